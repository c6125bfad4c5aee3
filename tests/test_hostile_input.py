"""The README's security promises under attack: secrets stay out of GCS, argv, logs, state
files and output; host keys stay pinned; `get` writes only under LOCAL_DIR; hostile or
broken input gets a one-line error and exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from local_cli import LocalCli

from tests.fixtures_pod import pod_hosts
from tpuctl.fanout import run
from tpuctl.jobs.runs import RunRequest, resolved_recipe_yaml, run_env
from trainer.config import load_recipe

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


def one_line_error(result, *needles: str) -> None:
    """Exit status 2, one `error:` line on stderr naming every needle, no traceback."""
    assert result.returncode == 2, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def recipe_with(tmp_path: Path, extra: str) -> Path:
    """tiny.yaml with absolute data paths (it may live anywhere) and `extra` appended."""
    text = TINY.read_text().replace("data/", f"{REPO}/recipes/data/")
    path = tmp_path / "recipe.yaml"
    path.write_text(text + extra)
    return path


# -- 1. secrets: never in GCS, argv, logs, state files or output -------------------------


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _files_containing(root: Path, secrets: list[str], skip: Path) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path != skip:
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def _argv_containing(secrets: list[str]) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        found += [f"{proc.name}: {s}" for s in secrets if s.encode() in cmdline]
    return found


def test_run_secrets_reach_the_job_but_no_file_argv_or_output(tmp_path):
    (tmp_path / "user").mkdir()
    cli = LocalCli(tmp_path / "user")
    in_file, in_override, in_flag = "file-secret-61", "override-secret-62", "flag-secret-63"
    recipe = recipe_with(tmp_path, f"env:\n  FILE_TOKEN: {in_file}\n")
    cli.env["FLAG_TOKEN"] = in_flag
    try:
        cli.ok("up", "v4-8", "--local", "--name", "sec")
        result = cli(
            "run", str(recipe), "--name", "sec", "--run-id", "sec1", "--env", "FLAG_TOKEN",
            "--", f"env.OVERRIDE_TOKEN={in_override}", "train.steps=100000",
            f"run_dir={tmp_path / 'run'}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        secrets = [in_file, in_override, in_flag]
        # The recipe's own values work, with a warning naming them but not their values.
        assert "FILE_TOKEN, OVERRIDE_TOKEN" in result.stderr and "plain text" in result.stderr
        assert not [s for s in secrets if s in result.stdout + result.stderr]
        job_dir = next((cli.root / "state").rglob("jobs/sec1"))
        environ = _environ(int((job_dir / "pid").read_text()))
        assert [environ.get(n) for n in ("FILE_TOKEN", "OVERRIDE_TOKEN", "FLAG_TOKEN")] == secrets
        assert _argv_containing(secrets) == []
        # GCS (the emulator keeps its objects under the state dir), job logs, caches.
        assert _files_containing(cli.root, secrets, skip=recipe) == []
        # A run of the stored recipe (what a babysitter elsewhere does) needs the values again.
        again = cli("run", "gs://tpuctl-local/tpuctl/runs/sec1/recipe.yaml", "--name", "sec")
        one_line_error(again, "FILE_TOKEN", "--env FILE_TOKEN")
    finally:
        cli("kill", "sec", "--grace", "1")
        cli("down", "sec", "--yes")


def test_stored_recipe_keeps_env_names_only():
    recipe = load_recipe(str(TINY), ["env.WANDB_API_KEY=wandb-secret-7", "env.HF_TOKEN=hf-8"])
    stored = resolved_recipe_yaml(recipe)
    assert "wandb-secret-7" not in stored and "hf-8" not in stored
    assert yaml.safe_load(stored)["env"] == {"WANDB_API_KEY": None, "HF_TOKEN": None}


def test_a_relaunch_from_the_stored_recipe_takes_the_values_of_the_first_launch(tmp_path):
    first = load_recipe(str(TINY), ["env.WANDB_API_KEY=wandb-secret-7"])
    warnings: list[str] = []
    given = run_env(first, RunRequest(str(TINY), env={"HF_TOKEN": "hf-8"}), warnings.append)
    assert given == {"WANDB_API_KEY": "wandb-secret-7", "HF_TOKEN": "hf-8"}
    assert len(warnings) == 1 and "wandb-secret-7" not in warnings[0]
    stored = tmp_path / "stored.yaml"
    stored.write_text(resolved_recipe_yaml(first))
    again = load_recipe(str(stored))
    # What babysit passes on a relaunch: the first launch's StartedRun.env.
    assert run_env(again, RunRequest(str(stored), env=given), warnings.append) == given
    assert len(warnings) == 1  # nothing carried a value this time


# -- 2. host keys: pinned per address, whatever key type a host offers -------------------

SSH_PROJECT, SSH_ZONE = "test-project", "us-central1-a"


@pytest.fixture(scope="module")
def lone_host(make_ssh_pod):
    """A one-host pod of its own: these tests change its host keys."""
    return make_ssh_pod(1)


@pytest.fixture
def lone_node(lone_host, fake_tpu, pod_key, monkeypatch):
    """Node `one` (v2-8: one worker) on the lone host, which starts with an ed25519 key."""
    lone_host.set_host_keys(0, ("ed25519",), fresh=True)
    fake_tpu.add_node("one", "v2-8", project=SSH_PROJECT, zone=SSH_ZONE, worker_ips=lone_host.hosts)
    monkeypatch.setenv("TPUCTL_SSH_KEY", pod_key[0])
    monkeypatch.setenv("TPUCTL_SSH_USER", "root")
    return lone_host


def tpuctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tpuctl", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.pod
def test_a_pinned_address_offering_a_key_of_another_type_is_refused(lone_host, pod_key, tmp_path):
    lone_host.set_host_keys(0, ("ed25519",), fresh=True)
    known = tmp_path / "known_hosts"
    hosts = pod_hosts(lone_host, pod_key, str(known))
    assert run(hosts, "true")[0].ok
    pinned = known.read_text()
    lone_host.set_host_keys(0, ("ecdsa",))  # a man in the middle with an ECDSA key
    result = run(hosts, "true")[0]
    assert result.unreachable and "host key of w00" in result.error and "changed" in result.error
    assert known.read_text() == pinned  # nothing recorded


@pytest.mark.pod
def test_only_the_pinned_key_types_are_negotiated(lone_host, pod_key, tmp_path):
    lone_host.set_host_keys(0, ("ecdsa",), fresh=True)
    known = tmp_path / "known_hosts"
    hosts = pod_hosts(lone_host, pod_key, str(known))
    assert run(hosts, "true")[0].ok
    pinned = known.read_text()
    # Now it also has ed25519, which paramiko prefers: the pinned ECDSA key is still used.
    lone_host.set_host_keys(0, ("ed25519", "ecdsa"))
    assert run(hosts, "true")[0].ok
    assert known.read_text() == pinned


@pytest.mark.pod
def test_tpuctl_ssh_refuses_a_key_of_another_type_too(lone_node):
    assert tpuctl("exec", "one", "--", "true").returncode == 0  # pins ed25519
    lone_node.set_host_keys(0, ("ecdsa",))
    result = tpuctl("ssh", "one", "--", "-o", "BatchMode=yes", "true")
    assert result.returncode != 0
    assert "host key" in result.stderr.lower() or "no matching host key" in result.stderr


@pytest.mark.pod
def test_the_first_command_after_a_recreation_at_the_same_address_works(lone_node, fake_tpu):
    assert tpuctl("exec", "one", "--", "true").returncode == 0  # caches the node, pins its key
    fake_tpu.vanish("one")
    fake_tpu.add_node("one", "v2-8", project=SSH_PROJECT, zone=SSH_ZONE, worker_ips=lone_node.hosts)
    lone_node.set_host_keys(0, ("ed25519",), fresh=True)  # the new VM's new key
    result = tpuctl("exec", "one", "--", "echo", "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[w00] hello"
    assert "one was recreated; retrying w00 with its new host keys" in result.stderr
