"""Pickle-based files are read without running code: only the allow-listed globals resolve."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dune_scale.safe_load import (
    RefusedGlobal,
    UnreadableCheckpoint,
    load_pickle,
    numpy_globals,
    official_training_globals,
    plain_globals,
    torch_load,
)


class _Payload:
    """Unpickling this calls ``os.system`` (creates ``marker``): what a planted file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_a_payload_never_runs_and_the_refusal_names_the_global(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    plain = tmp_path / "list.pkl"
    plain.write_bytes(pickle.dumps({"images": ["a.jpg"], "evil": _Payload(marker)}))
    checkpoint = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2), "evil": _Payload(marker)}, checkpoint)
    with pytest.raises(RefusedGlobal, match=r"posix\.system|os\.system"):
        load_pickle(plain, {**plain_globals(), **numpy_globals()})
    with pytest.raises(RefusedGlobal, match=r"posix\.system|os\.system"):
        torch_load(checkpoint, official_training_globals())
    assert not marker.exists()


def test_numpy_arrays_and_scalars_load_under_numpy_2_and_numpy_1_names(tmp_path: Path) -> None:
    value = {"lr": np.float64(1.5e-4), "schedule": np.linspace(0, 1, 5), "ids": np.arange(3, dtype=np.int32), "names": np.array(["a", "bc"])}
    data = pickle.dumps(value, protocol=2)
    assert b"numpy._core.multiarray" in data
    for name, blob in (("np2.pkl", data), ("np1.pkl", data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))):
        (tmp_path / name).write_bytes(blob)
        loaded = load_pickle(tmp_path / name, {**plain_globals(), **numpy_globals()})
        assert loaded["lr"] == value["lr"] and loaded["lr"].dtype == np.float64
        np.testing.assert_array_equal(loaded["schedule"], value["schedule"])
        np.testing.assert_array_equal(loaded["ids"], value["ids"])
        np.testing.assert_array_equal(loaded["names"], value["names"])


def test_numpy_is_allowed_class_by_class_never_as_a_module(tmp_path: Path) -> None:
    """numpy holds functions that evaluate strings; naming one is refused like any other global."""
    blob = pickle.dumps(np.float64(1.0), protocol=2).replace(b"numpy._core.multiarray\nscalar", b"numpy.lib.utils\nsafe_eval")
    (tmp_path / "eval.pkl").write_bytes(blob)
    with pytest.raises(RefusedGlobal, match="numpy.lib.utils.safe_eval"):
        load_pickle(tmp_path / "eval.pkl", numpy_globals())


def test_official_training_objects_load_from_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(lr_schedule=np.linspace(0, 1e-3, 4), layers=[1, 2])
    torch.save({"model": {"module.w": torch.ones(2)}, "optimizer": {"param_groups": [{"lr": np.float64(1e-3)}]}, "args": args}, path)
    with pytest.raises(RefusedGlobal, match="argparse.Namespace|numpy"):
        torch_load(path)
    loaded = torch_load(path, official_training_globals())
    assert loaded["optimizer"]["param_groups"][0]["lr"] == 1e-3
    np.testing.assert_array_equal(loaded["args"].lr_schedule, args.lr_schedule)


def test_a_file_that_is_not_a_pickle_is_one_clear_error_without_unsafe_advice(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    for read in (lambda: torch_load(junk), lambda: load_pickle(junk, plain_globals())):
        with pytest.raises(UnreadableCheckpoint) as caught:
            read()
        assert "weights_only=False" not in str(caught.value)
