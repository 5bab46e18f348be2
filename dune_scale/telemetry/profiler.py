"""On-demand profiling of a few steps (``run.profile_steps=A:B``): a torch.profiler trace that Chrome
(chrome://tracing) and Perfetto open, and on GPU a CUDA memory snapshot (pytorch.org/memory_viz).

Steps are numbered as in ``metrics.jsonl`` (the first step is 1); each rank writes its own files under
``<output_dir>/profiles/``. A run resumed inside the window profiles the rest of it; a run that
stops inside it writes what it recorded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PROFILES_FOLDER = "profiles"
# Allocation events the CUDA memory history keeps (the snapshot shows the last ones).
MEMORY_HISTORY_EVENTS = 100_000


class StepProfiler:
    def __init__(self, steps: tuple[int, int] | None, output_dir: Path, rank: int, device: torch.device) -> None:
        self.steps = steps
        self.folder = Path(output_dir) / PROFILES_FOLDER
        self.rank = rank
        self.cuda = device.type == "cuda"
        self._profiler: torch.profiler.profile | None = None

    @contextlib.contextmanager
    def around(self, step: int) -> Iterator[None]:
        """Wrap optimizer step number ``step`` (1-based)."""
        if self.steps is not None and self._profiler is None and self.steps[0] <= step <= self.steps[1]:
            self._start()
        yield
        if self._profiler is not None and step >= self.steps[1]:
            self.finish()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_EVENTS)
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self._profiler.__enter__()

    def finish(self) -> None:
        """Stop and write the files (no-op when not profiling)."""
        if self._profiler is None:
            return
        self._profiler.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"steps_{self.steps[0]}-{self.steps[1]}_rank_{self.rank:05d}"
        trace = self.folder / f"trace_{name}.json"
        self._profiler.export_chrome_trace(str(trace))
        self._profiler = None
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.folder / f"memory_{name}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        log.info("profile of steps %d-%d written to %s", *self.steps, trace)
