"""Connection reuse through the per-node holder, against real sshd hosts (tests/fixtures_pod.py):
the holder's answers are the cold path's, it keeps one connection per worker across
commands, and it is left alone when the node, its host keys or the settings say so."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
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
from tpuctl import config
from tpuctl.fanout import STREAMED_TAIL_BYTES, StopSignal, get, holder, put, run
from tpuctl.fanout.base import merged_env

COMMAND = 'echo "out $(hostname -I)"; echo err >&2; exit $(( $(hostname -I | cut -d. -f4) % 3 ))'


@pytest.mark.parametrize(
    ("enabled", "covered", "answer", "step"),
    [
        (False, True, "ready", "cold"),  # opted out: never a holder, not even a live one
        (True, False, "ready", "cold"),  # a host the holder does not hold (a jump host's)
        (True, True, "ready", "use"),
        (True, True, None, "start"),  # nobody listening: run cold, leave a holder behind
        (True, True, "other", "replace"),  # the node was recreated or its workers moved
    ],
)
def test_choose(enabled, covered, answer, step):
    assert holder.choose(enabled, covered, answer) == step


def test_reuse_is_five_minutes_unless_set_and_off_turns_it_off(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("TPUCTL_SSH_REUSE")
    assert holder.reuse_seconds(config.load()) == 300
    monkeypatch.setenv("TPUCTL_SSH_REUSE", "90s")
    assert holder.reuse_seconds(config.load()) == 90
    monkeypatch.setenv("TPUCTL_SSH_REUSE", "off")
    assert holder.reuse_seconds(config.load()) is None


def test_a_holder_of_another_protocol_serves_another_identity(monkeypatch):
    # A holder an older tpuctl left running would ignore a put or get: the identity it serves
    # carries the protocol, so a newer command replaces it rather than asks it.
    from tpuctl.fanout.base import Host
    from tpuctl.providers.base import Node

    node, hosts = Node("pod", "us-central1-a", "v3-8", "READY"), [Host("w00", "10.0.0.2")]
    current = holder.node_identity(node, hosts)
    monkeypatch.setattr(holder, "PROTOCOL", holder.PROTOCOL - 1)
    assert holder.node_identity(node, hosts) != current


def test_messages_arrive_whole_however_the_stream_is_cut():
    # The receiver keeps an offset into what it has read and joins a message's chunks once:
    # messages several to a read, one across many reads and a timeout, then the end.
    sender, receiver = socket.socketpair()
    lines = holder._Lines(receiver)
    big = {"result": {"stdout": "x" * 150_000}}  # over 2 reads, within the socket buffer
    stream = b"".join(json.dumps(m).encode() + b"\n" for m in ({"a": 1}, {"b": 2}, big))
    sender.sendall(stream[:5])
    with pytest.raises(TimeoutError):
        lines.receive(timeout=0)
    sender.sendall(stream[5:-10])
    assert [lines.receive(), lines.receive()] == [{"a": 1}, {"b": 2}]
    with pytest.raises(TimeoutError):
        lines.receive(timeout=0)
    sender.sendall(stream[-10:])
    sender.close()
    assert lines.receive() == big and lines.receive() is None
    receiver.close()


pod = pytest.mark.pod


@pytest.fixture
def state(monkeypatch):
    """A short state dir (a socket path holds ~100 bytes), which the holders inherit."""
    directory = Path(tempfile.mkdtemp(prefix="tpuctl-holder-", dir="/tmp"))
    monkeypatch.setenv("XDG_STATE_HOME", str(directory))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def held(ssh_pod, pod_key, tmp_path, state):
    """The pod's hosts, attached to a holder of identity "node-a" (started by the first run)."""
    hosts = pod_hosts(ssh_pod, pod_key, str(tmp_path / "known_hosts"))
    attachment = holder.Attachment("node-a", state / "holders" / "a.sock", 60.0, tuple(hosts))
    holder.attach(attachment)
    yield hosts, attachment
    holder.attach(None)
    holder.tell_to_exit(attachment.socket)
    wait_for(lambda: not attachment.socket.exists(), what="the holder to exit")


def logins(pod) -> int:
    return sum(pod.log(i).count("Accepted publickey") for i in range(pod.n))


