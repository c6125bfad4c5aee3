"""Connection reuse, as OpenSSH's ControlMaster/ControlPersist: a per-node holder process
keeps the SSH connections to a node's workers open, and later `tpuctl` commands run over
them instead of paying a key exchange per worker.

The first command to a node runs cold and then starts the holder (`spawn`), which listens
on a unix socket, 0600 in a 0700 directory (`state_dir()/holders/`), for requests: run a
command, put or get files (the holder is the same user, so it reads and writes the
requester's files); it exits after `ssh.reuse` of idleness. It connects to the workers in
the background, serving requests from the start: a silent worker delays only its own
results.
The holder is keyed on the node's identity (name, creation time, worker addresses and
login): a recreated node, moved workers or other keys mean another identity, which the
old holder refuses (and is told to exit). Each request re-reads the known_hosts files and
reuses a held connection only if its host's key is the one recorded now; otherwise the
holder connects afresh, checked exactly as a cold connection is. The connections to jump
hosts are held and checked the same way; a worker's held connection goes with its jump
host's.

Requests and answers are JSON lines; environment values travel in them over the socket,
never in an argv or a file. This module is light: paramiko is imported only by the holder.

    python -m tpuctl.fanout.holder     # the holder itself; its settings come on stdin
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tpuctl.fanout.base import (
    UNREACHABLE,
    Host,
    HostResult,
    LineFn,
    Output,
    ResultFn,
    StopSignal,
)

T = TypeVar("T")

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.providers.base import Node

MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
ANSWER_TIMEOUT_S = 5.0  # for the holder's first answer; commands themselves may run long
# The requests a holder understands and the answers it gives. Part of the identity it
# serves, so that a holder left running by an older tpuctl (one without put and get, or
# sending a message per line, or keeping all of a streamed command's output) is replaced,
# not sent what it ignores or misunderstood.
PROTOCOL = 4


@dataclass(frozen=True)
class Attachment:
    """The holder a command's fan-outs may use: for these hosts, under this identity."""

    identity: str
    socket: Path
    idle_s: float
    hosts: tuple[Host, ...]


_attached: Attachment | None = None


# --- decisions (pure) -----------------------------------------------------------------


def choose(enabled: bool, covered: bool, answer: str | None) -> str:
    """What a fan-out does: "use" the holder, run "cold" and then "start" one, or run cold
    and "replace" the holder of another identity; plain "cold" when reuse is off or some
    host is not the holder's to serve. `answer` is the holder's reply to our identity:
    None (no holder listening), "ready" or "other"."""
    if not enabled or not covered:
        return "cold"
    if answer == "ready":
        return "use"
    return "start" if answer is None else "replace"


def holdable(host: Host) -> bool:
    """SSH connections are held: direct, through a ProxyCommand (its process lives as long
    as the connection: an IAP tunnel or `ssh -W` is started once, not per command) or
    through a jump host (whose connection the holder keeps too)."""
    return host.transport == "ssh"


def covers(attachment: Attachment | None, hosts: list[Host]) -> bool:
    """Whether every host is one of the attached node's (per-call env aside)."""
    if attachment is None or not hosts:
        return False
    held = {_route_id(h) for h in attachment.hosts}
    return all(holdable(h) and _route_id(h) in held for h in hosts)


def node_identity(node: Node, hosts: list[Host]) -> str:
    """Changes whenever the node is recreated or its workers' addresses or logins do, or
    the holder's `PROTOCOL`."""
    created = node.created.isoformat() if node.created else ""
    record = [PROTOCOL, node.provider, node.project, node.zone, node.name, created]
    record += sorted(_route_id(h) for h in hosts)
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:32]


def _route_id(host: Host) -> str:
    fields = dataclasses.asdict(dataclasses.replace(host, env={}))
    return json.dumps(fields, sort_keys=True)


def socket_path(settings: Settings, node_name: str) -> Path:
    from tpuctl.config import state_dir

    place = f"{settings.get('project')}/{settings.get('zone')}/{node_name}"
    return state_dir() / "holders" / f"{hashlib.sha256(place.encode()).hexdigest()[:16]}.sock"


