"""File transfer to hosts whose sshd has no SFTP subsystem: tar over the exec channel
copies the same way SFTP does (tests/test_fanout.py covers hosts with SFTP)."""

from __future__ import annotations

import paramiko
import pytest

from tests.fixtures_pod import pod_hosts
from tpuctl.fanout import get, put, run

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
    copied = transfer.get_from_host(
        hosts[0], SshContext(10.0), StopSignal(), "linked", target, skipped
    )
    assert copied == 1 and (target / "sub" / "a").read_text() == "a\n"
    assert skipped == ["linked/passwd"] and not (target / "passwd").exists()
