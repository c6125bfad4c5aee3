"""SIGTERM (a TPU VM's preemption, `tpuctl kill`, a local pod's `down`): stop, keeping the work.

- While the run is starting up (reading the recipe, importing jax, joining the pod, loading
  weights, tokenizing, compiling) there is nothing new to keep: the first SIGTERM ends the run at once (`while_starting`),
  with `EXIT_PREEMPTED`, which tpuctl resumes like any other stop of that kind.
- Once it trains (`started`), the first SIGTERM only sets a flag: the Checkpointer reads it
  at its next `maybe_save`, saves that step and the run exits with `EXIT_PREEMPTED`.
- A second SIGTERM ends the process at once.

jax's own preemption notifier would take SIGTERM from the process as soon as it joins a pod
and keep it: a SIGTERM then was lost and the run trained on. `trainer.distributed` turns it
off; `python -m trainer` calls `watch` first thing, before the recipe or jax.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

_received = threading.Event()
_starting_lock = threading.Lock()
_starting = False
_stop: Callable[[], Any] | None = None  # while_starting's
_stopper: threading.Thread | None = None  # the thread that calls it


def _on_sigterm(signum: int, frame: Any) -> None:
    if _received.is_set():  # a second SIGTERM: stop now
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    _received.set()


def watch() -> Any:
    """Take SIGTERM from here on (from the main thread only: Python sets handlers there).
    Returns the handler this replaced, for `unwatch`; None when nothing changed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    return None if previous is _on_sigterm else previous


def unwatch(previous: Any) -> None:
    """Give SIGTERM back to the handler `watch` returned (nothing when it returned None)."""
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def received() -> bool:
    """True once this process got SIGTERM while watching."""
    return _received.is_set()


def while_starting(stop: Callable[[], Any]) -> None:
    """Until `started`, a SIGTERM (one already received included) calls `stop`, which ends
    the process. It runs in a thread of its own, not in the signal handler, which interrupts
    the main thread anywhere (inside a print, holding a lock). A later call replaces `stop`:
    the entry point watches from its first line, and joining the pod brings a `stop` that
    ends every process."""
    global _starting, _stop, _stopper
    with _starting_lock:
        _starting, _stop = True, stop
        if _stopper is None:
            _stopper = threading.Thread(
                target=_stop_if_starting, name="sigterm-while-starting", daemon=True
            )
            _stopper.start()


def _stop_if_starting() -> None:
    _received.wait()
    with _starting_lock:
        if _starting and _stop is not None:
            _stop()


def wait_if_stopping(timeout_s: float) -> None:
    """When a SIGTERM came while starting up, wait (at most `timeout_s`) for `stop` to end the
    process: an error it causes meanwhile (the token cache's worker processes die of the same
    SIGTERM) is part of that stop, not a crash of its own."""
    if _starting and _received.is_set() and _stopper is not None:
        _stopper.join(timeout_s)


def started() -> None:
    """The run trains from here on: a SIGTERM now means save this step and stop."""
    global _starting
    with _starting_lock:
        _starting = False