def reuse_seconds(settings: Settings) -> float | None:
    """`ssh.reuse` (TPUCTL_SSH_REUSE): how long a holder waits idle; None when off."""
    from tpuctl.config import DEFAULT_SSH_REUSE, reuse_idle_seconds

    return reuse_idle_seconds(settings.get("ssh.reuse", DEFAULT_SSH_REUSE))


# --- client side ----------------------------------------------------------------------


def attach_node(settings: Settings, node: Node, hosts: list[Host]) -> None:
    """Let this process's fan-outs to the node's workers go through its holder (if reuse
    is on); `hosts` are all the node's workers, so that one holder serves any selection."""
    idle = reuse_seconds(settings)
    path = socket_path(settings, node.name)
    held = [h for h in hosts if holdable(h)]
    if idle is None or not held or len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        attach(None)
        return
    attach(Attachment(node_identity(node, held), path, idle, tuple(held)))


def attach(attachment: Attachment | None) -> None:
    """Route this process's covered fan-outs through `attachment`'s holder (None: none)."""
    global _attached
    _attached = attachment


def via_holder(
    hosts: list[Host],
    request: dict[str, Any],
    on_line: LineFn | None,
    on_result: ResultFn | None,
    stop: StopSignal,
    connect_timeout: float,
    cold: Callable[[], list[HostResult]],
) -> list[HostResult]:
    """A fan-out (`request`: its op, "run", "put" or "get", and that op's arguments) through
    the attached holder when `choose` says so, else `cold()` (then starting or replacing the
    holder for the next command)."""
    attachment = _attached
    enabled, covered = attachment is not None, covers(attachment, hosts)
    conn, answer = _hello(attachment) if enabled and covered else (None, None)
    step = choose(enabled, covered, answer)
    if step == "use":
        hosts_fields = [dataclasses.asdict(h) for h in hosts]
        request = {**request, "hosts": hosts_fields, "connect_timeout": connect_timeout}
        return _converse(conn, request, hosts, on_line, on_result, stop)
    if conn is not None:
        if step == "replace":
            with contextlib.suppress(OSError):
                conn.send({"op": "exit"})
        conn.close()
    results = cold()
    if step in ("start", "replace") and attachment is not None:
        spawn(attachment, connect_timeout)
    return results


def _hello(attachment: Attachment) -> tuple[_Lines | None, str | None]:
    """Connect and introduce ourselves: (connection, "ready" | "other"), or (None, None)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lines = _Lines(conn)
    try:
        conn.settimeout(ANSWER_TIMEOUT_S)
        conn.connect(str(attachment.socket))
        lines.send({"identity": attachment.identity})
        reply = lines.receive() or {}
        conn.settimeout(None)
    except (OSError, ValueError):
        conn.close()
        return None, None
    return lines, "ready" if reply.get("ready") else "other"


def _converse(
    conn: _Lines,
    request: dict[str, Any],
    hosts: list[Host],
    on_line: LineFn | None,
    on_result: ResultFn | None,
    stop: StopSignal,
) -> list[HostResult]:
    """Send a request and relay the holder's lines and results until it is done."""
    from tpuctl.fanout import Interrupted

    results: list[HostResult | None] = [None] * len(hosts)
    conn.send(request)
    interrupted = stopping = False
    while None in results:
        try:
            if stop.is_set() and not stopping:
                conn.send({"op": "stop", "reason": stop.reason})
                stopping = True
            message = conn.receive(timeout=0.2)  # short waits: Ctrl-C and `stop` noticed
        except TimeoutError:
            continue
        except KeyboardInterrupt:
            interrupted = True
            stop.set("interrupted")
            continue
        except (OSError, ValueError):
            message = None
        if message is None:
            break
        if "lines" in message and on_line is not None:
            index, stream, texts = message["lines"]
            for text in texts:
                on_line(hosts[index], stream, text)
        elif "result" in message:
            fields = message["result"]
            index = fields.pop("index")
            results[index] = result = HostResult(hosts[index], **fields)
            if on_result is not None:
                on_result(result)
    conn.close()
    final = [
        r or HostResult(h, None, "", "", "connection lost: the holder exited", 0.0)
        for h, r in zip(hosts, results, strict=True)
    ]
    if interrupted:
        raise Interrupted(final)
    return final


