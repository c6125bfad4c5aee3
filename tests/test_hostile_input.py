"""The README's security promises under attack: secrets stay out of GCS, argv, logs, state
files and output; host keys stay pinned; `get` writes only under LOCAL_DIR; hostile or
broken input gets a one-line error and exit status 2, never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

import paramiko
import pytest
import yaml
from local_cli import LocalCli
from polling import wait_for

from tests.fixtures_pod import pod_hosts
from tpuctl import jobs
from tpuctl.fanout import Host, get, run
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


@pytest.fixture(scope="module")
def local_pod(tmp_path_factory):
    """tpuctl with a one-worker local pod `lp` (v4-8), for the refusals that need a node."""
    cli = LocalCli(tmp_path_factory.mktemp("hostile-local"))
    cli.ok("up", "v4-8", "--local", "--name", "lp")
    yield cli
    cli("down", "lp", "--yes")


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


def test_a_babysitter_carrying_on_takes_env_overrides_as_values_and_never_echoes_them(
    tmp_path, monkeypatch
):
    """Started again as it first was (`-- env.TOKEN=...`), a babysitter refused to carry on,
    since the stored recipe keeps names only, and its refusal printed the value."""
    from tpuctl import config
    from tpuctl.babysit import BabysitOptions, BabysitState, Babysitter
    from tpuctl.errors import TpuctlError

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("TPUCTL_PROVIDER", "local")
    secret = "babysit-secret-64"
    first = [f"env.TOKEN={secret}", "train.steps=5"]
    stored = tmp_path / "stored.yaml"
    stored.write_text(resolved_recipe_yaml(load_recipe(str(recipe_with(tmp_path, "")), first)))
    saved = BabysitState("E", "pod", "v4-8", started_at=0.0, recipe_uri=str(stored))

    def sitter(*overrides: str) -> Babysitter:
        options = BabysitOptions("v4-8", "pod", str(TINY), list(overrides), run_id="E")
        return Babysitter(config.load(), options)

    again = sitter(*first)
    again._refuse_overrides_it_would_drop(saved)  # the same command line carries on
    assert again._run_env == {"TOKEN": secret}  # and its relaunches get the value
    with pytest.raises(TpuctlError) as refused:
        sitter(f"env.TOKEN={secret}", "train.steps=7")._refuse_overrides_it_would_drop(saved)
    assert secret not in str(refused.value) and "env.TOKEN=... train.steps=7" in str(refused.value)


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


def pinned(lone_host, pod_key, known: Path, key_type: str) -> list[Host]:
    """The lone host with a fresh `key_type` host key, contacted once (which pins it)."""
    lone_host.set_host_keys(0, (key_type,), fresh=True)
    hosts = pod_hosts(lone_host, pod_key, str(known))
    assert run(hosts, "true")[0].ok
    return hosts


@pytest.mark.pod
def test_a_pinned_address_offering_a_key_of_another_type_is_refused(lone_host, pod_key, tmp_path):
    hosts = pinned(lone_host, pod_key, tmp_path / "known_hosts", "ed25519")
    recorded = (tmp_path / "known_hosts").read_text()
    lone_host.set_host_keys(0, ("ecdsa",))  # a man in the middle with an ECDSA key
    result = run(hosts, "true")[0]
    assert result.unreachable and "host key of w00" in result.error and "changed" in result.error
    assert (tmp_path / "known_hosts").read_text() == recorded  # nothing recorded


@pytest.mark.pod
def test_only_the_pinned_key_types_are_negotiated(lone_host, pod_key, tmp_path):
    hosts = pinned(lone_host, pod_key, tmp_path / "known_hosts", "ecdsa")
    recorded = (tmp_path / "known_hosts").read_text()
    # Now it also has ed25519, which paramiko prefers: the pinned ECDSA key is still used.
    lone_host.set_host_keys(0, ("ed25519", "ecdsa"))
    assert run(hosts, "true")[0].ok
    assert (tmp_path / "known_hosts").read_text() == recorded


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


# -- 3. `get` writes only under LOCAL_DIR/wNN --------------------------------------------


class HostileSftp(paramiko.SFTPServerInterface):
    """A compromised worker's SFTP server: /data lists whatever `LISTING` says, `loop` is
    a symlink to /data itself, and every other name the client asks for is a small file."""

    LISTING: ClassVar[list[tuple[str, int]]] = []

    def _attrs(self, name: str, mode: int) -> paramiko.SFTPAttributes:
        attrs = paramiko.SFTPAttributes()
        attrs.filename, attrs.st_mode, attrs.st_size = name, mode, 6
        return attrs

    def _is_data_dir(self, path: str) -> bool:
        return path.rstrip("/") == "/data" or path.startswith("/data/loop")

    def list_folder(self, path):
        return [self._attrs(name, mode) for name, mode in self.LISTING]

    def stat(self, path):
        is_dir = self._is_data_dir(path)
        return self._attrs(path, (stat.S_IFDIR | 0o755) if is_dir else (stat.S_IFREG | 0o644))

    def lstat(self, path):
        return self.stat(path)

    def open(self, path, flags, attr):
        handle = paramiko.SFTPHandle(flags)
        handle.readfile = io.BytesIO(b"owned\n")
        return handle


class _AnyKey(paramiko.ServerInterface):
    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED


@pytest.fixture(scope="module")
def hostile_worker():
    """(port) of a paramiko SFTP server on 127.0.0.1 serving HostileSftp to every login."""
    host_key = paramiko.ECDSAKey.generate()
    listener = socket.create_server(("127.0.0.1", 0))
    transports: list[paramiko.Transport] = []

    def serve() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            transport = paramiko.Transport(sock)
            transport.add_server_key(host_key)
            transport.set_subsystem_handler("sftp", paramiko.SFTPServer, HostileSftp)
            transport.start_server(server=_AnyKey())
            transports.append(transport)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for transport in transports:
        transport.close()


def hostile_get(port: int, key: str, tmp_path: Path, listing: list[tuple[str, int]]):
    HostileSftp.LISTING = listing
    known_hosts = str(tmp_path / "known_hosts")
    host = Host("w00", "127.0.0.1", "root", port, key_filename=key, known_hosts=known_hosts)
    return get([host], "/data", tmp_path / "out")[0]


def test_get_refuses_absolute_and_dotdot_names_from_a_hostile_worker(
    hostile_worker, pod_key, tmp_path
):
    outside = tmp_path / "outside"
    outside.mkdir()
    regular = stat.S_IFREG | 0o644
    # (paramiko's client drops "." and ".." entries itself; get_tree refuses them too.)
    for evil in ("../escape.txt", str(outside / "abs.txt"), "sub/inner.txt"):
        result = hostile_get(
            hostile_worker, pod_key[0], tmp_path, [("ok.txt", regular), (evil, regular)]
        )
        assert result.exit_code == 1 and "refusing the name" in result.stderr, result
        assert repr(evil) in result.stderr
        written = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"owned\n"]
        assert all(p.is_relative_to(tmp_path / "out" / "w00" / "data") for p in written), written


def test_get_does_not_follow_remote_symlinks(hostile_worker, pod_key, tmp_path):
    listing = [("ok.txt", stat.S_IFREG | 0o644), ("loop", stat.S_IFLNK | 0o777)]
    result = hostile_get(hostile_worker, pod_key[0], tmp_path, listing)
    assert result.ok, result
    assert "skipped symlinks and special files: /data/loop" in result.stdout
    copied = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*"))
    assert copied == [Path("w00"), Path("w00/data"), Path("w00/data/ok.txt")]


def test_get_reads_no_fifo_or_device_from_a_worker(hostile_worker, pod_key, tmp_path):
    """A remote /dev/zero was copied without end (and a FIFO hung the get for good)."""
    listing = [
        ("ok.txt", stat.S_IFREG | 0o644),
        ("pipe", stat.S_IFIFO | 0o644),
        ("zero", stat.S_IFCHR | 0o666),
    ]
    result = hostile_get(hostile_worker, pod_key[0], tmp_path, listing)
    assert result.ok, result
    assert "skipped symlinks and special files: /data/pipe, /data/zero" in result.stdout
    copied = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*"))
    assert copied == [Path("w00"), Path("w00/data"), Path("w00/data/ok.txt")]


def test_a_local_pods_get_follows_no_symlink_there_or_here(local_pod, tmp_path):
    """copytree followed a worker's links (all of /etc came along) and wrote through a
    link already in LOCAL_DIR/wNN."""
    worker = Path(local_pod("exec", "lp", "--worker", "0", "--", "pwd").stdout.split()[-1])
    data = worker / "linked"
    data.mkdir()
    (data / "a.txt").write_text("a")
    (data / "etc").symlink_to("/etc")
    (data / "pipe").mkdir()
    os.mkfifo(data / "pipe" / "fifo")
    result = local_pod("get", "linked", str(tmp_path / "out"), "--name", "lp", "--worker", "0")
    assert result.returncode == 0, result.stderr
    assert "skipped symlinks and special files" in result.stdout
    copied = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*"))
    assert copied == [Path(p) for p in ("w00", "w00/linked", "w00/linked/a.txt", "w00/linked/pipe")]
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "out2" / "w00").mkdir(parents=True)
    (tmp_path / "out2" / "w00" / "linked").symlink_to(victim)
    again = local_pod("get", "linked", str(tmp_path / "out2"), "--name", "lp", "--worker", "0")
    assert again.returncode == 1 and "resolves outside" in again.stdout + again.stderr
    assert list(victim.iterdir()) == []


def test_get_of_a_path_ending_in_dot_dot_stays_in_the_worker_directory(ssh_pod, pod_key, tmp_path):
    hosts = pod_hosts(ssh_pod, pod_key, str(tmp_path / "known_hosts"))[:1]
    remote = f"/tmp/get-dotdot-{os.getpid()}"
    assert run(hosts, f"mkdir -p {remote}/sub && echo hi > {remote}/sub/file")[0].ok
    result = get(hosts, f"{remote}/sub/..", tmp_path / "out")[0]
    assert result.ok, result
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["w00"]
    name = remote.rsplit("/", 1)[1]
    assert (tmp_path / "out" / "w00" / name / "sub" / "file").read_text() == "hi\n"


def test_get_does_not_write_through_a_local_symlink(hostile_worker, pod_key, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    (tmp_path / "out" / "w00" / "data").mkdir(parents=True)
    (tmp_path / "out" / "w00" / "data" / "ok.txt").symlink_to(victim)
    result = hostile_get(hostile_worker, pod_key[0], tmp_path, [("ok.txt", stat.S_IFREG | 0o644)])
    assert result.exit_code == 1 and "resolves outside" in result.stderr
    assert victim.read_text() == "mine\n"


# -- 4. env names and values -------------------------------------------------------------


def test_babysit_takes_no_path_for_a_run_id_from_a_worker(local_pod, tmp_path):
    """`babysit --name NODE` adopts worker 0's latest run id: a worker naming it
    `../../x` had the babysitter write its lock and log as x.lock and x.log."""
    jobs_dir = next((local_pod.root / "state").rglob("pods/lp/workers/w00"))
    (jobs_dir / ".tpuctl" / "jobs").mkdir(parents=True, exist_ok=True)
    target = tmp_path / "outside"
    target.mkdir()  # the worker shows a run only where its directory exists
    hostile = "../" * 40 + str(target).lstrip("/")
    (jobs_dir / ".tpuctl" / "jobs" / "current").write_text(hostile + "\n")
    try:
        result = local_pod("babysit", "--name", "lp", "--poll", "1", timeout=60)
    finally:
        (jobs_dir / ".tpuctl" / "jobs" / "current").unlink()
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "w00 of lp names its latest run" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside"]


@pytest.mark.parametrize("arg", ["é=env-secret-5", "A-B=env-secret-5", "1X=env-secret-5",
                                 "TOKEN:env-secret-5", "TOKEN env-secret-5"])  # fmt: skip
def test_exec_refuses_env_names_a_shell_would_echo_with_their_value(arg, tmp_path):
    cli = LocalCli(tmp_path)
    result = cli("exec", "--env", arg, "--json", "--", "true")
    one_line_error(result, "--env")
    assert "env-secret-5" not in result.stdout + result.stderr


def test_a_secret_given_as_the_whole_env_section_is_not_echoed():
    """`-- env=TOKEN`: a value where the recipe's env mapping goes."""
    from trainer.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="expected a mapping of NAME: value") as refused:
        load_recipe(str(TINY), ["env=env-secret-7"])
    assert "env-secret-7" not in str(refused.value)


