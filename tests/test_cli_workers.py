"""`tpuctl exec`, `ssh`, `put`, `get`, `clear-locks`, `check` end to end, on production's path:
the real Cloud TPU client asks the fake API for the node, whose network endpoints are the
test pod's sshd hosts, and the fan-out logs in over SSH."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import time

import pytest
from polling import wait_for

from tests.fixtures_pod import pod_hosts
from tpuctl.fanout import run
from tpuctl.testing.sshpod import ALT_PORT
from tpuctl.worker_scripts import REFUSED_EXIT, clear_locks_script, parse_lock_report

pytestmark = pytest.mark.pod

PROJECT, ZONE = "test-project", "us-central1-a"


def tpuctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tpuctl", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def pod_node(fake_tpu, ssh_pod, pod_key, monkeypatch):
    """Node `pod` (v3-32: 4 workers) whose workers are the 4 sshd hosts."""
    fake_tpu.add_node("pod", "v3-32", project=PROJECT, zone=ZONE, worker_ips=ssh_pod.hosts)
    monkeypatch.setenv("TPUCTL_SSH_KEY", pod_key[0])
    monkeypatch.setenv("TPUCTL_SSH_USER", "root")
    return ssh_pod


def prefixed(stdout: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in stdout.splitlines())


def test_exec_streams_prefixed_lines_and_a_green_summary(pod_node):
    result = tpuctl("exec", "--", "hostname", "-I")
    assert result.returncode == 0, result.stderr
    lines = prefixed(result.stdout)
    assert {k: v.strip() for k, v in lines.items()} == {
        f"[w0{i}]": address for i, address in enumerate(pod_node.hosts)
    }
    assert "all 4 workers succeeded" in result.stderr


def test_exec_on_32_workers(fake_tpu, ssh_pod32, pod_key, monkeypatch):
    fake_tpu.add_node("big", "v3-256", project=PROJECT, zone=ZONE, worker_ips=ssh_pod32.hosts)
    monkeypatch.setenv("TPUCTL_SSH_KEY", pod_key[0])
    monkeypatch.setenv("TPUCTL_SSH_USER", "root")
    result = tpuctl("exec", "--", "hostname -I")
    assert result.returncode == 0, result.stderr
    lines = prefixed(result.stdout)
    assert len(lines) == 32
    assert lines["[w31]"].strip() == ssh_pod32.hosts[31]
    assert "all 32 workers succeeded" in result.stderr


def test_a_failing_worker_makes_exec_fail_and_is_summarised_with_its_last_lines(pod_node):
    target = pod_node.hosts[2]
    command = f"if hostname -I | grep -qw {target}; then echo boom >&2; exit 7; fi"
    result = tpuctl("exec", "--", command)
    assert result.returncode == 1
    assert "3/4 workers succeeded" in result.stderr
    assert "failed: w02 (exit 7)" in result.stderr
    assert result.stderr.count("[w02] boom") == 2  # streamed, then repeated in the summary


def test_exec_says_when_the_summary_shows_the_end_of_a_longer_output(pod_node):
    """exec keeps only the tail of each worker's streamed output: where the summary's last
    lines reach back to where that tail begins, it says so; --json still has every byte."""
    command = "head -c 100000 /dev/zero | tr '\\0' x >&2; printf '\\nboom\\n' >&2; exit 3"
    result = tpuctl("exec", "--worker", "0", "--", command)
    assert result.returncode == 1
    streamed, summary = result.stderr.split("--- last lines of w00 ---\n")
    lines = [line for line in streamed.splitlines() if line.startswith("[w00] ")]
    pieces = [line.removeprefix("[w00] ") for line in lines]  # progress lines aside
    assert "".join(pieces[:-1]) == "x" * 100_000 and pieces[-1] == "boom"  # all of it shown
    assert summary.splitlines() == [
        "[w00] " + "x" * (65536 - len("\nboom\n")),
        "[w00] boom",
        "(w00's stderr kept here is its last 64.0 KiB; the 33.7 KiB before were streamed "
        "above, not kept, so the first line shown may be cut)",
    ]
    [row] = json.loads(tpuctl("exec", "--json", "--worker", "0", "--", command).stdout)
    assert row["stderr"] == "x" * 100_000 + "\nboom\n"


def test_an_unreachable_worker_ends_exec_in_bounded_time_and_is_named(pod_node):
    pod_node.stop_host(1)
    started = time.monotonic()
    result = tpuctl("exec", "--connect-timeout", "3", "--", "echo up")
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    assert f"unreachable: w01 ({pod_node.hosts[1]})" in result.stderr
    assert prefixed(result.stdout) == {"[w00]": "up", "[w02]": "up", "[w03]": "up"}


def test_timeout_per_worker(pod_node):
    result = tpuctl("exec", "--timeout", "1", "--", "sleep 30")
    assert result.returncode == 1
    assert "timed out after 1 s: w00-w03" in result.stderr
    wait_for(lambda: not any("sleep 30" in p for i in range(4) for p in pod_node.processes(i)))


def test_slow_workers_are_shown_as_progress(pod_node):
    slow = pod_node.hosts[0]
    result = tpuctl("exec", "--", f"if hostname -I | grep -qw {slow}; then sleep 1.5; fi")
    assert result.returncode == 0
    assert "3/4 done after" in result.stderr and "waiting on w00\n" in result.stderr


def test_json_gives_per_worker_exit_code_and_output(pod_node):
    result = tpuctl("exec", "--json", "--worker", "0,2-3", "--", "echo out; echo err >&2; exit 2")
    rows = json.loads(result.stdout)
    assert [r["worker"] for r in rows] == ["w00", "w02", "w03"]
    assert all(
        r["exit_code"] == 2 and r["stdout"] == "out\n" and r["stderr"] == "err\n" for r in rows
    )
    assert result.returncode == 1


def test_env_values_reach_the_workers_but_never_tpuctl_output(pod_node, monkeypatch):
    secret = "wandb-0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    result = tpuctl(
        "exec",
        "--env",
        "WANDB_API_KEY",
        "--env",
        "MODE=x",
        "--",
        'echo "${#WANDB_API_KEY} $MODE"; exit 1',
    )
    assert prefixed(result.stdout)["[w00]"] == f"{len(secret)} x"
    assert secret not in result.stdout + result.stderr


def test_ctrl_c_stops_every_remote_command_then_prints_the_summary(pod_node):
    process = subprocess.Popen(
        [sys.executable, "-m", "tpuctl", "exec", "--json", "--", "sleep", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: all(any("sleep 1000" in p for p in pod_node.processes(i)) for i in range(4))
        )
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 130
    assert [r["error"] for r in json.loads(stdout)] == ["interrupted"] * 4
    assert "interrupted: 0/4 workers succeeded" in stderr
    assert "interrupted: w00-w03" in stderr
    assert not any("sleep 1000" in p for i in range(4) for p in pod_node.processes(i))


def test_exec_whose_reader_went_away_stops_the_workers_commands_and_says_why(pod_node):
    """`tpuctl exec -- ... | head -1`: the write to the closed pipe passed for a lost
    connection on every worker (`connection lost: [Errno 32] Broken pipe`), and the
    commands ran on, unseen, after tpuctl had exited."""
    loop = "echo first; while sleep 0.0517; do echo more; done"
    process = subprocess.Popen(
        [sys.executable, "-m", "tpuctl", "exec", "--", loop],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().endswith(" first\n")
        process.stdout.close()  # as `head -1` exits
        stderr = process.stderr.read()
        assert process.wait(timeout=30) == 1
    finally:
        process.kill()
    assert "connection lost" not in stderr
    assert "stopped because the output's reader went away" in stderr
    assert not any("sleep 0.0517" in p for i in range(4) for p in pod_node.processes(i))


def test_repeated_exec_uses_cached_addresses_without_the_api(pod_node, fake_tpu):
    assert tpuctl("exec", "pod", "--", "true").returncode == 0
    fake_tpu.stop()  # any API call would now fail
    result = tpuctl("exec", "pod", "--", "echo cached")
    assert result.returncode == 0, result.stderr
    assert len(prefixed(result.stdout)) == 4


def test_recreated_node_refreshes_cached_addresses(pod_node, fake_tpu):
    assert tpuctl("exec", "pod", "--", "true").returncode == 0
    # The node is recreated and worker 3 now has another address; its old one is dead.
    pod_node.stop_host(3)
    fake_tpu.vanish("pod")
    moved = [*pod_node.hosts[:3], pod_node.hosts[2]]
    fake_tpu.add_node("pod", "v3-32", project=PROJECT, zone=ZONE, worker_ips=moved)
    result = tpuctl("exec", "pod", "--connect-timeout", "3", "--", "hostname -I")
    assert result.returncode == 0, result.stderr
    assert "addresses of w03 changed" in result.stderr
    assert prefixed(result.stdout)["[w03]"].strip() == pod_node.hosts[2]


def test_ssh_logs_into_the_chosen_worker_with_tpuctl_key(pod_node):
    result = tpuctl("ssh", "--worker", "2", "--", "-o", "BatchMode=yes", "hostname", "-I")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [pod_node.hosts[2]]


def test_exec_and_ssh_reach_workers_behind_a_bastion_with_ssh_proxy_jump(
    fake_tpu, bastion_pod, pod_key, monkeypatch
):
    workers = bastion_pod.hosts[1:3]
    fake_tpu.add_node("inner", "v4-16", project=PROJECT, zone=ZONE, worker_ips=workers)
    monkeypatch.setenv("TPUCTL_SSH_KEY", pod_key[0])
    monkeypatch.setenv("TPUCTL_SSH_USER", "root")
    monkeypatch.setenv("TPUCTL_SSH_PROXY_JUMP", f"root@{bastion_pod.hosts[0]}")
    result = tpuctl("exec", "inner", "--connect-timeout", "5", "--", "hostname -I")
    assert result.returncode == 0, result.stderr
    assert {k: v.strip() for k, v in prefixed(result.stdout).items()} == {
        "[w00]": workers[0],
        "[w01]": workers[1],
    }
    shell = tpuctl("ssh", "inner", "--worker", "1", "--", "-o", "BatchMode=yes", "hostname -I")
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.split() == [workers[1]]


def test_exec_follows_an_ssh_config_host_entry(fake_tpu, ssh_pod, pod_key, tmp_path, monkeypatch):
    fake_tpu.add_node("cfg", "v3-32", project=PROJECT, zone=ZONE, worker_ips=ssh_pod.hosts)
    (tmp_path / ".ssh").mkdir()
    locked = tmp_path / ".ssh" / "locked"  # needs a passphrase: skipped for the next one
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", locked], check=True)
    subnet = ssh_pod.hosts[0].rsplit(".", 1)[0]
    (tmp_path / ".ssh" / "config").write_text(
        f"Host {subnet}.*\n  User root\n  IdentityFile ~/.ssh/locked\n"
        f"  IdentityFile {pod_key[0]}\n  Port {ALT_PORT}\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    # tpuctl's defaults would be wrong here: a user the hosts lack and tpuctl's own key.
    for variable in ("USER", "LOGNAME"):
        monkeypatch.setenv(variable, "nobody-here")
    for variable in ("TPUCTL_SSH_USER", "TPUCTL_SSH_KEY"):
        monkeypatch.delenv(variable, raising=False)
    result = tpuctl("exec", "cfg", "--", "echo $USER $SSH_CONNECTION")
    assert result.returncode == 0, result.stderr
    # "[w00] root CLIENT_IP CLIENT_PORT SERVER_IP SERVER_PORT"
    seen = {label: line.split() for label, line in prefixed(result.stdout).items()}
    assert {label: (words[0], words[3], words[4]) for label, words in seen.items()} == {
        f"[w0{i}]": ("root", address, str(ALT_PORT)) for i, address in enumerate(ssh_pod.hosts)
    }


def test_put_and_get_on_all_workers(pod_node, tmp_path):
    source = tmp_path / "config.yaml"
    source.write_text("lr: 0.1\n")
    put = tpuctl("put", str(source), "/tmp/config.yaml")
    assert put.returncode == 0, put.stderr
    assert all(pod_node.path(i, "/tmp/config.yaml").read_text() == "lr: 0.1\n" for i in range(4))
    got = tpuctl("get", "/tmp/config.yaml", str(tmp_path / "back"), "--worker", "1")
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "back" / "w01" / "config.yaml").read_text() == "lr: 0.1\n"
    assert not (tmp_path / "back" / "w00").exists()


def test_put_of_a_pipe_is_a_one_line_error(pod_node, tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    put = tpuctl("put", str(pipe), "/tmp/from-a-pipe")
    assert put.returncode == 2
    assert put.stderr.strip().splitlines() == [
        f"error: LOCAL {pipe} is neither a file nor a directory (a pipe or a device): "
        "write it to a file and put that"
    ]
    assert not pod_node.path(0, "/tmp/from-a-pipe").exists()


def test_clear_locks_removes_lock_files_on_every_worker(pod_node):
    for index in (0, 2, 3):
        pod_node.path(index, "/tmp/libtpu_lockfile").write_text("")
        (pod_node.path(index, "/tmp/tpu_logs")).mkdir()
        (pod_node.path(index, "/tmp/tpu_logs") / "tpu_driver.INFO").write_text("log")
    result = tpuctl("clear-locks")
    assert result.returncode == 0, result.stderr
    lines = prefixed(result.stdout)
    assert lines["[w00]"] == "removed /tmp/libtpu_lockfile, /tmp/tpu_logs"
    assert lines["[w01]"] == "nothing to remove"
    for index in range(4):
        assert not pod_node.path(index, "/tmp/libtpu_lockfile").exists()
        assert not pod_node.path(index, "/tmp/tpu_logs").exists()


def test_clear_locks_refuses_while_a_process_holds_the_device(ssh_pod, pod_key, tmp_path):
    hosts = pod_hosts(ssh_pod, pod_key, str(tmp_path / "known_hosts"))
    fake_device = ("/tmp/fake-accel*",)  # the pod has no TPU: a file stands in for /dev/accel0
    for index in range(2):
        ssh_pod.path(index, "/tmp/libtpu_lockfile").write_text("")
    holder = "setsid sh -c 'exec 3>/tmp/fake-accel0; exec sleep 41' </dev/null >/dev/null 2>&1 &"
    run(hosts[1:2], holder)
    wait_for(lambda: any("sleep 41" in p for p in ssh_pod.processes(1)))
    try:
        results = run(hosts[:2], clear_locks_script(force=False, device_globs=fake_device))
        assert results[0].ok and parse_lock_report(results[0].stdout).removed
        assert results[1].exit_code == REFUSED_EXIT
        assert "(sleep) on /tmp/fake-accel0" in parse_lock_report(results[1].stdout).holders[0]
        assert ssh_pod.path(1, "/tmp/libtpu_lockfile").exists()
        forced = run(hosts[1:2], clear_locks_script(force=True, device_globs=fake_device))
        assert forced[0].ok and not ssh_pod.path(1, "/tmp/libtpu_lockfile").exists()
    finally:
        run(hosts[1:2], "pkill -f 'sleep 41'; true")


def test_check_reports_a_healthy_pod_when_jax_works_everywhere(pod_node):
    result = tpuctl("check", "--python", sys.executable, "--json", timeout=120)
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stderr
    assert report["healthy"] and report["problems"] == []
    assert [w["devices"] for w in report["workers"]] == [1, 1, 1, 1]
    versions = {(w["python"], w["jax"]) for w in report["workers"]}
    assert versions == {(platform.python_version(), importlib.metadata.version("jax"))}
    assert all(w["disk_free_gb"] > 0 and w["mem_free_gb"] > 0 for w in report["workers"])


def test_check_names_workers_where_jax_fails(pod_node):
    result = tpuctl("check", "--python", "/nonexistent/python3")
    assert result.returncode == 1
    assert "unhealthy" in result.stderr
    assert "w00: jax failed" in result.stderr
    assert "w00" in result.stdout  # the table


def test_check_is_not_healthy_without_device_information(pod_node):
    result = tpuctl("check", "--python", "/bin/true", "--worker", "0")
    assert result.returncode == 1
    assert "unhealthy" in result.stderr
    assert "w00: no device count: the interpreter printed none" in result.stderr


def test_check_json_gives_an_unreachable_worker_every_field_as_null(pod_node):
    """A worker that never answered had only worker, address and error: a script reading
    `w["devices"]` off each row, as the README lists them, failed on it."""
    pod_node.stop_host(3)
    result = tpuctl("check", "--python", "/bin/true", "--json")
    assert result.returncode == 1
    workers = json.loads(result.stdout)["workers"]
    assert [sorted(w) for w in workers[:3]] == [sorted(workers[3])] * 3
    assert workers[3]["error"].startswith("unreachable")
    assert workers[3]["devices"] is None and workers[3]["holders"] is None


def test_usage_errors_are_one_line(pod_node):
    no_command = tpuctl("exec")
    assert no_command.returncode == 2 and "put it after --" in no_command.stderr
    bad_worker = tpuctl("exec", "--worker", "9", "--", "true")
    assert bad_worker.returncode == 2
    assert "worker 9 does not exist; the node has workers 0-3" in bad_worker.stderr
    missing = tpuctl("exec", "nope", "--", "true")
    assert missing.returncode == 1 and "no node named 'nope'" in missing.stderr
    assert "Traceback" not in no_command.stderr + bad_worker.stderr + missing.stderr


def test_check_verdict_flags_disagreeing_device_counts_and_busy_tpus(tmp_path):
    from tpuctl.fanout import Host, HostResult
    from tpuctl.worker_scripts import health_verdict, parse_health

    outputs = {
        "w00": "devices 32 8\ndisk_free_kb 99999999\nmem_free_kb 1000",
        "w01": "devices 8 8\ndisk_free_kb 1000\nmem_free_kb 1000",
        "w02": "held 4242 python3 /dev/accel0\ndisk_free_kb 99999999",
    }
    results = [
        HostResult(Host(label, "h"), 0, text, "", None, 0.1) for label, text in outputs.items()
    ]
    problems = health_verdict(results, {r.host.label: parse_health(r.stdout) for r in results})
    assert problems == [
        "w01: only 0.0 GB free on disk",
        "w02: TPU held by pid 4242 (python3) on /dev/accel0",
        "workers disagree on the device count: 8 devices on w01; 32 devices on w00",
    ]


def test_check_verdict_flags_a_probe_that_failed_whatever_it_printed():
    from tpuctl.fanout import Host, HostResult
    from tpuctl.worker_scripts import health_verdict, parse_health

    printed = "devices 8 8\ndisk_free_kb 99999999\n"
    failed = HostResult(Host("w00", "h"), 137, printed, "line 1\nKilled\n", None, 0.1)
    problems = health_verdict([failed], {"w00": parse_health(failed.stdout)})
    assert problems == ["w00: the check exited with status 137: Killed"]


def test_unreachable_workers_of_a_preempted_node_say_so(pod_node, fake_tpu):
    assert tpuctl("exec", "pod", "--", "true").returncode == 0
    fake_tpu.preempt("pod")
    pod_node.stop_host(0)
    result = tpuctl("exec", "pod", "--connect-timeout", "3", "--", "true")
    assert result.returncode == 1
    assert "unreachable: w00" in result.stderr
    assert "note: node pod is now PREEMPTED" in result.stderr


def test_on_a_terminal_prefixes_are_coloured_and_the_summary_is_green(pod_node, monkeypatch):
    import pty

    monkeypatch.delenv("NO_COLOR", raising=False)
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "tpuctl", "exec", "--", "echo hi"],
        stdin=follower, stdout=follower, stderr=follower,
    )  # fmt: skip
    os.close(follower)
    output = b""
    while chunk := _read_pty(leader):
        output += chunk
    os.close(leader)
    assert process.wait(30) == 0
    text = output.decode()
    assert "\x1b[36m[w00]\x1b[0m hi" in text  # each worker has its own colour
    assert "\x1b[1;32m✓ all 4 workers succeeded\x1b[0m" in text


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the process closed the terminal
        return b""


def test_a_refused_key_is_named_with_the_fix(pod_node, tmp_path, monkeypatch):
    from tpuctl.testing.sshpod import make_keypair

    stranger_key, _ = make_keypair(tmp_path)
    monkeypatch.setenv("TPUCTL_SSH_KEY", stranger_key)
    result = tpuctl("exec", "--", "true")
    assert result.returncode == 1
    assert (
        f"authentication failed: no key accepted for user 'root' (tried {stranger_key})"
        in result.stderr
    )
    assert "hint: the workers refused the SSH key" in result.stderr
