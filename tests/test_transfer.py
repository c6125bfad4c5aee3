"""File transfer to hosts whose sshd has no SFTP subsystem: tar over the exec channel
copies the same way SFTP does (tests/test_fanout.py covers hosts with SFTP)."""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
import tarfile
from pathlib import Path

import paramiko
import pytest

from tests.fixtures_pod import pod_hosts
from tpuctl.fanout import get, put, run, transfer

pytestmark = pytest.mark.pod


@pytest.fixture(scope="module")
def no_sftp_pod(make_ssh_pod):
    return make_ssh_pod(2, sftp=False)


@pytest.fixture
def hosts(no_sftp_pod, pod_key, tmp_path):
    return pod_hosts(no_sftp_pod, pod_key, str(tmp_path / "known_hosts"))


def test_the_hosts_really_refuse_sftp(no_sftp_pod, pod_key):
    transport = paramiko.Transport((no_sftp_pod.hosts[0], 22))
    try:
        transport.connect(username="root", pkey=paramiko.PKey.from_path(pod_key[0]))
        with pytest.raises(paramiko.SSHException):
            paramiko.SFTPClient.from_transport(transport)
    finally:
        transport.close()


def test_put_and_get_fall_back_to_tar(no_sftp_pod, hosts, tmp_path):
    script = tmp_path / "setup.sh"
    script.write_text("echo hi\n")
    script.chmod(0o755)
    tree = tmp_path / "configs"
    (tree / "nested").mkdir(parents=True)
    (tree / "a.yaml").write_text("a: 1\n")
    (tree / "nested" / "b.yaml").write_text("b: 2\n")

    assert [r.stdout for r in put(hosts, script, "/tmp/bin/setup.sh")] == [
        "1 file -> /tmp/bin/setup.sh"
    ] * 2
    assert [r.stdout for r in put(hosts, tree, "configs")] == ["2 files -> configs"] * 2
    copied = no_sftp_pod.path(1, "/tmp/bin/setup.sh")
    assert copied.read_text() == "echo hi\n" and copied.stat().st_mode & 0o111
    owners = run(hosts, "stat -c %U configs/nested/b.yaml")
    assert [r.stdout.strip() for r in owners] == ["root", "root"]

    fetched = get(hosts, "configs", tmp_path / "back")
    assert [r.stdout for r in fetched] == [
        f"2 files -> {tmp_path / 'back' / label / 'configs'}" for label in ("w00", "w01")
    ]
    assert (tmp_path / "back" / "w01" / "configs" / "nested" / "b.yaml").read_text() == "b: 2\n"


@pytest.fixture(params=["sftp", "tar"])
def either_pod(request, no_sftp_pod):
    """The shared pod (SFTP) or the one without SFTP (tar): put must do the same on both."""
    return request.getfixturevalue("ssh_pod") if request.param == "sftp" else no_sftp_pod


@pytest.fixture
def either_hosts(either_pod, pod_key, tmp_path):
    return pod_hosts(either_pod, pod_key, str(tmp_path / "known_hosts"))


def test_put_skips_links_and_special_files_as_get_does_on_both_paths(
    either_pod, either_hosts, tmp_path
):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a").write_text("a\n")
    (source / "sub" / "b").write_text("b\n")
    (source / "dangling").symlink_to("/nonexistent")
    (source / "link").symlink_to(source / "a")
    os.mkfifo(source / "pipe")
    run(either_hosts[:1], "rm -rf /tmp/p")
    [result] = put(either_hosts[:1], source, "/tmp/p")
    skipped = ", ".join(str(source / name) for name in ("dangling", "link", "pipe"))
    assert result.stdout == f"2 files -> /tmp/p (skipped symlinks and special files: {skipped})"
    copied = either_pod.path(0, "/tmp/p")
    assert sorted(str(p.relative_to(copied)) for p in copied.rglob("*")) == ["a", "sub", "sub/b"]


def test_a_file_put_onto_a_directory_goes_into_it_and_parents_are_made_on_both_paths(
    either_pod, either_hosts, tmp_path
):
    source = tmp_path / "f"
    source.write_text("data\n")
    run(either_hosts[:1], "rm -rf /tmp/ed /tmp/new /tmp/deep; mkdir /tmp/ed")
    for remote in ("/tmp/ed", "/tmp/new/", "/tmp/deep/er/g"):
        [result] = put(either_hosts[:1], source, remote)
        assert result.ok, (remote, result.stderr)
    for where in ("/tmp/ed/f", "/tmp/new/f", "/tmp/deep/er/g"):
        assert either_pod.path(0, where).read_text() == "data\n", where


def test_put_and_get_keep_modification_times_on_both_paths(either_pod, either_hosts, tmp_path):
    # tar kept each file's modification time; SFTP gave it the time of the copy.
    source = tmp_path / "t"
    source.mkdir()
    (source / "f").write_text("f\n")
    os.utime(source / "f", (1_200_000_000, 1_200_000_000))
    run(either_hosts[:1], "rm -rf /tmp/mt")
    assert put(either_hosts[:1], source, "/tmp/mt")[0].ok
    assert either_pod.path(0, "/tmp/mt/f").stat().st_mtime == 1_200_000_000
    assert run(either_hosts[:1], "touch -d @1000000000 /tmp/mt/f")[0].ok
    assert get(either_hosts[:1], "/tmp/mt", tmp_path / "back")[0].ok
    assert (tmp_path / "back/w00/mt/f").stat().st_mtime == 1_000_000_000


