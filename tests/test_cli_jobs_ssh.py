"""`tpuctl prepare / run / logs / ps / kill` on the SSH test pod: the real Cloud TPU client
asks the fake API for node `pod` (v3-32), whose workers are 4 sshd hosts in their own
network, mount and PID namespaces; the trainer runs on them as 4 jax.distributed processes
x 8 CPU devices; the recipe goes through a GCS emulator the hosts reach over the pod's
bridge. Node `stock` (v4-16) has workers like a stock TPU VM: python3 is 3.10, nothing
newer on the PATH, no venv, no tpuctl, and (like a minimal image) no SFTP."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from polling import wait_for

from tests.fixtures_pod import pod_hosts
from tests.fixtures_trainer import worker_env_args
from tpuctl.fanout import run
from tpuctl.gcs_emulator import GcsEmulator, emulator_env
from tpuctl.jobs.runs import pod_env
from tpuctl.providers.base import Node, Worker

pytestmark = pytest.mark.pod

PROJECT, ZONE = "test-project", "us-central1-a"
REPO = Path(__file__).resolve().parent.parent
SLOW_S = 300.0  # a training run on 2 shared cores
TINY = str(REPO / "recipes" / "tiny.yaml")
# One unpacked copy of the trainer's packages for every worker and every test run.
SHARED_UV_CACHE = "--cache-dir /var/tmp/tpuctl-test-cache/uv --link-mode symlink"
FAST = ["train.batch_size=32", "train.grad_accum=1", "eval.every_steps=0", "logging.every_steps=1"]


def tpuctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tpuctl", *args], capture_output=True, text=True, timeout=timeout
    )


def ok(*args: str) -> str:
    result = tpuctl(*args)
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


@pytest.fixture
def gcs_on_bridge(ssh_pod):
    """A GCS emulator on the pod's bridge address, so that the hosts reach it too."""
    with GcsEmulator(host=ssh_pod.gateway) as emulator:
        emulator.create_bucket("test-bucket")
        yield emulator.url


