"""DeepSpeed universal checkpoints: resuming ZeRO on another number of ranks.

ZeRO files hold each rank's flat partition of the fp32 weights and Adam moments, cut for the rank
count (and stage) that wrote them. DeepSpeed's converter (``deepspeed.checkpoint.ds_to_universal``)
rewrites them per parameter (fp32 weight, exp_avg, exp_avg_sq, step), which any rank count loads
(``checkpoint.load_universal``). The conversion goes to a hidden folder inside the checkpoint folder
and is renamed into place when complete: the ZeRO files and the manifest stay as written, a job
killed mid-conversion leaves nothing that looks usable, and a later resume reuses the result.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dune_scale.distributed import DistInfo
from dune_scale.engine.checkpoint_files import CheckpointError, deepspeed_loads, read_torch_file
from dune_scale.files import fsync_path

log = logging.getLogger(__name__)

UNIVERSAL_FOLDER = "deepspeed_universal"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The converter prints every step and draws progress bars: keep them out of the run's log."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def saved_model_state(zero_folder: Path) -> dict[str, Any]:
    """DeepSpeed's model-state file of ``zero_folder`` (rank 0's under ZeRO-3), memory-mapped: what
    is not read (the weights) costs nothing. Tensors and plain containers only (``weights_only``):
    a checkpoint never unpickles objects."""
    model_files = sorted(zero_folder.glob("*model_states.pt"))
    if not model_files:
        raise FileNotFoundError(f"{zero_folder} holds no DeepSpeed model-state file (*model_states.pt)")
    return read_torch_file(model_files[0], mmap=True)


def zero_files_layout(zero_folder: Path) -> tuple[int, int]:
    """(ranks, ZeRO stage) that the ZeRO files in ``zero_folder`` were written for."""
    state = saved_model_state(zero_folder)
    return int(state["dp_world_size"]), int(state["ds_config"]["zero_optimization"]["stage"])


def convert_to_universal(zero_folder: Path, universal_root: Path, workers: int = 1) -> Path:
    """Convert the ZeRO files of ``zero_folder`` (DeepSpeed's tag folder) into ``universal_root``
    (atomically: a temporary sibling renamed into place); returns ``universal_root``, whose
    ``zero_folder.name`` tag folder DeepSpeed loads. ``workers`` > 1 converts in child processes."""
    from deepspeed.checkpoint import ds_to_universal

    tmp = universal_root.parent / f".{universal_root.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # inject_missing_state: a plain model (not Megatron's) does not record the universal-format version.
    args = argparse.Namespace(
        input_folder=str(zero_folder), output_folder=str(tmp / zero_folder.name), num_extract_workers=workers,
        num_merge_workers=workers, keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    with _quiet(), deepspeed_loads():
        ds_to_universal.main(args)
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_path(path)
    os.replace(tmp, universal_root)
    fsync_path(universal_root.parent)
    return universal_root


def ensure_universal(checkpoint_folder: Path, zero_folder: Path, dist: DistInfo) -> Path:
    """The universal form of ``zero_folder`` inside ``checkpoint_folder``, converted by rank 0 if it
    is not there yet while the other ranks wait (collective; a failed conversion raises on every
    rank rather than leaving them waiting, as one :class:`CheckpointError`)."""
    universal_root = checkpoint_folder / UNIVERSAL_FOLDER
    problem = None
    if dist.is_main and not universal_root.is_dir():
        log.info("converting %s to a DeepSpeed universal checkpoint in %s", zero_folder, universal_root)
        try:
            convert_to_universal(zero_folder, universal_root)
        except CheckpointError as err:  # reported on every rank below
            problem = str(err)
        except Exception as err:
            problem = f"{type(err).__name__}: {err}"
    if dist.world_size > 1 and torch.distributed.is_initialized():
        shared = [problem]
        torch.distributed.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        raise CheckpointError(f"converting {zero_folder} to a DeepSpeed universal checkpoint failed: {problem}")
    return universal_root
