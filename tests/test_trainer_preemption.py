"""trainer.preemption: while starting up the first SIGTERM ends the run; once it trains, the
first one is a flag and the second ends the process; watching is undone only by whoever
started it. The SIGTERM cases run in a child process: the flag lasts for a process's life."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def test_a_sigterm_while_the_trainer_reads_its_recipe_stops_it_to_be_resumed():
    """`python -m trainer gs://...` is sent SIGTERM while its recipe is being read (the
    storage server holds the request until then): before jax is imported or the pod joined.
    Before the entry point watched from its first line, the signal's default action killed
    it (-15), which babysit counts as a failure."""
    asked, release = threading.Event(), threading.Event()

    class HoldEveryRequest(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.set()
            release.wait(60)

        do_HEAD = do_GET

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), HoldEveryRequest)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPUCTL_")}
    env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{server.server_port}"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "trainer", "gs://bucket/recipe.yaml"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert asked.wait(60), "the trainer never asked for its recipe"
        trainer.send_signal(signal.SIGTERM)
        _, stderr = trainer.communicate(timeout=60)
    finally:
        trainer.kill()
        release.set()
        server.shutdown()
    assert trainer.returncode == EXIT_PREEMPTED, stderr
    assert stderr.splitlines() == [
        "trainer: stopped on SIGTERM while starting up: before training, nothing new to save"
    ]
