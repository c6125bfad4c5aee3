"""`tpuctl babysit` end to end: the real CLI in a subprocess babysits the tiny recipe on a
local pod (real jax.distributed trainer processes) while the test takes the pod away
twice and kills one worker's trainer; the run must finish with exactly the parameters of
an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from local_cli import LocalCli

from tests.fixtures_trainer import worker_env_args
from tpuctl.gcs_emulator import GcsEmulator, emulator_env

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


class Cli(LocalCli):
    """The local-pod CLI, plus starting a babysitter in the background and reading its state."""

    def __init__(self, root: Path):
        super().__init__(root, timeout=RUN_TIMEOUT_S)

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


def metrics(run_dir: Path | str) -> list[dict]:
    """The run's metrics records: a local run directory's, or a gs:// one's (in the GCS
    emulator STORAGE_EMULATOR_HOST names)."""
    from tpuctl import storage

    if isinstance(run_dir, str):
        text = storage.read_text(f"{run_dir}/metrics.jsonl") or ""
    else:
        path = run_dir / "metrics.jsonl"
        text = path.read_text() if path.is_file() else ""
    # A line still being written is skipped until it is complete.
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def step_reached(run_dir: Path | str, step: int, after_record: int = 0):
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
    cli("down", "pod", "--yes")  # stops leftover jobs and the local GCS emulator


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run uninterrupted, babysat on a local pod of the same shape (2 processes x 4
    devices) that is deleted when done."""
    cli = Cli(tmp_path_factory.mktemp("reference"))
    run_dir = cli.root / "reference"
    result = cli(*babysit_args("ref", "reference", run_dir, "--delete-when-done"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run reference finished: step {STEPS}" in result.stdout
    assert "restarts: 0 preemption(s), 0 failure(s), 1 launch(es)" in result.stdout
    assert not (cli.pods_dir() / "ref").exists()  # --delete-when-done
    return run_dir


def assert_same_training(reference: Path, resumed: Path) -> None:
    """Every logged step (re-run ones included) gave the reference's loss, and the final
    parameters are bit for bit the reference's."""
    expected = losses_by_step(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert losses_by_step(resumed) == expected
    (ref_step, ref_params), (step, params) = final_params(reference), final_params(resumed)
    assert ref_step == step == STEPS
    assert params.keys() == ref_params.keys()
    for name, value in params.items():
        assert np.array_equal(value, ref_params[name]), name


def babysit_args(
    name: str,
    run_id: str,
    run_dir: Path | str,
    *extra: str,
    overrides: tuple[str, ...] = (),
    accelerator_type: str = "v4-16",
) -> list[str]:
    return [
        "babysit", accelerator_type, TINY, "--name", name, "--run-id", run_id, "--poll", "0.3",
        "--grace", "5", *worker_env_args(),
        *extra, "--", *OVERRIDES, f"run_dir={run_dir}", *overrides,
    ]  # fmt: skip


def test_babysit_carries_a_run_through_two_preemptions_and_a_crash_on_a_local_pod(
    cli, reference, tmp_path
):
    from tpuctl.providers.local import LocalProvider

    resumed = tmp_path / "resumed"
    pods = LocalProvider(cli.pods_dir().parent)
    proc = cli.start(*babysit_args("pod", "resumed", resumed))
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
    assert crash["worker"] == "w01" and crash["exit_code"] == 128 + signal.SIGKILL
    assert any("killed by signal 9" in line for line in crash["log_tail"]), crash["log_tail"]
    for event in state["events"]:  # every restart got the run training again
        assert event["resumed_s"] > 0 and event["steps_lost"] is not None
        # At most the checkpoint interval (3), or twice it when the kill lands while the
        # newest (asynchronous) save has not committed yet.
        assert event["steps_lost"] <= 2 * 3, event
    assert_same_training(reference, resumed)


def test_the_preemption_budget_stops_babysitting_and_leaves_the_node_as_it_is(cli, tmp_path):
    from tpuctl.providers.local import LocalProvider

    args = babysit_args("pod", "budget", tmp_path / "run", "--max-preemptions", "0")
    proc = cli.start(*args)
    wait_for(lambda: cli.state("budget").get("launches") == 1, "the first launch", proc)
    LocalProvider(cli.pods_dir().parent).preempt("pod")
    proc.wait(timeout=RUN_TIMEOUT_S)
    out = output(proc)
    assert proc.returncode == 1, out
    assert "error: stopped babysitting run budget after 1 preemptions (--max-preemptions 0)" in out
    state = cli.state("budget")
    assert (state["preemptions"], state["launches"]) == (1, 1)
    assert LocalProvider(cli.pods_dir().parent).get("pod").state == "PREEMPTED"  # not replaced


def test_babysit_with_no_recipe_watches_the_nodes_latest_run_to_the_end(cli, tmp_path):
    run_dir = tmp_path / "run"
    assert cli("up", "v4-16", "--local", "--name", "pod").returncode == 0
    started = cli(
        "run", TINY, "--name", "pod", "--all-workers", "--run-id", "mine",
        "--", *OVERRIDES, f"run_dir={run_dir}",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    result = cli("babysit", "--preemptible", "--name", "pod", "--poll", "0.3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run mine finished: step {STEPS}" in result.stdout
    assert "restarts: 0 preemption(s), 0 failure(s), 1 launch(es)" in result.stdout
    assert "run mine already runs on every worker of pod: watching it" in result.stderr
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == list(range(1, STEPS + 1))
    # The run goes on with more steps: a babysitter over the finished saved state watches
    # it to its new end (it used to say finished at once, from the saved state).
    more = cli(
        "run", TINY, "--name", "pod", "--all-workers", "--run-id", "mine",
        "--", *OVERRIDES, f"run_dir={run_dir}", f"train.steps={STEPS + 4}",
    )  # fmt: skip
    assert more.returncode == 0, more.stderr
    again = cli("babysit", "--preemptible", "--name", "pod", "--poll", "0.3")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"run mine finished: step {STEPS + 4}" in again.stdout


@pytest.mark.parametrize("where", ["local", "gs"])
def test_progress_is_read_incrementally_and_a_half_written_line_waits(where, tmp_path, request):
    from tpuctl.babysit import MetricsTail
    from trainer import io

    run_dir = str(tmp_path) if where == "local" else "gs://test-bucket/runs/progress"
    if where == "gs":
        request.getfixturevalue("gcs")
    path = io.join(run_dir, "metrics.jsonl")
    tail = MetricsTail(run_dir)
    assert tail.poll() == [] and tail.last_step is None  # no metrics yet
    first = json.dumps({"step": 1, "loss": 2.5}) + "\n"
    io.write_text(path, first + '{"step": 2, "lo')  # the trainer is mid-line
    assert [r["step"] for r in tail.poll()] == [1]
    io.write_text(path, first + json.dumps({"step": 2, "loss": 2.0}) + "\n")
    assert tail.poll() == [{"step": 2, "loss": 2.0}]
    assert (tail.last_step, tail.last_loss) == (2, 2.0)
    assert tail.poll() == []  # nothing new
    io.write_text(path, json.dumps({"step": 1, "loss": 2.5}) + "\n")  # recreated, shorter
    assert [r["step"] for r in tail.poll()] == [1]
    assert not tail.cache_progress
    # A token cache build's progress record is progress (no hang), but no step.
    line = json.dumps({"data_cache": "data: cache 3/40 files, 1.2M tokens/s, ETA 5m00s"})
    io.write_text(path, json.dumps({"step": 1, "loss": 2.5}) + "\n" + line + "\n")
    assert tail.poll() == [] and tail.cache_progress and tail.last_step == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["v4-16", TINY], "error: babysit needs a node name: pass --name NAME"),
        (["v4-16", TINY, "-n", "p", "--spot", "--preemptible"], "error: --spot and --preemptible"),
        (["v4-16", TINY, "-n", "p", "--poll", "soon"], "error: --poll 'soon' is not a duration"),
        (["--name", "nowhere"], "error: no node named 'nowhere'"),
        (["mine"], "error: 'mine' is not a TPU type (e.g. v4-32); the node goes in --name"),
        (["v9-16", TINY, "-n", "p"], "error: unknown TPU generation 'v9' in 'v9-16'"),
        (["v4-16", TINY, "-n", "p", "--run-id", "../../x"], "error: --run-id '../../x' is not"),
    ],
)
def test_bad_babysit_flags_are_one_line_errors(cli, args, message):
    result = cli("babysit", *args, timeout=60)
    assert result.returncode != 0
    assert result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_babysitter_on_the_same_run_refuses_naming_the_first(cli, tmp_path):
    from tpuctl.babysit import LocalLock

    env = {"XDG_STATE_HOME": cli.env["XDG_STATE_HOME"]}
    os.environ.update(env)  # this process takes the run's lock, as a running babysitter does
    try:
        first = LocalLock("shared-run")
        first.acquire()
        second = cli(*babysit_args("pod", "shared-run", tmp_path / "run"), timeout=60)
        first.release()
    finally:
        os.environ.pop("XDG_STATE_HOME")
    assert second.returncode == 1
    assert second.stderr.startswith(
        f"error: run shared-run is already babysat by pid {os.getpid()} on "
    ), second.stderr
    assert "Traceback" not in second.stderr
    assert not (cli.pods_dir() / "pod").exists()  # refused before touching anything


def test_no_step_progress_is_a_failure_and_the_failure_budget_stops_babysitting(cli, tmp_path):
    run_dir = tmp_path / "run"
    # A run that trains but never logs a step (far too long to finish while it is stopped):
    # no step progress within 1 s of each launch, a hang each time, whatever the machine.
    quiet = ("train.steps=100000", "logging.every_steps=100000")
    args = babysit_args(
        "pod", "hangs", run_dir, "--hang-timeout", "1s", "--max-failures", "1", overrides=quiet
    )
    result = cli(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "error: stopped babysitting run hangs after 2 job failures (--max-failures 1)"
        in result.stderr
    )
    state = cli.state("hangs")
    assert [e["kind"] for e in state["events"]] == ["hang", "hang"]
    assert state["events"][0]["cause"].startswith("no step progress for ")
    assert state["launches"] == 2  # relaunched once, then gave up instead of burning time
    ps = cli("ps", "pod")
    assert "running" not in ps.stdout  # the hung job was stopped before relaunching / giving up


def test_a_recipe_the_trainer_rejects_stops_babysitting_at_once_with_its_line(cli, tmp_path):
    """Exit 2 is bad input: it was relaunched up to --max-failures times, each time failing
    the same way. A data.format that tpuctl's check lets through (it reads no records) and
    the trainer rejects on the first record it tokenizes."""
    from tpuctl.providers.local import LocalProvider

    bad = ("data.format=prompt_completion",)
    result = cli(*babysit_args("pod", "bad-input", tmp_path / "run", overrides=bad))
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()[-1:]
    assert re.fullmatch(
        r"error: stopped babysitting run bad-input: the trainer on w0[01] rejected the run's "
        r"input \(exit 2\), which no relaunch can fix: \S+tiny_train.txt record 1: data.format "
        r"prompt_completion: records need prompt\+completion or instruction\(\+input\)\+output; "
        r"fix the recipe, then `tpuctl run RECIPE --name pod --run-id bad-input --all-workers` "
        r"\(it resumes from the run's checkpoints\) and babysit it again, which carries on what "
        r"you ran \(nothing was recreated or relaunched; see \S+\)",
        line,
    ), result.stderr
    assert "Traceback" not in result.stderr
    state = cli.state("bad-input")
    assert (state["launches"], state["failures"], state["preemptions"]) == (1, 1, 0)
    (event,) = state["events"]
    assert event["exit_code"] == 2 and event["relaunched_s"] is None
    assert any("prompt+completion" in line for line in event["log_tail"]), event["log_tail"]
    assert LocalProvider(cli.pods_dir().parent).get("pod").state == "READY"  # not recreated
    assert "running" not in cli("ps", "pod").stdout  # the job stopped everywhere


def test_a_recipe_that_cannot_resume_the_runs_checkpoints_stops_babysitting_at_once(
    cli, tmp_path, monkeypatch
):
    """Refused by `tpuctl run`'s own check before anything is stored (trainer.resume), the
    first launch of a babysitter was an action failure like any other: retried up to
    --max-failures times, each refused alike, then exit 1."""
    from tpuctl import storage
    from tpuctl.providers.local import running_gcs_emulator_url

    run_dir = tmp_path / "run"
    cli.ok("up", "v4-16", "--local", "--name", "pod")
    cli.ok("run", TINY, "--name", "pod", "--run-id", "kept", "--all-workers", "--follow",
           "--", *OVERRIDES, "train.steps=3", f"run_dir={run_dir}")  # fmt: skip
    monkeypatch.setenv("XDG_STATE_HOME", str(cli.root / "state"))
    stored_uri = "gs://tpuctl-local/tpuctl/runs/kept/recipe.yaml"
    with storage.emulated(running_gcs_emulator_url()):
        stored = storage.read_text(stored_uri)
    lion = ("train.steps=6", "optimizer.name=lion")
    result = cli(*babysit_args("pod", "kept", run_dir, overrides=lion))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: stopped babysitting run kept: {run_dir}/checkpoints holds checkpoints of an "
        "optimizer.name 'adamw' run (newest step 3) and this recipe's optimizer.name is "
        "'lion', whose optimizer state is another: set optimizer.name=adamw to resume it, or a "
        "new run_dir (to start from that run's weights, export them with `python -m "
        "trainer.export` and set model.init_from to the export) (nothing was stored or "
        "launched)"
    ), result.stderr
    assert "action failed" not in result.stdout + result.stderr  # not retried
    with storage.emulated(running_gcs_emulator_url()):
        assert storage.read_text(stored_uri) == stored
    assert json.loads((run_dir / "DONE").read_text())["step"] == 3


def test_a_run_that_diverges_stops_babysitting_at_once_with_the_trainers_line(cli, tmp_path):
    """Exit 65: the trainer stopped a run whose gradient norm was NaN, saving nothing after
    its last finite step; it was relaunched from that checkpoint, to diverge again, up to
    --max-failures times."""
    run_dir = tmp_path / "run"
    diverging = ("optimizer.lr=1e30", "optimizer.warmup_steps=0", "checkpoint.every_steps=1")
    result = cli(*babysit_args("pod", "diverges", run_dir, overrides=diverging))
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()[-1:]
    assert re.fullmatch(
        r"error: stopped babysitting run diverges: the trainer on w0[01] stopped the run, which "
        r"diverged \(exit 65\), before saving a state that is not finite; relaunched with the "
        r"same settings it diverges again: grad_norm is nan at step 2: the run diverged; its "
        r"newest checkpoint, step 1, is from before that, .*; lower optimizer.lr in the recipe "
        r"\(or raise optimizer.warmup_steps\), then `tpuctl run RECIPE --name pod --run-id "
        r"diverges --all-workers` \(it resumes from the run's checkpoints\) and babysit it "
        r"again, .*",
        line,
    ), result.stderr
    assert "Traceback" not in result.stderr
    state = cli.state("diverges")
    assert (state["launches"], state["failures"]) == (1, 1)
    assert state["events"][0]["exit_code"] == 65
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    assert "running" not in cli("ps", "pod").stdout


# -- the SSH test pod through the fake Cloud TPU API ---------------------------------------


@pytest.fixture(scope="module")
def ssh_pod2(make_ssh_pod):
    """Two sshd hosts: the workers of every v4-16 the fake API creates."""
    return make_ssh_pod(2)


@pytest.fixture
def gcs_for_hosts(ssh_pod2):
    """A GCS emulator on the pod's gateway address, which the hosts reach too."""
    with GcsEmulator(host=ssh_pod2.gateway) as emulator:
        emulator.create_bucket("test-bucket")
        yield emulator.url


@pytest.fixture
def cloud_cli(fake_tpu, ssh_pod2, pod_key, gcs_for_hosts, tmp_path):
    """`tpuctl` against the fake API, whose nodes' workers are the two sshd hosts."""
    fake_tpu.worker_ips = lambda _name, count: ssh_pod2.hosts[:count]
    cli = Cli(tmp_path)
    cli.env.update(emulator_env(gcs_for_hosts))
    for name in ("TPUCTL_TPU_API_ENDPOINT", "TPUCTL_PROJECT", "TPUCTL_ZONE", "TPUCTL_TIME_SCALE"):
        cli.env[name] = os.environ[name]
    cli.env.update(
        TPUCTL_PROVIDER="cloud",
        TPUCTL_SSH_KEY=pod_key[0],
        TPUCTL_SSH_USER="root",
        TPUCTL_BUCKET="test-bucket",
    )
    config = tmp_path / "config" / "tpuctl" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(f"worker:\n  python: {sys.executable}\n")
    yield cli
    for index in range(ssh_pod2.n):  # nothing of this test's run survives it
        ssh_pod2.stop_host(index)
        ssh_pod2.start_host(index)


def take_hosts_away(pod) -> None:
    """What a preemption does to the VMs: every process on every host ends. The fake API
    gives the recreated node the same addresses, so the hosts come back."""
    for index in range(pod.n):
        pod.stop_host(index)
    for index in range(pod.n):
        pod.start_host(index)


def kill_trainer_on_host(cli: Cli, pod, index: int) -> None:
    """SIGKILL the trainer on one host, inside that host's own process namespace."""
    from tests.fixtures_pod import pod_hosts
    from tpuctl.fanout import run

    script = (
        'ps -eo pid=,args= | awk \'$3 == "-m" && $4 == "trainer" {print $1}\' | '
        "xargs -r kill -KILL && echo killed"
    )
    host = pod_hosts(pod, (cli.env["TPUCTL_SSH_KEY"], ""), str(cli.root / "kh"))[index]
    result = run([host], script)[0]
    assert result.ok and "killed" in result.stdout, result


def api_requests(fake_tpu, method: str) -> int:
    return sum(1 for verb, _path in list(fake_tpu.requests) if verb == method)


@pytest.mark.pod
def test_babysit_on_the_ssh_test_pod_through_vanish_stockouts_outage_preemption_and_crash(
    cloud_cli, fake_tpu, ssh_pod2, reference, tmp_path, monkeypatch
):
    """The run directory is in GCS, as babysit requires of a Cloud TPU node's run: the
    workers' own disks do not outlive a recreated node (it used to be a directory the test
    pod's hosts share with this machine, as no real pod's do)."""
    from tpuctl import storage

    cli, run_dir = cloud_cli, "gs://test-bucket/runs/ssh"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", cli.env["STORAGE_EMULATOR_HOST"])
    log = cli.root / "state" / "tpuctl" / "babysit" / "ssh.log"
    proc = cli.start(*babysit_args("pod", "ssh", run_dir, "--spot"))
    wait_for(step_reached(run_dir, 3), "step 3", proc)  # babysit created pod and launched
    assert fake_tpu.node("pod")["schedulingConfig"] == {"spot": True}  # queued, as v4 pods are

    fake_tpu.fail_queued(2)  # no capacity twice: the recreation has to wait for it
    fake_tpu.vanish("pod")  # no PREEMPTED state: the node is just gone
    take_hosts_away(ssh_pod2)
    seen = len(metrics(run_dir))
    wait_for(step_reached(run_dir, 6, seen), "step 6 after the node vanished", proc)
    assert log.read_text().count("ended FAILED: no capacity could be found") == 2

    deletes, launches = api_requests(fake_tpu, "DELETE"), cli.state("ssh")["launches"]
    fake_tpu.fail_next(12)  # every request fails for three looks at the node
    wait_for(lambda: "TPU API answering again" in log.read_text(), "the API back", proc)
    assert "TPU API unavailable" in log.read_text()
    seen = len(metrics(run_dir))
    wait_for(step_reached(run_dir, 9, seen), "step 9 after the API outage", proc)
    assert api_requests(fake_tpu, "DELETE") == deletes  # a failing API deletes nothing
    assert cli.state("ssh")["launches"] == launches  # ... and launches nothing

    fake_tpu.preempt("pod")
    take_hosts_away(ssh_pod2)
    seen = len(metrics(run_dir))
    wait_for(step_reached(run_dir, 12, seen), "step 12 after the preemption", proc)
    kill_trainer_on_host(cli, ssh_pod2, 1)
    proc.wait(timeout=RUN_TIMEOUT_S)
    out = output(proc)
    assert proc.returncode == 0, out
    assert f"run ssh finished: step {STEPS}" in out
    assert "restarts: 2 preemption(s), 1 failure(s), 4 launch(es)" in out
    causes = [(e["kind"], e["cause"]) for e in cli.state("ssh")["events"]]
    assert causes[:2] == [("preemption", "node pod missing"), ("preemption", "node pod PREEMPTED")]
    assert causes[2][0] == "failure" and "w01 exited" in causes[2][1]
    assert api_requests(fake_tpu, "DELETE") == deletes + 1  # only the PREEMPTED node's
    assert fake_tpu.node("pod")["state"] == "READY"  # not deleted when done (no flag)
    # The state and the (released) lease are in GCS too, for a babysitter elsewhere.
    shared = json.loads(storage.read_text("gs://test-bucket/tpuctl/runs/ssh/babysit.json"))
    assert (shared["preemptions"], shared["failures"], shared["finished"]) == (2, 1, True)
    lease = json.loads(storage.read_text("gs://test-bucket/tpuctl/runs/ssh/babysit.lease"))
    assert lease["released"] and lease["holder"].startswith(f"pid {proc.pid} on ")
    assert_same_training(reference, storage_copy(run_dir, tmp_path / "run"))


@pytest.mark.pod
def test_with_max_preemptions_0_a_run_dir_on_the_workers_disks_is_read_on_worker_0(
    cloud_cli, ssh_pod2, tmp_path
):
    """A babysitter that never recreates the node (--max-preemptions 0) may watch a run
    whose run_dir is on the workers' own disks: it reads metrics and DONE on worker 0, not
    the file of that name on this machine (here another run's finished DONE, which it took
    for this run's end before the run even started). One host (a v3-8): the checkpoints of
    several processes need a directory they all see."""
    cli, run_dir = cloud_cli, tmp_path / "run"  # /tmp: each test pod host has its own
    run_dir.mkdir()
    (run_dir / "DONE").write_text('{"step": 999, "final": {"loss": 9.0}, "wall_time_s": 1}\n')
    args = babysit_args(
        "pod", "disks", run_dir, "--max-preemptions", "0", overrides=("train.steps=6",),
        accelerator_type="v3-8",
    )  # fmt: skip
    result = cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "run disks finished: step 6, final loss " in result.stdout
    assert "restarts: 0 preemption(s), 0 failure(s), 1 launch(es)" in result.stdout
    state = cli.state("disks")
    assert (state["step"], state["final_step"]) == (6, 6)  # worker 0's metrics.jsonl
    assert sorted(p.name for p in run_dir.iterdir()) == ["DONE"]  # nothing written here


def storage_copy(run_dir: str, target: Path) -> Path:
    """A gs:// run directory copied to `target`, to compare with a local one."""
    from tpuctl import storage

    storage.download_prefix(run_dir, target)
    return target


def download(client, bucket: str, prefix: str, target: Path) -> Path:
    """Every object under gs://BUCKET/PREFIX, copied to `target` (a local run directory)."""
    for blob in client.list_blobs(bucket, prefix=f"{prefix}/"):
        path = target / blob.name[len(prefix) + 1 :]
        path.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(path))
    return target


