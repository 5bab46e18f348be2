"""``python launch/convert_checkpoint.py CHECKPOINT``: DeepSpeed ZeRO files → a universal checkpoint.

A run resumed on another number of ranks converts its checkpoint by itself (rank 0, the others
wait); this does the same ahead of time, e.g. on a CPU node with more workers, so the resumed job
starts at once. CHECKPOINT is a checkpoint folder (``.../checkpoints/step_N``) or a run folder (its
latest intact checkpoint). The result goes into the checkpoint folder (``deepspeed_universal/``;
for a run of several students, into each student's part ``students/<name>/``); the ZeRO files stay
as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dune_scale.cli.common import run_program
from dune_scale.config import STUDENTS_FOLDER
from dune_scale.distributed import DistInfo
from dune_scale.engine.checkpointer import Checkpointer, CheckpointError, verify
from dune_scale.engine.run_files import CHECKPOINTS
from dune_scale.engine.strategies.deepspeed import ZERO_TAG
from dune_scale.engine.universal import UNIVERSAL_FOLDER, convert_to_universal, zero_files_layout


def checkpoint_folder(source: Path) -> Path:
    """The intact checkpoint folder ``source`` names (itself, or a run folder's latest one)."""
    if (source / CHECKPOINTS).is_dir():
        latest = Checkpointer(source / CHECKPOINTS, 1, 1, DistInfo()).find_latest()
        if latest is None:
            raise CheckpointError(f"{source} holds no checkpoint")
        return latest
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a checkpoint folder or a run folder (no such directory)")
    problems = verify(source, DistInfo())
    if problems:
        raise CheckpointError(f"{source} cannot be converted: " + "; ".join(problems))
    return source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder (step_N) or run folder (its latest checkpoint)")
    parser.add_argument("--workers", type=int, default=4, help="processes that convert in parallel (default 4)")
    args = parser.parse_args(argv)

    def program() -> int:
        folder = checkpoint_folder(args.checkpoint)
        parts = [folder] + sorted((folder / STUDENTS_FOLDER).glob("*"))  # the student, or each of several
        parts = [part for part in parts if (part / ZERO_TAG).is_dir()]
        if not parts:
            raise CheckpointError(
                f"{folder} was not written by strategy.name=deepspeed; only ZeRO files need converting "
                "(FSDP's checkpoints reshard to any rank count by themselves)"
            )
        for part in parts:
            universal = part / UNIVERSAL_FOLDER
            if universal.is_dir():
                print(f"{universal} exists already")
                continue
            ranks, stage = zero_files_layout(part / ZERO_TAG)
            convert_to_universal(part / ZERO_TAG, universal, workers=max(1, args.workers))
            print(f"converted the ZeRO-{stage} files of {ranks} rank(s) in {part} to {universal}; resume on any number of ranks")
        return 0

    return run_program(program)
