"""Non-finite losses and gradients: found on the device every step, acted on at the next host sync.

Each step produces a device flag per teacher (its loss is not finite on some rank) and one for the
gradient norm; the strategy skips that step's update on the device (no host sync), so the weights
stay finite whatever happens. The flags are read when the trainer syncs anyway (log steps) and
always before a save: ``train.nonfinite=stop`` then ends the run naming the step and the teacher,
``skip`` tolerates up to ``train.max_nonfinite_skips`` consecutive skipped steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dune_scale.distributed import all_reduce_sum

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training met non-finite losses or gradients beyond what ``train.nonfinite`` allows."""


def nonfinite_loss_flags(teacher_losses: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Per teacher, then for the total loss: 1 where it is not finite on any rank (a device
    collective, so every rank takes the same decision)."""
    flags = ~torch.isfinite(torch.cat([teacher_losses.detach().float(), loss.detach().float().reshape(1)]))
    return all_reduce_sum(flags.float()) > 0


@dataclass
class StepFlags:
    """One step's device flags, kept until the next check."""

    step: int
    losses: torch.Tensor  # (teachers + 1,) bool: each teacher's loss, then the total
    skipped: torch.Tensor  # () bool: the update was skipped (a loss or the grad norm not finite)


class NonFiniteGuard:
    """Applies ``train.nonfinite`` to the flags of the steps since the last check."""

    def __init__(self, policy: str, max_consecutive_skips: int, teacher_names: list[str]) -> None:
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.teacher_names = teacher_names
        self.consecutive = 0
        self._unchecked: list[StepFlags] = []
        self._skips_to_report = 0

    def record(self, step: int, loss_flags: torch.Tensor, skipped: torch.Tensor) -> None:
        self._unchecked.append(StepFlags(step, loss_flags, skipped))

    def describe(self, flags: StepFlags, losses: list[bool]) -> str:
        bad = [name for name, flag in zip(self.teacher_names, losses) if flag]
        if bad:
            what = f"the loss of teacher {', '.join(bad)} is not finite"
        elif losses[-1]:
            what = "the loss is not finite"
        else:
            what = "the gradient norm is not finite (every loss was)"
        return f"step {flags.step}: {what}"

    def take_skip_count(self) -> int:
        """Steps skipped since the previous call (for the metrics record)."""
        count, self._skips_to_report = self._skips_to_report, 0
        return count

    def check(self) -> None:
        """Host sync: act on the steps since the last check (collective-free: the flags already
        agree on every rank, so every rank takes the same decision)."""
        if not self._unchecked:
            return
        pending, self._unchecked = self._unchecked, []
        skipped = torch.stack([f.skipped for f in pending]).tolist()
        losses = torch.stack([f.losses for f in pending]).tolist()
        for flags, was_skipped, loss_flags in zip(pending, skipped, losses):
            if not was_skipped:
                self.consecutive = 0
                continue
            self._skips_to_report += 1
            self.consecutive += 1
            problem = self.describe(flags, loss_flags)
            if self.policy == "stop":
                raise NonFiniteError(
                    f"{problem}; its update was not applied and training stops (train.nonfinite=stop). "
                    "The checkpoints hold finite weights; train.nonfinite=skip skips such steps instead"
                )
            if self.consecutive > self.max_consecutive_skips:
                raise NonFiniteError(
                    f"{problem}; that is {self.consecutive} consecutive skipped updates, more than "
                    f"train.max_nonfinite_skips={self.max_consecutive_skips}: training stops. "
                    "The checkpoints hold finite weights"
                )
            log.warning("%s; update skipped (%d in a row, train.nonfinite=skip)", problem, self.consecutive)

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