def test_a_missing_remote_path_is_one_line(hosts, tmp_path):
    missing = get(hosts[:1], "/tmp/does-not-exist", tmp_path / "fetched")[0]
    assert missing.exit_code == 1
    assert missing.stderr == "No such file or directory: /tmp/does-not-exist"


def test_get_skips_symlinks_inside_the_tree_and_follows_the_named_one(hosts, tmp_path):
    from tpuctl.fanout import StopSignal, transfer
    from tpuctl.fanout.ssh import SshContext

    made = run(
        hosts[:1],
        "mkdir -p tree/sub && echo a > tree/sub/a && ln -sfn /etc/passwd tree/passwd && "
        "ln -sfn tree linked",
    )
    assert made[0].ok, made[0].stderr
    skipped: list[str] = []
    target = tmp_path / "w00" / "linked"
    over = transfer.over_new_connection(SshContext(10.0), StopSignal())
    copied = transfer.get_from_host(hosts[0], over, "linked", target, skipped)
    assert copied == 1 and (target / "sub" / "a").read_text() == "a\n"
    assert skipped == ["linked/passwd"] and not (target / "passwd").exists()


@pytest.mark.parametrize("mode", [0o644, 0o755, 0o4755, 0o2775, 0o666, 0o500, 0o700, 0o1777, 0o070])
def test_the_fallback_gives_a_file_the_mode_and_owner_of_tarfiles_data_filter(mode, tmp_path):
    # Python before 3.11.4 has no extraction filters; transfer then applies the data filter's
    # rules itself. Here, on a Python that has the filter, the two must agree.
    member = tarfile.TarInfo("tree/file")
    member.mode, member.uid, member.uname = mode, 4321, "someone"
    want = tarfile.data_filter(member, str(tmp_path))
    got = transfer._as_data(member)
    assert oct(got.mode) == oct(want.mode)
    assert (got.uid, got.uname) == (os.getuid(), "") and want.uid is None


def test_the_fallback_keeps_directories_plain_and_refuses_special_files(tmp_path):
    directory = tarfile.TarInfo("tree")
    directory.type, directory.mode = tarfile.DIRTYPE, 0o7777
    assert tarfile.data_filter(directory, str(tmp_path)).mode is None  # left to the umask
    assert transfer._as_data(directory).mode == 0o755
    for kind in (tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE):
        special = tarfile.TarInfo("tree/special")
        special.type = kind
        with pytest.raises(tarfile.FilterError):
            tarfile.data_filter(special, str(tmp_path))
        with pytest.raises(transfer.RefusedMember, match="'tree/special' is a special file"):
            transfer._as_data(special)


def _python_without_tar_filters() -> str | None:
    """A Python 3.11 before 3.11.4 on this machine (Debian 12's is 3.11.2), if any."""
    probe = "import sys, tarfile; sys.exit(sys.version_info[:2] != (3, 11) or hasattr(tarfile, 'data_filter'))"
    for python in ("/usr/bin/python3.11", "/usr/bin/python3"):
        if Path(python).exists() and subprocess.run([python, "-c", probe]).returncode == 0:
            return python
    return None


GET_SCRIPT = """
import json, sys
from pathlib import Path
from tpuctl.fanout import get
from tpuctl.fanout.base import Host
host = Host(**json.loads(sys.argv[1]))
for remote in ("plain", "with-fifo"):
    result = get([host], remote, Path(sys.argv[2]) / remote)[0]
    print(json.dumps([result.exit_code, result.stdout, result.stderr]))
"""


def test_get_through_tar_works_on_a_python_without_extraction_filters(hosts, tmp_path):
    python = _python_without_tar_filters()
    if python is None:
        pytest.skip("no Python 3.11.0 to 3.11.3 on this machine")
    made = run(
        hosts[:1],
        "mkdir -p plain/sub with-fifo && echo hi > plain/sub/tool && chmod 4757 plain/sub/tool"
        " && echo x > with-fifo/a && mkfifo with-fifo/pipe",
    )
    assert made[0].ok, made[0].stderr
    host = {k: v for k, v in hosts[0].__dict__.items() if k not in ("jump", "env")}
    paths = os.pathsep.join([sysconfig.get_paths()["purelib"], str(Path(__file__).parents[1])])
    done = subprocess.run(
        [python, "-c", GET_SCRIPT, json.dumps(host), str(tmp_path)],
        env={**os.environ, "PYTHONPATH": paths},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    plain, with_fifo = (json.loads(line) for line in done.stdout.splitlines())
    assert plain[:2] == [0, f"1 file -> {tmp_path / 'plain' / 'w00' / 'plain'}"], plain
    tool = tmp_path / "plain" / "w00" / "plain" / "sub" / "tool"
    assert tool.read_text() == "hi\n" and oct(tool.stat().st_mode & 0o7777) == oct(0o755)
    assert with_fifo[0] == 1 and "'with-fifo/pipe' is a special file" in with_fifo[2], with_fifo
