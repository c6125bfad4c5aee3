"""The SSH fan-out against real sshd hosts (tests/fixtures_pod.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from polling import wait_for
from streaming import (
    CHATTY,
    Counter,
    assert_streamed_with_its_tail_kept,
    peak_traced,
)

from tests.fixtures_pod import pod_hosts
from tpuctl.fanout import STREAMED_TAIL_BYTES, StopSignal, get, put, run
from tpuctl.sshconfig import SshConfig

pytestmark = pytest.mark.pod


@pytest.fixture
def hosts(ssh_pod, pod_key, tmp_path):
    return pod_hosts(ssh_pod, pod_key, str(tmp_path / "known_hosts"))


def test_every_host_runs_the_command_and_streams_its_own_lines(ssh_pod, hosts):
    lines = []
    results = run(hosts, "hostname -I; echo to-stderr >&2", on_line=lambda *a: lines.append(a))
    assert [r.exit_code for r in results] == [0, 0, 0, 0]
    for host, result in zip(hosts, results, strict=True):
        assert result.stdout.split() == [host.address]
        assert result.stderr == "to-stderr\n"
        assert (host, "stdout", host.address) in [(h, s, ln.strip()) for h, s, ln in lines]
        assert (host, "stderr", "to-stderr") in lines


def test_each_host_has_its_own_tmp(ssh_pod, hosts):
    run(hosts, "hostname -I > /tmp/whoami")
    for index, address in enumerate(ssh_pod.hosts):
        assert ssh_pod.path(index, "/tmp/whoami").read_text().split() == [address]


def test_one_failing_worker_gets_its_exit_code_and_output(ssh_pod, hosts):
    target = ssh_pod.hosts[2]
    command = f"if hostname -I | grep -qw {target}; then echo boom >&2; exit 7; fi; echo fine"
    results = run(hosts, command)
    assert [r.exit_code for r in results] == [0, 0, 7, 0]
    assert results[2].stderr == "boom\n" and not results[2].ok
    assert all(r.stdout == "fine\n" for i, r in enumerate(results) if i != 2)


def test_unreachable_worker_is_named_and_does_not_block_the_others(ssh_pod, hosts):
    ssh_pod.stop_host(1)
    started = time.monotonic()
    results = run(hosts, "echo up", connect_timeout=3)
    assert time.monotonic() - started < 6
    assert results[1].unreachable and results[1].exit_code is None
    assert "refused" in results[1].error.lower()
    assert [r.stdout for i, r in enumerate(results) if i != 1] == ["up\n"] * 3


def test_a_silent_worker_costs_one_connect_timeout(ssh_pod, hosts):
    ssh_pod.silence_host(2)
    try:
        started = time.monotonic()
        results = run(hosts, "echo up", connect_timeout=1.5)
        assert time.monotonic() - started < 4
    finally:
        ssh_pod.silence_host(2, silent=False)
    assert results[2].error == f"unreachable: no answer from {ssh_pod.hosts[2]}:22 within 1.5 s"
    assert [r.ok for r in results] == [True, True, False, True]


def test_timeout_stops_the_remote_command(ssh_pod, hosts):
    started = time.monotonic()
    results = run(hosts, "sleep 31", timeout=1)
    assert time.monotonic() - started < 5
    assert all(r.error == "timed out after 1 s" and r.exit_code is None for r in results)
    wait_for(lambda: not any("sleep 31" in p for i in range(4) for p in ssh_pod.processes(i)))


def test_a_timeout_stops_the_command_on_a_host_with_no_session_to_spare(ssh_pod, hosts):
    # sshd's MaxSessions 1: the command's session is the connection's only one, and lasts as
    # long as the command does, so stopping it takes a connection of its own.
    ssh_pod.set_max_sessions(0, 1)
    try:
        # In a process of its own: there Python would print paramiko's log of the refused
        # channel to stderr (pytest's log capture takes it here).
        script = (
            "import json, sys; from tpuctl.fanout import Host, run; "
            "host = Host(**{**json.loads(sys.argv[1]), 'identity_files': (), 'jump': None}); "
            "print(run([host], 'sleep 1031', timeout=1)[0].error)"
        )
        fields = json.dumps({**asdict(hosts[0]), "identity_files": None, "jump": None})
        done = subprocess.run(
            [sys.executable, "-c", script, fields], capture_output=True, text=True, timeout=60
        )
        assert done.stdout == "timed out after 1 s\n" and done.stderr == ""
        wait_for(lambda: not any("sleep 1031" in p for p in ssh_pod.processes(0)))
    finally:
        ssh_pod.set_max_sessions(0, 100)


def test_fail_fast_stops_the_others(ssh_pod, hosts):
    first = ssh_pod.hosts[0]
    command = f"if hostname -I | grep -qw {first}; then exit 3; fi; sleep 32"
    started = time.monotonic()
    results = run(hosts, command, fail_fast=True)
    assert time.monotonic() - started < 6
    assert results[0].exit_code == 3
    assert all("w00 failed" in r.error for r in results[1:])
    wait_for(lambda: not any("sleep 32" in p for i in range(4) for p in ssh_pod.processes(i)))


def test_env_values_reach_the_command_but_never_any_process_arguments(ssh_pod, hosts):
    secret = "hunter2-very-secret"
    stop = StopSignal()
    seen: list[str] = []
    worker = threading.Thread(
        target=lambda: seen.extend(
            r.stdout
            for r in run(hosts, 'echo "got=$TOKEN"; sleep 33', env={"TOKEN": secret}, stop=stop)
        )
    )
    worker.start()
    try:
        wait_for(lambda: all(any("sleep 33" in p for p in ssh_pod.processes(i)) for i in range(4)))
        every_argv = [p for i in range(4) for p in ssh_pod.processes(i)]
        assert every_argv and not any(secret in p for p in every_argv)
    finally:
        stop.set("test over")
        worker.join(10)
    assert seen == [f"got={secret}\n"] * 4


def test_per_host_env_overrides_the_shared_env(ssh_pod, hosts):
    hosts = [replace(h, env={"RANK": str(i)}) for i, h in enumerate(hosts)]
    results = run(hosts, 'echo "$RANK/$SIZE"', env={"RANK": "x", "SIZE": "4"})
    assert [r.stdout for r in results] == ["0/4\n", "1/4\n", "2/4\n", "3/4\n"]


def test_a_command_reading_stdin_does_not_hang(hosts):
    results = run(hosts, "cat; echo done", timeout=10)
    assert [r.stdout for r in results] == ["done\n"] * 4


def test_changed_host_key_is_refused(ssh_pod, hosts, tmp_path):
    assert all(r.ok for r in run(hosts, "true"))
    known = tmp_path / "known_hosts"
    lines = known.read_text().splitlines()
    keys = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    # Host 0's address now presents host 1's key: what a recreated VM looks like.
    keys[ssh_pod.hosts[0]], keys[ssh_pod.hosts[1]] = keys[ssh_pod.hosts[1]], keys[ssh_pod.hosts[0]]
    known.write_text("".join(f"{name} {key}\n" for name, key in keys.items()))
    results = run(hosts, "true")
    assert "host key of w00" in results[0].error and "changed" in results[0].error
    assert results[0].unreachable and results[2].ok


def test_put_and_get_copy_files_per_worker(ssh_pod, hosts, tmp_path):
    source = tmp_path / "setup.sh"
    source.write_text("echo hi\n")
    source.chmod(0o755)
    assert all(r.ok for r in put(hosts, source, "/tmp/setup.sh"))
    for index in range(4):
        copied = ssh_pod.path(index, "/tmp/setup.sh")
        assert copied.read_text() == "echo hi\n" and copied.stat().st_mode & 0o111
    run(hosts, "hostname -I > /tmp/me")
    results = get(hosts, "/tmp/me", tmp_path / "fetched")
    assert all(r.ok for r in results)
    for host in hosts:
        assert (tmp_path / "fetched" / host.label / "me").read_text().split() == [host.address]
    missing = get(hosts[:1], "/tmp/does-not-exist", tmp_path / "fetched")
    assert missing[0].exit_code == 1 and "does-not-exist" in missing[0].stderr


def test_get_keeps_file_modes_as_the_tar_path_does(hosts, tmp_path):
    made = run(
        hosts[:1],
        "mkdir -p /tmp/gm && cd /tmp/gm && echo s > secret && chmod 600 secret"
        " && echo x > run.sh && chmod 755 run.sh && echo p > plain && chmod 664 plain",
    )
    assert made[0].ok, made[0].stderr
    [fetched] = get(hosts[:1], "/tmp/gm", tmp_path / "back")
    assert fetched.ok, fetched.stderr
    modes = {f.name: oct(f.stat().st_mode & 0o7777) for f in (tmp_path / "back/w00/gm").iterdir()}
    assert modes == {"secret": "0o600", "run.sh": "0o755", "plain": "0o644"}


def test_put_keeps_a_private_file_private_while_it_copies(ssh_pod, hosts, tmp_path):
    secret = tmp_path / "secret"
    with open(secret, "wb") as out:
        out.truncate(64 << 20)  # big enough that the copy is seen under way
    secret.chmod(0o600)
    copied = ssh_pod.path(0, "/tmp/secret")
    copied.unlink(missing_ok=True)
    results: list = []
    copying = threading.Thread(target=lambda: results.extend(put(hosts[:1], secret, "/tmp/secret")))
    copying.start()
    first_seen = wait_for(lambda: copied.exists() and copied.stat().st_mode, what="the copy")
    copying.join()
    assert results[0].ok, results[0].stderr
    assert oct(first_seen & 0o777) == oct(0o600)
    assert oct(copied.stat().st_mode & 0o777) == oct(0o600)


def test_commands_start_everywhere_even_with_few_handshake_slots(ssh_pod32, pod_key, tmp_path):
    # The hosts share this machine's /var/tmp: a barrier none passes until all 32 started.
    hosts = pod_hosts(ssh_pod32, pod_key, str(tmp_path / "known_hosts"))
    started = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="tpuctl-barrier-"))
    try:
        barrier = f"touch {started}/$(hostname -I); until [ $(ls {started} | wc -l) -ge 32 ]; do sleep 0.05; done"
        results = run(hosts, barrier, max_parallel=4, timeout=30)
        assert [r.error for r in results] == [None] * 32
    finally:
        shutil.rmtree(started)


def test_32_workers_in_parallel(ssh_pod32, pod_key, tmp_path):
    pod = ssh_pod32
    hosts = pod_hosts(pod, pod_key, str(tmp_path / "known_hosts"))
    started = time.monotonic()
    results = run(hosts, "hostname -I")
    assert time.monotonic() - started < 10
    assert [r.stdout.split() for r in results] == [[address] for address in pod.hosts]


def test_a_new_connection_opens_its_first_channel_without_a_delayed_ack(hosts):
    """After login sshd sends small messages and Nagle holds its answer to the first
    channel open until they are acknowledged: 40 ms at least (Linux's minimum delayed
    ACK) on every new connection, unless the client acknowledges at once."""
    from tpuctl.fanout import ssh

    ctx = ssh.SshContext(connect_timeout=10.0)
    waits = []
    for host in hosts:
        transport = ssh.connect(host, ctx, StopSignal())
        try:
            started = time.monotonic()
            transport.open_session().close()
            waits.append(time.monotonic() - started)
        finally:
            transport.close()
    assert min(waits) < 0.030, waits


def test_a_worker_that_dies_mid_command_is_reported_without_waiting(ssh_pod, hosts):
    lost = threading.Event()
    stop = StopSignal()
    results = []

    def fan_out():
        on_result = lambda r: r.host.label == "w01" and lost.set()  # noqa: E731
        results.extend(run(hosts[:2], "sleep 38", stop=stop, on_result=on_result))

    worker = threading.Thread(target=fan_out)
    worker.start()
    try:
        wait_for(lambda: all(any("sleep 38" in p for p in ssh_pod.processes(i)) for i in range(2)))
        ssh_pod.stop_host(1)
        assert lost.wait(5), "the dead worker's result did not arrive"
    finally:
        stop.set("test over")
        worker.join(10)
    assert results[1].error == "connection lost" and results[1].exit_code is None
    assert results[0].error == "test over"


def test_a_chatty_login_script_does_not_hide_output_or_the_process_group(ssh_pod, hosts):
    bashrc = ssh_pod.path(0, "/root/.bashrc")
    bashrc.write_text("echo welcome to w00\n")
    try:
        [result] = run(hosts[:1], "echo hi")
        assert result.stdout.endswith("hi\n") and "welcome to w00" in result.stdout
        [stopped] = run(hosts[:1], "sleep 39", timeout=1)
        assert stopped.error == "timed out after 1 s"
        wait_for(lambda: not any("sleep 39" in p for p in ssh_pod.processes(0)))
    finally:
        bashrc.unlink()


def test_put_and_get_copy_directory_trees(ssh_pod, hosts, tmp_path):
    tree = tmp_path / "configs"
    (tree / "nested").mkdir(parents=True)
    (tree / "a.yaml").write_text("a: 1\n")
    (tree / "nested" / "b.yaml").write_text("b: 2\n")
    results = put(hosts[:2], tree, "/tmp/configs")
    assert [r.stdout for r in results] == ["2 files -> /tmp/configs"] * 2
    assert ssh_pod.path(1, "/tmp/configs/nested/b.yaml").read_text() == "b: 2\n"
    fetched = get(hosts[1:2], "/tmp/configs", tmp_path / "back")
    assert fetched[0].ok
    assert (tmp_path / "back" / "w01" / "configs" / "nested" / "b.yaml").read_text() == "b: 2\n"


def test_descriptors_numbered_past_1024_are_fine(hosts):
    # A 512-host fan-out holds over a thousand descriptors; select() cannot watch those.
    fillers = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        results = run(hosts, "echo ok")
    finally:
        for fd in fillers:
            os.close(fd)
    assert [r.stdout for r in results] == ["ok\n"] * 4


def test_workers_behind_a_bastion_share_one_connection_to_it(bastion_pod, hosts):
    bastion, workers = hosts[0], hosts[1:]
    assert run(workers[:1], "true", connect_timeout=1)[0].unreachable  # no direct way in
    logins = bastion_pod.log(0).count("Accepted publickey")
    # One handshake slot: the bastion's handshake must not wait for the workers' slot.
    behind = [replace(w, jump=replace(bastion, label="bastion")) for w in workers]
    results = run(behind, "hostname -I", max_parallel=1)
    assert [r.stdout.split() for r in results] == [[a] for a in bastion_pod.hosts[1:]]
    assert bastion_pod.log(0).count("Accepted publickey") == logins + 1


def test_a_dead_bastion_fails_every_worker_behind_it_at_once(bastion_pod, hosts):
    bastion_pod.stop_host(0)
    behind = [replace(w, jump=replace(hosts[0], label="bastion")) for w in hosts[1:]]
    started = time.monotonic()
    results = run(behind, "true", connect_timeout=2)
    assert time.monotonic() - started < 5  # one bastion attempt, not one per worker
    assert all(r.unreachable and "via bastion" in r.error for r in results)


def test_an_ssh_config_proxy_command_carries_the_connection(bastion_pod, hosts, pod_key):
    # OpenSSH's own client as the ProxyCommand: the usual `ssh -W` through a bastion.
    target = hosts[2]
    ssh_config = SshConfig([("config", f"""
Host {target.address}
    ProxyCommand ssh -q -i {pod_key[0]} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -W %h:%p root@{bastion_pod.hosts[0]}
""")])  # fmt: skip
    routed = ssh_config.apply(target, default_user="root", proxy_jump=None, jump_known_hosts="")
    [result] = run([routed], "hostname -I")
    assert result.stdout.split() == [target.address]


def test_a_streamed_command_keeps_only_the_tail_of_its_output(hosts):
    """Every byte of a host's output stayed in memory even while `on_line` streamed it."""
    counter = Counter()
    [result], peak = peak_traced(
        lambda: run(hosts[:1], CHATTY, on_line=counter, keep_tail=STREAMED_TAIL_BYTES)
    )
    assert_streamed_with_its_tail_kept(result, counter, STREAMED_TAIL_BYTES)
    assert peak < 16 * 2**20  # paramiko's window (2 MiB) and ours; all of it: over 128 MiB
