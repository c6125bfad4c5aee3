"""`tpuctl run / logs / ps / kill` end to end on local pods: the real CLI in a subprocess,
the real trainer as jax.distributed processes on the CPU, the recipe stored in the local
pods' GCS emulator."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from local_cli import LocalCli
from polling import wait_for

REPO = Path(__file__).resolve().parent.parent
SLOW_S = 300.0  # a training run on 2 shared cores
TINY = str(REPO / "recipes" / "tiny.yaml")
# Few, small steps: the point is the job machinery, not the model.
FAST = ["train.batch_size=16", "train.grad_accum=1", "eval.every_steps=0", "logging.every_steps=1"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    cli = LocalCli(tmp_path_factory.mktemp("local-jobs"))
    yield cli
    for name in ("pod", "big"):
        cli("down", name, "--yes")  # stops leftover jobs and the GCS emulator


@pytest.fixture(scope="module")
def pod(cli):
    """A 2-worker local pod (v4-16: 2 processes x 4 devices)."""
    cli.ok("up", "v4-16", "--local", "--name", "pod")
    yield "pod"


@pytest.fixture
def idle_pod(pod, cli):
    """The pod, with no job left running after the test, whatever the test did."""
    yield pod
    cli("kill", pod, "--grace", "5")


def ps_rows(cli, *node):
    lines = cli.ok("ps", *node).splitlines()[1:]
    return [line.split(None, 3) for line in lines]


def live_processes(text: str) -> list[str]:
    """Command lines on this machine containing `text` (zombies excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(cmdline)
    return found


def worker_hosts(cli, name: str):
    """The pod's workers as tpuctl.jobs takes them, to start stand-in jobs on them directly."""
    from tpuctl.config import Settings
    from tpuctl.hosts import hosts_for
    from tpuctl.providers.local import LocalProvider

    return hosts_for(Settings(), LocalProvider(cli.root / "state" / "tpuctl" / "local").get(name))


@pytest.mark.slow
def test_run_follow_on_a_four_worker_pod_trains_and_reports_the_final_loss(cli, tmp_path):
    cli.ok("up", "v4-32", "--local", "--name", "big")  # 4 workers x 4 devices
    run_dir = tmp_path / "run"
    out = cli.ok(
        "run", TINY, "--name", "big", "--all-workers", "--follow", "--run-id", "e2e",
        "--", "train.steps=3", "train.batch_size=32", "train.grad_accum=1", "eval.every_steps=0",
        "logging.every_steps=1", f"run_dir={run_dir}",
    )  # fmt: skip
    assert "run e2e started on 4 workers of big" in out
    assert "gs://tpuctl-local/tpuctl/runs/e2e/recipe.yaml" in out
    assert "w00 | trainer:" in out
    assert "x 1 machine(s) of 4 process(es)" in out  # one jax.distributed job, one machine
    done = json.loads((run_dir / "DONE").read_text())
    assert done["step"] == 3
    assert f"run e2e finished: step 3, final loss {done['final']['loss']:.4f}" in out
    assert f"checkpoints: {run_dir}/checkpoints" in out
    rows = ps_rows(cli, "big")
    assert [row[:3] for row in rows] == [[f"w0{i}", "e2e", "exited"] for i in range(4)]
    assert all(row[3].startswith("0 ") for row in rows)
    # each worker's last line says where it is, not only process 0's (which logs the run)
    for index, row in enumerate(rows[1:], 1):
        assert row[3].endswith(f"trainer: process {index} of 4 finished at step 3"), row
    assert "deleted big" in cli.ok("down", "big", "--yes")


def test_recipe_errors_are_caught_before_anything_is_launched(cli, pod):
    result = cli("run", TINY, "--name", "pod", "--all-workers", "--", "train.stepz=3")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: recipe")
    assert "unknown key train.stepz" in result.stderr and "Traceback" not in result.stderr
    # Wrong for this node's 8 devices: caught here too, not on the workers.
    result = cli("run", TINY, "--name", "pod", "--all-workers", "--", "train.batch_size=4")
    assert result.returncode == 2 and "8 devices" in result.stderr
    assert "absent" in cli.ok("ps", "pod")
    result = cli("run", TINY, "--name", "pod")
    assert result.returncode == 2 and "--all-workers" in result.stderr
    # gs:// recipes are read (here from the local pods' GCS emulator) and checked the same way.
    missing = "gs://tpuctl-local/no/such/recipe.yaml"
    result = cli("run", missing, "--name", "pod", "--all-workers")
    assert result.returncode == 2 and f"recipe {missing} does not exist" in result.stderr


@pytest.mark.slow
def test_ctrl_c_stops_following_only_second_run_refused_secrets_hidden_kill_ends_all(
    cli, idle_pod, tmp_path
):
    secret = "wandb-secret-value-42"
    cli.env["MY_LOCAL_TOKEN"] = "hf-token-value-43"
    follower = subprocess.Popen(
        [sys.executable, "-m", "tpuctl", "run", TINY, "--name", "pod", "--all-workers",
         "--run-id", "long", "--follow", "--env", f"WANDB_API_KEY={secret}",
         "--env", "MY_LOCAL_TOKEN", "--", *FAST, "train.steps=100000",
         f"run_dir={tmp_path / 'long'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli.env, cwd=cli.root,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in follower.stdout], daemon=True
    ).start()
    seen = []
    try:
        while not any("step 1 " in line for line in seen):
            seen.append(lines.get(timeout=300))
        follower.send_signal(signal.SIGINT)  # Ctrl-C stops following, not the job
        _, err = follower.communicate(timeout=60)
    finally:
        follower.kill()
    out = "".join(seen)
    assert follower.returncode == 130
    assert "stopped following; the job keeps running" in err
    assert "run long started" in out
    assert [row[2] for row in ps_rows(cli, "pod")] == ["running", "running"]
    listing = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    assert "tpuctl/runs/long/recipe.yaml" in listing
    assert secret not in listing and "hf-token-value-43" not in listing

    second = cli("run", TINY, "--name", "pod", "--all-workers", "--", *FAST)
    assert second.returncode == 1
    assert "run long is still running on w00, w01" in second.stderr
    assert [row[2] for row in ps_rows(cli, "pod")] == ["running", "running"]

    # SIGTERM: the trainer saves a checkpoint and exits (75) well within the grace period.
    killed = cli.ok("kill", "pod", "--grace", "120").splitlines()
    assert killed == ["w00: stopped long (SIGTERM)", "w01: stopped long (SIGTERM)"]
    assert cli.ok("ps", "pod").count("exited 75") == 2
    assert "trainer: stopped on SIGTERM" in cli.ok("logs", "pod", "-n", "3")
    assert live_processes("tpuctl/runs/long/recipe.yaml") == []
    everything = cli.ok("logs", "pod", "--all-lines")
    assert secret not in everything and secret not in out + err + second.stdout + second.stderr
    assert "nothing running" in cli.ok("kill", "pod")


@pytest.mark.slow
@pytest.mark.slow
def test_a_finished_run_launched_again_with_more_steps_loses_its_done_record_first(
    cli, idle_pod, tmp_path
):
    """Before the trainer started, the old DONE said the new launch had finished: a
    babysitter polling then took it for the end of the run."""
    run_dir = tmp_path / "run"
    launch = ["run", TINY, "--name", "pod", "--all-workers"]
    overrides = ["--", *FAST, f"run_dir={run_dir}"]
    cli.ok(*launch, "--follow", *overrides, "train.steps=2", timeout=SLOW_S)
    assert json.loads((run_dir / "DONE").read_text())["step"] == 2
    again = cli(*launch, *overrides, "train.steps=4")
    assert again.returncode == 0, again.stderr
    assert not (run_dir / "DONE").exists()  # at once, not once the trainer is up
    assert f"{run_dir} finished at step 2 before; going on to step 4" in again.stderr
    cli.ok("logs", "pod", "--tail", timeout=SLOW_S)
    assert json.loads((run_dir / "DONE").read_text())["step"] == 4


@pytest.mark.slow
def test_a_finished_epochs_run_launched_again_never_shows_its_old_done_as_the_new_end(
    cli, idle_pod, tmp_path
):
    """With train.epochs tpuctl cannot tell the launch's steps, and it left the old DONE as
    it was: a launch that failed before its trainer removed it, or a babysitter polling
    before then, took it for this launch's end. Now it is marked pending until the trainer
    confirms the run finished (the record back as it was) or removes it to go on."""
    from tpuctl.jobs.runs import run_summary

    run_dir = tmp_path / "run"
    launch = ["run", TINY, "--name", "pod", "--all-workers"]
    overrides = ["--", *FAST, f"run_dir={run_dir}", "train.steps=null"]
    cli.ok(*launch, "--follow", *overrides, "train.epochs=0.02", timeout=SLOW_S)
    done = (run_dir / "DONE").read_text()
    finished = json.loads(done)["step"]
    again = cli(*launch, *overrides, "train.epochs=0.02")  # finished already: nothing to train
    assert again.returncode == 0, again.stderr
    assert f"{run_dir} finished at step {finished} before; its DONE record counts " in again.stderr
    cli.ok("logs", "pod", "--tail", timeout=SLOW_S)
    assert (run_dir / "DONE").read_text() == done  # confirmed by the trainer, as it was
    longer = cli(*launch, *overrides, "train.epochs=0.04")
    assert longer.returncode == 0, longer.stderr
    assert run_summary(str(run_dir)) is None  # at once, whether the trainer is up or not
    cli.ok("logs", "pod", "--tail", timeout=SLOW_S)
    assert run_summary(str(run_dir))["step"] > finished


def test_a_relaunch_the_trainer_would_refuse_to_resume_leaves_the_run_as_it_was(
    cli, idle_pod, tmp_path, monkeypatch
):
    """Relaunched under another optimizer.name, a run got that recipe stored as its own (what
    its babysitter relaunches) and lost its DONE record before the trainer on the workers
    refused to resume its checkpoints: no relaunch of the run could resume them after."""
    from tpuctl import storage
    from tpuctl.providers.local import running_gcs_emulator_url

    run_dir = tmp_path / "run"
    launch = ["run", TINY, "--name", idle_pod, "--all-workers", "--run-id", "kept"]
    overrides = ["--", *FAST, f"run_dir={run_dir}"]
    cli.ok(*launch, "--follow", *overrides, "train.steps=2", timeout=SLOW_S)
    done, jobs_before = (run_dir / "DONE").read_text(), ps_rows(cli, idle_pod)
    monkeypatch.setenv("XDG_STATE_HOME", str(cli.root / "state"))
    stored_uri = "gs://tpuctl-local/tpuctl/runs/kept/recipe.yaml"
    with storage.emulated(running_gcs_emulator_url()):
        stored = storage.read_text(stored_uri)
    lion = cli(*launch, *overrides, "train.steps=4", "optimizer.name=lion")
    assert lion.returncode == 2, lion.stderr
    assert lion.stderr == (
        f"error: {run_dir}/checkpoints holds checkpoints of an optimizer.name 'adamw' run "
        "(newest step 2) and this recipe's optimizer.name is 'lion', whose optimizer state is "
        "another: set optimizer.name=adamw to resume it, or a new run_dir (to start from that "
        "run's weights, export them with `python -m trainer.export` and set model.init_from "
        "to the export)\n"
    )
    with storage.emulated(running_gcs_emulator_url()):
        assert storage.read_text(stored_uri) == stored
    assert (run_dir / "DONE").read_text() == done
    assert ps_rows(cli, idle_pod) == jobs_before  # nothing launched


def test_a_crashing_worker_shows_in_ps_and_logs(cli, idle_pod, tmp_path):
    cli.ok(
        "run", TINY, "--name", "pod", "--all-workers", "--run-id", "crash",
        "--", *FAST, "train.steps=100000", f"run_dir={tmp_path / 'crash'}",
    )  # fmt: skip
    wait_for(lambda: "step 1 " in cli.ok("logs", "pod", "-n", "5"), timeout=SLOW_S)
    # Worker 1's trainer dies without a word, as under the OOM killer.
    (victim,) = [
        line.split()[0]
        for line in subprocess.run(
            ["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True
        ).stdout.splitlines()
        if "tpuctl/runs/crash/recipe.yaml" in line
        and "w01" in _cwd(line.split()[0])
        and "-m trainer" in line
        and "tpuctl-job" not in line
    ]
    os.kill(int(victim), 9)
    wait_for(lambda: "exited 137" in cli.ok("ps", "pod"), timeout=SLOW_S)
    logs = cli.ok("logs", "pod")
    assert "w01 | tpuctl: job failed: killed by signal 9" in logs
    assert "w00 | step 1 " in logs  # worker 0 in full, worker 1 only its error lines
    assert not any(line.startswith("w01 | step") for line in logs.splitlines())
    cli.ok("kill", "pod", "--grace", "5")
    assert live_processes("tpuctl/runs/crash/recipe.yaml") == []


def test_logs_of_a_run_no_worker_has_is_one_error_line_tailing_or_not(cli, idle_pod):
    """Each worker printed "no tpuctl run ID on this worker" (32 lines on a v3-256) before
    the error; `--tail` printed them and exited 0, as if it had followed a run to its end."""
    from tpuctl import jobs

    for tail in ([], ["--tail"]):
        missing = cli("logs", idle_pod, "--run-id", "nosuch", *tail)
        assert (missing.returncode, missing.stdout) == (1, ""), missing
        assert missing.stderr == "error: no run nosuch on these workers\n"
    # A run on worker 0 alone (w01 recreated since, say): its log, and one line for w01.
    first = worker_hosts(cli, idle_pod)[:1]
    jobs.launch(first, jobs.JobSpec("half", ["sh", "-c", "echo hello"]))
    wait_for(lambda: jobs.status(first, "half")[0].state == "exited", timeout=60)
    for tail in ([], ["--tail"]):
        half = cli("logs", idle_pod, "--run-id", "half", *tail)
        assert (half.returncode, half.stdout) == (0, "w00 | hello\n"), half
        assert half.stderr == "no run half on w01\n"


def test_run_force_says_which_run_it_stopped_on_which_workers(cli, idle_pod, tmp_path):
    """It stopped the running job without a word: nothing said that run `old` had ended,
    nor whether it had had to be SIGKILLed before it could save."""
    from tpuctl import jobs

    jobs.launch(worker_hosts(cli, idle_pod), jobs.JobSpec("old", ["sleep", "600"]))
    replacing = cli(
        "run", TINY, "--name", idle_pod, "--all-workers", "--force", "--run-id", "new",
        "--", *FAST, f"run_dir={tmp_path / 'new'}",
    )  # fmt: skip
    assert replacing.returncode == 0, replacing.stderr
    assert "--force: stopped run old on w00, w01 (SIGTERM)\n" in replacing.stderr
    assert "run new started on 2 workers" in replacing.stdout


def test_ctrl_c_while_run_force_replaces_a_job_leaves_no_half_started_run(cli, idle_pod, tmp_path):
    """Worker 1's old job stopped at once and the new run started there; Ctrl-C while worker
    0's old job still took its time left that half of the new run waiting 15 minutes for
    the rest of the pod to join, and said nothing."""
    from tpuctl import jobs

    hosts = worker_hosts(cli, idle_pod)
    stubborn = 'case "$PWD" in */w00) trap "" TERM;; esac; exec sleep 600'  # w00's ignores TERM
    jobs.launch(hosts, jobs.JobSpec("stubborn", ["bash", "-c", stubborn]))
    replacing = subprocess.Popen(
        [sys.executable, "-m", "tpuctl", "run", TINY, "--name", idle_pod, "--all-workers",
         "--force", "--run-id", "half", "--", *FAST, f"run_dir={tmp_path / 'half'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli.env, cwd=cli.root,
    )  # fmt: skip
    w01_jobs = cli.root / "state/tpuctl/local/pods" / idle_pod / "workers/w01/.tpuctl/jobs"
    try:
        wait_for(lambda: (w01_jobs / "half" / "pid").exists(), what="the new run on w01")
        replacing.send_signal(signal.SIGINT)
        _, err = replacing.communicate(timeout=120)
    finally:
        replacing.kill()
    assert replacing.returncode == 130, err
    assert "interrupted before run half started on every worker" in err
    assert "Traceback" not in err
    assert live_processes("tpuctl/runs/half/recipe.yaml") == []
    assert [j.run_id for j in jobs.status(hosts) if j.state == "running"] == ["stubborn"]


def test_a_run_id_of_another_nodes_run_or_run_dir_is_refused_before_anything_is_written(
    cli, idle_pod, tmp_path, monkeypatch
):
    """Launched on another node, or with another run_dir, under a run's id, `run` stored
    its recipe over the run's: the run's next relaunch (a babysitter's, after a preemption)
    trained the other recipe, on the run's node, in the other run_dir."""
    from tpuctl import storage
    from tpuctl.config import local_user
    from tpuctl.providers.local import running_gcs_emulator_url

    stored_uri = "gs://tpuctl-local/tpuctl/runs/owned/recipe.yaml"
    run_dir = tmp_path / "owned"
    cli.ok(
        "run", TINY, "--name", idle_pod, "--all-workers", "--run-id", "owned",
        "--", *FAST, "train.steps=100000", f"run_dir={run_dir}",
    )  # fmt: skip
    monkeypatch.setenv("XDG_STATE_HOME", str(cli.root / "state"))
    with storage.emulated(running_gcs_emulator_url()):
        stored = storage.read_text(stored_uri)
    assert f"run_dir: {run_dir}\n" in stored
    cli.ok("up", "v3-8", "--local", "--name", "other")
    try:
        elsewhere = cli(
            "run", TINY, "--name", "other", "--run-id", "owned",
            "--", *FAST, f"run_dir={tmp_path / 'other'}",
        )  # fmt: skip
        assert elsewhere.returncode == 2, elsewhere.stderr
        assert elsewhere.stderr == (
            f"error: --run-id owned is node pod's run (launched by {local_user()}; "
            f"{stored_uri}), not other's: give this run another --run-id, or relaunch that "
            "run on its node with --name pod\n"
        )
        assert ps_rows(cli, "other")[0][2] == "absent"  # nothing launched there
    finally:
        cli("down", "other", "--yes")
    # --force stops a running job; it does not make another run_dir this run's.
    another_dir = cli(
        "run", TINY, "--name", idle_pod, "--all-workers", "--force", "--run-id", "owned",
        "--", *FAST, f"run_dir={tmp_path / 'another'}",
    )  # fmt: skip
    assert another_dir.returncode == 2, another_dir.stderr
    assert another_dir.stderr == (
        f"error: --run-id owned is the run in {run_dir} ({stored_uri}) and this recipe's "
        f"run_dir is {tmp_path / 'another'}: give this run another --run-id, or set "
        f"run_dir={run_dir} to go on with that run\n"
    )
    assert [row[:3] for row in ps_rows(cli, idle_pod)] == [
        ["w00", "owned", "running"],
        ["w01", "owned", "running"],
    ]  # not stopped by that --force
    with storage.emulated(running_gcs_emulator_url()):
        assert storage.read_text(stored_uri) == stored
    # The same run on its node (a babysitter's relaunch, a resume) goes on as before.
    again = cli(
        "run", stored_uri, "--name", idle_pod, "--all-workers", "--force", "--run-id", "owned"
    )
    assert again.returncode == 0, again.stderr
    assert "--force: stopped run owned on w00, w01" in again.stderr


FAKE_DOCKER = """
import os, sys
# docker run as tpuctl calls it: only the variables named by -e reach the container.
args = sys.argv[1:]
if args[0] == "pull":
    sys.exit(0)
args, names = args[1:], []
while args[0].startswith("-"):
    option = args.pop(0)
    if option in ("-e", "-v"):
        value = args.pop(0)
        names += [value] if option == "-e" else []
image, command = args[0], args[1:]
base = {n: os.environ[n] for n in ("PATH", "HOME", "PYTHONPATH")}
os.execvpe(command[0], command, base | {n: os.environ[n] for n in names if n in os.environ})
"""


def test_a_container_image_gets_every_variable_the_job_gets(tmp_path):
    """worker.image: TPUCTL_PROCESS_ID, set per worker, never reached the container, so
    every run on a CPU pod stopped at once."""
    cli = LocalCli(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f"#!{sys.executable}\n{FAKE_DOCKER}")
    (bin_dir / "docker").chmod(0o755)
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # the image's
    (bin_dir / "python3").chmod(0o755)
    cli.env["PATH"] = f"{bin_dir}:{cli.env['PATH']}"
    cli.env["PYTHONPATH"] = str(REPO)
    (tmp_path / "tpuctl.yaml").write_text("worker:\n  image: example/trainer:1\n")
    cli.ok("config", "trust")
    cli.ok("up", "v4-8", "--local", "--name", "boxed")
    try:
        out = cli.ok(
            "run", TINY, "--name", "boxed", "--follow", "--run-id", "boxed",
            "--", *FAST, "train.steps=2", f"run_dir={tmp_path / 'run'}", timeout=SLOW_S,
        )  # fmt: skip
        assert "run boxed finished: step 2" in out
    finally:
        cli("down", "boxed", "--yes")


def test_run_follow_reports_a_stop_on_sigterm_as_a_stop_to_resume_not_a_failure(tmp_path):
    """A `tpuctl kill` from another terminal, or a preemption, while following: every worker's
    trainer saved and exited 75, and `run --follow` called the run failed."""
    cli = LocalCli(tmp_path)
    stopped = tmp_path / "stopped-trainer"  # the trainer's end after a SIGTERM, at once
    stopped.write_text("#!/bin/sh\necho 'trainer: stopped on SIGTERM at step 7'\nexit 75\n")
    stopped.chmod(0o755)
    (tmp_path / "tpuctl.yaml").write_text(f"worker:\n  python: {stopped}\n")
    cli.ok("config", "trust")
    cli.ok("up", "v4-16", "--local", "--name", "stopping")
    try:
        out = cli("run", TINY, "--name", "stopping", "--all-workers", "--follow", "--run-id", "s")
    finally:
        cli("down", "stopping", "--yes")
    assert out.returncode == 1
    assert out.stderr.endswith(
        "error: run s stopped on SIGTERM (`tpuctl kill`, or a preemption) with its steps saved:"
        " exit 75 on w00, w01; run it again with the same run_dir to resume\n"
    ), out.stderr
    assert "failed" not in out.stderr


def _cwd(pid: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


@pytest.mark.slow
def test_a_local_pod_is_found_by_name_by_every_command_without_the_provider_setting(tmp_path):
    cli = LocalCli(tmp_path)
    del cli.env["TPUCTL_PROVIDER"]  # as a new user types it: only `up --local` says local
    for name in ("TPUCTL_PROJECT", "TPUCTL_ZONE", "TPUCTL_TPU_API_ENDPOINT"):
        cli.env.pop(name, None)
    cli.ok("up", "v3-8", "--local", "--name", "mine")
    try:
        assert '"provider": "local"' in cli.ok("status", "mine", "--json")
        assert cli.ok("exec", "mine", "--", "echo", "hi").strip() == "[w00] hi"
        run_dir = tmp_path / "run"
        out = cli.ok(
            "run", TINY, "--name", "mine", "--follow", "--run-id", "found",
            "--", *FAST, "train.steps=2", "train.profile_steps=[0,2]", f"run_dir={run_dir}",
        )  # fmt: skip
        assert "run found finished: step 2" in out
        fetched = cli.ok("profile", "mine", "--to", str(tmp_path / "trace"))  # by node name
        assert f"1 trace(s) of {run_dir} in {tmp_path / 'trace'}" in fetched
        assert list((tmp_path / "trace").glob("plugins/profile/*/*.xplane.pb"))
        assert "step 2 " in cli.ok("logs", "mine")
        assert ps_rows(cli, "mine")[0][:3] == ["w00", "found", "exited"]
        assert cli.ok("kill", "mine").strip() == "w00: nothing running"
        babysat = cli("babysit", "--name", "mine")  # the run is DONE: it says so and exits
        assert babysat.returncode == 0, babysat.stderr
        assert "mine" in cli.ok("list") and "local" in cli.ok("list")
    finally:
        assert "deleted mine" in cli.ok("down", "mine", "--yes")
    missing = cli("status", "mine")
    assert missing.returncode == 1 and "no node named 'mine'" in missing.stderr


def test_every_command_that_takes_a_node_as_name_takes_it_as_dash_dash_name_too(cli):
    """`run` and `babysit` take the node as --name; `logs --name NODE` after them used to be
    "no such option"."""
    cli.ok("up", "v3-8", "--local", "--name", "named")
    try:
        assert cli.ok("exec", "--name", "named", "--", "echo", "hi").strip() == "[w00] hi"
        assert '"name": "named"' in cli.ok("status", "--name", "named", "--json")
        assert ps_rows(cli, "--name", "named")[0][:3] == ["w00", "-", "absent"]
        assert cli.ok("kill", "--name", "named").strip() == "w00: nothing running"
        cli.ok("clear-locks", "--name", "named")
        twice = cli("status", "named", "--name", "other")
        assert (twice.returncode, twice.stdout) == (2, "")
        assert (
            twice.stderr == "error: NAME named and --name other are two nodes: give the node once\n"
        )
    finally:
        assert "deleted named" in cli.ok("down", "--name", "named", "--yes")


def test_logs_and_ps_leave_out_gloo_chatter_that_raw_keeps(cli, tmp_path):
    from tpuctl import jobs

    cli.ok("up", "v4-16", "--local", "--name", "chatty")
    try:
        gloo = "[Gloo] Rank 1 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3"
        # Pieces of gloo's line interleaved between its threads and jax's warning about the
        # trainer's recoverability setting, as a 4-process pod's logs have them, and a blank
        # line, which `ps` passes over too.
        pieces = ["Expected number of connected peer ranks is : 31", "1",
                  " peer ranks. Expected number of connected peer ranks is : 3",
                  "W1206 11:25:10.802769   20189 coordination_service.cc:185] [4782202217185705062]"
                  " Using experimental recoverable task feature. The default shutdown barrier will"
                  " only block non-recoverable tasks."]  # fmt: skip
        chatter = "; ".join(f"echo '{line}'" for line in [gloo, *pieces])
        script = f"{chatter}; echo 'step 5  loss 3.1000'; {chatter}; echo"
        hosts = worker_hosts(cli, "chatty")
        jobs.launch(hosts, jobs.JobSpec("gloo", ["bash", "-c", script]))
        wait_for(lambda: [j.state for j in jobs.status(hosts)] == ["exited"] * 2)
        shown = cli.ok("logs", "chatty", "--all-lines").splitlines()
        assert sorted(line for line in shown if line.split("|", 1)[1].strip()) == [
            "w00 | step 5  loss 3.1000",
            "w01 | step 5  loss 3.1000",
        ]
        raw = cli.ok("logs", "chatty", "--raw")
        assert raw.count("[Gloo]") == 2 and raw.count("w00 | 1\n") == 2
        assert [row[3].split(None, 2)[2] for row in ps_rows(cli, "chatty")] == [
            "step 5  loss 3.1000"
        ] * 2
    finally:
        cli.ok("down", "chatty", "--yes")


def test_profile_fetches_a_gs_run_dirs_trace_and_says_what_is_missing(gcs, tmp_path):
    from trainer.tracing import StepTrace

    trace = StepTrace("gs://test-bucket/run", [0, 1])
    trace.at_step(0, None)
    trace.at_step(1, None)
    cli = LocalCli(tmp_path)
    cli.env["STORAGE_EMULATOR_HOST"] = gcs.url
    out = cli.ok("profile", "gs://test-bucket/run", "--to", str(tmp_path / "got"))
    assert out.startswith(f"1 trace(s) of gs://test-bucket/run in {tmp_path / 'got'}: ")
    assert "tensorboard --logdir" in out
    assert list((tmp_path / "got").glob("plugins/profile/*/*.xplane.pb"))
    unknown = cli("profile", "nosuch")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "RUN 'nosuch' is neither a run directory nor a node" in unknown.stderr
    (tmp_path / "bare").mkdir()
    untraced = cli("profile", str(tmp_path / "bare"), "--to", str(tmp_path / "none"))
    assert untraced.returncode == 1 and "set train.profile_steps=[START,END]" in untraced.stderr
