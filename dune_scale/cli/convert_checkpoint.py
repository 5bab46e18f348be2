"""``python launch/convert_checkpoint.py CHECKPOINT``: a checkpoint made loadable on any number of ranks.

A run resumed on another number of ranks converts its checkpoint by itself when its strategy needs
it (DeepSpeed's ZeRO files → a universal checkpoint; rank 0 converts, the others wait); this does the
same ahead of time, e.g. on a CPU node with more workers, so the resumed job starts at once.
CHECKPOINT is a checkpoint folder (``.../checkpoints/step_N``) or a run folder (its latest intact
checkpoint). The strategy the checkpoint records converts each student's part (for DeepSpeed into
``deepspeed_universal/`` beside the ZeRO files, which stay as they are); a strategy whose files load
on any rank count as written (single, FSDP) has nothing to convert.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dune_scale.cli.common import run_program
from dune_scale.config import resolve_student_dicts
from dune_scale.distributed import DistInfo
from dune_scale.engine.checkpointer import Checkpointer, CheckpointError, read_trainer_state, verify
from dune_scale.engine.run_files import CHECKPOINTS, student_subdir
from dune_scale.engine.strategies import STRATEGIES


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
        record = read_trainer_state(folder)["run"]
        name = record.get("layout", {}).get("strategy")
        if name not in STRATEGIES:
            raise CheckpointError(f"{folder}: written by strategy {name!r}, which is not one of {', '.join(STRATEGIES)}")
        parts = [folder / student_subdir(student) for student, _ in resolve_student_dicts(record["config"])]
        done = [STRATEGIES[name].convert_for_any_rank_count(part, max(1, args.workers)) for part in parts]
        if None in done:
            raise CheckpointError(f"{folder} was written by strategy.name={name}, whose checkpoints load on any number "
                                  "of ranks as they are: nothing to convert")
        for line in done:
            print(line)
        return 0

    return run_program(program)
