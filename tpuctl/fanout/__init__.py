"""Run a command, or copy files, on many hosts at once: SSH workers or local directories.

    from tpuctl.fanout import Host, run
    results = run(hosts, "hostname", on_line=print_line)

`run` starts the command on every host at once (a multi-host JAX program only starts when
all of its processes do), with at most `max_parallel` SSH handshakes in flight; `put` and
`get` copy to at most `max_parallel` hosts at a time. One thread per active host, none per
line, no process per host. Environment values travel inside the script fed on stdin, never in any argv. On
Ctrl-C every remote command is stopped and `Interrupted` carries the per-host results.
This module is light; paramiko is imported only when an SSH host is actually contacted.
When the CLI attached the node's connection holder (tpuctl.fanout.holder), `run`, `put` and
`get` go over the holder's open connections instead, with the same results.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import posixpath
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpuctl.fanout.base import (
    STREAMED_TAIL_BYTES,
    UNREACHABLE,
    Host,
    HostResult,
    LineFn,
    Output,
    ResultFn,
    StopSignal,
    each_line,
    ensure_descriptors,
    merged_env,
)

if TYPE_CHECKING:
    from tpuctl.fanout.transfer import Over

__all__ = [
    "STREAMED_TAIL_BYTES",
    "UNREACHABLE",
    "Host",
    "HostResult",
    "Interrupted",
    "StopSignal",
    "get",
    "put",
    "run",
]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C arrived: every host's command was stopped; `results` says where each one was."""

    def __init__(self, results: list[HostResult]) -> None:
        super().__init__("interrupted")
        self.results = results


def run(
    hosts: Iterable[Host],
    command: str,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    on_line: LineFn | None = None,
    keep_tail: int | None = None,
    fail_fast: bool = False,
    max_parallel: int = 64,
    connect_timeout: float = 10.0,
    on_result: ResultFn | None = None,
    stop: StopSignal | None = None,
) -> list[HostResult]:
    """Run `command` under `bash -c` on every host in parallel; results in `hosts` order.

    `on_line(host, stream, line)` sees each output line as it arrives; `on_result` each
    host's result as it finishes. `keep_tail` bytes: each result holds only the last that
    many of its host's stdout and of its stderr (`stdout_dropped`/`stderr_dropped` say how
    many came before), and a line longer than that reaches `on_line` in pieces, so memory
    stays bounded however much a host writes (`tail -f`); for callers that stream the
    lines and read no more than the last ones afterwards (`STREAMED_TAIL_BYTES` holds the
    summaries' last lines). None, the default, keeps every byte: for callers that parse
    stdout. `timeout` bounds each command's wall time, after which its process group is
    stopped. `fail_fast` stops everyone once one host fails. `max_parallel` bounds
    simultaneous connection handshakes, never running commands.
    """
    hosts = list(hosts)
    envs = [merged_env(host, env) for host in hosts]
    stop = stop or StopSignal()
    output = Output(each_line(on_line), keep_tail)

    def run_one(index: int, ctx) -> HostResult:
        host = hosts[index]
        if stop.is_set():
            return HostResult(host, None, "", "", stop.reason, 0.0)
        if host.transport == "local":
            from tpuctl.fanout import local

            return local.run_on_host(host, command, envs[index], stop, timeout, output)
        from tpuctl.fanout import ssh

        return ssh.run_on_host(host, command, envs[index], ctx, stop, timeout, output)

    def cold() -> list[HostResult]:
        with _ssh_context(hosts, connect_timeout, max_parallel) as ctx:
            one = lambda index: run_one(index, ctx)  # noqa: E731
            return _fan_out(hosts, one, len(hosts), fail_fast, stop, on_result)

    if not any(host.transport == "ssh" for host in hosts):
        return cold()
    from tpuctl.fanout.holder import via_holder

    request = {
        "op": "run", "command": command, "envs": envs, "timeout": timeout,
        "keep_tail": keep_tail, "fail_fast": fail_fast, "max_parallel": max_parallel,
    }  # fmt: skip
    return via_holder(hosts, request, on_line, on_result, stop, connect_timeout, cold)


def put(
    hosts: Iterable[Host],
    local_path: str | Path,
    remote_path: str,
    *,
    max_parallel: int = 64,
    connect_timeout: float = 10.0,
    on_result: ResultFn | None = None,
) -> list[HostResult]:
    """Copy a local file or directory to `remote_path` on every host."""
    hosts, source = list(hosts), put_source(local_path)
    request = {"op": "put", "local": str(source.absolute()), "remote": remote_path}
    one = lambda host, over: put_one(host, source, remote_path, over)  # noqa: E731
    return _copy(hosts, one, request, max_parallel, connect_timeout, on_result)


def put_source(local_path: str | Path) -> Path:
    """`put`'s source, checked: FileNotFoundError when it does not exist, ValueError when it
    is neither a file nor a directory (a pipe such as `<(cmd)`, a device): every worker
    needs the same bytes, and a pipe can be read once."""
    source = Path(local_path)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if not (source.is_file() or source.is_dir()):
        raise ValueError(
            f"{source} is neither a file nor a directory (a pipe or a device): "
            "write it to a file and put that"
        )
    return source


