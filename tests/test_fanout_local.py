"""The local transport: workers as directories on this machine, same semantics as SSH."""

from __future__ import annotations

import io
import os
import signal
import threading
from pathlib import Path

from polling import wait_for
from streaming import (
    CHATTY,
    Counter,
    assert_streamed_with_its_tail_kept,
    peak_traced,
)

from tpuctl.fanout import STREAMED_TAIL_BYTES, Host, Interrupted, StopSignal, get, put, run
from tpuctl.fanout.report import Reporter


def local_hosts(root: Path, n: int = 3) -> list[Host]:
    hosts = []
    for index in range(n):
        workdir = root / f"worker-{index}"
        workdir.mkdir()
        hosts.append(Host(f"w{index:02d}", "localhost", workdir=str(workdir), transport="local"))
    return hosts


def processes_matching(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(cmdline.decode(errors="replace"))
    return found


def test_each_worker_runs_in_its_own_directory_with_its_own_tmpdir(tmp_path):
    hosts = local_hosts(tmp_path)
    lines = []
    results = run(
        hosts,
        'pwd; echo "$TMPDIR"; touch "${TMPDIR:-/tmp}/libtpu_lockfile"',
        on_line=lambda *a: lines.append(a),
    )
    for host, result in zip(hosts, results, strict=True):
        assert result.ok
        assert result.stdout.splitlines() == [host.workdir, f"{host.workdir}/tmp"]
        assert (Path(host.workdir) / "tmp" / "libtpu_lockfile").exists()
        assert (host, "stdout", host.workdir) in lines


def test_exit_codes_and_stderr_per_worker(tmp_path):
    hosts = local_hosts(tmp_path)
    results = run(hosts, 'case "$PWD" in *-1) echo bad >&2; exit 4;; esac')
    assert [r.exit_code for r in results] == [0, 4, 0]
    assert results[1].stderr == "bad\n" and results[0].stderr == ""


def test_env_reaches_the_command_but_not_its_arguments(tmp_path):
    hosts = local_hosts(tmp_path, 2)
    secret = "local-secret-value-123"
    stop = StopSignal()
    seen: list[str] = []
    worker = threading.Thread(
        target=lambda: seen.extend(
            r.stdout for r in run(hosts, 'echo "$KEY"; sleep 34', env={"KEY": secret}, stop=stop)
        )
    )
    worker.start()
    try:
        wait_for(lambda: len(processes_matching("sleep 34")) >= 2)
        assert processes_matching(secret) == []
    finally:
        stop.set("test over")
        worker.join(10)
    assert seen == [f"{secret}\n"] * 2


def test_timeout_kills_the_whole_process_group(tmp_path):
    hosts = local_hosts(tmp_path, 2)
    results = run(hosts, "sleep 35 & sleep 35; wait", timeout=0.5)
    assert all(r.error == "timed out after 0.5 s" for r in results)
    wait_for(lambda: processes_matching("sleep 35") == [])


def test_ctrl_c_stops_every_worker_and_reports_them(tmp_path):
    hosts = local_hosts(tmp_path, 2)
    # Longer than wait_for's bound: the commands outlive the wait for them however slowly a
    # loaded machine lists its processes (a load average near 300 in one suite run); the
    # test ends at the Ctrl-C, not with them.
    command = "sleep 360"

    def press_ctrl_c_once_both_run() -> None:
        wait_for(lambda: len(processes_matching(command)) == 2)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c_once_both_run, daemon=True).start()
    try:
        run(hosts, command)
    except Interrupted as interrupted:
        assert [r.error for r in interrupted.results] == ["interrupted", "interrupted"]
    else:
        raise AssertionError("run() returned although SIGINT arrived")
    wait_for(lambda: processes_matching(command) == [])


