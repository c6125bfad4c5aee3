"""`tpuctl top`: nodes of every configured zone (the fake Cloud TPU API) and local pods,
with the progress of the run on each (a real trainer job on a local pod, babysat)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from local_cli import LocalCli
from polling import wait_for

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "recipes" / "tiny.yaml")


def snapshot(cli: LocalCli) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(cli.ok("top", "--once", "--json"))["nodes"]}


@pytest.mark.slow
def test_top_once_json_shows_cloud_nodes_per_zone_and_a_local_run_with_its_babysitter(
    fake_tpu, tmp_path
):
    fake_tpu.add_node("near", "v3-8", project="test-project", zone="us-central1-a")
    fake_tpu.add_node("far", "v4-8", project="test-project", zone="europe-west4-a")
    fake_tpu.add_node("unlisted", "v3-8", project="test-project", zone="asia-east1-b")
    cli = LocalCli(tmp_path)
    del cli.env["TPUCTL_PROVIDER"]
    cli.ok("config", "set", "accelerators.v4-8.zones", "europe-west4-a")
    cli.ok("up", "v3-8", "--local", "--name", "pod")
    babysitter = None
    try:
        run_dir = tmp_path / "run"
        cli.ok(
            "run", TINY, "--name", "pod", "--run-id", "topped", "--",
            "train.steps=100000", "logging.every_steps=1", "eval.every_steps=0",
            "checkpoint.every_steps=100000", f"run_dir={run_dir}",
        )  # fmt: skip
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), timeout=300, what="a step")
        babysitter = subprocess.Popen(
            [sys.executable, "-m", "tpuctl", "babysit", "--name", "pod", "--poll", "1s"],
            env=cli.env, cwd=cli.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        fake_tpu.requests.clear()

        def babysat():
            rows = snapshot(cli)
            run = rows["pod"]["run"]
            return run["babysitter"] and run["restarts"] is not None and rows

        rows = wait_for(babysat, timeout=120, what="the babysitter and its state in top")
        assert sorted(rows) == ["far", "near", "pod"]  # asia-east1-b is no configured zone
        lists = [path for method, path in fake_tpu.requests if method == "GET"]
        assert sorted(set(lists)) == [
            "/v2/projects/test-project/locations/europe-west4-a/nodes",
            "/v2/projects/test-project/locations/us-central1-a/nodes",
        ]
        assert rows["far"]["zone"] == "europe-west4-a" and rows["far"]["run"] is None
        pod = rows["pod"]
        assert (pod["provider"], pod["accelerator_type"], pod["state"]) == (
            "local",
            "v3-8",
            "READY",
        )
        run = pod["run"]
        assert run["run_id"] == "topped" and run["run_dir"] == str(run_dir)
        assert run["total_steps"] == 100000 and run["step"] >= 1
        assert run["loss"] > 0 and run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1
        assert run["eta_s"] > 0
        assert run["babysitter"] == f"pid {babysitter.pid}" and run["restarts"] == 0
        table = cli.ok("top", "--once")
        assert "topped" in table and "/100000" in table
    finally:
        if babysitter is not None:
            babysitter.send_signal(signal.SIGINT)
            babysitter.wait(timeout=60)
        cli("kill", "pod", "--grace", "5")
        cli("down", "pod", "--yes")


def test_a_diverged_runs_nan_loss_is_null_in_top_json_and_a_new_node_shows_no_old_run(
    run_tpuctl, fake_tpu, tmp_path
):
    from tpuctl.jobs import launches

    assert run_tpuctl("up", "v4-8", "--local", "--name", "mine").code == 0
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text('{"step": 5, "loss": NaN, "mfu": Infinity}\n')
        launches.record(launches.Launch("mine", "r1", str(run_dir), 10, 0.0))
        shown = run_tpuctl("top", "--once", "--json")
        assert shown.code == 0, shown.err
        run = json.loads(shown.out, parse_constant=pytest.fail)["nodes"][0]["run"]
        assert (run["run_id"], run["step"], run["loss"], run["mfu"]) == ("r1", 5, None, None)

        assert run_tpuctl("down", "mine", "--yes").code == 0
        assert run_tpuctl("up", "v4-8", "--local", "--name", "mine").code == 0
        again = json.loads(run_tpuctl("top", "--once", "--json").out)["nodes"]
        assert [(n["name"], n["run"]) for n in again] == [("mine", None)]
    finally:
        run_tpuctl("down", "mine", "--yes")


def test_top_and_profile_read_a_local_pods_gs_run_from_the_local_pods_emulator(
    tmp_path, monkeypatch
):
    """Both ended in a DefaultCredentialsError traceback: they read storage.googleapis.com."""
    from tpuctl import storage
    from tpuctl.jobs import launches
    from tpuctl.providers.local import gcs_emulator_url

    cli = LocalCli(tmp_path)
    monkeypatch.setenv("XDG_STATE_HOME", cli.env["XDG_STATE_HOME"])  # the CLI's pods, here
    cli.ok("up", "v4-8", "--local", "--name", "mine")
    try:
        run_dir = "gs://tpuctl-local/runs/g"
        with storage.emulated(gcs_emulator_url()):
            storage.upload_text(f"{run_dir}/metrics.jsonl", '{"step": 5, "loss": 3.0}\n')
        launches.record(launches.Launch("mine", "g", run_dir, 10, 0.0))
        assert snapshot(cli)["mine"]["run"]["step"] == 5
        fetched = cli("profile", "mine")
        assert (fetched.returncode, fetched.stderr.strip()) == (
            1,
            f"error: no trace in {run_dir}/profile: set train.profile_steps=[START,END] in "
            "the recipe and let the run pass step END",
        )
    finally:
        cli.ok("down", "mine", "--yes")


@pytest.mark.pod
def test_top_reads_a_run_dir_on_the_workers_own_disks_on_worker_0(
    run_tpuctl, fake_tpu, make_ssh_pod, pod_key, tmp_path, monkeypatch
):
    """A Cloud TPU node's run with a plain-path run_dir writes it on each worker's own disk:
    top read this machine's file of that name (here another run's) instead of worker 0's."""
    from tests.fixtures_pod import pod_hosts
    from tpuctl.fanout import run
    from tpuctl.jobs import launches

    pod = make_ssh_pod(1)
    fake_tpu.add_node("far", "v3-8", project="test-project", zone="us-central1-a",
                      worker_ips=pod.hosts)  # fmt: skip
    monkeypatch.setenv("TPUCTL_SSH_KEY", pod_key[0])
    monkeypatch.setenv("TPUCTL_SSH_USER", "root")
    run_dir = tmp_path / "run"  # /tmp: the test pod's host has its own
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 99, "loss": 9.0}\n')  # another run's
    record = '{"step": 7, "loss": 2.5, "tokens_per_s": 10.0}'
    write = f"mkdir -p {run_dir} && echo '{record}' > {run_dir}/metrics.jsonl"
    (result,) = run(pod_hosts(pod, pod_key, str(tmp_path / "kh"))[:1], write)
    assert result.ok, result
    launches.record(launches.Launch("far", "r1", str(run_dir), 10, 0.0))
    shown = run_tpuctl("top", "--once", "--json")
    assert shown.code == 0, shown.err
    (node,) = json.loads(shown.out)["nodes"]
    run_ = node["run"]
    assert (run_["run_id"], run_["step"], run_["loss"], run_["tokens_per_s"]) == (
        "r1", 7, 2.5, 10.0,
    )  # fmt: skip