def tell_to_exit(path: Path) -> None:
    """Ask the holder listening at `path` (if any) to exit, as `ssh -O exit` does."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lines = _Lines(conn)
    with contextlib.suppress(OSError, ValueError):
        conn.settimeout(ANSWER_TIMEOUT_S)
        conn.connect(str(path))
        lines.send({"identity": None})
        lines.receive()
        lines.send({"op": "exit"})
    conn.close()


def spawn(attachment: Attachment, connect_timeout: float) -> subprocess.Popen:
    """Start the node's holder in the background; it outlives this command."""
    from tpuctl.config import private_dir

    private_dir(attachment.socket.parent)
    settings = {
        "identity": attachment.identity,
        "socket": str(attachment.socket),
        "idle_s": attachment.idle_s,
        "connect_timeout": connect_timeout,
        "hosts": [dataclasses.asdict(h) for h in attachment.hosts],
    }
    holder = subprocess.Popen(
        [sys.executable, "-m", "tpuctl.fanout.holder"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",  # keeps no directory of the user's busy
        start_new_session=True,  # Ctrl-C in the terminal is not for the holder
    )
    assert holder.stdin is not None
    holder.stdin.write(json.dumps(settings).encode())
    holder.stdin.close()
    return holder


class _Lines:
    """JSON messages, one per line, over a connected unix socket."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self._buffer = b""  # received: whole messages from `_start` on, then part of one
        self._start = 0
        self._partial: list[bytes] = []  # received after `_buffer`, no newline among them

    def send(self, message: Mapping[str, Any]) -> None:
        self.conn.sendall(json.dumps(message).encode() + b"\n")

    def receive(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message, None at the end; TimeoutError if `timeout` passes first."""
        end = self._buffer.find(b"\n", self._start)
        while end < 0:
            if timeout is not None and not select.select([self.conn], [], [], timeout)[0]:
                raise TimeoutError
            chunk = self.conn.recv(65536)
            if not chunk:
                return None
            end = self._take(chunk)
        message = json.loads(self._buffer[self._start : end])
        self._start = end + 1  # an offset, not a copy of the rest per message
        return message

    def _take(self, chunk: bytes) -> int:
        """Keep `chunk`; where the first newline now is in `_buffer`, -1 while none came.
        A message's chunks are joined once its newline arrives: a large one (a result
        carrying all of a host's output) is copied once, not once per chunk."""
        newline = chunk.find(b"\n")
        if newline < 0:
            self._partial.append(chunk)
            return -1
        head = b"".join([self._buffer[self._start :], *self._partial])
        self._buffer, self._start, self._partial = head + chunk, 0, []
        return len(head) + newline

    def close(self) -> None:
        self.conn.close()


# --- the holder -----------------------------------------------------------------------


def _host(fields: dict[str, Any]) -> Host:
    jump = _host(fields["jump"]) if fields.get("jump") else None
    return Host(**{**fields, "identity_files": tuple(fields["identity_files"]), "jump": jump})


class _Pool:
    """The held connections, by route; each used only while its host key is still the one
    recorded in the host's known_hosts file. Jump hosts' connections are held too, lent to
    each request's SSH context (which handles the workers' connections through them)."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._held: dict[str, Any] = {}
        self._through: dict[str, str] = {}  # a held worker's route -> its jump host's
        self._jumps: dict[str, Any] = {}
        self._retired: list[Any] = []  # jump connections replaced while others used them
        self._first: dict[str, Future] = {}  # the first connections, while under way
        self._lock = threading.Lock()

    def connect_all(self, hosts: list[Host]) -> None:
        """Start connecting to every host, in the background: requests are served
        meanwhile, and one for a host still being connected waits for that first
        connection (`_await_first`) rather than making a second."""
        routes = {_route_id(h): h for h in hosts}
        with self._lock:
            self._first.update((route, Future()) for route in routes)
        threading.Thread(target=self._connect_first, args=(routes,), daemon=True).start()

    def _connect_first(self, routes: dict[str, Host]) -> None:
        """The first connection to each host, all at once; then hold the jump hosts'.
        Daemon threads, not a pool: a holder told to exit does not wait for a silent host."""
        ctx, stop = self.context(), StopSignal()
        threads = [
            threading.Thread(target=self._first_one, args=(r, h, ctx, stop), daemon=True)
            for r, h in routes.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.keep_jumps(ctx)
        ctx.close()

    def _first_one(self, route: str, host: Host, ctx, stop: StopSignal) -> None:
        """One host's first connection, held; its outcome told to the requests waiting."""
        with self._lock:
            first = self._first[route]
        try:
            first.set_result(self._connect(host, ctx, stop))
        except ConnectionError as err:
            first.set_exception(err)
        finally:
            with self._lock:
                del self._first[route]

    def _await_first(self, host: Host, timeout: float) -> None:
        """Wait for the holder's first connection to `host` if it is under way, at most
        `timeout` (the request's connect timeout). Its failure is the request's: a silent
        host costs the request one connect timeout, not two."""
        with self._lock:
            first = self._first.get(_route_id(host))
        if first is None:
            return
        try:
            first.result(timeout)
        except FutureTimeout:
            raise ConnectionError(
                f"{UNREACHABLE}: no answer from {host.address}:{host.port} within {timeout:g} s"
            ) from None

    def lend_jumps(self, ctx, hosts: list[Host], known: Mapping[str | None, Any]) -> None:
        """Before a request: lend `ctx` the held connections to the jump hosts `hosts` go
        through, those still live whose key is recorded now; close the others, and the
        workers' connections through them (a fresh one is checked as a cold one is)."""
        jumps = {_route_id(h.jump): h.jump for h in hosts if h.jump is not None}
        for key, jump in jumps.items():
            with self._lock:
                held = self._jumps.get(key)
            if held is None:
                continue
            if held.is_active() and known[jump.known_hosts].records(
                jump, held.get_remote_server_key()
            ):
                ctx.lend_jump(jump, held)
            else:
                self._drop_jump(key)

    def keep_jumps(self, ctx) -> None:
        """After a request: hold the jump-host connections `ctx` made for it."""
        for jump, transport in ctx.take_jumps():
            with self._lock:
                replaced = self._jumps.get(_route_id(jump))
                self._jumps[_route_id(jump)] = transport
                if replaced is not None:  # two requests connected at once: both in use
                    self._retired.append(replaced)

    def _drop_jump(self, key: str) -> None:
        with self._lock:
            jump = self._jumps.pop(key, None)
            workers = [w for w, through in self._through.items() if through == key]
            dropped = [self._held.pop(w, None) for w in workers]
            for worker in workers:
                del self._through[worker]
        for transport in [*dropped, jump]:
            if transport is not None:
                transport.close()

    def transport(self, host: Host, ctx, known, stop: StopSignal):
        """A live connection to `host` whose key is recorded now, else a fresh one.
        Raises ConnectionError as `ssh.connect` does."""
        self._await_first(host, ctx.connect_timeout)
        key = _route_id(host)
        with self._lock:
            held = self._held.get(key)
        if (
            held is not None
            and held.is_active()
            and known.records(host, held.get_remote_server_key())
        ):
            return held
        if held is not None:
            held.close()
        return self._connect(host, ctx, stop)

    def drop(self, host: Host) -> None:
        with self._lock:
            held = self._held.pop(_route_id(host), None)
            self._through.pop(_route_id(host), None)
        if held is not None:
            held.close()

    def _connect(self, host: Host, ctx, stop: StopSignal):
        from tpuctl.fanout import ssh

        transport = ssh.connect(host, ctx, stop)
        with self._lock:
            self._held[_route_id(host)] = transport
            if host.jump is not None:
                self._through[_route_id(host)] = _route_id(host.jump)
        return transport

    def context(self, max_parallel: int = 64, connect_timeout: float | None = None):
        """An SSH context for one request: its own --connect-timeout, else the holder's."""
        from tpuctl.fanout import ssh

        return ssh.SshContext(connect_timeout or self.connect_timeout, max_parallel)

    def close(self) -> None:
        with self._lock:
            for transport in [*self._held.values(), *self._jumps.values(), *self._retired]:
                transport.close()
            self._held.clear()
            self._jumps.clear()
            self._retired.clear()


@dataclass(frozen=True)
class _Job:
    """One request being served: its hosts, their held connections, its fan-out's SSH
    context and stop signal."""

    request: dict[str, Any]
    hosts: list[Host]
    held: Callable[[Host], Any]  # the host's held connection (ConnectionError as cold)
    ctx: Any  # ssh.SshContext (paramiko is the holder's import alone)
    stop: StopSignal


class _Holder:
    """Serves run requests for one node identity until idle for `idle_s`."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.identity = settings["identity"]
        self.path = Path(settings["socket"])
        self.idle_s = float(settings["idle_s"])
        self.pool = _Pool(float(settings["connect_timeout"]))
        self.hosts = [_host(h) for h in settings["hosts"]]
        self.active = 0
        self.last_used = time.monotonic()
        self.exiting = False
        self._inode: int | None = None
        self._lock = threading.Lock()

    def serve(self) -> None:
        listener = self._listen()
        if listener is None:
            return
        try:
            self.pool.connect_all(self.hosts)
            while not self.exiting:
                ready, _, _ = select.select([listener], [], [], 0.5)
                if ready:
                    conn, _ = listener.accept()
                    threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
                with self._lock:
                    idle = self.active == 0 and time.monotonic() - self.last_used > self.idle_s
                if idle:
                    break
        finally:
            self._release_path()
            listener.close()
            self.pool.close()

    def _release_path(self) -> None:
        """Remove our socket, so that no command finds it (never a successor's socket)."""
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()

    def _listen(self) -> socket.socket | None:
        """Bind the socket 0600 (a successor for a new identity replaces a stale path)."""
        from tpuctl.config import private_dir

        private_dir(self.path.parent)
        if _listening(self.path):  # two cold commands at once: the first holder serves
            return None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)  # created 0600: never reachable by others, even briefly
        try:
            listener.bind(str(self.path))
        except OSError:
            listener.close()
            return None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self._inode = self.path.stat().st_ino
        listener.listen(16)
        return listener

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            self.active += 1
        try:
            if _peer_uid(conn) == os.getuid():
                self._converse(_Lines(conn))
        except (OSError, ValueError, KeyError):
            pass  # the client went away or sent nonsense: nothing to answer
        finally:
            with contextlib.suppress(OSError):  # wakes the stop watcher blocked reading
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
            with self._lock:
                self.active -= 1
                self.last_used = time.monotonic()

    def _converse(self, conn: _Lines) -> None:
        hello = conn.receive() or {}
        mine = hello.get("identity") == self.identity
        conn.send({"ready": mine})
        request = conn.receive() or {}
        if request.get("op") == "exit":  # a successor for the node's new identity
            self.exiting = True
            self._release_path()
        elif mine and request.get("op") in ("run", "put", "get"):
            self._serve(conn, request)

    def _serve(self, conn: _Lines, request: dict[str, Any]) -> None:
        from tpuctl.fanout import _fan_out, ssh

        hosts = [_host(h) for h in request["hosts"]]
        stop = StopSignal()
        write_lock = threading.Lock()

        def send(message: dict[str, Any]) -> None:
            with write_lock, contextlib.suppress(OSError):
                conn.send(message)

        def watch() -> None:  # a stop request, or the client gone, stops every host
            try:
                message = conn.receive() or {}
            except (OSError, ValueError):
                message = {}
            stop.set(message.get("reason") or "interrupted")

        threading.Thread(target=watch, daemon=True).start()
        ctx = self.pool.context(int(request["max_parallel"]), float(request["connect_timeout"]))
        routes = [*hosts, *(h.jump for h in hosts if h.jump is not None)]
        known = {p: ssh.KnownHosts(p) for p in {h.known_hosts for h in routes}}
        self.pool.lend_jumps(ctx, hosts, known)

        def held(host: Host) -> Any:
            """The host's held connection, or ConnectionError as a cold connection gives."""
            return self.pool.transport(host, ctx, known[host.known_hosts], stop)

        job = _Job(request, hosts, held, ctx, stop)
        if request["op"] == "run":
            one = self._run_one(job, send)
            workers = len(hosts)  # every command starts at once, as on the cold path
        else:
            one = self._copy_one(job)
            workers = int(request["max_parallel"])

        def answered(index: int) -> HostResult:
            """One host's part, its result sent with its index (never looked up)."""
            result = one(index)
            fields = dataclasses.asdict(result)
            fields.pop("host")
            send({"result": {"index": index, **fields}})
            return result

        _fan_out(hosts, answered, workers, bool(request["fail_fast"]), stop, None)
        self.pool.keep_jumps(ctx)
        ctx.close()

    def _run_one(
        self, job: _Job, send: Callable[[dict[str, Any]], None]
    ) -> Callable[[int], HostResult]:
        """One host's part of a "run" request, the lines of each read sent as they come,
        in one message; the result holds what the request's "keep_tail" says (the holder
        outlives the command: a `tail -f` through it must not grow it)."""
        from tpuctl.fanout import ssh

        request, hosts, held, ctx, stop = job.request, job.hosts, job.held, job.ctx, job.stop
        command, envs = request["command"], request["envs"]

        def one(index: int) -> HostResult:
            host, started = hosts[index], time.monotonic()
            if stop.is_set():
                return HostResult(host, None, "", "", stop.reason, 0.0)

            def on_lines(_host: Host, stream: str, lines: list[str]) -> None:
                send({"lines": [index, stream, lines]})

            output = Output(on_lines, request["keep_tail"])

            def attempt(transport: Any) -> HostResult:
                return ssh.run_on_transport(
                    transport, host, command, envs[index], ctx, stop,
                    request["timeout"], output, started,
                )  # fmt: skip

            def own() -> HostResult:  # as many commands as sshd allows already use it
                return ssh.run_on_host(
                    host, command, envs[index], ctx, stop, request["timeout"], output
                )

            try:
                return self._over_held(host, held, attempt, own)
            except ConnectionError as err:
                return HostResult(host, None, "", "", str(err), time.monotonic() - started)

        return one

    def _over_held(
        self,
        host: Host,
        held: Callable[[Host], Any],
        attempt: Callable[[Any], T],
        own: Callable[[], T],
    ) -> T:
        """`attempt` over the host's held connection; `own()` where sshd has no session to
        spare on it. A held connection the host had dropped unseen (a reboot) fails before
        any session opens, so nothing ran: `attempt` runs once more over a fresh one."""
        from tpuctl.fanout import ssh

        try:
            return self._over(host, held(host), attempt, own)
        except ssh.ConnectionDead:
            return self._over(host, held(host), attempt, own)

    def _over(
        self, host: Host, transport: Any, attempt: Callable[[Any], T], own: Callable[[], T]
    ) -> T:
        """`attempt` over `transport`, `own()` where it has no session to spare; a dead
        connection is dropped, for the next request to replace."""
        from tpuctl.fanout import ssh

        try:
            return attempt(transport)
        except ssh.SessionRefused:
            return own()
        finally:
            if not transport.is_active():
                self.pool.drop(host)

    def _copy_one(self, job: _Job) -> Callable[[int], HostResult]:
        """One host's part of a "put" or "get" request: the same copy as the cold path's,
        over the held connection (or one of its own where that has no session to spare)."""
        from tpuctl.fanout import get_one, put_one, transfer

        request, hosts, held, stop = job.request, job.hosts, job.held, job.stop
        fresh = transfer.over_new_connection(job.ctx, stop)

        def over(host: Host, copy: transfer.Copy) -> int:
            return self._over_held(host, held, copy, lambda: fresh(host, copy))

        def one(index: int) -> HostResult:
            host = hosts[index]
            if stop.is_set():
                return HostResult(host, None, "", "", stop.reason, 0.0)
            if request["op"] == "put":
                return put_one(host, Path(request["local"]), request["remote"], over)
            local_dir, cwd = Path(request["local"]), Path(request["cwd"])
            return get_one(host, request["remote"], local_dir, over, cwd)

        return one


def _listening(path: Path) -> bool:
    """Whether a holder accepts connections at `path` (one told to exit no longer does)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end (Linux); our own where it cannot be told."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return os.getuid()  # the 0600 socket in a 0700 directory already keeps others out
    import struct

    creds = conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def main() -> None:
    """The holder process: settings (JSON) on stdin, then serve until idle."""
    settings = json.loads(sys.stdin.read())
    sys.stdin.close()
    _Holder(settings).serve()


if __name__ == "__main__":
    main()
