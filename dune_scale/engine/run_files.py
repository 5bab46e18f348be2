"""The names of what a run folder holds, shared by the trainer, the checkpointer, the remote copy,
the run-folder checks, export and the programs: one place, so that a reader and a writer never
disagree on a name.

```
<run.output_dir>/config.yaml            the resolved config (CONFIG)
                 metrics.jsonl          one JSON record per logged step (METRICS)
                 student.safetensors    the full student at the end (STUDENT_WEIGHTS)
                 students/<name>/…      metrics and weights of each of several students
                 checkpoints/latest     the name of the latest complete checkpoint (CHECKPOINTS, LATEST)
                 checkpoints/step_N/    one checkpoint: COMPLETE manifest, trainer_state.pt,
                                        rank_R.pt, each student's strategy files
```
"""

from __future__ import annotations

from dune_scale.config import STUDENTS_FOLDER, student_subdir

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
STUDENT_WEIGHTS = "student.safetensors"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_PREFIX = "step_"

__all__ = [
    "CHECKPOINTS", "CHECKPOINT_PREFIX", "CONFIG", "LATEST", "MANIFEST", "METRICS", "STUDENTS_FOLDER", "STUDENT_WEIGHTS",
    "TRAINER_STATE", "checkpoint_name", "rank_state_file", "student_subdir",
]


def checkpoint_name(step: int) -> str:
    """The folder of the checkpoint saved after ``step`` (zero-padded: names sort by step)."""
    return f"{CHECKPOINT_PREFIX}{step:09d}"


def rank_state_file(rank: int) -> str:
    """The file of one rank's own components (its random streams) in a checkpoint folder."""
    return f"rank_{rank:05d}.pt"
