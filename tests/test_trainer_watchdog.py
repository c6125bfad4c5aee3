"""`train.stall_timeout_s`: a training loop that stops making progress without dying ends
the run, every process of it, with the stacks that show where it waits."""

from __future__ import annotations

import os
import re
import sys
import threading

import pytest
from polling import wait_for

from tests.fixtures_trainer import TINY_RECIPE, launch_processes, launch_trainer, wait_all
from trainer.contract import EXIT_STALLED
from trainer.watchdog import Watchdog, stalled


@pytest.mark.parametrize(
    ("last", "now", "timeout", "expected"),
    [
        (0.0, 10.0, 30.0, False),  # progress 10 s ago
        (0.0, 30.0, 30.0, False),  # exactly the timeout: not yet
        (0.0, 30.5, 30.0, True),
        (0.0, 1e9, 0.0, False),  # 0: never
    ],
)
def test_stalled(last, now, timeout, expected):
    assert stalled(last, now, timeout) is expected


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_keeps_the_watchdog_quiet_and_a_stall_is_reported():
    clock, calls = FakeClock(), []
    watchdog = Watchdog(1.0, lambda last, idle_s: calls.append((last, idle_s)), clock)
    clock.now += 0.9
    watchdog.progress("step 1")
    clock.now += 0.9  # 1.8 s since the start, 0.9 s since step 1
    assert not watchdog.check() and calls == []
    clock.now += 0.6
    assert watchdog.check() and calls == [("step 1", pytest.approx(1.5))]
    watchdog.stop()
    clock.now += 10
    assert not watchdog.check()  # stopped: the loop ended, nothing is stalled


def test_its_thread_reports_a_stall_once_and_stops():
    clock, calls, fired = FakeClock(), [], threading.Event()

    def on_stall(last: str, idle_s: float) -> None:
        calls.append((last, idle_s))
        fired.set()

    watchdog = Watchdog(0.5, on_stall, clock)
    watchdog.start()
    assert watchdog.watching
    clock.now += 1.0
    assert fired.wait(10)
    wait_for(lambda: not watchdog.watching, what="the watchdog's thread to stop")
    assert calls == [("the start of the loop", pytest.approx(1.0))]


def test_a_timeout_of_0_starts_no_watch():
    watchdog = Watchdog(0.0, lambda last, idle: None)
    watchdog.start()
    assert not watchdog.watching


# jax's liveness check is not what these tests test, so it gets a margin no stall of the test
# machine reaches. Process 0 hosts jax's coordination service, which declares a process dead
# once it has recorded no heartbeat from it for TPUCTL_HEARTBEAT_TIMEOUT seconds (each process
# sends one every half of that; a hung open() or a collective does not stop them). With the
# default 20, the service's host or the whole 2-core CI machine not running for 10 s or so
# (seen once in a full CI run: both processes declared dead at the same instant, before the
# first step) ended a run as lost peers, 69 and no stacks, not as a stall. The watchdog alone
# ends these runs, so the longer timeout adds nothing to their time.
LIVENESS_MARGIN = {"TPUCTL_HEARTBEAT_TIMEOUT": "60"}


@pytest.mark.slow  # two 2-process tiny runs
def test_a_loop_hung_on_one_process_ends_every_process_with_its_stack(tmp_path):
    # Process 0 writes the first step's metrics line into a FIFO nobody reads: its open()
    # never returns, as a write to a dead NFS mount would not. Process 1 then waits in the
    # next step's collective for a process that never comes.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / "metrics.jsonl")
    args = [
        str(TINY_RECIPE), f"run_dir={run_dir}", "train.steps=50", "train.stall_timeout_s=10",
        "logging.every_steps=1", "eval.every_steps=0",
    ]  # fmt: skip
    results = wait_all(launch_trainer(args, 2, 2, tmp_path, **LIVENESS_MARGIN), timeout=300)
    assert [code for code, _ in results] == [EXIT_STALLED] * 2, results[0][1][-3000:]
    hung, waiting = (output for _, output in results)
    # Whichever process noticed first, each shows where it waits: the hung one in the write.
    assert 'trainer/metrics.py", line' in hung and " in write\n" in hung, hung[-3000:]
    assert "in process_allgather" in waiting, waiting[-3000:]  # the next collective
    for output in (hung, waiting):
        assert output.count("; the stack of every thread follows") == 1, output[-3000:]
        # The time it waited, measured: the timeout, or a second or two past it under load.
        assert re.search(r"no progress for 1[0-9] s since the start of the loop \(train\."
                         r"stall_timeout_s=10; raise it if an iteration can take that long\)",
                         output), output[-3000:]  # fmt: skip
        assert "error: training stalled on process " in output


# Process 1 sees a directory of its own (a tmpfs in a mount namespace of its own) at
# {run_dir}/checkpoints, $0 here: the rest of the run directory is the one process 0 sees.
_OWN_CHECKPOINTS = (
    'if [ "$TPUCTL_PROCESS_ID" = 1 ]; then mount -t tmpfs t "$0" || exit 99; fi; exec "$@"'
)


def test_a_final_save_that_never_commits_ends_every_process_as_a_stall(tmp_path):
    """The final save (after the loop's last step) waits in orbax's commit for files process 1
    wrote where process 0 does not see them: train.stall_timeout_s ends the run with the
    stacks. The watchdog stopped with the loop, so the run idled until
    checkpoint.save_timeout_s (600 s by default)."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    command = [
        "unshare", "--mount", "sh", "-c", _OWN_CHECKPOINTS, str(run_dir / "checkpoints"),
        sys.executable, "-m", "trainer", str(TINY_RECIPE), f"run_dir={run_dir}",
        "train.steps=2", "train.stall_timeout_s=10", "checkpoint.save_timeout_s=600",
        "eval.every_steps=0",
    ]  # fmt: skip
    results = wait_all(launch_processes(command, 2, 1, tmp_path, **LIVENESS_MARGIN), timeout=120)
    assert [code for code, _ in results] == [EXIT_STALLED] * 2, results[0][1][-3000:]
    for output in (output for _, output in results):
        assert output.count("; the stack of every thread follows") == 1, output[-3000:]
        assert 'trainer/checkpoint.py", line' in output and " in close\n" in output, output
        assert " s since step 2 (train.stall_timeout_s=10; " in output  # 10 s, or 11 polled
    assert not (run_dir / "DONE").exists()
