"""An earlier run in the run folder is never thrown away behind the user's back.

``checkpoint.resume=auto`` finding no checkpoint starts a new run; that is only right when the folder
shows no earlier progress. When ``checkpoints/latest`` or a ``metrics.jsonl`` says a checkpoint had
been written and none is left (deleted, moved, an unmounted disk), starting from step 0 would
truncate the metrics and overwrite the student: the run is refused instead. Starting over is
``checkpoint.resume=never``, which moves the earlier run's files into ``previous_<time>/``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from dune_scale.config import CheckpointConfig
from dune_scale.engine.checkpoint_files import CheckpointError
from dune_scale.engine.run_files import CHECKPOINT_PREFIX, CHECKPOINTS, LATEST, METRICS, STUDENTS_FOLDER

log = logging.getLogger(__name__)

PREVIOUS_PREFIX = "previous_"


def _last_step(metrics: Path) -> int:
    """The highest step a metrics file records (0 without one); a line cut short by a kill is skipped."""
    last = 0
    for line in metrics.read_text().splitlines():
        try:
            last = max(last, int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return last


def earlier_progress(output_dir: Path, checkpoint: CheckpointConfig) -> list[str]:
    """What in ``output_dir`` shows that a checkpoint had been written: the ``latest`` pointer, or
    a metrics file with a step after which a save must have completed (a run killed before its
    first save leaves steps no checkpoint held, and starts again from zero)."""
    found = []
    pointer = output_dir / CHECKPOINTS / LATEST
    if pointer.is_file() or pointer.is_symlink():
        found.append(f"{pointer} (it names {pointer.read_text().strip() if pointer.is_file() else os.readlink(pointer)})")
    # A synchronous save of step N completes before step N + 1 is logged; an async one before the next save.
    saved_by = checkpoint.every_steps * (2 if checkpoint.async_save else 1)
    metrics = [output_dir / METRICS, *sorted((output_dir / STUDENTS_FOLDER).glob(f"*/{METRICS}"))]
    for path in metrics:
        if path.is_file() and (last := _last_step(path)) > saved_by:
            found.append(f"{path} (steps up to {last}, checkpoint.every_steps={checkpoint.every_steps})")
    return found


def refuse_silent_start_over(output_dir: Path, checkpoint: CheckpointConfig) -> None:
    """Raise :class:`CheckpointError` when ``output_dir`` shows earlier progress but no checkpoint
    is left to resume from (called once ``checkpoint.resume=auto`` found none)."""
    found = earlier_progress(output_dir, checkpoint)
    if found:
        raise CheckpointError(
            f"run.output_dir={output_dir} shows earlier progress:\n  " + "\n  ".join(found)
            + f"\nbut no checkpoint is left to resume from (no complete {output_dir / CHECKPOINTS}/{CHECKPOINT_PREFIX}* folder);"
            " restore the checkpoints, or start over with checkpoint.resume=never (the earlier files are moved to "
            f"{output_dir}/{PREVIOUS_PREFIX}<time>/), or use a new run.output_dir"
        )


def move_aside(output_dir: Path) -> Path | None:
    """``checkpoint.resume=never``: move everything of the earlier run (all but earlier
    ``previous_*`` folders) into a new ``previous_<time>`` folder; returns it (None: nothing there)."""
    if not output_dir.is_dir():
        return None
    earlier = [p for p in sorted(output_dir.iterdir()) if not p.name.startswith(PREVIOUS_PREFIX)]
    if not earlier:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    destination = output_dir / f"{PREVIOUS_PREFIX}{stamp}"
    suffix = 1
    while destination.exists():
        suffix += 1
        destination = output_dir / f"{PREVIOUS_PREFIX}{stamp}_{suffix}"
    destination.mkdir()
    for path in earlier:
        os.replace(path, destination / path.name)
    log.warning("checkpoint.resume=never: the earlier run's files (%d entries) were moved to %s", len(earlier), destination)
    return destination
