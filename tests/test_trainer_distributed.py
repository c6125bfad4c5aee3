"""Joining a run (CPU devices for a plain machine, before jax starts) and leaving it: a normal
finish, and a crash told apart from a SIGTERM's stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.fixtures_trainer import REPO, TINY_RECIPE, launch_processes, launch_trainer, wait_all
from trainer.config import MeshConfig
from trainer.contract import EXIT_BAD_INPUT
from trainer.distributed import CPU_DEVICES_FLAG, cpu_devices_flags, meeting_env


def test_a_plain_machine_gets_the_devices_the_mesh_names():
    mesh = MeshConfig(data=2, fsdp=-1, tensor=2)
    assert cpu_devices_flags(mesh, {}) == f"{CPU_DEVICES_FLAG}=4"
    assert cpu_devices_flags(mesh, {"XLA_FLAGS": "--xla_dump_to=/d"}) == (
        f"--xla_dump_to=/d {CPU_DEVICES_FLAG}=4"
    )


def test_a_device_count_given_by_the_user_tpuctl_or_a_tpu_is_left_alone(monkeypatch):
    mesh = MeshConfig(data=2, fsdp=-1, tensor=1)
    assert cpu_devices_flags(mesh, {"XLA_FLAGS": f"{CPU_DEVICES_FLAG}=1"}) is None
    assert cpu_devices_flags(mesh, {"TPUCTL_COORDINATOR": "10.0.0.2:8476"}) is None
    assert cpu_devices_flags(MeshConfig(data=1, fsdp=-1, tensor=1), {}) is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")  # a TPU pod: its mesh error stays
    assert cpu_devices_flags(mesh, {}) is None


def test_the_tiny_recipe_trains_on_a_plain_machine_without_xla_flags(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("TPU")}
    env["PYTHONPATH"] = str(REPO)
    args = [str(TINY_RECIPE), f"run_dir={tmp_path / 'run'}", "train.steps=2", "eval.every_steps=0"]
    done = subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in done.stdout + done.stderr
    assert (tmp_path / "run" / "DONE").is_file()


LEAVE_SLOWLY = """
import sys, time, jax
from trainer import distributed
distributed.initialize()
if jax.process_index() == 1:  # a loaded worker: still disconnecting when process 0 is done
    shutdown = jax.distributed.shutdown
    jax.distributed.shutdown = lambda: (time.sleep(3), shutdown())
distributed.finish()
# A watch thread still inside a jax call at exit can abort the process as Python finalizes.
print("left, watch still running" if distributed._watch[0].is_alive() else "left", flush=True)
"""


def test_process_0_leaves_a_normal_finish_after_a_slow_process_has_disconnected(tmp_path):
    # Process 0 hosts jax's coordination service; one that left at once aborted process 1
    # ("Terminating process because the JAX distributed service detected fatal errors").
    command = [sys.executable, "-c", LEAVE_SLOWLY]
    workers = launch_processes(command, 3, 1, tmp_path, PYTHONUNBUFFERED="1")
    for index, (code, output) in enumerate(wait_all(workers, timeout=120)):
        last = output.strip().splitlines()[-1] if output.strip() else ""
        assert code == 0 and last == "left", f"process {index} exited {code}:\n{output[-3000:]}"


_FAIL_WHILE_PROCESS_0_LOOKS = """
import time, jax
from trainer import distributed

joined_client = distributed._client

class SlowLiveness:
    # Process 0 on a loaded machine: process 1 fails and leaves while it reads who is live.
    def __getattr__(self, name):
        return getattr(joined_client(), name)

    def get_live_nodes(self, nodes):
        client = joined_client()
        if jax.process_index() != 0:
            return client.get_live_nodes(nodes)
        client.key_value_set("test/process-0-reads-liveness", "1", allow_overwrite=True)
        while len(live := client.get_live_nodes(nodes)) == len(nodes):
            time.sleep(0.05)
        return live

distributed._client = lambda: SlowLiveness() if joined_client() is not None else None
distributed.initialize()
if jax.process_index() == 1:
    joined_client().blocking_key_value_get("test/process-0-reads-liveness", 60_000)
    distributed.fail_everywhere("stopped on SIGTERM while starting up", 75, prefix="trainer")
