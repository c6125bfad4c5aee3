"""trainer.preemption: the first SIGTERM is a flag, the second ends the process; watching is
undone only by the one who started it. In a child process: the flag lasts for a process's life."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import os, signal
from trainer import preemption

assert preemption.watch() is signal.SIG_DFL  # replaced the default action
assert preemption.watch() is None  # already watching: the Checkpointer's watch changes nothing
preemption.unwatch(None)  # ... and neither does its unwatch
os.kill(os.getpid(), signal.SIGTERM)
print("after the first SIGTERM", preemption.received(), flush=True)
os.kill(os.getpid(), signal.SIGTERM)
print("not reached", flush=True)
"""


def test_the_first_sigterm_sets_the_flag_and_the_second_ends_the_process():
    child = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert child.stderr == ""
    assert child.stdout == "after the first SIGTERM True\n"
    assert child.returncode == -signal.SIGTERM


def test_unwatch_gives_sigterm_back():
    from trainer import preemption

    previous = signal.getsignal(signal.SIGTERM)
    replaced = preemption.watch()
    assert signal.getsignal(signal.SIGTERM) is not previous
    preemption.unwatch(replaced)
    assert signal.getsignal(signal.SIGTERM) is previous
    assert not preemption.received()