def _warm_up(hosts, attachment) -> list:
    """A cold run, then its holder holding a connection to every host: a run through it
    waits for the holder's connections still under way, and connects any it could not make
    in time (on a loaded machine; counting exactly two logins per host waited forever then)."""
    results = run(hosts, COMMAND)
    wait_for(lambda: _answers(attachment), what="the holder's answer")
    assert all(r.ok for r in run(hosts, "true"))
    return results


def _answers(attachment) -> bool:
    lines, answer = holder._hello(attachment)
    if lines is not None:
        lines.close()
    return answer == "ready"


def outcome(results) -> list[tuple]:
    return [(r.host.label, r.exit_code, r.stdout, r.stderr, r.error) for r in results]


@pod
def test_later_runs_reuse_the_holders_connections_and_answer_as_the_cold_run(ssh_pod, held):
    hosts, attachment = held
    cold = _warm_up(hosts, attachment)
    assert {r.exit_code for r in cold} != {0}  # the outcome compared includes failures
    held_logins = logins(ssh_pod)
    lines: list[tuple] = []
    warm = run(hosts, COMMAND, on_line=lambda h, s, t: lines.append((h.label, s, t)))
    again = run(hosts[1:3], COMMAND)
    assert outcome(warm) == outcome(cold) and outcome(again) == outcome(cold)[1:3]
    assert sorted(lines) == sorted(
        (r.host.label, stream, text.rstrip("\n"))
        for r in cold
        for stream, text in (("stdout", r.stdout), ("stderr", r.stderr))
    )
    assert logins(ssh_pod) == held_logins  # sshd saw no new connection


@pod
def test_put_and_get_go_over_the_held_connections_as_the_cold_path_copies(
    ssh_pod, held, tmp_path, monkeypatch
):
    hosts, attachment = held
    _warm_up(hosts, attachment)
    held_logins = logins(ssh_pod)
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "a").write_text("a\n")
    (tmp_path / "tree" / "sub" / "b").write_text("b\n")
    monkeypatch.chdir(tmp_path)  # relative paths are the command's, not the holder's
    assert [r.stdout for r in put(hosts, "tree", "held-tree")] == ["2 files -> held-tree"] * 4
    fetched = get(hosts, "held-tree", "back")
    assert [r.stdout for r in fetched] == [f"2 files -> back/{h.label}/held-tree" for h in hosts]
    assert (tmp_path / "back" / "w03" / "held-tree" / "sub" / "b").read_text() == "b\n"
    missing = outcome(get(hosts, "/tmp/does-not-exist", "back"))
    holder.attach(None)
    try:
        assert missing == outcome(get(hosts, "/tmp/does-not-exist", "back"))  # as cold
        held_logins += len(hosts)
    finally:
        holder.attach(attachment)
    assert {(m[1], m[3]) for m in missing} == {(1, "No such file: /tmp/does-not-exist")}
    assert logins(ssh_pod) == held_logins  # sshd saw no new connection


@pod
def test_workers_behind_a_proxy_command_keep_their_connections_and_proxies_in_the_holder(
    bastion_pod, pod_key, tmp_path, state
):
    # OpenSSH's `ssh -W` through the bastion: each connection runs one, a login there.
    through = (f"ssh -q -i {pod_key[0]} -o BatchMode=yes -o StrictHostKeyChecking=no "
               f"-o UserKnownHostsFile=/dev/null -W {{}}:22 root@{bastion_pod.hosts[0]}")  # fmt: skip
    direct = pod_hosts(bastion_pod, pod_key, str(tmp_path / "known_hosts"))[1:]
    hosts = [replace(h, proxy_command=through.format(h.address)) for h in direct]
    attachment = holder.Attachment("node-p", state / "holders" / "p.sock", 60.0, tuple(hosts))
    holder.attach(attachment)
    try:
        _warm_up(hosts, attachment)
        bastion_logins = bastion_pod.log(0).count("Accepted publickey")
        results = run(hosts, "hostname -I")
        assert [r.stdout.split() for r in results] == [[h.address] for h in direct]
        assert bastion_pod.log(0).count("Accepted publickey") == bastion_logins
    finally:
        holder.attach(None)
        holder.tell_to_exit(attachment.socket)
        wait_for(lambda: not attachment.socket.exists(), what="the holder to exit")