time.sleep(120)
"""


def test_a_process_that_fails_and_leaves_while_another_looks_is_not_taken_for_dead(tmp_path):
    """Process 1 sets its failure (here a SIGTERM's stop, 75) and leaves while process 0's
    watch reads which processes are live: process 0 ends with process 1's line and status.
    It read the failure before liveness, found neither, and ended with 69, "process 1
    stopped (no heartbeat)": a preempted run taken for a lost peer (seen under load in CI)."""
    command = [sys.executable, "-c", _FAIL_WHILE_PROCESS_0_LOOKS]
    procs = launch_processes(command, 2, 1, tmp_path, TPUCTL_HEARTBEAT_TIMEOUT="3")
    results = wait_all(procs, timeout=120)
    assert [code for code, _ in results] == [75, 75], results
    for _code, output in results:
        last = output.strip().splitlines()[-1]
        assert last == "trainer: stopped on SIGTERM while starting up", output[-2000:]


_FAIL_AND_LEAVE = """
import time, jax
from trainer import distributed
distributed.initialize()
if jax.process_index() == 1:
    distributed.fail_everywhere("checkpoint save of step 4 failed on process 1", 74)
time.sleep(120)
"""


def test_a_failure_reaches_the_others_at_once_not_after_the_leavers_heartbeats_time_out(
    tmp_path,
):
    """Reading liveness first (a barrier of the live processes, which waits for one that left
    without a word until its heartbeats time out) held the failure back that long; a process
    in `crash` meanwhile took the collective's error for its own and printed its traceback."""
    command = [sys.executable, "-c", _FAIL_AND_LEAVE]
    procs = launch_processes(command, 2, 1, tmp_path, TPUCTL_HEARTBEAT_TIMEOUT="100")
    started = time.monotonic()
    results = wait_all(procs, timeout=120)
    assert time.monotonic() - started < 60, results  # the launch and joining included
    assert [code for code, _ in results] == [74, 74], results
    for _code, output in results:
        assert output.strip().splitlines()[-1] == (
            "error: checkpoint save of step 4 failed on process 1"
        ), output[-2000:]


_CRASH_WHILE_STOPPING = """
import os, signal, time
import jax._src.distributed  # what crash() reads: imported now, so it answers at once
from trainer import contract, distributed, preemption

def slow_stop():
    time.sleep(2)  # a stop that takes its time (process 0 waits for the others' acks)
    print("stopped on SIGTERM", flush=True)
    os._exit(contract.EXIT_PREEMPTED)

preemption.watch()
preemption.while_starting(slow_stop)
os.kill(os.getpid(), signal.SIGTERM)
distributed.crash(RuntimeError("a worker process of the token cache died"))
"""


def test_an_error_while_a_sigterm_stops_the_start_up_is_that_stop_not_a_crash():
    """The token cache's worker processes die of the SIGTERM that stops the run; the error
    the main thread then sees must not end the run first, as a crash with a traceback."""
    child = subprocess.run(
        [sys.executable, "-c", _CRASH_WHILE_STOPPING],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (child.returncode, child.stdout) == (75, "stopped on SIGTERM\n"), child.stderr[-3000:]
    assert "Traceback" not in child.stderr


def test_a_recipe_error_after_joining_ends_every_process_with_its_line_and_exit_2(tmp_path):
    """A data.format the recipe check cannot judge (it reads no records) is rejected when the
    joined processes tokenize. Process 0 returned 2, which took jax's coordination service
    down with it: every process, process 0 too, exited 69 (peer lost) instead, the one with
    the line after a heartbeat timeout."""
    args = [str(TINY_RECIPE), f"run_dir={tmp_path}", "data.format=prompt_completion"]
    results = wait_all(launch_trainer(args, 2, 1, tmp_path), timeout=120)
    assert [code for code, _ in results] == [EXIT_BAD_INPUT] * 2, results
    for _code, output in results:
        last = output.strip().splitlines()[-1]
        assert last.startswith("error: ") and last.endswith(
            "record 1: data.format prompt_completion: records need prompt+completion or "
            "instruction(+input)+output"
        ), output[-2000:]
        assert "Traceback" not in output


def test_a_run_dir_the_processes_do_not_share_ends_every_process_with_its_line_and_exit_2(
    tmp_path,
):
    """Each process with a run_dir of its own (as a plain path on each worker's own disk is):
    every process exits 2 with one line naming run_dir, the process that does not see it and
    the fix, before anything is written there. The run trained all its steps and then idled
    in orbax's multi-host save of the final checkpoint, which waits for files the other
    process never sees, until checkpoint.save_timeout_s (600 s)."""
    args = [str(TINY_RECIPE), "train.steps=1", "eval.every_steps=0"]
    own = {i: [f"run_dir={tmp_path / f'run{i}'}"] for i in range(2)}
    results = wait_all(launch_trainer(args, 2, 1, tmp_path, args_of=own), timeout=120)
    assert [code for code, _ in results] == [EXIT_BAD_INPUT] * 2, results
    for _code, output in results:
        last = output.strip().splitlines()[-1]
        assert last.startswith(f"error: run_dir {tmp_path / 'run'}"), output[-2000:]
        assert "process 1 (on " in last and "of 2" in last, last
        assert "set run_dir to a gs:// path, or to a filesystem every worker mounts" in last
        assert "Traceback" not in output
    assert [p.name for p in (tmp_path / "run0").iterdir()] == ["trainer.lock"]  # probe removed
    assert not (tmp_path / "run1").exists()


# A TPU pod: jax finds its coordinator itself, tpuctl names only where the processes meet.
TPU_POD = {"meet_at": "TPUCTL_RENDEZVOUS", "TPU_WORKER_HOSTNAMES": "w0,w1,w2"}


@pytest.mark.parametrize("pod", [{}, TPU_POD], ids=["cpu-pod", "tpu-pod"])
def test_a_process_that_fails_before_joining_ends_the_pod_at_once(tmp_path, pod):
    """Not after TPUCTL_INIT_TIMEOUT (900 s): the processes waiting to join end with the
    failed one's line and exit status."""
    procs = launch_trainer(
        [str(TINY_RECIPE), f"run_dir={tmp_path}"],
        3,
        1,
        tmp_path,
        args_of={2: ["train.steps=0"]},
        **pod,
    )
    results = wait_all(procs, timeout=120)
    assert [code for code, _ in results] == [2, 2, 2], results
    failed = results[2][1]
    assert "error: train.steps" in failed and "Traceback" not in failed
    line = failed.strip().splitlines()[-1].removeprefix("error: ")
    for _code, output in results[:2]:
        assert f"error: process 2 failed before joining the pod: {line}" in output
        assert "Traceback" not in output
    assert not (tmp_path / "DONE").exists()


def test_on_a_tpu_pod_the_processes_meet_on_jaxs_coordinator_port(monkeypatch):
    """The one port the pod's network surely lets through: jax's, read from the jax the
    worker has (so a jax that moves it or renames it fails here first)."""
    from jax._src.clusters import cloud_tpu_cluster

    monkeypatch.setenv("TPUCTL_RENDEZVOUS", "10.0.0.2")
    monkeypatch.setenv("TPUCTL_NUM_PROCESSES", "4")
    monkeypatch.setenv("TPUCTL_PROCESS_ID", "3")
    monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
    assert meeting_env() == (f"10.0.0.2:{int(cloud_tpu_cluster.coordinator_port)}", 4, 3)
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "9000")  # jax's own override, honoured alike
    assert meeting_env() == ("10.0.0.2:9000", 4, 3)


def test_on_a_tpu_pod_a_worker_whose_jax_is_broken_fails_in_one_line(tmp_path):
    """Telling the pod needs jax's coordinator port, read from jax: the broken jax raised
    again in the handler of its own ImportError, a traceback instead of the `error:` line."""
    broken = tmp_path / "broken"
    (broken / "jax").mkdir(parents=True)
    (broken / "jax" / "__init__.py").write_text("raise ImportError('libtpu is not installed')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU", "XLA_FLAGS"))}
    env |= {
        "PYTHONPATH": f"{broken}:{REPO}",
        "TPUCTL_RENDEZVOUS": "127.0.0.1",
        "TPUCTL_NUM_PROCESSES": "2",
        "TPUCTL_PROCESS_ID": "1",
        "TPU_WORKER_HOSTNAMES": "w0,w1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "trainer", str(TINY_RECIPE), f"run_dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-3000:]
    assert "error: libtpu is not installed" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
