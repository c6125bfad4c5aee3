"""ssh_config applied to worker addresses under tpuctl's settings (the pod tests in
test_fanout.py and test_cli_workers.py connect through what this resolves)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tpuctl.errors import TpuctlError
from tpuctl.fanout.base import Host
from tpuctl.sshconfig import SshConfig, user_ssh_config

CONFIG = """
Host 10.0.*
    User bob
    Port 2200
    IdentityFile /keys/gce
    ProxyJump bastion
Host bastion
    HostName bastion.example.com
    User ops
    IdentityFile /keys/ops
Host *
    ProxyCommand nc -X connect %h %p
"""


def apply(host: Host, config: str = CONFIG, proxy_jump: str | None = None) -> Host:
    return SshConfig([("~/.ssh/config", config)]).apply(
        host, default_user="me", proxy_jump=proxy_jump, jump_known_hosts="/state/jumps"
    )


def test_a_host_entry_fills_in_what_tpuctl_left_unset():
    worker = apply(Host("w00", "10.0.0.2", key_filename="/keys/tpuctl"))
    assert (worker.user, worker.port) == ("bob", 2200)
    assert (worker.key_filename, worker.identity_files) == ("/keys/tpuctl", ("/keys/gce",))
    bastion = worker.jump
    assert (bastion.address, bastion.user, bastion.port) == ("bastion.example.com", "ops", 22)
    assert bastion.identity_files[0] == "/keys/ops" and bastion.identity_files[-1] == "/keys/tpuctl"
    assert bastion.known_hosts == "/state/jumps" and bastion.jump is None
    # A user tpuctl was told beats ssh_config's; no entry at all leaves tpuctl's defaults.
    assert apply(Host("w00", "10.0.0.2", user="alice")).user == "alice"
    plain = apply(Host("w00", "172.16.0.2"), config="")
    assert (plain.user, plain.port, plain.jump, plain.proxy_command) == ("me", 22, None, None)


def test_ssh_proxy_jump_beats_ssh_config_and_chains_hops():
    worker = apply(Host("w00", "10.0.0.2"), proxy_jump="root@first:2022,second")
    second, first = worker.jump, worker.jump.jump
    assert (second.address, first.address, first.user, first.port) == (
        "second",
        "first",
        "root",
        2022,
    )
    assert first.jump is None  # ssh_config's `Host *` ProxyCommand is not used on the way
    assert apply(Host("w00", "10.0.0.2"), proxy_jump="none").jump is None
    with pytest.raises(TpuctlError, match=r"ssh.proxy_jump 'root@' is not \[user@\]host"):
        apply(Host("w00", "10.0.0.2"), proxy_jump="root@")


def test_proxy_command_is_expanded_and_a_wildcard_jump_does_not_loop():
    other = apply(Host("w00", "172.16.0.9"))
    assert other.proxy_command == "nc -X connect 172.16.0.9 22"
    looped = apply(Host("w00", "10.0.0.2"), config="Host *\n    ProxyJump bastion\n")
    assert looped.jump.address == "bastion" and looped.jump.jump is None


def test_an_unparsable_ssh_config_is_one_line_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host x\n  =broken\n")
    with pytest.raises(TpuctlError, match=r"\.ssh/config: Unparsable line =broken; fix that line"):
        user_ssh_config()


def test_match_exec_runs_its_command_though_paramiko_is_imported_without_invoke():
    # A fresh process: paramiko comes without invoke (tpuctl.fanout.paramiko_loader) and
    # gets it when a `Match exec` line is evaluated.
    code = """
import sys
from tpuctl.sshconfig import SshConfig
config = SshConfig([("config", 'Match exec "test %h = 10.0.0.2"\\n    User alice\\n')])
before = "invoke" in sys.modules
print(before, config.options("10.0.0.2").get("user"), config.options("10.0.0.3").get("user"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "alice", "None"]


def test_a_config_naming_nothing_tpuctl_reads_is_not_handed_to_paramiko():
    code = """
import sys
from tpuctl.sshconfig import SshConfig
stock = "Host *\\n    SendEnv LANG LC_*\\n    HashKnownHosts yes\\n# User is a comment here\\n"
print(SshConfig([("ssh_config", stock)]).options("10.0.0.2"), "paramiko" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["{}", "False"]
    assert (
        apply(Host("w00", "10.0.0.2"), config="Host *\n  SendEnv LANG\n  User=carol\n").user
        == "carol"
    )


@pytest.mark.parametrize(
    ("config", "proxy_jump", "message"),
    [
        ("", "bastion:99999999999999999999", r"Port '99999999999999999999' for ssh.proxy_jump"),
        ("", "bastion:0", r"Port '0' for ssh.proxy_jump"),
        ("Host 10.0.*\n    Port 2²\n", None, r"Port '2²' for 10.0.0.2 is not a port number"),
        ("Host 10.0.*\n    Port 70000\n", None, r"Port '70000' for 10.0.0.2"),
    ],
)
def test_a_port_that_is_no_port_number_is_one_line(config, proxy_jump, message):
    """They crashed the connection with OverflowError or ValueError."""
    with pytest.raises(TpuctlError, match=message):
        apply(Host("w00", "10.0.0.2"), config=config, proxy_jump=proxy_jump)


def test_a_host_name_that_is_no_address_is_unreachable_not_a_crash():
    """IDNA refuses an empty label (tpu..example.com): the host cannot be connected to."""
    from tpuctl.fanout.base import StopSignal
    from tpuctl.fanout.ssh import SshContext, connect

    with pytest.raises(ConnectionError, match=r"tpu\.\.example\.com:22 is not an address"):
        connect(Host("w00", "tpu..example.com"), SshContext(1.0), StopSignal())