@pytest.mark.parametrize(
    ("override", "shown"),
    [("env.TOKEN:env-secret-8", "'env.TOKEN...'"), ("env.TOKEN env-secret-8", "'env.TOKEN...'"),
     ("=env-secret-8", "'...'"), ("train.steps", "'train.steps'")],
)  # fmt: skip
def test_an_override_without_its_equals_sign_is_not_echoed_past_its_key(override, shown):
    """`-- env.TOKEN:VALUE` (a colon for the `=`) printed VALUE in the refusal."""
    from trainer.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="write overrides as key=value") as refused:
        load_recipe(str(TINY), [override])
    assert str(refused.value).startswith(f"override {shown}: ")


def test_an_env_value_that_is_not_utf8_is_a_one_line_error(tmp_path):
    """It was a UnicodeEncodeError traceback (through the holder: 'connection lost')."""
    cli = LocalCli(tmp_path)
    cli.env["TOKEN"] = "ab\udcffcd-env-secret-6"  # the bytes ab, 0xff, cd...
    result = cli("exec", "--env", "TOKEN", "--", "true")
    one_line_error(result, "--env TOKEN", "not UTF-8")
    assert "env-secret-6" not in result.stdout + result.stderr


def test_the_environment_channel_refuses_a_nul_byte_rather_than_drop_everything(tmp_path):
    host = Host("w00", "localhost", workdir=str(tmp_path), transport="local")
    with pytest.raises(ValueError, match="NUL") as caught:
        run([host], "true", env={"GOOD": "1", "BAD": "a\0b"})
    assert "a\0b" not in str(caught.value)