@pod
def test_workers_behind_a_jump_host_are_held_with_its_connection_and_its_key_checked(
    bastion_pod, pod_key, tmp_path, state
):
    known = tmp_path / "known_hosts"
    direct = pod_hosts(bastion_pod, pod_key, str(known))
    bastion = replace(direct[0], label="bastion")
    hosts = [replace(h, jump=bastion) for h in direct[1:]]
    attachment = holder.Attachment("node-j", state / "holders" / "j.sock", 60.0, tuple(hosts))
    holder.attach(attachment)
    try:
        _warm_up(hosts, attachment)
        held_logins = logins(bastion_pod)
        results = run(hosts, "hostname -I")
        assert [r.stdout.split() for r in results] == [[h.address] for h in direct[1:]]
        assert logins(bastion_pod) == held_logins  # neither the bastion nor a worker
        # The bastion's recorded key is now another host's: its held connection goes, with
        # the workers' through it, and the fresh one is refused as a cold one is.
        keys = dict(line.split(None, 1) for line in known.read_text().splitlines())
        keys[bastion.address] = keys[direct[1].address]
        known.write_text("".join(f"{name} {key}\n" for name, key in keys.items()))
        refused = run(hosts, "true")
        assert all(r.unreachable and "via bastion" in r.error for r in refused), refused
        assert all("host key of bastion" in r.error for r in refused)
    finally:
        holder.attach(None)
        holder.tell_to_exit(attachment.socket)
        wait_for(lambda: not attachment.socket.exists(), what="the holder to exit")


