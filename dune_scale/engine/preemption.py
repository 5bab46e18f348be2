"""Preemption: SIGTERM / SIGUSR1 ask every rank to finish its step, save, and exit.

The handler only sets a flag. At each step boundary the ranks agree on it (max over ranks, on a
CPU "gloo" group so the GPU stream is never synchronised), so all ranks stop after the same step
even when the scheduler signalled only some of them. A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Exit code of a run that stopped on a signal after saving: the SLURM script requeues on it.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
EXIT_SECOND_SIGNAL = 143
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    def __init__(self) -> None:
        self.signalled: int | None = None
        self._previous: dict[int, object] = {}
        self._group = None

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signalled is not None:
            log.warning("second signal %s: exiting now without saving", signal.Signals(signum).name)
            os._exit(EXIT_SECOND_SIGNAL)
        self.signalled = signum
        log.warning("received %s: will save and exit after the current step", signal.Signals(signum).name)

    def should_stop(self) -> bool:
        """Collective on every rank: did any rank receive a stop signal?"""
        flag = torch.tensor([1 if self.signalled is not None else 0], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
