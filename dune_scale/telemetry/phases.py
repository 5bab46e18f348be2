"""Where a step's time goes: named phases timed with CUDA events (GPU) or the wall clock (CPU).

The trainer wraps its phases in ``timer.phase(name)``; the default :class:`NullPhaseTimer` costs
nothing, so the benchmark measures the very step that training runs.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class NullPhaseTimer:
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


class PhaseTimer(NullPhaseTimer):
    """Accumulates seconds per phase. On CUDA, events are recorded without synchronising and read
    in :meth:`collect` (call it once per step, after the step); on CPU phases are timed directly."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            begin = time.perf_counter()
            yield
            self.totals[name] += time.perf_counter() - begin

    def collect(self) -> None:
        if self._events:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self.totals[name] += start.elapsed_time(end) / 1000.0
            self._events.clear()

    def reset(self) -> None:
        self.collect()
        self.totals.clear()