@pytest.mark.parametrize(
    ("env_block", "needle"),
    [('  "WANDB-KEY": x\n', "'WANDB-KEY'"), ('  "Ü": x\n', "'Ü'"), ('  TOKEN: "a\\0b"\n', "NUL")],
)
def test_bad_recipe_env_is_refused_with_the_recipe_before_anything_is_stored(
    env_block, needle, local_pod, tmp_path
):
    recipe = recipe_with(tmp_path, "env:\n" + env_block)
    result = local_pod("run", str(recipe), "--name", "lp", "--run-id", "badenv")
    one_line_error(result, "env", needle)
    assert not list((local_pod.root / "state").rglob("badenv*")), "nothing stored or launched"


# -- 5. tpuctl's own files are private ---------------------------------------------------


def _open_modes(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Paths under `root` (and root) readable by others: dirs not 0700, files not 0600
    (public keys, KEY.pub, are public)."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        if any(part in skip for part in path.relative_to(root).parts) or path.suffix == ".pub":
            continue
        want = 0o700 if path.is_dir() else 0o600
        if path.stat().st_mode & 0o777 != want:
            wrong.append(f"{path} {oct(path.stat().st_mode & 0o777)}")
    return wrong


def test_state_config_and_local_gcs_files_are_this_users_only(tmp_path):
    cli = LocalCli(tmp_path)
    older = tmp_path / "state" / "tpuctl"
    older.mkdir(parents=True)
    older.chmod(0o755)  # as an earlier tpuctl left it
    cli.ok("config", "set", "zone", "us-central1-a")
    cli.ok("up", "v4-8", "--local", "--name", "modes")
    try:
        recipe = recipe_with(tmp_path, "")
        cli.ok(
            "run", str(recipe), "--name", "modes", "--run-id", "modes1",
            "--", "train.steps=100000", f"run_dir={tmp_path / 'run'}",
        )  # fmt: skip
        assert list((older / "local" / "gcs" / "data").rglob("*"))  # the stored recipe is there
        # Worker directories are the workers' homes: what jobs write there is theirs.
        assert _open_modes(older, skip=("workers",)) == []
        assert _open_modes(tmp_path / "config" / "tpuctl") == []
    finally:
        cli("kill", "modes", "--grace", "1")
        cli("down", "modes", "--yes")
    assert _open_modes(older) == []  # the emulator's data, kept after `down`


@pytest.mark.pod
def test_node_cache_and_known_hosts_are_private(lone_node, tmp_path):
    assert tpuctl("exec", "one", "--", "true").returncode == 0
    nodes = tmp_path / "xdg-state" / "tpuctl" / "nodes"
    assert sorted(p.name for p in nodes.rglob("one.*")) == ["one.json", "one.known_hosts"]
    assert _open_modes(tmp_path / "xdg-state" / "tpuctl") == []


def test_the_babysit_log_is_private(tmp_path, monkeypatch):
    from tpuctl.babysit import LogFile

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    with LogFile("r1") as log:
        log("a job's last lines")
    assert _open_modes(tmp_path / "tpuctl") == []


# -- 6. a checkout's ./tpuctl.yaml: trusted before it decides code or logins -------------


def test_a_checkouts_project_file_runs_nothing_on_the_workers_until_trusted(tmp_path):
    """A repository you clone and `cd` into ran its ./tpuctl.yaml's worker.setup on every
    worker at your next `prepare` (or chose your bucket, project, ssh key or jump host).
    Such keys now apply only to the content `tpuctl config trust` recorded."""
    cli = LocalCli(tmp_path)
    project = tmp_path / "tpuctl.yaml"
    cli.ok("up", "v4-8", "--local", "--name", "cloned")
    try:
        one_line_error(cli("config", "trust"), f"no ./tpuctl.yaml in {tmp_path}: nothing to trust")
        project.write_text("node: cloned\nworker:\n  setup: echo ran >> setup-ran\n")
        fix = "review ./tpuctl.yaml, then run `tpuctl config trust`"
        one_line_error(cli("prepare"), f"./tpuctl.yaml ({project}) is not trusted", "setup", fix)
        assert not list(tmp_path.rglob("setup-ran"))
        shown = cli.ok("config", "show").splitlines()  # to review it: shown, marked
        rows = {" ".join(line.split()) for line in shown}
        assert "worker.setup echo ran >> setup-ran ./tpuctl.yaml (untrusted)" in rows
        assert "node cloned ./tpuctl.yaml" in rows
        assert shown[-1].startswith("note: ./tpuctl.yaml") and shown[-1].endswith(fix)

        assert "its worker.setup now applies" in cli.ok("config", "trust")
        store = tmp_path / "state" / "tpuctl" / "trusted_project_files.json"
        assert store.stat().st_mode & 0o777 == 0o600
        cli.ok("prepare")
        assert [p.read_text() for p in tmp_path.rglob("setup-ran")] == ["ran\n"]

        project.write_text(project.read_text().replace("ran >>", "edited >>"))
        one_line_error(cli("prepare"), "changed since you trusted it", "worker.setup", fix)
        project.write_text("node: cloned\nzone: us-east1-d\nworker: {platform: cpu}\n")
        assert cli.ok("prepare") == "cloned: 1 worker ready\n"  # harmless keys: no trust
        assert [p.read_text() for p in tmp_path.rglob("setup-ran")] == ["ran\n"]
    finally:
        project.unlink(missing_ok=True)
        cli("down", "cloned", "--yes")


@pytest.mark.parametrize("user", ["-oProxyCommand=touch /tmp/owned", "alice\nroot", "a b"])
def test_an_ssh_user_that_is_no_user_name_is_refused_from_an_untrusted_checkout(user, tmp_path):
    cli = LocalCli(tmp_path)
    (tmp_path / "tpuctl.yaml").write_text(yaml.safe_dump({"ssh": {"user": user}}))
    result = cli("exec", "--", "true")
    one_line_error(result, "ssh.user", "./tpuctl.yaml", "is not trusted")
    cli.ok("config", "trust")  # even a file you trust gives ssh no option
    result = cli("exec", "--", "true")
    one_line_error(result, "ssh.user", "./tpuctl.yaml", "is not a user name")
    result = cli("exec", "--ssh-user", "-l", "--", "true")
    one_line_error(result, "ssh.user", "--ssh-user")


def test_every_ssh_command_line_ends_its_options_before_the_destination():
    from tpuctl.cli.workers import ssh_argv

    host = Host("w00", "10.0.0.2", user="-oProxyCommand=x", key_filename="/k")
    argv = ssh_argv(host, ["-L", "6006:localhost:6006", "-o", "BatchMode=yes", "ls", "-l"])
    destination = argv.index("-oProxyCommand=x@10.0.0.2")
    assert argv[destination - 1] == "--"
    assert argv[destination + 1 :] == ["ls", "-l"]
    assert argv[destination - 5 : destination - 1] == [
        "-L",
        "6006:localhost:6006",
        "-o",
        "BatchMode=yes",
    ]


# -- 7. one holder check for run, kill, clear-locks and check ----------------------------


@pytest.fixture
def worker(tmp_path):
    """A local worker, and a process in another mount namespace (as in a container) that
    holds its libtpu lockfile."""
    host = Host("w00", "localhost", workdir=str(tmp_path), transport="local")
    lockfile = tmp_path / "tmp" / "libtpu_lockfile"
    lockfile.parent.mkdir()
    lockfile.write_text("")
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private",
         "sh", "-c", f'exec 3<"{lockfile}"; exec sleep 120'],
    )  # fmt: skip
    wait_for(lambda: str(lockfile) in _open_files(holder.pid))
    yield host, holder, lockfile
    holder.kill()
    holder.wait()


