"""Second metrics sink (TensorBoard) and on-demand profiles, on the tiny CPU run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CPU, tiny_overrides
from dune_scale.cli.train import train
from dune_scale.config import ConfigError, load_config
from dune_scale.telemetry.metrics import read_metrics, scalar_tags


def test_scalar_tags_namespace_records_by_kind_and_dataset() -> None:
    assert scalar_tags({"step": 3, "kind": "train", "loss": 0.5, "grad_norm": None, "lr": 1e-3}) == {"loss": 0.5, "lr": 1e-3}
    tags = scalar_tags({"step": 3, "kind": "val", "dataset": "gldv2", "loss": 0.25, "images": 12})
    assert tags == {"val/gldv2/loss": 0.25, "val/gldv2/images": 12.0}


def test_tensorboard_event_files_hold_training_and_validation_scalars(tmp_path: Path, demo_shards: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_eval import val_sets

    out = tmp_path / "run"
    cfg = load_config(TINY_CPU, tiny_overrides(out, demo_shards, "train.max_steps=4", "eval.every_steps=2", "run.tensorboard=true"))

    def grey(encoder: object, images: object) -> np.ndarray:
        return np.full((len(images), 8, 8, 3), 128, dtype=np.uint8)

    train(cfg, val=val_sets(6), feature_pictures=grey)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "loss_mast3r_vitlarge_16", "val/all/loss", "val/synth_dino2/loss_dino2reg_vitlarge_14_cls"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/synth_mast3r/loss")] == [2, 4]
    assert set(events.Tags()["images"]) == {f"pictures/{i}" for i in range(4)}
    assert [e.step for e in events.Images("pictures/0")] == [2, 4]


def test_tensorboard_requested_but_missing_is_named(demo_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    from dune_scale.distributed import DistInfo
    from dune_scale.engine.compose import check_run

    cfg = load_config(TINY_CPU, [f"data.remote_root={demo_shards}", "run.tensorboard=true"])
    with pytest.raises(ConfigError, match="run.tensorboard=true needs the tensorboard package"):
        check_run(cfg, DistInfo())


def test_profile_steps_write_a_chrome_trace_of_those_steps(tmp_path: Path, demo_shards: Path) -> None:
    out = tmp_path / "run"
    train(load_config(TINY_CPU, tiny_overrides(out, demo_shards, "train.max_steps=2", "run.profile_steps=2:2",
                                               "run.tensorboard=false")))
    traces = list((out / "profiles").iterdir())
    assert [p.name for p in traces] == ["trace_steps_2-2_rank_00000.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(name.startswith("aten::") for name in names)
    assert not (out / "tensorboard").exists()


def test_wandb_gets_validation_under_its_dataset_and_the_feature_pictures(
    tmp_path: Path, demo_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    from test_eval import val_sets

    logged: list[tuple[int, dict]] = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: types.SimpleNamespace(log=lambda data, step: logged.append((step, data)), finish=lambda: None)
    fake.util = types.SimpleNamespace(generate_id=lambda: "run-x")
    fake.Image = lambda path: ("image", Path(path).name)
    fake.__spec__ = types.SimpleNamespace(name="wandb")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    cfg = load_config(TINY_CPU, tiny_overrides(out, demo_shards, "train.max_steps=2", "eval.every_steps=2",
                                               "run.wandb_project=dune", "run.tensorboard=false"))
    train(cfg, val=val_sets(6), feature_pictures=lambda encoder, images: np.zeros((2, 4, 4, 3), np.uint8))
    logged_at: dict[int, dict] = {}
    for step, data in logged:
        logged_at.setdefault(step, {}).update(data)
    # Every number of metrics.jsonl, and nothing else, at its step: training records under their own
    # names, the others under <kind>/<dataset>/ (validation per dataset, the pictures record's none).
    expected: dict[int, dict] = {}
    for record in read_metrics(out / "metrics.jsonl"):
        prefix = "" if record["kind"] == "train" else f"{record['kind']}/{record['dataset']}/"
        numbers = {f"{prefix}{key}": float(value) for key, value in record.items()
                   if key not in ("step", "kind", "dataset") and type(value) in (int, float)}
        expected.setdefault(record["step"], {}).update(numbers)
    assert {step: {k: v for k, v in data.items() if k != "pictures"} for step, data in logged_at.items()} == expected
    assert expected[2]["val/synth_dino2/loss_mast3r_vitlarge_16"] > 0 and expected[1]["loss"] > 0
    assert logged_at[2]["pictures"] == [("image", "step_000000002_0.png"), ("image", "step_000000002_1.png")]