@pytest.mark.pod
@pytest.mark.slow
def test_a_failed_checkpoint_save_on_the_ssh_test_pod_is_a_failure_relaunched_at_once(
    cloud_cli, ssh_pod2, reference, tmp_path
):
    """The run's GCS refuses the first write of step 6's checkpoint: every trainer process
    exits 74, and the babysitter (hang timeout: the default 30 minutes) records a failure
    and relaunches from step 3 at once, instead of the pod idling until a hang is noticed;
    the run finishes with the uninterrupted run's losses and parameters."""
    cli = cloud_cli
    faulty = GcsEmulator(
        host=ssh_pod2.gateway, fail_writes=r"/runs/savefail/checkpoints/6[./]", fail_times=1
    )
    with faulty:
        faulty.create_bucket("test-bucket")
        cli.env.update(emulator_env(faulty.url))
        proc = cli.start(*babysit_args("pod", "savefail", "gs://test-bucket/runs/savefail"))
        proc.wait(timeout=RUN_TIMEOUT_S)
        out = output(proc)
        assert proc.returncode == 0, out
        assert f"run savefail finished: step {STEPS}" in out
        assert "restarts: 0 preemption(s), 1 failure(s), 2 launch(es)" in out
        (event,) = cli.state("savefail")["events"]
        assert (event["kind"], event["exit_code"]) == ("failure", 74), event
        assert any("checkpoint save of step 6 failed" in line for line in event["log_tail"]), event
        assert event["relaunched_s"] < 60, event  # a poll or two, plus stopping the job
        run_dir = download(faulty.client(), "test-bucket", "runs/savefail", tmp_path / "run")
    assert_same_training(reference, run_dir)


