"""Preemption: SIGTERM / SIGUSR1 ask every rank to finish its step, save, and exit.

The handler only sets a flag. At each step boundary the ranks agree on it (max over ranks, on a
CPU "gloo" group so the GPU stream is never synchronised), so all ranks stop after the same step
even when the scheduler signalled only some of them. Further signals never cost the saved state:
before the stop checkpoint is complete they are noted and the run still saves; once it is complete
any signal (also during teardown) exits at once with the requeue code, and from the end of the
program on (interpreter shutdown, where Python would put back the default, deadly handler) further
stop signals are ignored and a deadline bounds the shutdown.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Exit code of a run that stopped on a signal after saving: the SLURM script requeues on it.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Longest a saved, stopping process may take to shut down before it is ended with EXIT_PREEMPTED.
PREEMPTED_EXIT_LIMIT_S = 30.0


class PreemptionWatcher:
    def __init__(self) -> None:
        self.signalled: int | None = None
        self.saved = False  # the checkpoint of the stop is complete
        self._previous: dict[int, object] = {}
        self._group = None

    def install(self) -> None:
        """Note stop signals from now on (the first thing a training program does: a signal during
        start-up then stops the run at the next safe point, with the requeue code). Signals that
        ``launch/train.py`` held back while it imported are delivered here."""
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def join_ranks(self) -> None:
        """Agree with the other ranks from now on (once the process group exists; collective)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def uninstall(self) -> None:
        """Restore the previous handlers; after a stop's save ours stay, so that a signal during the
        teardown that follows still exits with the requeue code."""
        if self.saved:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.saved:
            log.warning("%s after the checkpoint was saved: exiting now", name)
            os._exit(EXIT_PREEMPTED)
        if self.signalled is not None:
            log.warning("%s again: already stopping; the checkpoint is saved first, then the run exits", name)
            return
        self.signalled = signum
        log.warning("received %s: will save and exit after the current step", name)

    def mark_saved(self) -> None:
        """The stop's checkpoint is complete: from now on a signal may end the process at once."""
        self.saved = True

    def should_stop(self) -> bool:
        """Collective on every rank: did any rank receive a stop signal?"""
        flag = torch.tensor([1 if self.signalled is not None else 0], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())


def guard_preempted_exit() -> None:
    """For the last moments of a process that saved and is exiting with the requeue code.

    At interpreter shutdown Python resets its handlers to the default, so a late SIGTERM would
    turn exit code 75 into a kill (143) and the job would not be requeued: stop signals are
    ignored from here on. Ignoring them must not let a stuck shutdown (a thread that never joins,
    an exit hook that never returns) hang the job, so a daemon timer ends the process with 75 after
    ``PREEMPTED_EXIT_LIMIT_S``."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    deadline = threading.Timer(PREEMPTED_EXIT_LIMIT_S, os._exit, args=(EXIT_PREEMPTED,))
    deadline.daemon = True
    deadline.start()
