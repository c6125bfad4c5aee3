"""`tpuctl babysit` end to end: the real CLI in a subprocess babysits the tiny recipe on a
local pod (real jax.distributed trainer processes) while the test takes the pod away
twice and kills one worker's trainer; the run must finish with exactly the parameters of
an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "recipes" / "tiny.yaml")
STEPS = 16
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.batch_size=8",
    "train.seq_len=64",
    "train.grad_accum=1",
    "logging.every_steps=1",
    "eval.every_steps=0",
    "checkpoint.every_steps=3",
    "checkpoint.keep=3",
]
RUN_TIMEOUT_S = 400


class Cli:
    """`tpuctl` as a user runs it, with private config and state directories (local pods)."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {
            **os.environ,
            "XDG_CONFIG_HOME": str(root / "config"),
            "XDG_STATE_HOME": str(root / "state"),
            "TPUCTL_PROVIDER": "local",
        }
        for name in ("STORAGE_EMULATOR_HOST", "TPUCTL_NODE", "TPUCTL_BUCKET"):
            self.env.pop(name, None)

    def start(self, *args: str) -> subprocess.Popen:
        out = open(self.root / f"babysit-{time.monotonic_ns()}.out", "w+")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "tpuctl", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.root,
        )
        proc.output_file = out
        return proc

    def __call__(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "tpuctl", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=self.root,
        )

    def pods_dir(self) -> Path:
        return self.root / "state" / "tpuctl" / "local" / "pods"

    def state(self, run_id: str) -> dict:
        path = self.root / "state" / "tpuctl" / "babysit" / f"{run_id}.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def output(proc: subprocess.Popen) -> str:
    proc.output_file.seek(0)
    return proc.output_file.read()


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout=RUN_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"babysit exited while waiting for {what}:\n{output(proc)}")
        time.sleep(0.05)
    raise AssertionError(f"{what}: not before the deadline\n{output(proc) if proc else ''}")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    # A line still being written is skipped until it is complete.
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def step_reached(run_dir: Path, step: int, after_record: int = 0):
    """A condition: a record past the first `after_record` ones logs step >= `step`."""
    return lambda: any(r.get("step", 0) >= step for r in metrics(run_dir)[after_record:])


def kill_trainer(worker_dir: Path) -> list[int]:
    """SIGKILL the trainer process running in one local worker's directory (not the job's
    wrapper around it: the worker itself lives on, as after an OOM kill)."""
    killed = []
    for proc in Path("/proc").iterdir():
        try:
            cwd = os.readlink(proc / "cwd")
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cwd.startswith(str(worker_dir)) and argv[1:3] == [b"-m", b"trainer"]:
            os.kill(int(proc.name), signal.SIGKILL)
            killed.append(int(proc.name))
    return killed


def final_params(run_dir: Path) -> tuple[int, dict[str, np.ndarray]]:
    from trainer.checkpoint import load_params

    step, params = load_params(str(run_dir / "checkpoints"))
    return step, flatten(params)


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        return {k: v for key in tree for k, v in flatten(tree[key], f"{prefix}/{key}").items()}
    return {prefix: np.asarray(tree)}


def losses_by_step(run_dir: Path) -> dict[int, set[float]]:
    found: dict[int, set[float]] = {}
    for record in metrics(run_dir):
        if "loss" in record:
            found.setdefault(record["step"], set()).add(record["loss"])
    return found


@pytest.fixture
def cli(tmp_path):
    cli = Cli(tmp_path)
    yield cli
    for name in ("pod", "ref"):
        cli("down", name, "--yes")  # stops leftover jobs and the local GCS emulator


def babysit_args(cli: Cli, name: str, run_id: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        "babysit", "v4-16", TINY, "--name", name, "--run-id", run_id, "--poll", "0.3",
        "--grace", "5", "--env", f"JAX_COMPILATION_CACHE_DIR={cli.root / 'jax-cache'}",
        *extra, "--", *OVERRIDES, f"run_dir={run_dir}",
    ]  # fmt: skip


def test_babysit_carries_a_run_through_two_preemptions_and_a_crash_on_a_local_pod(cli, tmp_path):
    from tpuctl.providers.local import LocalProvider

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    ref = cli(*babysit_args(cli, "ref", "reference", reference, "--delete-when-done"))
    assert ref.returncode == 0, ref.stdout + ref.stderr
    assert f"run reference finished: step {STEPS}" in ref.stdout
    assert "restarts: 0 preemption(s), 0 failure(s), 1 launch(es)" in ref.stdout
    assert not (cli.pods_dir() / "ref").exists()  # --delete-when-done

    pods = LocalProvider(cli.pods_dir().parent)
    proc = cli.start(*babysit_args(cli, "pod", "resumed", resumed))
    wait_for(step_reached(resumed, 4), "step 4", proc)
    pods.preempt("pod")  # PREEMPTED, every worker process killed
    seen = len(metrics(resumed))
    wait_for(step_reached(resumed, 8, seen), "step 8 after the first preemption", proc)
    pods.preempt("pod", vanish=True)  # gone without a PREEMPTED state
    seen = len(metrics(resumed))
    wait_for(step_reached(resumed, 12, seen), "step 12 after the second preemption", proc)
    assert kill_trainer(cli.pods_dir() / "pod" / "workers" / "w01")
    proc.wait(timeout=RUN_TIMEOUT_S)
    out = output(proc)
    assert proc.returncode == 0, out
    assert f"run resumed finished: step {STEPS}" in out
    assert "restarts: 2 preemption(s), 1 failure(s), 4 launch(es)" in out

    state = cli.state("resumed")
    kinds = [(e["kind"], e["cause"]) for e in state["events"]]
    assert kinds[0] == ("preemption", "node pod PREEMPTED")
    assert kinds[1] == ("preemption", "node pod missing")
    assert kinds[2][0] == "failure" and "w01 exited" in kinds[2][1]
    crash = state["events"][2]
    assert crash["worker"] == "w01" and crash["exit_code"] is not None
    assert any("killed by signal 9" in line for line in crash["log_tail"]), crash["log_tail"]
    for event in state["events"]:  # every restart got the run training again
        assert event["resumed_s"] > 0 and event["steps_lost"] is not None
        assert event["steps_lost"] <= 3 + 1, event  # at most the checkpoint interval (+1 in flight)

    expected = losses_by_step(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    got = losses_by_step(resumed)
    assert got == expected  # every step, re-run ones included, gave the reference's loss
    (ref_step, ref_params), (step, params) = final_params(reference), final_params(resumed)
    assert ref_step == step == STEPS
    assert params.keys() == ref_params.keys()
    for name, value in params.items():
        assert np.array_equal(value, ref_params[name]), name