# -- on a shared project: the fake Cloud TPU API ----------------------------------------


def cloud_env(cli: Cli, gcs_url: str) -> None:
    """`tpuctl` as a user of the shared project runs it, against the fake API and GCS."""
    cli.env.update(emulator_env(gcs_url))
    for name in ("TPUCTL_TPU_API_ENDPOINT", "TPUCTL_PROJECT", "TPUCTL_ZONE", "TPUCTL_TIME_SCALE"):
        cli.env[name] = os.environ[name]
    cli.env.update(TPUCTL_PROVIDER="cloud", TPUCTL_BUCKET="test-bucket")


def our_labels(run_id: str) -> dict[str, str]:
    from tpuctl.config import local_user
    from tpuctl.ownership import ownership_labels

    return ownership_labels(local_user(), run_id)


def test_a_colleagues_preempted_node_of_the_same_name_is_left_alone(fake_tpu, gcs, tmp_path):
    from tpuctl.ownership import ownership_labels

    fake_tpu.add_node(
        "pod", "v4-16", project="test-project", zone="us-central1-a", state="PREEMPTED",
        labels=ownership_labels("bob", "bobs-run"),
    )  # fmt: skip
    cli = Cli(tmp_path)
    cloud_env(cli, gcs.url)
    result = cli(*babysit_args("pod", "mine", "gs://test-bucket/runs/mine"), timeout=120)
    assert result.returncode == 1, result.stderr
    assert (
        "error: stopped babysitting run mine: node pod is not yours (labels tpuctl-user=bob, "
        "tpuctl-run=bobs-run): babysit leaves it alone; babysit another --name"
    ) in result.stderr
    assert [verb for verb, _path in fake_tpu.requests] == ["GET"]  # looked, touched nothing
    assert fake_tpu.node_state("pod") == "PREEMPTED"