def test_put_and_get_use_the_worker_directories(tmp_path):
    hosts = local_hosts(tmp_path, 2)
    source = tmp_path / "data"
    source.mkdir()
    (source / "a.txt").write_text("A")
    assert all(r.ok for r in put(hosts, source, "inputs"))
    assert all((Path(h.workdir) / "inputs" / "a.txt").read_text() == "A" for h in hosts)
    run(hosts, "basename $PWD > out.txt")
    results = get(hosts, "out.txt", tmp_path / "fetched")
    assert all(r.ok for r in results)
    assert (tmp_path / "fetched" / "w01" / "out.txt").read_text() == "worker-1\n"


def test_put_to_a_local_worker_copies_as_over_ssh(tmp_path):
    hosts = local_hosts(tmp_path, 1)
    source = tmp_path / "src"
    source.mkdir()
    (source / "a").write_text("A")
    (source / "link").symlink_to(source / "a")
    [tree] = put(hosts, source, "tree")
    assert tree.stdout == f"1 file -> tree (skipped symlinks and special files: {source / 'link'})"
    assert [p.name for p in (Path(hosts[0].workdir) / "tree").iterdir()] == ["a"]
    (Path(hosts[0].workdir) / "into").mkdir()
    assert put(hosts, source / "a", "into")[0].ok
    assert (Path(hosts[0].workdir) / "into" / "a").read_text() == "A"