def use_pod(monkeypatch, gcs_url: str, pod_key: tuple[str, str]) -> None:
    """tpuctl's settings for the test pods: their GCS emulator, login key and bucket."""
    for name, value in {
        **emulator_env(gcs_url),
        "TPUCTL_SSH_KEY": pod_key[0],
        "TPUCTL_SSH_USER": "root",
        "TPUCTL_BUCKET": "test-bucket",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def pod(fake_tpu, ssh_pod, pod_key, gcs_on_bridge, monkeypatch, tmp_path):
    """Node `pod` (v3-32) on the sshd hosts; workers use this interpreter (worker.python)."""
    fake_tpu.add_node("pod", "v3-32", project=PROJECT, zone=ZONE, worker_ips=ssh_pod.hosts)
    use_pod(monkeypatch, gcs_on_bridge, pod_key)
    config_file = Path(tmp_path / "xdg-config" / "tpuctl" / "config.yaml")
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(f"worker:\n  python: {sys.executable}\n")
    hosts = pod_hosts(ssh_pod, pod_key, str(tmp_path / "known_hosts"))
    yield ssh_pod, hosts
    tpuctl("kill", "pod", "--grace", "1")


@pytest.fixture
def stock_pod(make_ssh_pod, old_python, fake_tpu, pod_key, monkeypatch, tmp_path):
    """Node `stock` (v4-16) on 2 hosts whose python3 is 3.10 and whose sshd has no SFTP;
    worker settings only point uv at local mirrors (the tests have no internet)."""
    ssh_pod = make_ssh_pod(2, python3=old_python, sftp=False)
    fake_tpu.add_node("stock", "v4-16", project=PROJECT, zone=ZONE, worker_ips=ssh_pod.hosts)
    with GcsEmulator(host=ssh_pod.gateway) as emulator:
        emulator.create_bucket("test-bucket")
        use_pod(monkeypatch, emulator.url, pod_key)
        yield ssh_pod, pod_hosts(ssh_pod, pod_key, str(tmp_path / "known_hosts"))


@pytest.fixture
def shared_dir():
    """A run directory every host sees (their /tmp and /root are private)."""
    path = Path(tempfile.mkdtemp(prefix="tpuctl-ssh-run-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def trainers_on(ssh_pod, index: int, run_id: str) -> list[str]:
    return [
        line
        for line in ssh_pod.processes(index)
        if f"tpuctl/runs/{run_id}/recipe.yaml" in line and "-m trainer" in line
    ]


@pytest.mark.slow
def test_run_follow_trains_across_the_four_hosts_with_jax_distributed(pod, shared_dir):
    ssh_pod, _hosts = pod
    out = ok(
        "run", TINY, "--name", "pod", "--all-workers", "--follow", "--run-id", "ssh-e2e",
        *worker_env_args(), "--", *FAST, "train.steps=3", f"run_dir={shared_dir}",
    )  # fmt: skip
    assert "run ssh-e2e started on 4 workers of pod" in out
    assert "gs://test-bucket/tpuctl/runs/ssh-e2e/recipe.yaml" in out
    # One program over the 4 hosts' 32 devices, all on this machine (one measured peak).
    assert "x 1 machine(s) of 4 process(es)" in out
    done = json.loads((shared_dir / "DONE").read_text())
    assert f"run ssh-e2e finished: step 3, final loss {done['final']['loss']:.4f}" in out
    rows = [line.split() for line in ok("ps", "pod").splitlines()[1:]]
    assert [row[:4] for row in rows] == [[f"w0{i}", "ssh-e2e", "exited", "0"] for i in range(4)]
    for index in range(4):  # each host keeps its own job record and log
        log = ssh_pod.path(index, "/root/.tpuctl/jobs/ssh-e2e/log")
        assert log.is_file()


@pytest.mark.slow
def test_second_run_refused_secrets_hidden_crash_visible_and_kill_leaves_nothing(pod, shared_dir):
    ssh_pod, hosts = pod
    secret = "wandb-secret-on-ssh-77"
    ok(
        "run", TINY, "--name", "pod", "--all-workers", "--run-id", "ssh-long",
        "--env", f"WANDB_API_KEY={secret}", *worker_env_args(),
        "--", *FAST, "train.steps=100000", f"run_dir={shared_dir}",
    )  # fmt: skip
    wait_for(lambda: "step 1 " in ok("logs", "pod", "-n", "5"), timeout=SLOW_S)
    for index in range(4):
        listing = run(hosts[index : index + 1], "ps -eww -o args")[0].stdout
        assert "tpuctl/runs/ssh-long/recipe.yaml" in listing
        assert secret not in listing

    second = tpuctl("run", TINY, "--name", "pod", "--all-workers", "--", *FAST)
    assert second.returncode == 1
    assert "run ssh-long is still running on w00, w01, w02, w03" in second.stderr

    # Host 2's trainer dies without a word (as under the OOM killer).
    # Anchored on the interpreter: the job's wrapper shell has the same words in its argv.
    killed = run(hosts[2:3], "pkill -KILL -f '^[^ ]*python[^ ]* -m trainer '")
    assert killed[0].ok, killed[0].stderr
    wait_for(lambda: "exited 137" in ok("ps", "pod"), timeout=SLOW_S)
    logs = ok("logs", "pod")
    assert "w02 | tpuctl: job failed: killed by signal 9" in logs
    assert secret not in ok("logs", "pod", "--all-lines")

    report = ok("kill", "pod", "--grace", "10").splitlines()
    assert len(report) == 4 and report[2] == "w02: nothing running"
    assert all(trainers_on(ssh_pod, index, "ssh-long") == [] for index in range(4))
    assert ok("kill", "pod").count("nothing running") == 4


@pytest.mark.slow
def test_run_follow_reports_the_done_record_a_run_wrote_on_its_workers_disk(
    pod, fake_tpu, tmp_path
):
    """A run directory on the worker's own disk (its /tmp is not this machine's): `run
    --follow` read DONE at the same path here, so it reported a local run's old record as
    this run's end, or said the run wrote none."""
    ssh_pod, _hosts = pod
    fake_tpu.add_node("one", "v3-8", project=PROJECT, zone=ZONE, worker_ips=ssh_pod.hosts[:1])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "DONE").write_text('{"step": 99, "final": {"loss": 9.5}}')  # a local run's
    out = ok(
        "run", TINY, "--name", "one", "--follow", "--run-id", "on-disk", *worker_env_args(),
        "--", *FAST, "train.steps=2", f"run_dir={run_dir}",
    )  # fmt: skip
    done = json.loads(ssh_pod.path(0, f"{run_dir}/DONE").read_text())
    assert done["step"] == 2
    assert f"run on-disk finished: step 2, final loss {done['final']['loss']:.4f}" in out


def test_recipe_errors_are_refused_before_anything_reaches_the_hosts(pod):
    before = ok("ps", "pod")  # the shared pod's hosts may remember earlier runs
    result = tpuctl("run", TINY, "--name", "pod", "--all-workers", "--", "model.presett=tiny")
    assert result.returncode == 2
    assert result.stderr.startswith("error: recipe") and "model.presett" in result.stderr
    assert "Traceback" not in result.stderr
    assert ok("ps", "pod") == before and "running" not in before


def test_a_tpu_pods_processes_meet_at_worker_0_before_jax_joins_them():
    """So that one failing before it joins ends the others at once (the trainer's side:
    tests/test_trainer_distributed.py); jax finds the coordinator itself, and a single
    host has no one to meet."""
    workers = tuple(Worker(i, f"10.0.0.{i + 2}") for i in range(4))
    pod = Node("p", "z", "v4-32", "READY", workers=workers)
    assert pod_env(pod, cpu=False) == {
        "TPUCTL_RENDEZVOUS": "10.0.0.2",
        "TPUCTL_NUM_PROCESSES": "4",
    }
    assert pod_env(dataclasses.replace(pod, workers=workers[:1]), cpu=False) == {}
    assert pod_env(pod, cpu=True)["TPUCTL_COORDINATOR"] == "10.0.0.2:8476"


@pytest.mark.slow
def test_a_stock_tpu_vm_image_is_prepared_and_runs_the_tiny_recipe(
    stock_pod, shared_dir, tmp_path, uv_wheels, trainer_wheelhouse, python_mirror
):
    ssh_pod, hosts = stock_pod
    (tmp_path / "xdg-config" / "tpuctl").mkdir(parents=True, exist_ok=True)
    (tmp_path / "xdg-config" / "tpuctl" / "config.yaml").write_text(
        "worker:\n"
        f"  python_mirror: {python_mirror}\n"
        f"  pip_args: --no-index --find-links {uv_wheels}\n"
        f"  uv_args: --no-index --find-links {trainer_wheelhouse} {SHARED_UV_CACHE}\n"
    )
    assert {r.stdout.strip() for r in run(hosts, "python3 --version")} == {"Python 3.10.13"}
    version = sys.version.split()[0]  # what the mirror offers

    first = tpuctl("prepare", "stock", timeout=SLOW_S)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "stock: 2 workers ready\n"
    for label in ("w00", "w01"):
        for step in ("installing uv (pip)", f"installing Python {version} (uv)",
                     "creating the venv", "installing the trainer (uv pip)"):  # fmt: skip
            assert re.search(rf"^{label}: {re.escape(step)} \.\.\. \d+ s$", first.stderr, re.M)
    again = tpuctl("prepare", "stock")
    assert again.returncode == 0 and "unchanged" in again.stderr
    assert "installing" not in again.stderr

    out = ok(
        "run", TINY, "--name", "stock", "--all-workers", "--follow", "--run-id", "stock-e2e",
        "--", *FAST, "train.steps=2", f"run_dir={shared_dir}",
    )  # fmt: skip
    assert "run stock-e2e finished: step 2" in out
    log = ssh_pod.path(0, "/root/.tpuctl/jobs/stock-e2e/log").read_text()
    assert f"trainer: Python {version} (/root/.tpuctl/venv/bin/python)" in log
    assert "3.10" not in log

    report = json.loads(ok("check", "stock", "--json"))
    assert {w["python"] for w in report["workers"]} == {version}

    run(hosts[1:], "rm -rf ~/.tpuctl")  # w01 was recreated (a preempted worker's new VM)
    recreated = tpuctl("prepare", "stock", timeout=SLOW_S)
    assert recreated.returncode == 0, recreated.stderr
    assert "preparing 1 worker " in recreated.stderr
    assert f"w01: installing Python {version} (uv)" in recreated.stderr
    assert "w00:" not in recreated.stderr