@pod
def test_the_socket_is_the_users_alone(ssh_pod, held):
    hosts, attachment = held
    _warm_up(hosts, attachment)
    assert stat.S_IMODE(attachment.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(attachment.socket.parent.stat().st_mode) == 0o700


@pod
def test_a_second_holder_for_a_live_one_leaves_it_serving(ssh_pod, held):
    hosts, attachment = held
    _warm_up(hosts, attachment)
    inode, before = attachment.socket.stat().st_ino, logins(ssh_pod)
    assert holder.spawn(attachment, 10.0).wait(timeout=60) == 0
    assert attachment.socket.stat().st_ino == inode and logins(ssh_pod) == before
    assert all(r.ok for r in run(hosts, "true")) and logins(ssh_pod) == before


@pod
def test_an_idle_holder_exits(ssh_pod, pod_key, tmp_path, state):
    hosts = pod_hosts(ssh_pod, pod_key, str(tmp_path / "known_hosts"))
    attachment = holder.Attachment("node-a", state / "holders" / "a.sock", 1.0, tuple(hosts))
    holder.attach(attachment)
    try:
        _warm_up(hosts, attachment)
    finally:
        holder.attach(None)
    wait_for(lambda: not attachment.socket.exists(), timeout=30, what="the idle holder to exit")


@pod
def test_a_recreated_node_is_not_served_by_the_old_holder(ssh_pod, held):
    hosts, attachment = held
    _warm_up(hosts, attachment)
    before = logins(ssh_pod)
    holder.attach(holder.Attachment("node-a-recreated", attachment.socket, 60.0, tuple(hosts)))
    results = run(hosts, "true")
    assert all(r.ok for r in results)
    assert logins(ssh_pod) >= before + len(hosts)  # cold, not through the old holder


@pod
def test_a_changed_host_key_is_refused_as_on_a_cold_connection(ssh_pod, held, tmp_path):
    hosts, attachment = held
    _warm_up(hosts, attachment)
    known = tmp_path / "known_hosts"
    keys = dict(line.split(None, 1) for line in known.read_text().splitlines())
    # Hosts 0 and 1 swap recorded keys: the held connections' keys are no longer recorded.
    keys[ssh_pod.hosts[0]], keys[ssh_pod.hosts[1]] = keys[ssh_pod.hosts[1]], keys[ssh_pod.hosts[0]]
    known.write_text("".join(f"{name} {key}\n" for name, key in keys.items()))
    results = run(hosts, "true")
    for index in (0, 1):
        assert f"host key of w0{index}" in results[index].error
        assert "changed" in results[index].error and results[index].unreachable
    assert results[2].ok and results[3].ok


@pod
def test_a_timeout_stops_the_remote_command_through_the_holder(ssh_pod, held):
    hosts, attachment = held
    _warm_up(hosts, attachment)
    results = run(hosts, "sleep 41", timeout=1)
    assert all(r.error == "timed out after 1 s" and r.exit_code is None for r in results)
    wait_for(lambda: not any("sleep 41" in p for i in range(4) for p in ssh_pod.processes(i)))


def test_a_held_connection_to_a_silent_host_costs_one_connect_timeout_then_is_dropped(
    ssh_pod, held
):
    """A held connection whose host went silent waited paramiko's fixed 10 s to open a
    session, whatever --connect-timeout said, at every command, and said 'connection lost'."""
    hosts, attachment = held
    _warm_up(hosts, attachment)
    ssh_pod.silence_host(2)
    try:
        for attempt in range(2):  # the held connection, then a fresh one
            started = time.monotonic()
            results = run(hosts, "echo up", connect_timeout=1.5)
            assert time.monotonic() - started < 6, attempt
            assert results[2].error.startswith(
                f"unreachable: no answer from {ssh_pod.hosts[2]}:22 within 1.5 s"
            ), results[2].error
            assert [r.ok for r in results] == [True, True, False, True]
    finally:
        ssh_pod.silence_host(2, silent=False)


@pod
def test_a_starting_holder_serves_at_once_while_it_still_connects_to_a_silent_worker(ssh_pod, held):
    """A starting holder answered nobody until it had tried every worker: one silent worker
    made every command for a connect timeout wait 5 s for an answer, then run cold."""
    hosts, attachment = held
    ssh_pod.silence_host(3)
    try:
        before = logins(ssh_pod)
        process = holder.spawn(attachment, 600.0)
        wait_for(lambda: _connecting(process.pid, ssh_pod.hosts[3]), what="a connect to w03")
        assert _answers(attachment)
        assert all(r.ok for r in run(hosts[:3], "true"))
        assert logins(ssh_pod) == before + 3  # the holder's own connections, waited for
        [silent] = run(hosts[3:], "true", connect_timeout=1.5)
        assert silent.error == f"unreachable: no answer from {ssh_pod.hosts[3]}:22 within 1.5 s"
        assert _connecting(process.pid, ssh_pod.hosts[3])  # all of it before w03 answered
        holder.tell_to_exit(attachment.socket)
        assert process.wait(timeout=60) == 0  # not held up by its connect to w03
    finally:
        ssh_pod.silence_host(3, silent=False)


def _connecting(pid: int, address: str) -> bool:
    """Whether process `pid` is connecting to `address`:22, still unanswered (SYN_SENT)."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            sockets.add(os.readlink(fd).removeprefix("socket:[").removesuffix("]"))
    # /proc/net/tcp: the address as one native-endian 32-bit word, then the port, in hex.
    [word] = struct.unpack("=I", socket.inet_aton(address))
    remote = f"{word:08X}:0016"
    rows = [line.split() for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]]
    return any(r[2] == remote and r[3] == "02" and r[9] in sockets for r in rows)


@pod
def test_the_holder_sends_the_lines_of_each_read_in_one_message(ssh_pod, held):
    """The holder sent a message per output line, each encoded, sent and decoded on its own:
    20 MB of output took 6-10 times as long through it as without it."""
    hosts, attachment = held
    _warm_up(hosts, attachment)
    conn, answer = holder._hello(attachment)
    assert conn is not None and answer == "ready"
    command = r"seq 1000; printf 'a\xe2\x82\nb\xffc\nlast'"  # not UTF-8, no final newline
    conn.send({
        "op": "run", "command": command, "envs": [merged_env(hosts[0], None)],
        "timeout": None, "keep_tail": None, "fail_fast": False, "max_parallel": 64,
        "hosts": [asdict(hosts[0])], "connect_timeout": 10.0,
    })  # fmt: skip
    messages = list(iter(conn.receive, None))  # until the holder hangs up, the request done
    conn.close()
    batches = [m["lines"] for m in messages if "lines" in m]
    texts = [text for _, _, lines in batches for text in lines]
    assert texts == [str(n) for n in range(1, 1001)] + ["a\ufffd", "b\ufffdc", "last"]
    assert len(batches) < len(texts)


@pod
def test_a_held_connection_the_worker_forgot_is_replaced_before_the_command_runs(
    ssh_pod, held, tmp_path
):
    """A worker that dropped the held connection silently (a reboot) answers the next
    session request with a reset: nothing ran yet, so the holder connects afresh."""
    hosts, attachment = held
    _warm_up(hosts, attachment)
    source = tmp_path / "f"
    source.write_text("x\n")
    for index, attempt in (
        (1, lambda: run(hosts, "echo up")),
        (2, lambda: put(hosts, source, "f")),
    ):
        ssh_pod.forget_connections(index)
        results = attempt()
        assert [r.error for r in results] == [None] * 4, index
    assert [r.ok for r in run(hosts, "true")] == [True] * 4


@pod
def test_a_host_refusing_more_sessions_on_the_held_connection_gets_a_connection_of_its_own(
    ssh_pod, held
):
    # sshd allows MaxSessions sessions per connection (10 by default): commands beyond that
    # through one held connection (a `logs --tail`, a babysit, a shell loop of execs) would
    # fail as "connection lost" where their cold runs succeed.
    hosts, attachment = held
    ssh_pod.set_max_sessions(0, 1)
    try:
        host = hosts[:1]
        _warm_up(host, attachment)
        stop, started = StopSignal(), threading.Event()
        long = threading.Thread(
            target=run, args=(host, "echo started; sleep 1043"),
            kwargs={"stop": stop, "on_line": lambda *_: started.set()},
        )  # fmt: skip
        long.start()
        try:
            assert started.wait(30)
            before = logins(ssh_pod)
            [result] = run(host, "echo second")
            assert result.ok and result.stdout == "second\n", result.error
            assert logins(ssh_pod) == before + 1  # a connection for this command alone
            [again] = run(host, "echo third")
            assert again.ok and logins(ssh_pod) == before + 2  # not held: the first still is
            [sent] = put(host, Path(__file__), "/tmp/held-copy.py")  # a copy is a session too
            assert sent.ok and logins(ssh_pod) == before + 3, sent.error
        finally:
            stop.set("done")
            long.join(30)
        # Stopped without a session to spare for the kill: it freed its own first.
        wait_for(lambda: not any("sleep 1043" in p for p in ssh_pod.processes(0)))
        assert all(r.ok for r in run(host, "true"))
    finally:
        ssh_pod.set_max_sessions(0, 100)


@pod
def test_secrets_reach_the_command_but_no_argv_or_file(ssh_pod, held, state):
    hosts, attachment = held
    _warm_up(hosts, attachment)
    secret = "hunter2-held-secret"
    stop, seen = StopSignal(), []
    worker = threading.Thread(
        target=lambda: seen.extend(
            r.stdout
            for r in run(hosts, 'echo "$TOKEN"; sleep 42', env={"TOKEN": secret}, stop=stop)
        )
    )
    worker.start()
    try:
        wait_for(lambda: all(any("sleep 42" in p for p in ssh_pod.processes(i)) for i in range(4)))
        argvs = [p for i in range(4) for p in ssh_pod.processes(i)] + _local_argvs()
        assert not any(secret in p for p in argvs)
        files = [p for p in state.rglob("*") if p.is_file()]
        assert not any(secret.encode() in p.read_bytes() for p in files)
    finally:
        stop.set("test over")
        worker.join(10)
    assert seen == [f"{secret}\n"] * 4


def _local_argvs() -> list[str]:
    argvs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            argvs.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
    return argvs


@pod
def test_opted_out_no_holder_is_started(ssh_pod, pod_key, tmp_path, state, monkeypatch):
    from tpuctl.providers.base import Node

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    hosts = pod_hosts(ssh_pod, pod_key, str(tmp_path / "known_hosts"))
    node = Node("pod", "us-central1-a", "v3-32", "READY")
    holder.attach_node(config.load(), node, hosts)  # TPUCTL_SSH_REUSE=off (tests/conftest.py)
    before = logins(ssh_pod)
    assert all(r.ok for r in run(hosts, "true")) and all(r.ok for r in run(hosts, "true"))
    assert logins(ssh_pod) == before + 2 * len(hosts)
    assert not (state / "tpuctl" / "holders").exists()


@pod
def test_exec_ps_put_and_get_reuse_one_holder_from_the_cli_and_down_ends_it(
    fake_tpu, ssh_pod, pod_key, state, monkeypatch, tmp_path
):
    fake_tpu.add_node("pod", "v3-32", project="test-project", zone="us-central1-a",
                      worker_ips=ssh_pod.hosts)  # fmt: skip
    monkeypatch.setenv("XDG_STATE_HOME", str(state))  # fake_tpu set a long one
    env = {**os.environ, "TPUCTL_SSH_KEY": pod_key[0], "TPUCTL_SSH_USER": "root",
           "TPUCTL_SSH_REUSE": "60s"}  # fmt: skip

    def tpuctl(*args: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "tpuctl", *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)

    before = logins(ssh_pod)
    cold = tpuctl("exec", "--", COMMAND)
    wait_for(lambda: logins(ssh_pod) == before + 8, what="the holder's logins")
    [sock] = wait_for(lambda: list((state / "tpuctl" / "holders").glob("*.sock")))
    try:
        warm = tpuctl("exec", "--", COMMAND)
        listed = tpuctl("ps")
        assert warm.returncode == cold.returncode == 1
        for stream in ("stdout", "stderr"):  # in arrival order, without the progress lines
            seen = [sorted(ln for ln in getattr(r, stream).splitlines() if "done after" not in ln)
                    for r in (warm, cold)]  # fmt: skip
            assert seen[0] == seen[1]
        rows = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
        assert listed.returncode == 0 and rows == ["w00", "w01", "w02", "w03"], listed.stderr
        sent = tpuctl("put", __file__, "/tmp/via-holder.py")
        assert sent.returncode == 0, sent.stderr
        assert tpuctl("get", "/tmp/via-holder.py", str(tmp_path)).returncode == 0
        assert (tmp_path / "w03" / "via-holder.py").read_text() == Path(__file__).read_text()
        assert logins(ssh_pod) == before + 8
        argv = [sys.executable, "-m", "tpuctl", "exec", "--json", "--", "sleep", "1000"]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env)  # fmt: skip
        try:
            wait_for(lambda: all(any("sleep 1000" in p for p in ssh_pod.processes(i))
                                 for i in range(4)))  # fmt: skip
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=15)
        finally:
            process.kill()
        assert process.returncode == 130  # Ctrl-C: as on the cold path
        assert [r["error"] for r in json.loads(stdout)] == ["interrupted"] * 4
        assert "interrupted: 0/4 workers succeeded" in stderr
        assert not any("sleep 1000" in p for i in range(4) for p in ssh_pod.processes(i))
        assert logins(ssh_pod) == before + 8
        assert tpuctl("down", "pod", "--yes").returncode == 0
        wait_for(lambda: not sock.exists(), what="the holder to exit with its node")
    finally:
        holder.tell_to_exit(sock)
        wait_for(lambda: not sock.exists(), what="the holder to exit")


@pod
def test_a_streamed_command_through_the_holder_leaves_it_no_bigger(ssh_pod, held):
    """The holder kept every byte of a command's output until the command ended, then sent
    it all in the result, though the client streamed the lines: a `logs --tail` through
    it grew the holder, which outlives the command, without bound."""
    hosts, attachment = held
    process = holder.spawn(attachment, 10.0)
    wait_for(lambda: _answers(attachment), what="the holder's answer")
    assert run(hosts[:1], "true")[0].ok  # its connection made, paramiko's buffers in use
    before = _peak_rss(process.pid)
    counter = Counter()
    [result], peak = peak_traced(
        lambda: run(hosts[:1], CHATTY, on_line=counter, keep_tail=STREAMED_TAIL_BYTES)
    )
    assert_streamed_with_its_tail_kept(result, counter, STREAMED_TAIL_BYTES)
    assert peak < 4 * 2**20  # here: the lines' messages, one read's at a time
    assert _peak_rss(process.pid) - before < 16 * 2**20  # all of it kept: over 128 MiB


def _peak_rss(pid: int) -> int:
    """The most memory process `pid` has held at once (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")
