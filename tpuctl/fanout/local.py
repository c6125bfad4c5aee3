"""The local transport: each "host" is a directory on this machine and the command a local
process, with the same script, environment handling and stopping rules as over SSH."""

from __future__ import annotations

import os
import selectors
import signal
import stat
import subprocess
import time
from pathlib import Path

from tpuctl.fanout import tree
from tpuctl.fanout.base import (
    Host,
    HostResult,
    LineSplitter,
    Output,
    StopSignal,
    env_script,
    wrapped_command,
)

POLL_S = 0.2
TERM_GRACE_S = 2.0


def workdir_of(host: Host) -> Path:
    if not host.workdir:
        raise ValueError(f"local host {host.label} has no workdir")
    return Path(host.workdir)


def run_on_host(
    host: Host,
    command: str,
    env: dict[str, str],
    stop: StopSignal,
    timeout: float | None,
    output: Output,
) -> HostResult:
    """Run `command` under `bash` in the host's workdir, each worker with its own TMPDIR."""
    started = time.monotonic()
    workdir = workdir_of(host)
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        ["bash", "-c", wrapped_command(command)],
        cwd=workdir,
        env={**os.environ, "TMPDIR": str(workdir / "tmp")},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, like an sshd session
    )
    assert process.stdin is not None
    process.stdin.write(env_script(env))
    process.stdin.close()
    out, err = output.splitter(host, "stdout"), output.splitter(host, "stderr")
    deadline = None if timeout is None else started + timeout
    error = _pump(process, out, err, stop, deadline, timeout)
    if error is not None:
        _kill_group(process)
    exit_code = process.wait()
    if error is None and exit_code < 0:
        error = f"terminated by signal {-exit_code}"
    return HostResult(
        host,
        None if error else exit_code,
        out.close(),
        err.close(),
        error,
        time.monotonic() - started,
        out.dropped,
        err.dropped,
    )


def _pump(process, out, err, stop: StopSignal, deadline, timeout) -> str | None:
    streams = {process.stdout: _SkipFirstLine(out), process.stderr: err}
    with selectors.DefaultSelector() as selector:
        for stream in streams:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            wait = (
                POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            )
            for key, _ in selector.select(wait):
                data = os.read(key.fileobj.fileno(), 65536)
                if data:
                    streams[key.fileobj].feed(data)
                else:
                    selector.unregister(key.fileobj)
            if stop.is_set():
                return stop.reason
            if deadline is not None and time.monotonic() >= deadline:
                return f"timed out after {timeout:g} s"
    return None


def _kill_group(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        if grace is None:
            return
        end = time.monotonic() + grace
        while time.monotonic() < end:
            process.poll()  # reap our own child
            if not _group_alive(process.pid):
                return
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. Zombies do not count: orphans are
    reaped by whoever adopted them, on that process's schedule."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    if not os.path.isdir("/proc"):
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class _SkipFirstLine:
    """The wrapper's first stdout line is the process-group marker: the local transport
    already knows the group, so the marker is simply dropped."""

    def __init__(self, splitter: LineSplitter) -> None:
        self.splitter = splitter
        self._skipping = True

    def feed(self, data: bytes) -> None:
        if self._skipping:
            newline = data.find(b"\n")
            if newline < 0:
                return
            self._skipping, data = False, data[newline + 1 :]
        if data:
            self.splitter.feed(data)


def resolve(host: Host, path: str) -> Path:
    """A worker path: relative paths live in the worker's directory (its "home")."""
    return Path(path) if os.path.isabs(path) else workdir_of(host) / path


def get_tree(source: Path, target: Path, skipped: list[str]) -> int:
    """`get` from a local worker as over SSH (`tpuctl.fanout.tree`); returns the number of
    files copied. `source` itself may be a link: the user named it."""
    return tree.get_tree(tree.LOCAL, str(source), source.stat().st_mode, target, skipped)


def put_tree(source: Path, host: Host, remote: str, skipped: list[str]) -> int:
    """`put` to a local worker as over SSH (`tpuctl.fanout.tree`); returns the files copied."""
    where = str(resolve(host, remote)) + ("/" if remote.endswith("/") else "")
    target = tree.put_target(source, where, os.path.isdir)
    writer = tree.local_writer(tree.LOCAL, stat.S_IMODE, None)
    return tree.put_tree(source, writer, target, skipped)
