"""Checkpoints: one folder per save, written atomically, with a ``latest`` pointer.

A save goes to a hidden temporary folder; every rank writes its part; rank 0 then writes a
manifest (``COMPLETE``: every file and its size), fsyncs, renames the folder into place and only
then moves ``latest``. A folder without a matching manifest is never resumed from, so a job killed
in the middle of a save falls back to the previous complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dune_scale.distributed import DistInfo, barrier
from dune_scale.engine.strategies import Strategy

log = logging.getLogger(__name__)

MANIFEST = "COMPLETE"
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (named in the message)."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _manifest(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def is_complete(folder: Path) -> bool:
    """The manifest exists and every file it lists is there with its recorded size."""
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in listed.items())


class Checkpointer:
    def __init__(self, root: Path, keep_last: int, dist: DistInfo) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.dist = dist

    def folder_for(self, step: int) -> Path:
        return self.root / f"step_{step:09d}"

    def save(self, step: int, strategy: Strategy, trainer_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Collective save; returns the final folder."""
        final = self.folder_for(step)
        tmp = self.root / f".tmp_step_{step:09d}"
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        strategy.save(tmp)
        torch.save(rank_state, tmp / f"rank_{self.dist.rank:05d}.pt")
        if self.dist.is_main:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        barrier()
        if self.dist.is_main:
            for path in tmp.rglob("*"):
                if path.is_file():
                    _fsync_path(path)
            _write_atomic(tmp / MANIFEST, json.dumps({"step": step, "files": _manifest(tmp)}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_path(self.root)
            _write_atomic(self.root / LATEST, final.name + "\n")
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        complete = [p for p in self.completed() if p.name != (self.root / LATEST).read_text().strip()]
        for stale in complete[: max(0, len(complete) - (self.keep_last - 1))]:
            shutil.rmtree(stale, ignore_errors=True)

    def completed(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        return [p for p in sorted(self.root.glob("step_*")) if p.is_dir() and is_complete(p)]

    def find_latest(self) -> Path | None:
        """The folder ``latest`` names if complete, else the newest complete one (with a warning)."""
        pointer = self.root / LATEST
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if is_complete(named):
                return named
            log.warning("checkpoint %s named by %s is incomplete or corrupt; looking for an older one", named, pointer)
        for folder in sorted(self.root.glob("step_*"), reverse=True) if self.root.is_dir() else []:
            if is_complete(folder):
                return folder
            log.warning("skipping incomplete or corrupt checkpoint %s", folder)
        return None

    def load(self, folder: Path, strategy: Strategy) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore the strategy; returns (trainer state, this rank's state)."""
        if not is_complete(folder):
            raise CheckpointError(f"checkpoint {folder} is incomplete or corrupt (its {MANIFEST} manifest does not match)")
        trainer_state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
        rank_file = folder / f"rank_{self.dist.rank:05d}.pt"
        # A rank that did not exist at save time (resumed on more ranks) starts from fresh RNG streams.
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=True) if rank_file.is_file() else {}
        strategy.load(folder)
        return trainer_state, rank_state