def _open_files(pid: int) -> list[str]:
    """What process `pid` has open; fds it closes while this looks are passed over (unshare
    and sh open and close some on the way to `sleep`)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found.append(os.readlink(fd))
    return found


def test_run_sees_a_holder_in_a_container(worker):
    host, holder, _ = worker
    assert jobs.status([host])[0].holders == (str(holder.pid),)
    with pytest.raises(jobs.JobBusy, match=f"pids {holder.pid}"):
        jobs.launch([host], jobs.JobSpec("r1", ["true"]))


def test_clear_locks_and_check_see_the_same_holders_as_run(worker):
    from tpuctl.worker_scripts import (
        REFUSED_EXIT,
        check_script,
        clear_locks_script,
        parse_health,
        parse_lock_report,
    )

    host, holder, lockfile = worker
    refused = run([host], clear_locks_script(force=False))[0]
    assert refused.exit_code == REFUSED_EXIT
    assert parse_lock_report(refused.stdout).holders == [f"pid {holder.pid} (sleep) on {lockfile}"]
    assert lockfile.exists()  # never pulled from under a live process
    health = parse_health(run([host], check_script())[0].stdout)
    assert health.holders == [f"pid {holder.pid} (sleep) on {lockfile}"]
    assert health.devices is None  # jax is not started against a held TPU


def test_the_holder_check_works_for_a_user_without_root_or_sudo():
    """As `nobody` (no sudo on this machine): no error, and the user's own holders are seen."""
    from tpuctl.worker_scripts import holders_function

    home = Path(tempfile.mkdtemp(prefix="tpuctl-nobody-", dir="/var/tmp"))  # not under 0700
    try:
        home.chmod(0o777)
        lockfile = home / "libtpu_lockfile"
        # The child holds fd 3 from its fork on (its name may still be bash's: not checked).
        opened = f'exec 3>"{lockfile}"; sleep 60 & exec 3>&-; echo "$!"\n'
        script = holders_function() + opened + "tpu_holders; kill $!\n"
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-c", script],
            capture_output=True, text=True, timeout=60,
            env={"TMPDIR": str(home), "PATH": os.environ["PATH"]},
        )  # fmt: skip
    finally:
        shutil.rmtree(home)
    assert result.returncode == 0, result.stderr
    child, holders = result.stdout.split("\n", 1)
    pid, _command, target = holders.split()
    assert (pid, target) == (child, str(lockfile)), result.stdout


