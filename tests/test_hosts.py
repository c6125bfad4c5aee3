"""Node -> hosts: worker selection, addresses, login, per-node known_hosts, address cache."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tpuctl import config
from tpuctl.errors import TpuctlError
from tpuctl.hosts import (
    cached_node,
    hosts_for,
    jump_known_hosts_path,
    known_hosts_path,
    lookup_node,
    parse_workers,
    remember,
    worker_label,
)
from tpuctl.providers.base import Node, Worker
from tpuctl.testing.sshpod import make_keypair


@pytest.fixture
def settings(tmp_path, monkeypatch):
    for var in ("TPUCTL_NODE", "TPUCTL_PROVIDER", "TPUCTL_SSH_INTERNAL_IP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/config unless a test writes one
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("TPUCTL_PROJECT", "proj")
    monkeypatch.setenv("TPUCTL_ZONE", "us-central2-b")
    monkeypatch.setenv("TPUCTL_SSH_USER", "alice")
    private_key, _ = make_keypair(tmp_path)
    monkeypatch.setenv("TPUCTL_SSH_KEY", private_key)
    return config.load()


def make_node(n: int = 4, created: datetime | None = None, external: bool = True) -> Node:
    workers = tuple(
        Worker(i, f"10.0.0.{i + 2}", f"35.1.1.{i + 2}" if external else None) for i in range(n)
    )
    return Node(
        "pod", "us-central2-b", "v4-32", "READY", project="proj", workers=workers,
        created=created or datetime(2026, 1, 1, tzinfo=UTC),
    )  # fmt: skip


def test_parse_workers_lists_and_ranges():
    assert parse_workers("0,3,5-7") == [0, 3, 5, 6, 7]
    assert parse_workers(" 2 , 2,1 ") == [2, 1]
    assert parse_workers(None) is None and parse_workers("all") is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("1,x", "'x' is not a worker number or range; use e.g. --worker 0,3,5-7"),
        ("5-3", "range '5-3' runs backwards"),
        ("0,8", "worker 8 does not exist; the node has workers 0-7"),
    ],
)
def test_parse_workers_errors_name_the_flag_and_the_fix(spec, message):
    with pytest.raises(TpuctlError, match="--worker") as err:
        parse_workers(spec, 8)
    assert message in str(err.value)


def test_a_worker_past_a_one_worker_node_is_refused_without_a_range_of_one():
    """It said "the node has workers 0-0"."""
    with pytest.raises(TpuctlError, match=r"worker 1 does not exist; the node has only worker 0$"):
        parse_workers("1", 1)


def test_labels_line_up_at_every_pod_size():
    assert worker_label(3, 4) == "w03"
    assert worker_label(7, 512) == "w007"


def test_hosts_use_external_ips_by_default_and_internal_on_request(settings, monkeypatch):
    hosts = hosts_for(settings, make_node())
    assert [h.address for h in hosts] == ["35.1.1.2", "35.1.1.3", "35.1.1.4", "35.1.1.5"]
    assert {(h.user, h.transport) for h in hosts} == {("alice", "ssh")}
    assert hosts[0].key_filename == settings.get("ssh.key")
    assert hosts[0].known_hosts == str(known_hosts_path(settings, "pod"))
    monkeypatch.setenv("TPUCTL_SSH_INTERNAL_IP", "true")
    internal = hosts_for(config.load(), make_node(), [1, 3])
    assert [(h.label, h.address) for h in internal] == [("w01", "10.0.0.3"), ("w03", "10.0.0.5")]


def test_workers_without_external_ip_are_reached_internally(settings):
    assert hosts_for(settings, make_node(2, external=False))[1].address == "10.0.0.3"


def test_ssh_config_yields_to_the_settings_the_user_set(settings, tmp_path, monkeypatch):
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host 35.1.1.*\n  User bob\n  Port 2200\n")
    [host] = hosts_for(settings, make_node(1))
    assert (host.user, host.port) == ("alice", 2200)  # TPUCTL_SSH_USER beats User
    monkeypatch.delenv("TPUCTL_SSH_USER")
    assert hosts_for(config.load(), make_node(1))[0].user == "bob"  # User beats the default


def test_a_jump_host_setting_means_internal_ips_unless_told_otherwise(settings, monkeypatch):
    monkeypatch.setenv("TPUCTL_SSH_PROXY_JUMP", "ops@bastion")
    hosts = hosts_for(config.load(), make_node(2))
    assert [h.address for h in hosts] == ["10.0.0.2", "10.0.0.3"]
    assert (hosts[0].jump.user, hosts[0].jump.address) == ("ops", "bastion")
    assert hosts[0].jump.known_hosts == str(jump_known_hosts_path())
    monkeypatch.setenv("TPUCTL_SSH_INTERNAL_IP", "false")
    assert hosts_for(config.load(), make_node(1))[0].address == "35.1.1.2"


def test_local_nodes_become_local_hosts(settings, tmp_path):
    workers = tuple(Worker(i, "127.0.0.1", workdir=str(tmp_path / f"w{i}")) for i in range(2))
    node = Node("mini", "local", "v3-16", "READY", workers=workers, provider="local")
    hosts = hosts_for(settings, node)
    assert [(h.transport, h.workdir) for h in hosts] == [("local", w.workdir) for w in workers]


def test_cache_round_trips_a_node(settings):
    node = make_node()
    remember(settings, node)
    assert cached_node(settings, "pod") == node
    assert cached_node(settings, "other") is None


def test_recreated_node_forgets_its_host_keys(settings):
    remember(settings, make_node())
    known = known_hosts_path(settings, "pod")
    known.write_text("35.1.1.2 ssh-ed25519 AAAA\n")
    remember(settings, make_node())  # same node looked up again: keys stay
    assert known.exists()
    remember(settings, make_node(created=datetime(2026, 2, 1, tzinfo=UTC)))
    assert not known.exists()


def test_lookup_prefers_the_cache_for_named_nodes(settings):
    remember(settings, make_node())
    # No TPU API is configured: a lookup that reached for it would fail.
    assert lookup_node(settings, "pod").workers == make_node().workers
