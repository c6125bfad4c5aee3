"""The SSH key pair `up` puts into node metadata."""

import os
import subprocess
import sys

import paramiko
import pytest

from tpuctl import config, sshkeys
from tpuctl.errors import TpuctlError


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("TPUCTL_SSH_KEY", raising=False)
    monkeypatch.setenv("TPUCTL_SSH_USER", "alice")
    monkeypatch.chdir(tmp_path)
    return config.load()


def test_generates_an_openssh_ed25519_pair_once(settings, tmp_path):
    private, public = sshkeys.ensure_keypair(settings)
    assert private == tmp_path / "cfg" / "tpuctl" / "ssh" / "id_ed25519"
    assert os.stat(private).st_mode & 0o777 == 0o600
    # paramiko (what fan-out uses) can load it, and it matches the public line.
    key = paramiko.Ed25519Key.from_private_key_file(str(private))
    assert public.split()[:2] == [key.get_name(), key.get_base64()]
    assert public.split()[2].startswith("alice@")
    assert sshkeys.ensure_keypair(settings) == (private, public)  # not regenerated


def test_configured_key_without_pub_file_derives_the_public_line(settings, tmp_path, monkeypatch):
    generated, public = sshkeys.ensure_keypair(settings)
    mine = tmp_path / "mykey"
    mine.write_bytes(generated.read_bytes())
    monkeypatch.setenv("TPUCTL_SSH_KEY", str(mine))
    private, derived = sshkeys.ensure_keypair(config.load())
    assert private == mine
    assert derived.split()[:2] == public.split()[:2]


def test_missing_configured_key_is_a_clear_error(tmp_path, monkeypatch, settings):
    monkeypatch.setenv("TPUCTL_SSH_KEY", str(tmp_path / "nope"))
    with pytest.raises(
        TpuctlError, match=r"ssh.key .*nope \(from env TPUCTL_SSH_KEY\) does not exist"
    ):
        sshkeys.ensure_keypair(config.load())


def test_metadata_value():
    assert sshkeys.metadata_ssh_keys("alice", "ssh-ed25519 AAAA c\n") == "alice:ssh-ed25519 AAAA c"


def test_the_login_key_needs_neither_its_public_half_nor_cryptography(tmp_path):
    # hosts_for runs in every `exec`: finding the key must not derive its public line.
    key = tmp_path / "gce"
    key.write_text("any private key\n")
    code = "import sys; from tpuctl import config, sshkeys; "
    code += "print(sshkeys.private_key_path(config.load()), 'cryptography' in sys.modules)"
    env = {**os.environ, "TPUCTL_SSH_KEY": str(key), "XDG_CONFIG_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)  # fmt: skip
    assert out.stdout.split() == [str(key), "False"]