# -- 8. bad values: one line, exit status 2, never a traceback or a silent misbehaviour --


@pytest.mark.parametrize(
    "args",
    [
        ["exec", "--timeout", "-1", "--", "true"],
        ["exec", "--timeout", "nan", "--", "true"],
        ["exec", "--connect-timeout", "0", "--", "true"],
        ["check", "--timeout", "inf"],
        ["kill", "--grace", "-5"],
        ["babysit", "v4-8", "r.yaml", "--name", "p", "--poll", "-1"],
        ["babysit", "v4-8", "r.yaml", "--name", "p", "--poll", "nan"],
        ["babysit", "v4-8", "r.yaml", "--name", "p", "--hang-timeout", "0"],
    ],
)
def test_durations_must_be_positive_and_finite(args, tmp_path):
    result = LocalCli(tmp_path)(*args, timeout=60)
    flag = next(a for a in args if a.startswith("--") and a != "--name" and a != "--")
    one_line_error(result, flag, "finite number of seconds")


@pytest.mark.parametrize(
    "args",
    [
        ["logs", "--run-id", "../.."],  # read a file outside the jobs directory
        ["ps", "--run-id", "a/b"],
        ["run", "r.yaml", "--run-id", "nl\n"],  # passed, then ps and kill lost the job
        ["status", "pod\n"],
    ],
)
def test_run_ids_and_node_names_are_checked_by_every_command_that_takes_them(args, tmp_path):
    result = LocalCli(tmp_path)(*args, timeout=60)
    one_line_error(result, "is not a")


