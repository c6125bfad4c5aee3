"""SIGTERM as "save and stop": the flag the Checkpointer turns into a committed save.

A TPU VM being preempted, `tpuctl kill` and a local pod's `down` all send SIGTERM first. The
first one only sets a flag, whenever it comes: while the run is still loading weights,
tokenizing or compiling, as well as between steps. The Checkpointer reads the flag at its next
`maybe_save`, saves that step and stops the run. A second SIGTERM ends the process at once.

jax's own preemption notifier would take SIGTERM from the process as soon as it joins a pod,
and keep it until the Checkpointer's handler replaced it: a SIGTERM in that window was lost
and the run trained on. `trainer.distributed` therefore turns that notifier off and calls
`watch` before it joins.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

_received = threading.Event()


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
