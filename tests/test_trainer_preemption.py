"""trainer.preemption: while starting up the first SIGTERM ends the run; once it trains, the
first one is a flag and the second ends the process; watching is undone only by whoever
started it. The SIGTERM cases run in a child process: the flag lasts for a process's life."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from trainer import preemption
from trainer.preemption import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parent.parent


def _child(body: str) -> subprocess.CompletedProcess:
    prelude = "import os, signal, sys, threading\nfrom trainer import preemption\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + body],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_first_sigterm_sets_the_flag_and_the_second_ends_the_process():
    child = _child("""
assert preemption.watch() is signal.SIG_DFL  # replaced the default action
assert preemption.watch() is None  # already watching: the Checkpointer's watch changes nothing
preemption.unwatch(None)  # ... and neither does its unwatch
os.kill(os.getpid(), signal.SIGTERM)
print("after the first SIGTERM", preemption.received(), flush=True)
os.kill(os.getpid(), signal.SIGTERM)
print("not reached", flush=True)
""")
    assert (child.stdout, child.stderr) == ("after the first SIGTERM True\n", "")
    assert child.returncode == -signal.SIGTERM


def test_a_sigterm_while_starting_calls_stop_and_one_after_started_does_not():
    stop = "lambda: (print('stopped', flush=True), os._exit(preemption.EXIT_PREEMPTED))"
    starting = _child(f"""
preemption.watch()
preemption.while_starting({stop})
os.kill(os.getpid(), signal.SIGTERM)
threading.Event().wait(50)  # the start-up goes on until stop ends the process
""")
    assert (starting.stdout, starting.returncode) == ("stopped\n", EXIT_PREEMPTED)
    training = _child(f"""
preemption.watch()
preemption.while_starting({stop})
preemption.started()
os.kill(os.getpid(), signal.SIGTERM)
print("training on, saving at the next step:", preemption.received(), flush=True)
""")
    assert training.stdout == "training on, saving at the next step: True\n", training.stderr
    assert training.returncode == 0


def test_a_sigterm_before_while_starting_still_stops_the_start_up():
    child = _child("""
preemption.watch()
os.kill(os.getpid(), signal.SIGTERM)
preemption.while_starting(lambda: os._exit(preemption.EXIT_PREEMPTED))
threading.Event().wait(50)
""")
    assert child.returncode == EXIT_PREEMPTED, child.stderr


def test_unwatch_gives_sigterm_back():
    previous = signal.getsignal(signal.SIGTERM)
    replaced = preemption.watch()
    assert signal.getsignal(signal.SIGTERM) is not previous
    preemption.unwatch(replaced)
    assert signal.getsignal(signal.SIGTERM) is previous
    assert not preemption.received()