def test_what_a_worker_prints_is_shown_as_text_not_as_rich_markup(local_pod, tmp_path):
    """A worker's Python printing '[/bold]' ended `check` in rich's MarkupError traceback."""
    fake = tmp_path / "fakepy"
    fake.write_text("#!/bin/sh\necho '[/bold] oops [red]styled'\nexit 3\n")
    fake.chmod(0o755)
    result = local_pod("check", "lp", "--python", str(fake), timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "unhealthy" in result.stderr


def test_a_huge_worker_range_is_refused_at_once(local_pod):
    started = time.monotonic()
    result = local_pod("exec", "lp", "--worker", "0-400000", "--", "true", timeout=60)
    one_line_error(result, "--worker", "worker 1 does not exist", "only worker 0")
    assert time.monotonic() - started < 30


BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 10 if prev else ['xxxxxxxx'] * 10)}]\n"
    for prev, name in zip(["", "a", "b", "c", "d", "e"], "abcdef", strict=True)
)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (bytes(range(256)) * 4, "not UTF-8"),
        (b"run_dir: x\n# " + b"x" * 1_100_000 + b"\n", "over 1 MB"),
        (BOMB.encode(), "aliases"),
        (b"run_dir: &a [*a]\n", "contains itself"),
    ],
)
def test_hostile_recipes_and_config_files_are_one_line_errors(content, needle, local_pod, tmp_path):
    assert len(BOMB) < 700
    (tmp_path / "bad.yaml").write_bytes(content)
    one_line_error(local_pod("run", str(tmp_path / "bad.yaml"), "--name", "lp"), needle)
    cli = LocalCli(tmp_path)
    python = subprocess.run(
        [sys.executable, "-m", "trainer", str(tmp_path / "bad.yaml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    one_line_error(python, needle)
    (tmp_path / "tpuctl.yaml").write_bytes(content)  # a project file in an untrusted checkout
    one_line_error(cli("config", "show"), "tpuctl.yaml", needle)


@pytest.mark.pod
@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00 not json", b'{"workers": 5}', b"[]"])
def test_a_corrupt_node_cache_is_ignored_with_a_warning_and_rebuilt(lone_node, tmp_path, garbage):
    assert tpuctl("exec", "one", "--", "true").returncode == 0
    (cache,) = (tmp_path / "xdg-state").rglob("one.json")
    cache.write_bytes(garbage)
    result = tpuctl("exec", "one", "--", "echo", "fine")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[w00] fine"
    assert "warning: ignoring the unreadable node cache" in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(cache.read_text())["name"] == "one"


@pytest.mark.pod
def test_corrupt_known_hosts_lines_are_dropped_with_a_warning(lone_node, tmp_path):
    assert tpuctl("exec", "one", "--", "true").returncode == 0
    (known,) = (tmp_path / "xdg-state").rglob("one.known_hosts")
    pinned = known.read_bytes()
    known.write_bytes(b"10.9.9.9 ssh-ed25519 !!!not-base64\n\xff\xfe\x00\n" + pinned)
    result = tpuctl("exec", "one", "--", "echo", "fine")
    assert result.returncode == 0, result.stderr
    assert "warning: dropped 2 unreadable line(s)" in result.stderr
    assert known.read_bytes() == pinned


@pytest.mark.pod
def test_an_exec_secret_is_in_no_worker_argv_and_not_in_the_json(lone_node, monkeypatch):
    secret = "exec-secret-value-91"
    monkeypatch.setenv("TOKEN", secret)
    # The command lists every process on the worker while it runs: its own argv included.
    result = tpuctl(
        "exec", "one", "--json", "--env", "TOKEN", "--", 'echo "${#TOKEN}"; ps -eww -o args'
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["stdout"].startswith(f"{len(secret)}\n") and "ps -eww" in row["stdout"]
    assert secret not in result.stdout + result.stderr
