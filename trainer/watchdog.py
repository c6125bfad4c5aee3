"""`train.stall_timeout_s`: end the run when its training loop stops making progress.

A process that hangs without dying (a file read or write that never returns, a collective
waiting on a process that is itself stuck) keeps the whole pod busy doing nothing: jax's
heartbeats still flow, so `distributed.PodWatch` sees no lost process, and a `tpuctl run`
would wait for ever. Each process therefore watches its own loop: when no iteration (a step,
its logging, eval and checkpoint save) has completed for `stall_timeout_s` seconds, nor after
the last one what ends the run (the final save, its commit and DONE), it prints
every thread's Python stack to stderr (which shows where it hangs) and ends every process of
the run with one line and `EXIT_STALLED`, as a failed save does. `tpuctl babysit` then
relaunches the run as a failure, from its last committed checkpoint.

The clock starts once the training step is compiled: compiling it, building the token cache
and restoring a checkpoint come before the loop and report their own progress.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MAX_POLL_S = 5.0


def stalled(last_progress: float, now: float, timeout_s: float) -> bool:
    """Whether a loop last seen making progress at `last_progress` is stalled at `now`
    (never, with a timeout of 0)."""
    return timeout_s > 0 and now - last_progress > timeout_s


class Watchdog:
    """Calls `on_stall(last, idle_s)` once, from its own thread, when `progress` has not been
    called for more than `timeout_s` seconds; `last` is what the last call said."""

    def __init__(
        self,
        timeout_s: float,
        on_stall: Callable[[str, float], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout_s, self.on_stall, self.clock = timeout_s, on_stall, clock
        self._seen = ("the start of the loop", clock())  # one assignment: read whole
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)

    def start(self) -> None:
        """Watch from now on, in a thread of its own (nothing with a timeout of 0)."""
        if self.timeout_s > 0:
            self._seen = (self._seen[0], self.clock())
            self._thread.start()

    @property
    def watching(self) -> bool:
        """Whether its thread is watching (it stops after reporting, or once stopped)."""
        return self._thread.is_alive()

    def progress(self, what: str) -> None:
        self._seen = (what, self.clock())

    def stop(self) -> None:
        self._stopped.set()

    def check(self) -> bool:
        """Call `on_stall` if the loop is stalled now; True when it did (the thread then
        stops: a stall is reported once)."""
        last, at = self._seen
        now = self.clock()
        if stalled(at, now, self.timeout_s) and not self._stopped.is_set():
            self.on_stall(last, now - at)
            return True
        return False

    def _watch(self) -> None:
        poll_s = min(MAX_POLL_S, self.timeout_s / 10)
        while not self._stopped.wait(poll_s):
            if self.check():
                return