def test_a_run_dir_on_the_workers_own_disks_is_refused_before_anything_is_done(
    fake_tpu, gcs, tmp_path
):
    """A Cloud TPU node's run with a plain-path run_dir: babysit read a file of that name on
    this machine (never the run's DONE), and a recreated node's empty disks made the run
    start over from step 0. It is refused in one line, exit 2, before any TPU API call."""
    cli = Cli(tmp_path)
    cloud_env(cli, gcs.url)
    result = cli(*babysit_args("pod", "disks", Path("/tmp/run")), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "error: run_dir /tmp/run is on each worker's own disk: babysit cannot read the run's "
        "progress or DONE from here, and a node it recreates after a preemption starts with "
        "empty disks"
    ), result.stderr
    assert "`-- run_dir=gs://test-bucket/runs/disks`" in result.stderr
    assert "--max-preemptions 0" in result.stderr
    assert fake_tpu.requests == []
    assert cli.state("disks") == {}


@pytest.mark.slow
def test_of_two_babysitters_started_at_once_exactly_one_acts(fake_tpu, gcs, tmp_path):
    """Two machines (two state directories) start a babysitter on the same run at the same
    instant, 20 times: each time one babysits and the other exits naming it."""
    for repetition in range(20):
        run_id = f"shared-{repetition}"
        # The run's node, not READY for now: the babysitter that wins waits on it.
        fake_tpu.add_node(
            f"pod-{repetition}", "v4-16", project="test-project", zone="us-central1-a",
            state="REPAIRING", labels=our_labels(run_id),
        )  # fmt: skip
        sitters = []
        for machine in ("a", "b"):
            (tmp_path / f"{machine}-{repetition}").mkdir()
            cli = Cli(tmp_path / f"{machine}-{repetition}")
            cloud_env(cli, gcs.url)
            node, run_dir = f"pod-{repetition}", f"gs://test-bucket/runs/{run_id}"
            sitters.append((cli, babysit_args(node, run_id, run_dir, "--not-ready-grace", "1h")))
        procs = [cli.start(*args) for cli, args in sitters]
        wait_for(lambda ps=procs: any(p.poll() is not None for p in ps), "one to refuse")
        refused = [p for p in procs if p.poll() is not None]
        assert len(refused) == 1, [output(p) for p in procs]
        (acting,) = [p for p in procs if p not in refused]
        holder = f"pid {acting.pid} on "
        assert refused[0].returncode == 1
        assert f"error: run {run_id} is already babysat by {holder}" in output(refused[0])
        acting.send_signal(signal.SIGINT)
        try:
            acting.wait(timeout=RUN_TIMEOUT_S)  # a loaded machine stops it slowly
        except subprocess.TimeoutExpired:
            acting.kill()
            raise AssertionError(f"Ctrl-C did not stop it:\n{output(acting)}") from None
        assert acting.returncode == 130, output(acting)
        assert f"babysit: interrupted; node pod-{repetition} and run {run_id}" in output(acting)


