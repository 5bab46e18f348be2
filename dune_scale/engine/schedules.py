"""Step-indexed schedules: learning rate, weight decay, teacher-norm momentum.

Pure functions of the step, so a resumed run recomputes them exactly and nothing needs saving. The
values are those of naver/dune's ``cosine_scheduler`` (a numpy array indexed by the iteration),
computed in the same order of float operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step total_steps, and after)."""
    done = min(max(step, 0), total_steps)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * done / max(total_steps, 1)))


def warmup_cosine(step: int, total_steps: int, peak: float, final: float, warmup_steps: int) -> float:
    """Warm-up ``np.linspace(0, peak, warmup_steps)`` (step warmup_steps − 1 is already at the peak),
    then the cosine peak → final over the remaining steps, as the official schedule."""
    if step < warmup_steps - 1:
        return step * (peak / (warmup_steps - 1))  # numpy's linspace: index × (stop − start) / (num − 1)
    if step == warmup_steps - 1:
        return 0.0 if warmup_steps == 1 else peak  # linspace(0, peak, 1) is [0]
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


@dataclass(frozen=True)
class Schedules:
    total_steps: int
    peak_lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum_start: float
    momentum_end: float

    def lr(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.peak_lr, self.min_lr, self.warmup_steps)

    def weight_decay_at(self, step: int) -> float:
        return cosine(step, self.total_steps, self.weight_decay, self.weight_decay_end)

    def norm_momentum(self, step: int) -> float:
        return cosine(step, self.total_steps, self.momentum_start, self.momentum_end)
