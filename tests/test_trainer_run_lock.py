"""trainer.run_lock on a gs:// run directory: a lease in the GCS emulator, held by a real
process that renews it, dies, is paused or ends (no gs:// run directory was locked at all:
two trainers trained on one side by side, saving over each other's checkpoints)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import io, run_lock

REPO = Path(__file__).resolve().parent.parent
RUN_DIR = "gs://test-bucket/runs/leased"
LOCK = f"{RUN_DIR}/trainer.lock"
TTL_S = 3.0  # renewals every 1 s: a loaded machine delays one by far less
# A process 0 holding RUN_DIR until its stdin closes; with the default on_lost, a lease taken
# over ends it (one line, status 2).
HOLDER = """
import sys
from trainer import run_lock
with run_lock.hold(sys.argv[1], "first-run"):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def short_ttl(gcs, monkeypatch):
    monkeypatch.setenv(run_lock.LEASE_TTL_ENV, str(TTL_S))


@pytest.fixture
def holder(short_ttl):
    """A process holding RUN_DIR's lease (its children inherit the emulator and the TTL)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, RUN_DIR],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout.readline() == "held\n", proc.stdout.read()
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()


def named(pid: int, run_id: str) -> tuple[str, str]:
    """How a lease's holder is named: its start and its end."""
    return f"pid {pid} on {socket.gethostname()} since ", f", run {run_id}"


def test_a_second_trainer_on_a_live_lease_is_refused_naming_the_first(holder, capsys):
    started = time.monotonic()
    with pytest.raises(run_lock.RunDirInUse) as refused, run_lock.hold(RUN_DIR, "second-run"):
        pytest.fail("held a run dir whose lease its holder renews")
    assert time.monotonic() - started < TTL_S  # its renewal, every TTL/3, says it lives
    first, run = named(holder.pid, "first-run")
    message = str(refused.value)
    assert message.startswith(f"run_dir {RUN_DIR} is in use by another trainer ({first}")
    assert f"{run}): a second one would save over its checkpoints; " in message
    assert f"trainer: run_dir {RUN_DIR} is leased to {first}" in capsys.readouterr().out
    assert holder.poll() is None  # left alone, still holding
    assert json.loads(io.read_bytes(LOCK))["pid"] == holder.pid


def test_a_lease_whose_holder_died_is_taken_over_after_its_ttl(holder, capsys):
    holder.send_signal(signal.SIGKILL)  # no release: as a preempted VM's trainer ends
    holder.wait()
    started = time.monotonic()
    with run_lock.hold(RUN_DIR, "second-run"):
        waited = time.monotonic() - started
        record = json.loads(io.read_bytes(LOCK))
    assert waited >= TTL_S
    assert (record["pid"], record["run_id"]) == (os.getpid(), "second-run")
    out, (first, _run) = capsys.readouterr().out, named(holder.pid, "first-run")
    assert out.count(f"trainer: run_dir {RUN_DIR} is leased to {first}") == 1
    assert f"waiting up to {TTL_S:g} s for it to renew the lease" in out
    assert f"trainer: took run_dir {RUN_DIR} over from {first}" in out
    assert io.read_with_generation(LOCK) is None  # released


def test_a_holder_whose_lease_was_taken_over_stops(holder):
    """Paused for longer than the TTL (a stopped VM, a partition), it was presumed dead."""
    holder.send_signal(signal.SIGSTOP)
    try:
        with run_lock.hold(RUN_DIR, "second-run"):
            holder.send_signal(signal.SIGCONT)
            assert holder.wait(timeout=30) == 2  # at its next renewal, before anything else
            assert json.loads(io.read_bytes(LOCK))["pid"] == os.getpid()  # still ours
    finally:
        holder.send_signal(signal.SIGCONT)
    me, run = named(os.getpid(), "second-run")
    out = holder.stdout.read()
    assert out.startswith(f"error: run_dir {RUN_DIR}'s lease was taken over by {me}"), out
    assert out.endswith(
        f"{run}, which found it not renewed for {TTL_S:g} s (this trainer was stopped, or cut "
        "off from GCS): stopping before this one saves over its checkpoints\n"
    ), out
    assert out.count("\n") == 1, out


def test_a_clean_end_releases_the_lease_at_once(holder, capsys):
    holder.stdin.close()  # its block ends
    assert holder.wait() == 0
    assert io.read_with_generation(LOCK) is None
    with run_lock.hold(RUN_DIR, "second-run"):
        pass
    assert capsys.readouterr().out == ""  # nothing to wait out


def test_a_run_dir_in_a_bucket_that_does_not_exist_cannot_be_written(short_ttl):
    with (
        pytest.raises(run_lock.RunDirUnusable) as refused,
        run_lock.hold("gs://no-such-bucket/run"),
    ):
        pytest.fail("held a run dir in no bucket")
    assert str(refused.value).startswith("run_dir gs://no-such-bucket/run cannot be written (")
    assert str(refused.value).endswith("): make it writable, or set another run_dir")


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf"])
def test_a_lease_ttl_that_is_no_positive_number_is_refused_naming_it(value, monkeypatch):
    monkeypatch.setenv(run_lock.LEASE_TTL_ENV, value)
    with pytest.raises(run_lock.RecipeError, match=rf"^TPUCTL_LEASE_TTL='{value}' is not a "):
        run_lock.lease_ttl()
