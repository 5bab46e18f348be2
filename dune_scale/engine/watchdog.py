"""Stall watchdog: a rank on which nothing completes for ``train.stall_timeout_s`` ends the job.

A stopped loader worker (SIGSTOP, a deadlock) blocks the training loop in the loader's queue, and a
stopped rank blocks every other rank in its next collective: without a watchdog either hangs the
job until the process group's timeout (30 minutes) or forever. The trainer beats at every batch it
receives and every step it completes (validation batches too); a daemon thread checks the time
since the last beat. On a stall it writes every thread's stack to ``stall_rank<R>.txt`` in the run
folder, says on stderr which rank and step and where to look, and ends the process with
:data:`EXIT_STALLED`: its loader workers die with it (they are killed when their parent exits), and
the launcher (torchrun, srun) ends the other ranks. Counting starts at the first completed step, so
compilation, teacher loading and a resume's conversion never count as a stall.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Exit code of a rank that stopped making progress (not 75: a requeue would stall again).
EXIT_STALLED = 70  # EX_SOFTWARE


class StallWatchdog:
    """Ends this process when no :meth:`beat` came for ``timeout_s`` after the first one."""

    def __init__(self, timeout_s: float, dump_path: Path, rank: int, end: Callable[[int], Any] = os._exit) -> None:
        """``end``: how the process ends (``os._exit``: the stuck main thread cannot unwind)."""
        self.timeout_s = timeout_s
        self.end = end
        self.dump_path = Path(dump_path)
        self.rank = rank
        self._last_beat: float | None = None  # monotonic time of the last beat; None: not armed yet
        self._step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dune-stall-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def beat(self, step: int | None = None) -> None:
        """Progress: a batch arrived or (``step``) an optimizer step completed, which arms it."""
        if step is not None:
            self._step = step
            self._last_beat = time.monotonic()
        elif self._last_beat is not None:
            self._last_beat = time.monotonic()

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(poll):
            last = self._last_beat
            if last is not None and time.monotonic() - last > self.timeout_s:
                self._fire(time.monotonic() - last)
                return

    def _fire(self, idle_s: float) -> None:
        """Dump every thread's stack, say so, and end the process (from this thread: the main one
        is the stuck one)."""
        where = f"every thread's stack is in {self.dump_path}"
        try:
            with open(self.dump_path, "w") as dump:
                dump.write(f"rank {self.rank}: nothing completed for {idle_s:.0f} s after step {self._step}\n\n")
                dump.flush()
                faulthandler.dump_traceback(dump, all_threads=True)
        except OSError as err:
            where = f"the stacks could not be written to {self.dump_path} ({err}); they follow"
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
        print(
            f"error: rank {self.rank} stalled: no batch and no optimizer step completed for {idle_s:.0f} s "
            f"(train.stall_timeout_s={self.timeout_s:g}) after step {self._step}; {where}. "
            f"Ending the job (exit code {EXIT_STALLED})",
            file=sys.stderr,
            flush=True,
        )
        self.end(EXIT_STALLED)