def get(
    hosts: Iterable[Host],
    remote_path: str,
    local_dir: str | Path,
    *,
    max_parallel: int = 64,
    connect_timeout: float = 10.0,
    on_result: ResultFn | None = None,
) -> list[HostResult]:
    """Copy `remote_path` (file or directory) from every host to `local_dir/<label>/<name>`."""
    hosts = list(hosts)
    request = {"op": "get", "remote": remote_path, "local": str(local_dir), "cwd": os.getcwd()}
    one = lambda host, over: get_one(host, remote_path, Path(local_dir), over)  # noqa: E731
    return _copy(hosts, one, request, max_parallel, connect_timeout, on_result)


def put_one(host: Host, source: Path, remote_path: str, over: Over | None) -> HostResult:
    """One host's part of `put`: its result, never an exception for its trouble. `over`
    gives SSH hosts their connection (None: no SSH host in the fan-out)."""

    links: list[str] = []

    def copy() -> int:
        if host.transport == "local":
            from tpuctl.fanout import local

            return local.put_tree(source, host, remote_path, links)
        from tpuctl.fanout import transfer

        return transfer.put_to_host(host, over, source, remote_path, links)

    return _transfer(host, copy, remote_path, f"-> {remote_path}", links)


def get_one(
    host: Host, remote_path: str, local_dir: Path, over: Over | None, cwd: Path = Path()
) -> HostResult:
    """One host's part of `get`, into `local_dir` (relative to `cwd`: the holder's requests
    come from another working directory; the result names `local_dir` as given)."""
    name = posixpath.basename(posixpath.normpath(remote_path))
    name = "root" if name in ("", ".", "..") else name  # never LOCAL_DIR/wNN/.. itself
    target = local_dir / host.label / name
    links: list[str] = []

    def copy() -> int:
        if host.transport == "local":
            from tpuctl.fanout import local

            return local.get_tree(local.resolve(host, remote_path), cwd / target, links)
        from tpuctl.fanout import transfer

        return transfer.get_from_host(host, over, remote_path, cwd / target, skipped=links)

    return _transfer(host, copy, remote_path, f"-> {target}", links)


def _copy(
    hosts: list[Host],
    one: Callable[[Host, Over | None], HostResult],
    request: dict[str, Any],
    max_parallel: int,
    connect_timeout: float,
    on_result: ResultFn | None,
) -> list[HostResult]:
    """`put` or `get`: through the node's connection holder when one is attached (the
    `request` tells it what to do), else over a connection per host."""
    stop = StopSignal()

    def cold() -> list[HostResult]:
        with _ssh_context(hosts, connect_timeout, max_parallel) as ctx:
            over = None
            if ctx is not None:
                from tpuctl.fanout import transfer

                over = transfer.over_new_connection(ctx, stop)
            job = lambda index: one(hosts[index], over)  # noqa: E731
            return _fan_out(hosts, job, max_parallel, False, stop, on_result)

    if not any(host.transport == "ssh" for host in hosts):
        return cold()
    from tpuctl.fanout.holder import via_holder

    request |= {"fail_fast": False, "max_parallel": max_parallel}
    return via_holder(hosts, request, None, on_result, stop, connect_timeout, cold)


def _transfer(
    host: Host, copy: Callable[[], int], remote_path: str, where: str, skipped: list[str]
) -> HostResult:
    """Run one host's copy; its result says how many files went where, and which symlinks
    and special files it skipped."""
    started = time.monotonic()
    try:
        count = copy()
    except ConnectionError as err:
        return HostResult(host, None, "", "", str(err), time.monotonic() - started)
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        message = f"{reason}: {err.filename or remote_path}"
        return HostResult(host, 1, "", message, None, time.monotonic() - started)
    files = "file" if count == 1 else "files"
    said = f"{count} {files} {where}"
    if skipped:
        said += f" (skipped symlinks and special files: {', '.join(skipped)})"
    return HostResult(host, 0, said, "", None, time.monotonic() - started)


@contextlib.contextmanager
def _ssh_context(hosts: list[Host], connect_timeout: float, max_handshakes: int):
    """The SSH state of one fan-out (None without SSH hosts), closed when it ends."""
    if not any(host.transport == "ssh" for host in hosts):
        yield None
        return
    from tpuctl.fanout.ssh import SshContext

    ctx = SshContext(connect_timeout, max_handshakes)
    try:
        yield ctx
    finally:
        ctx.close()


def _fan_out(
    hosts: list[Host],
    one: Callable[[int], HostResult],
    workers: int,
    fail_fast: bool,
    stop: StopSignal,
    on_result: ResultFn | None,
) -> list[HostResult]:
    if not hosts:
        return []
    ensure_descriptors(workers)

    def job(index: int) -> HostResult:
        result = one(index)
        if fail_fast and not result.ok:
            stop.set(f"stopped because {result.host.label} failed (--fail-fast)")
        if on_result is not None:
            on_result(result)
        return result

    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(hosts))))
    futures = [pool.submit(job, index) for index in range(len(hosts))]
    try:
        _wait_all(futures)
    except KeyboardInterrupt:
        stop.set("interrupted")
        concurrent.futures.wait(futures)
        pool.shutdown()
        raise Interrupted([future.result() for future in futures]) from None
    pool.shutdown()
    return [future.result() for future in futures]


def _wait_all(futures: list[concurrent.futures.Future]) -> None:
    # Short waits keep the main thread responsive to Ctrl-C.
    pending = set(futures)
    while pending:
        _, pending = concurrent.futures.wait(pending, timeout=0.5)
