"""trainer.preemption: while starting up the first SIGTERM ends the run; once it trains, the
first one is a flag and the second ends the process; watching is undone only by whoever
started it. The SIGTERM cases run in a child process: the flag lasts for a process's life."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.polling import wait_for
from trainer import preemption
from trainer.contract import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parent.parent


def _child(body: str) -> subprocess.CompletedProcess:
    prelude = "import os, signal, sys, threading\nfrom trainer import contract, preemption\n"
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
    stop = "lambda: (print('stopped', flush=True), os._exit(contract.EXIT_PREEMPTED))"
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
preemption.while_starting(lambda: os._exit(contract.EXIT_PREEMPTED))
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
    try:
        stderr = _stopped_while_starting(
            ["gs://bucket/recipe.yaml"],
            lambda: asked.wait(60) or pytest.fail("the trainer never asked for its recipe"),
            STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{server.server_port}",
        )
    finally:
        release.set()
        server.shutdown()
    assert stderr.splitlines() == [STOPPED_WHILE_STARTING]


def test_a_sigterm_while_worker_processes_build_the_token_cache_stops_it_quietly(tmp_path):
    """SIGTERM to the trainer's process group (as `tpuctl kill` sends it) while two
    tokenising processes build the token cache. The stop used to leave the pool's semaphores
    to multiprocessing's resource tracker, which printed "There appear to be 5 leaked
    semaphore objects" into the run's log."""
    words = (ROOT / "recipes" / "data" / "tiny_train.txt").read_text().split()
    paragraph = " ".join(words[:60]) + "\n\n"
    inputs = [tmp_path / f"part{i}.txt" for i in range(2)]
    for path in inputs:  # a few seconds of tokenising each
        path.write_text(paragraph * 40_000)
    run_dir = tmp_path / "run"

    def both_workers_building() -> bool:
        return len(list(run_dir.glob("data_cache/*/.tmp-shard-*"))) == 2

    stderr = _stopped_while_starting(
        ["recipes/tiny.yaml", f"run_dir={run_dir}", "data.cache_workers=2",
         f"data.train=[{','.join(map(str, inputs))}]"],
        lambda: wait_for(both_workers_building, what="two workers building shards"),
    )  # fmt: skip
    assert stderr.splitlines() == [STOPPED_WHILE_STARTING]


STOPPED_WHILE_STARTING = (
    "trainer: stopped on SIGTERM while starting up: before training, nothing new to save"
)


def _stopped_while_starting(args: list[str], ready: Callable[[], object], **env: str) -> str:
    """Start `python -m trainer ARGS` in a process group of its own, SIGTERM the group once
    `ready()` returns, check that the trainer stopped to be resumed; its stderr."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TPUCTL_")}
    trainer = subprocess.Popen(
        [sys.executable, "-m", "trainer", *args], cwd=ROOT, env=clean | env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        ready()
        os.killpg(trainer.pid, signal.SIGTERM)
        _, stderr = trainer.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(trainer.pid, signal.SIGKILL)
    assert trainer.returncode == EXIT_PREEMPTED, stderr
    return stderr


def test_a_sigterm_during_the_last_step_finishes_the_run(tmp_path):
    """The stop saves the last step: the run is complete. It used to exit 75 without DONE,
    and the relaunch wrote a DONE without the final metrics."""
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        "train.steps=1",
        "eval.every_steps=0",
        "logging.every_steps=1",
    ]
    child = _child(
        "from trainer.config import load_recipe\nfrom trainer.train import train\n"
        "preemption.watch()\nos.kill(os.getpid(), signal.SIGTERM)  # during the only step\n"
        f"sys.exit(train(load_recipe({str(ROOT / 'recipes' / 'tiny.yaml')!r}, {overrides!r})))\n"
    )
    assert child.returncode == 0, child.stderr[-3000:]
    done = json.loads((run_dir / "DONE").read_text())
    assert done["step"] == 1 and "loss" in done["final"], done