def test_reporter_prefixes_lines_and_summarises_failures(tmp_path):
    hosts = local_hosts(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    reporter = Reporter(hosts, out=out, err=err)
    command = 'case "$PWD" in *-1) echo bad >&2; exit 4;; *) echo fine;; esac'
    results = run(hosts, command, on_line=reporter.on_line, on_result=reporter.on_result)
    reporter.summary(results)
    assert sorted(out.getvalue().splitlines()) == ["[w00] fine", "[w02] fine"]
    assert err.getvalue().splitlines() == [
        "[w01] bad",
        "✗ 2/3 workers succeeded",
        "failed: w01 (exit 4)",
        "--- last lines of w01 ---",
        "[w01] bad",
    ]
    assert "\x1b[" not in out.getvalue() + err.getvalue()  # not terminals: no colour codes


def test_reporter_counts_one_worker_as_one(tmp_path):
    """It said "all 1 workers succeeded" and "0/1 workers succeeded"."""
    hosts = local_hosts(tmp_path, 1)
    for command, summary in (
        ("true", "✓ 1 worker succeeded"),
        ("exit 3", "✗ 0/1 worker succeeded"),
    ):
        reporter = Reporter(hosts, out=io.StringIO(), err=(err := io.StringIO()))
        reporter.summary(run(hosts, command))
        assert err.getvalue().splitlines()[0] == summary


def test_reporter_summarises_32_workers_failing_alike_in_a_few_lines(tmp_path):
    """Each failing worker had its own `--- last lines` block and its own `(exit N)`:
    32 workers failing alike were 98 lines, the same 3 repeated."""
    hosts = local_hosts(tmp_path, 32)
    reporter = Reporter(hosts, out=io.StringIO(), err=(err := io.StringIO()))
    command = (
        'case "$PWD" in *-[0-4]) echo flaky >&2; exit 2;; *-7) exit 0;; esac; '
        "echo no TPU here >&2; exit 1"
    )
    reporter.summary(run(hosts, command, on_line=reporter.on_line))
    summary = [line for line in err.getvalue().splitlines() if not line.startswith("[w")]
    assert summary == [
        "✗ 1/32 workers succeeded",
        "failed: w00-w04 (exit 2), w05 w06 w08-w31 (exit 1)",
        "--- last lines of w00-w04 (the same on all 5) ---",
        "--- last lines of w05 w06 w08-w31 (the same on all 26) ---",
    ]
    assert err.getvalue().count("] no TPU here") == 26 + 1  # streamed, then once in the summary
    assert "[w05 w06 w08-w31] no TPU here" in err.getvalue()


def test_reporter_colours_terminal_output_and_names_waiting_workers(tmp_path):
    hosts = local_hosts(tmp_path, 2)
    out, err = io.StringIO(), io.StringIO()
    reporter = Reporter(hosts, out=out, err=err, color=True)
    reporter.on_line(hosts[0], "stdout", "hello")
    assert out.getvalue().startswith("\x1b[") and out.getvalue().endswith("[w00]\x1b[0m hello\n")
    [first] = run(hosts[:1], "true")
    reporter.on_result(first)
    assert reporter.progress_line().startswith("1/2 done after 0 s, waiting on w01")


def test_every_command_runs_at_once_whatever_max_parallel(tmp_path):
    # Like the processes of one JAX program: none finishes until all have started.
    hosts = local_hosts(tmp_path, 24)
    started = tmp_path / "started"
    started.mkdir()
    barrier = f"touch {started}/$$; until [ $(ls {started} | wc -l) -ge 24 ]; do sleep 0.02; done"
    results = run(hosts, barrier, max_parallel=4, timeout=20)
    assert [r.error for r in results] == [None] * 24


def test_512_workers(tmp_path):
    hosts = local_hosts(tmp_path, 512)
    lines = []
    results = run(hosts, "basename $PWD", on_line=lambda h, _s, line: lines.append((h.label, line)))
    assert all(r.ok for r in results)
    assert sorted(lines) == sorted((f"w{i:02d}", f"worker-{i}") for i in range(512))


def test_a_streamed_command_keeps_only_the_tail_of_its_output(tmp_path):
    """Every byte of every host's output stayed in memory even while `on_line` streamed it:
    `tpuctl exec -- tail -f LOG` grew tpuctl without bound."""
    [host] = local_hosts(tmp_path, 1)
    counter = Counter()
    [result], peak = peak_traced(
        lambda: run([host], CHATTY, on_line=counter, keep_tail=STREAMED_TAIL_BYTES)
    )
    assert_streamed_with_its_tail_kept(result, counter, STREAMED_TAIL_BYTES)
    assert peak < 4 * 2**20  # all of it kept: over 128 MiB (64 MiB read, then decoded)


def test_a_line_longer_than_the_tail_is_streamed_in_pieces_of_whole_characters(tmp_path):
    # One line of 300,000 two-byte characters and no newline: it reaches on_line in pieces
    # rather than growing in memory, and no piece splits a character.
    [host] = local_hosts(tmp_path, 1)
    pieces: list[str] = []
    command = "yes é | head -n 300000 | tr -d '\\n'"
    [result] = run([host], command, on_line=lambda _h, _s, t: pieces.append(t), keep_tail=2**16)
    assert "".join(pieces) == "é" * 300_000 and len(pieces) > 2
    assert result.stdout == "é" * 2**15 and result.stdout_dropped == 600_000 - 2**16


def test_without_keep_tail_a_streamed_command_keeps_all_of_its_output(tmp_path):
    [host] = local_hosts(tmp_path, 1)
    [result] = run([host], "seq 100000", on_line=lambda *_: None)
    assert result.stdout == "".join(f"{n}\n" for n in range(1, 100001))
    assert result.stdout_dropped == 0


def test_get_and_put_keep_modification_times_as_over_ssh(tmp_path):
    """A local pod's get and put gave every file the time of the copy, where tar over SSH
    keeps each file's own."""
    [host] = local_hosts(tmp_path, 1)
    tree = Path(host.workdir) / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("f\n")
    os.utime(tree / "sub" / "f", (1_000_000_000, 1_000_000_000))
    assert get([host], "tree", tmp_path / "back")[0].ok
    assert (tmp_path / "back/w00/tree/sub/f").stat().st_mtime == 1_000_000_000
    source = tmp_path / "g"
    source.write_text("g\n")
    os.utime(source, (1_200_000_000, 1_200_000_000))
    assert put([host], source, "g")[0].ok
    assert (Path(host.workdir) / "g").stat().st_mtime == 1_200_000_000