def sitter_in_process(tmp_path, *extra: str, **options):
    """A Babysitter in this process, with the settings `tpuctl` would load."""
    from tpuctl import config
    from tpuctl.babysit import BabysitOptions, Babysitter

    settings = config.load()
    for key, value in (extra[i : i + 2] for i in range(0, len(extra), 2)):
        settings.values[key] = value
    user = config.local_user()  # who our_labels says made the node
    babysit = BabysitOptions("v4-16", "pod", TINY, run_id="obs", user=user, **options)
    return Babysitter(settings, babysit)


def test_a_local_pods_gs_recipe_names_the_run_without_run_id(tmp_path, monkeypatch):
    """The recipe was read from storage.googleapis.com, not the local pods' emulator: a
    traceback after a minute of retries."""
    from tpuctl import config, storage
    from tpuctl.babysit import BabysitOptions, Babysitter
    from tpuctl.gcs_emulator import emulator_env
    from tpuctl.providers.local import gcs_emulator_url, stop_gcs_emulator

    for name in ("STORAGE_EMULATOR_HOST", "TPUCTL_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("TPUCTL_PROVIDER", "local")
    uri = "gs://tpuctl-local/tpuctl/runs/stored/recipe.yaml"
    try:
        with monkeypatch.context() as patch:
            for key, value in emulator_env(gcs_emulator_url()).items():
                patch.setenv(key, value)
            text = Path(TINY).read_text().replace("data/", f"{Path(TINY).parent}/data/")
            storage.upload_text(uri, text.replace("run_dir: runs/tiny", "run_dir: /tmp/x"))
        options = BabysitOptions("v4-16", "pod", uri, user=config.local_user())
        assert Babysitter(config.load(), options).run_id.startswith("recipe-")
    finally:
        stop_gcs_emulator()


def test_a_run_taken_over_from_a_local_recipe_file_relaunches_from_its_stored_copy(
    tmp_path, monkeypatch
):
    """The file may have been edited since `run` stored the run's copy: the first
    relaunch reloaded the file (train.steps 8 instead of 60) and overwrote the copy."""
    from tpuctl import config, storage
    from tpuctl.babysit import BabysitOptions, Babysitter
    from tpuctl.gcs_emulator import emulator_env
    from tpuctl.providers.base import NodeSpec
    from tpuctl.providers.local import LocalProvider, gcs_emulator_url, stop_gcs_emulator

    for name in ("STORAGE_EMULATOR_HOST", "TPUCTL_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("TPUCTL_PROVIDER", "local")
    LocalProvider().create(NodeSpec("pod", "local", "v4-16", ""), lambda _m: None)
    text = Path(TINY).read_text().replace("data/", f"{Path(TINY).parent}/data/")
    stored = "gs://tpuctl-local/tpuctl/runs/H/recipe.yaml"
    try:
        with monkeypatch.context() as patch:
            for key, value in emulator_env(gcs_emulator_url()).items():
                patch.setenv(key, value)
            storage.upload_text(stored, text.replace("run_dir: runs/tiny", "run_dir: /tmp/stored"))
        edited = tmp_path / "r.yaml"
        edited.write_text(text.replace("steps: 100", "steps: 8"))
        options = BabysitOptions("v4-16", "pod", str(edited), run_id="H", user=config.local_user())
        sitter = Babysitter(config.load(), options)
        sitter._adopt()
        assert (sitter.state.recipe_uri, sitter.state.run_dir) == (stored, "/tmp/stored")
    finally:
        LocalProvider().delete("pod", lambda _m: None)
        stop_gcs_emulator()


def test_overrides_that_would_change_a_saved_runs_stored_recipe_are_refused(tmp_path, monkeypatch):
    """They were ignored: a finished run given `train.steps=200` stayed finished at 100."""
    from tpuctl import config
    from tpuctl.babysit import BabysitOptions, BabysitState, Babysitter, local_state_path
    from tpuctl.errors import TpuctlError
    from tpuctl.providers.local import stop_gcs_emulator

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("TPUCTL_PROVIDER", "local")
    stored = tmp_path / "stored.yaml"
    stored.write_text(Path(TINY).read_text().replace("data/", f"{Path(TINY).parent}/data/"))
    saved = BabysitState("H", "pod", "v4-16", started_at=0.0, recipe_uri=str(stored))
    local_state_path("H").parent.mkdir(parents=True)
    local_state_path("H").write_text(saved.to_json())

    def sitter(*overrides: str) -> Babysitter:
        options = BabysitOptions(
            "v4-16",
            "pod",
            TINY,
            list(overrides),
            run_id="H",
            user=config.local_user(),
            max_restarts=0,  # without the refusal it gives up on the missing node, makes none
        )
        return Babysitter(config.load(), options)

    try:
        for _ in range(2):  # the second is refused alike, not as "already babysat": no lock
            with pytest.raises(TpuctlError, match=r"stored recipe .*stored.yaml, which "
                               r"train.steps=200 would change; to go on with them, run `tpuctl "
                               r"run .*stored.yaml --name pod --run-id H -- train.steps=200` "
                               r"first") as refused:  # fmt: skip
                sitter("train.steps=200").run()
            assert refused.value.exit_code == 2
        sitter("train.steps=100")._refuse_overrides_it_would_drop(saved)  # as it was started
    finally:
        stop_gcs_emulator()


def test_a_recipe_file_edited_since_the_run_started_is_named_with_what_no_relaunch_applies(
    tmp_path, monkeypatch
):
    """Babysitting a saved run again with its recipe file edited since (train.steps 100 ->
    200) relaunched the stored recipe without a word: the run then stopped at step 100."""
    from tpuctl import config
    from tpuctl.babysit import BabysitOptions, BabysitState, Babysitter

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("TPUCTL_PROVIDER", "local")
    text = Path(TINY).read_text().replace("data/", f"{Path(TINY).parent}/data/")
    stored, given = tmp_path / "stored.yaml", tmp_path / "recipe.yaml"
    stored.write_text(text.replace("run_dir: runs/tiny", f"run_dir: {tmp_path / 'runs/tiny'}"))
    saved = BabysitState("H", "pod", "v4-16", started_at=0.0, recipe_uri=str(stored))
    monkeypatch.chdir(tmp_path)  # the file's relative run_dir is the stored absolute one
    lines: list[str] = []

    def note(recipe_text: str, *overrides: str) -> list[str]:
        given.write_text(recipe_text)
        options = BabysitOptions("v4-16", "pod", str(given), list(overrides), run_id="H")
        lines.clear()
        Babysitter(config.load(), options, log=lines.append)._note_edits_it_does_not_apply(saved)
        return lines

    assert note(text) == []  # the file as the run was started from it
    assert note(text.replace("steps: 100", "steps: 50"), "train.steps=100") == []
    (line,) = note(text.replace("steps: 100", "steps: 200"))
    assert line == (
        f"note: {given} differs from run H's stored recipe in train.steps 200 (the run's: "
        f"100); babysit relaunches the stored one ({stored}). To train with {given} as it is "
        f"now, run `tpuctl run {given} --name pod --run-id H` first, then babysit"
    )


def test_a_babysitter_whose_lease_was_taken_over_stops_acting_and_says_by_whom(
    fake_tpu, gcs, tmp_path, monkeypatch
):
    from tpuctl.babysit import StopBabysitting
    from tpuctl.lease import GcsLease

    monkeypatch.setenv("TPUCTL_BUCKET", "test-bucket")
    sitter = sitter_in_process(tmp_path, overrides=["run_dir=gs://test-bucket/r"])
    sitter.claim()
    # Another machine decided the lease had expired (its clock is an hour ahead).
    usurper = GcsLease(sitter.lease.uri, sitter.lease_ttl_s, now=lambda: time.time() + 3600)
    usurper.claim("run obs")
    assert not sitter.lease.heartbeat()
    with pytest.raises(StopBabysitting, match=f"taken over by {re.escape(usurper.holder)}"):
        sitter.cycle()
    assert fake_tpu.requests == []  # it stopped before looking, let alone acting
    sitter.lock.release()


def test_a_ctrl_c_in_a_finaliser_still_stops_the_babysitter_and_frees_its_lease(
    fake_tpu, gcs, tmp_path, monkeypatch
):
    """A KeyboardInterrupt raised inside a callback Python runs for itself (in CI: an
    import's module-lock cleanup) is printed as "Exception ignored" and lost, and the
    babysitter used to go on for good. Ctrl-C now stops it at its next look, wherever it
    lands, and frees the lease for the next babysitter."""
    from tpuctl.babysit import stop_on_signals
    from tpuctl.lease import GcsLease

    monkeypatch.setenv("TPUCTL_BUCKET", "test-bucket")
    fake_tpu.add_node(
        "pod", "v4-16", project="test-project", zone="us-central1-a", state="REPAIRING",
        labels=our_labels("obs"),
    )  # fmt: skip
    sitter = sitter_in_process(
        tmp_path, poll_s=0.05, not_ready_grace_s=3600, overrides=["run_dir=gs://test-bucket/r"]
    )
    updates = []

    def ctrl_c_swallowed_once(_state, _view) -> None:
        updates.append(_state)
        assert len(updates) < 3, "the babysitter went on after Ctrl-C"
        if len(updates) == 1:
            finalised = type("Finalised", (), {})()
            weakref.finalize(finalised, os.kill, os.getpid(), signal.SIGINT)
            del finalised  # the finaliser runs here: Python would swallow an interrupt

    sitter.on_update = ctrl_c_swallowed_once
    with pytest.raises(KeyboardInterrupt), stop_on_signals(sitter.stopping):
        sitter.run()
    assert len(updates) == 1
    assert not sitter.lock.holding
    GcsLease(sitter.lease.uri, sitter.lease_ttl_s).claim("run obs")  # free for the next one


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_ctrl_c_or_sigterm_interrupts_the_babysitter_at_once(signum):
    from tpuctl.babysit import stop_on_signals

    stopping = threading.Event()
    before = signal.getsignal(signum)
    with stop_on_signals(stopping):
        signal.raise_signal(signum)  # the first asks it to stop at its next look
        assert stopping.is_set()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signum)
    assert signal.getsignal(signum) is before


def test_http_429_from_the_tpu_api_is_waited_out_not_fatal(fake_tpu, tmp_path):
    from tpuctl.babysit_policy import Wait, decide

    sitter = sitter_in_process(tmp_path)
    fake_tpu.fail_next(8, status=429)  # the quota of reads exhausted for a while
    for _ in range(2):  # each look retries its read 4 times, then reports the 429
        observation = sitter.observe()
        assert observation.api_error is not None and "429" in observation.api_error
        assert isinstance(decide(sitter.state, observation, sitter.options), Wait)


CLI_ONLY_READS = """
import sys
for name in ("fsspec", "gcsfs", "jax"):
    sys.modules[name] = None  # as after `pip install tpuctl`, without the trainer's extra
from tpuctl import storage
from tpuctl.babysit import MetricsTail, read_done

run = sys.argv[1]
tail = MetricsTail(run)
steps = lambda: [record["step"] for record in tail.poll()]
before = (steps(), read_done(run))
storage.upload_text(f"{run}/metrics.jsonl", '{"step": 1, "loss": 3.0}\\n{"step": 2, "loss": 2.')
first = steps()  # step 2's line is still being written
storage.upload_text(f"{run}/metrics.jsonl", '{"step": 1, "loss": 3.0}\\n{"step": 2, "loss": 2.5}\\n')
grown = steps()
storage.upload_text(f"{run}/metrics.jsonl", '{"step": 3, "loss": 2.0}\\n')
recreated = steps()
storage.upload_text(f"{run}/DONE", '{"step": 3, "final": {}, "wall_time_s": 1.0}')
print(before, first, grown, recreated, read_done(run)["step"])
"""


def test_a_cli_only_install_reads_a_gs_run_dirs_metrics_and_done(gcs):
    """babysit read a gs:// run directory through the trainer's gcsfs, which `pip install
    tpuctl` does not bring: every look failed, so it never saw a step, a preemption or
    the end. It reads through google-cloud-storage, new bytes only."""
    run = "gs://test-bucket/runs/cli-only"
    result = subprocess.run(
        [sys.executable, "-c", CLI_ONLY_READS, run], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "([], None) [1] [2] [3] 3"


def test_gcs_read_errors_on_metrics_and_done_are_waited_out(fake_tpu, tmp_path, monkeypatch):
    from tpuctl.babysit import MetricsTail
    from tpuctl.providers.local import free_port

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nobody
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    sitter = sitter_in_process(tmp_path)
    sitter.state.run_dir = "gs://test-bucket/runs/obs"
    sitter.metrics = MetricsTail(sitter.state.run_dir)
    observation = sitter.observe()
    assert observation.storage_error is not None
    assert observation.storage_error.startswith("cannot read gs://test-bucket/runs/obs: ")


def test_an_observation_is_timed_once_the_tpu_api_answered(fake_tpu, tmp_path):
    """An event's `at` is when the babysitter knew: a preemption seen by an observation
    timed before it asked the API would count from before it happened (the recovery
    benchmark read a detection lag of -0.11 s)."""
    fake_tpu.add_node(
        "pod", "v4-16", project="test-project", zone="us-east1-d", labels=our_labels("obs")
    )
    sitter = sitter_in_process(tmp_path, "accelerators.v4-16.zones", ["us-east1-d"])
    sitter.clock = lambda: float(len(fake_tpu.requests))  # "time": API requests so far
    observation = sitter.observe()
    assert observation.node is not None
    assert observation.now == len(fake_tpu.requests) > 0


def test_a_run_that_finishes_while_it_is_observed_is_seen_finished(
    fake_tpu, gcs, tmp_path, monkeypatch
):
    """Worker 0 writes DONE, then every worker exits 0. Read before the jobs, DONE could be
    missed and the ended jobs then count as a failure (a finished run relaunched, or the
    babysitter exiting 1 once its failure budget was spent)."""
    from tpuctl import jobs, storage
    from tpuctl.babysit import MetricsTail

    fake_tpu.add_node(
        "pod", "v4-16", project="test-project", zone="us-east1-d", labels=our_labels("obs")
    )
    sitter = sitter_in_process(tmp_path, "accelerators.v4-16.zones", ["us-east1-d"])
    sitter.state.run_dir = "gs://test-bucket/runs/obs"
    sitter.metrics = MetricsTail(sitter.state.run_dir)

    def the_run_finishes_meanwhile(hosts, run_id):  # the trainer's order: DONE, then exit
        storage.upload_text("gs://test-bucket/runs/obs/DONE", '{"step": 8, "final": {"loss": 1.5}}')
        return [jobs.WorkerJob(h.label, "exited", run_id=run_id, exit_code=0) for h in hosts]

    monkeypatch.setattr(jobs, "status", the_run_finishes_meanwhile)
    observation = sitter.observe()
    assert observation.progress.done == {"step": 8, "final": {"loss": 1.5}}


def test_the_node_is_looked_for_where_it_lives_first_its_remembered_zone(fake_tpu, tmp_path):
    fake_tpu.add_node(
        "pod", "v4-16", project="test-project", zone="us-east1-d", labels=our_labels("obs")
    )
    sitter = sitter_in_process(tmp_path, "accelerators.v4-16.zones", ["us-east1-d"])
    observation = sitter.observe()  # nothing remembered: the plan's zones, in order
    assert observation.node is not None and observation.node.zone == "us-east1-d"
    sitter.state.zone, sitter.state.project = "us-east1-d", "test-project"
    fake_tpu.requests.clear()
    assert sitter.observe().node.zone == "us-east1-d"
    assert {path for _verb, path in fake_tpu.requests} == {
        "/v2/projects/test-project/locations/us-east1-d/nodes/pod"
    }
    # Remembered where the lost node was, while its replacement, interrupted (a Ctrl-C),
    # came up in the fallback zone: found there, not created a second time.
    sitter.state.zone = "us-central1-a"
    assert sitter.observe().node.zone == "us-east1-d"


# -- on a shared project: the fake API whose nodes are the sshd hosts ---------------------


@pytest.mark.pod
def test_a_key_the_node_refuses_stops_babysitting_and_deletes_nothing(
    cloud_cli, fake_tpu, ssh_pod2, tmp_path
):
    """A babysitter carrying on from another machine whose key the node does not accept
    (the README's "READY with workers SSH cannot reach" must never mean a deletion)."""
    from tpuctl import storage
    from tpuctl.babysit_policy import BabysitState
    from tpuctl.testing.sshpod import make_keypair

    cli = cloud_cli
    (tmp_path / "new-machine").mkdir()
    wrong_key, _public = make_keypair(tmp_path / "new-machine")
    cli.env["TPUCTL_SSH_KEY"] = wrong_key
    fake_tpu.add_node(
        "pod", "v4-16", project="test-project", zone="us-central1-a",
        worker_ips=ssh_pod2.hosts[:2], labels=our_labels("elsewhere"),
    )  # fmt: skip
    run_dir = "gs://test-bucket/runs/elsewhere"
    saved = BabysitState("elsewhere", "pod", "v4-16", launches=1, run_dir=run_dir)
    env = {k: cli.env[k] for k in ("STORAGE_EMULATOR_HOST",)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", env["STORAGE_EMULATOR_HOST"])
        storage.upload_text("gs://test-bucket/tpuctl/runs/elsewhere/babysit.json", saved.to_json())
    args = babysit_args("pod", "elsewhere", run_dir, "--not-ready-grace", "1s")
    result = cli(*args, timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "carrying on from saved state: 1 launch(es)" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: stopped babysitting run elsewhere: cannot log in to pod, which the TPU API says "
        "is READY: w00: unreachable: authentication failed: no key accepted for user 'root' "
        f"(tried {wrong_key})"
    ), last
    assert "Nothing was deleted" in last and "ssh.key PATH" in last
    assert api_requests(fake_tpu, "DELETE") == api_requests(fake_tpu, "POST") == 0
    assert fake_tpu.node_state("pod") == "READY"
    # With no run named, worker 0 is asked for its latest: refused, that is not "no run yet".
    alone = cli("babysit", "--preemptible", "--name", "pod", timeout=120)
    assert alone.returncode == 1, alone.stdout + alone.stderr
    assert alone.stderr.startswith(
        "error: cannot ask w00 of pod for its latest run: unreachable: authentication failed"
    ), alone.stderr


@pytest.mark.pod
@pytest.mark.slow
def test_after_a_stockout_the_node_in_the_fallback_zone_is_the_only_one_and_runs_once(
    cloud_cli, fake_tpu
):
    cli, run_dir = cloud_cli, "gs://test-bucket/runs/fallback"
    config = cli.root / "config" / "tpuctl" / "config.yaml"
    config.write_text(config.read_text() + "accelerators:\n  v4-16:\n    zones: [us-east1-d]\n")
    fake_tpu.fail_queued(1)  # no capacity in us-central1-a: the queued resource ends FAILED
    run_id = "llama-3.1-fallback"  # dots: not a valid label value as it is
    proc = cli.start(*babysit_args("pod", run_id, run_dir, overrides=("train.steps=6",)))
    nodes_seen = set()

    def finished() -> bool:
        nodes_seen.add(len(fake_tpu.nodes))
        return proc.poll() is not None

    wait_for(finished, "the run to finish")
    out = output(proc)
    assert proc.returncode == 0, out
    assert f"run {run_id} finished: step 6" in out
    assert "restarts: 0 preemption(s), 0 failure(s), 1 launch(es)" in out
    assert nodes_seen <= {0, 1}  # never two nodes at once
    assert list(fake_tpu.nodes) == ["projects/test-project/locations/us-east1-d/nodes/pod"]
    assert cli.state(run_id)["zone"] == "us-east1-d"
    assert fake_tpu.node("pod")["labels"] == our_labels(run_id)  # tpuctl-run: llama-3-1-fallback
    assert "stockout in us-central1-a (attempt 1): queued resource pod ended FAILED" in out


def test_a_run_the_user_stops_with_tpuctl_kill_is_not_started_again(cli, tmp_path):
    """The babysitter took the kill's clean exit (75, checkpoint saved) for a maintenance
    event and launched the run again behind the user's back; babysitting it again later
    carries it on from that checkpoint."""
    run_dir = tmp_path / "run"
    proc = cli.start(*babysit_args("pod", "stopped", run_dir))
    wait_for(step_reached(run_dir, 4), "step 4", proc)
    killed = cli("kill", "pod")
    assert killed.returncode == 0, killed.stderr
    assert proc.wait(timeout=RUN_TIMEOUT_S) == 1
    out = output(proc)
    assert (
        "error: stopped babysitting run stopped: its job was stopped with `tpuctl kill`" in out
    ), out
    state = cli.state("stopped")
    assert (state["launches"], state["clean_stops"], state["failures"]) == (1, 0, 0), state
    ps = cli.ok("ps", "pod")
    assert "running" not in ps, ps
    again = cli(*babysit_args("pod", "stopped", run_dir))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"run stopped finished: step {STEPS}" in again.stdout
    assert "trainer: resuming from checkpoint step" in cli.ok("logs", "pod")
