"""The SSH transport: one paramiko connection per host, driven from a bounded thread pool.

paramiko is used directly (not through fabric, whose Connection wraps it) because the
fan-out needs what fabric hides: feeding the script on stdin, reading stdout and stderr
from one loop, signalling the remote process group on timeout or Ctrl-C, tpuctl's own
host-key pinning, and one jump-host connection shared by every worker behind it (fabric
opens one per worker). Hosts arrive with ssh_config already applied (tpuctl.sshconfig).
Everything here is imported lazily by `tpuctl.fanout`.
"""

from __future__ import annotations

import errno
import os
import posixpath
import select
import shlex
import shutil
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

from tpuctl.fanout import paramiko_loader, tree
from tpuctl.fanout.base import (
    AUTH_FAILED,
    PID_MARKER,
    UNREACHABLE,
    Host,
    HostResult,
    LineSplitter,
    Output,
    StopSignal,
    env_script,
    kill_group_script,
    wrapped_command,
)

paramiko = paramiko_loader.load()

# Failures worth another try: the host is booting or sshd is briefly overloaded.
TRANSIENT_ERRORS = (ConnectionRefusedError, ConnectionResetError, EOFError, paramiko.SSHException)
CONNECT_ATTEMPTS = 3
RETRY_PAUSE_S = 0.5
POLL_S = 0.2
MARKER_WAIT_S = 3.0
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")


class HostKeyChanged(Exception):
    """The host presented a different key than the one recorded for its address."""


# The signature algorithms that prove a host key of each recorded type (an RSA key line
# says `ssh-rsa` whatever SHA the signature uses).
_ALGORITHMS_OF_TYPE = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}


class KnownHosts:
    """tpuctl's per-node known_hosts file: new addresses are recorded on first contact
    (tpuctl created the node, so trust on first use is the only information there is),
    a changed key is refused. Once an address has a key, only the recorded key types are
    negotiated: a host offering another type (a man in the middle with an ECDSA key where
    ed25519 was recorded) is refused, never recorded. Shared by every thread of a fan-out."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._keys = paramiko.HostKeys()
        self._lock = threading.Lock()
        if path and os.path.exists(path):
            self._load(path)

    def _load(self, path: str) -> None:
        """Read the file; lines that are not a host key (a crash mid-write, an editor) are
        dropped from it with a warning, so those addresses are learnt again."""
        good, bad = [], 0
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                line = raw.decode("utf-8", errors="replace").strip()
                if not line or line.startswith("#"):
                    good += [line] if line else []
                    continue
                try:
                    entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
                except (paramiko.hostkeys.InvalidHostKey, paramiko.SSHException, ValueError):
                    entry = None
                if entry is None:
                    bad += 1
                    continue
                good.append(line)
                for name in entry.hostnames:
                    self._keys.add(name, entry.key.get_name(), entry.key)
        if bad:
            print(
                f"warning: dropped {bad} unreadable line(s) from {path}; "
                "their hosts' keys are recorded again on the next contact",
                file=sys.stderr,
            )
            from tpuctl.config import write_private

            write_private(Path(path), "".join(f"{line}\n" for line in good))

    def pinned_algorithms(self, host: Host) -> list[str]:
        """The host key algorithms to offer `host`: its recorded types, or [] when it
        has none yet (then anything the transport supports is fine)."""
        if self.path is None:
            return []
        with self._lock:
            known = self._keys.lookup(_known_name(host))
            types = list(known.keys()) if known is not None else []
        return [a for t in types for a in _ALGORITHMS_OF_TYPE.get(t, (t,))]

    def verify(self, host: Host, key: paramiko.PKey) -> None:
        if self.path is None:
            return
        name = _known_name(host)
        with self._lock:
            known = self._keys.lookup(name)
            if known is None:
                from tpuctl.config import private_dir, private_opener

                self._keys.add(name, key.get_name(), key)
                private_dir(Path(self.path).parent)
                with open(self.path, "a", opener=private_opener) as out:
                    out.write(f"{name} {key.get_name()} {key.get_base64()}\n")
                return
            if known.get(key.get_name()) != key:
                raise self.changed(host)

    def records(self, host: Host, key: paramiko.PKey) -> bool:
        """Whether `key` is the key recorded for `host` now (a held connection is reused
        only then: a deleted or changed line means a fresh, fully checked connection)."""
        with self._lock:
            known = self._keys.lookup(_known_name(host))
        return known is not None and known.get(key.get_name()) == key

    def changed(self, host: Host) -> HostKeyChanged:
        return HostKeyChanged(
            f"host key of {host.label} ({_known_name(host)}) changed since tpuctl first "
            f"connected; if you trust the new key, delete its line from {self.path}"
        )


def _known_name(host: Host) -> str:
    return host.address if host.port == 22 else f"[{host.address}]:{host.port}"


class Credentials:
    """Private keys loaded once per fan-out and shared by every connection."""

    def __init__(self) -> None:
        self._cache: dict[str | None, list[paramiko.PKey]] = {}
        self.unusable: dict[str, str] = {}  # key file -> why it was skipped
        self._lock = threading.Lock()

    def keys_for(self, key_filename: str | None) -> list[paramiko.PKey]:
        with self._lock:
            if key_filename not in self._cache:
                self._cache[key_filename] = self._load(key_filename)
            return self._cache[key_filename]

    def _load(self, key_filename: str | None) -> list[paramiko.PKey]:
        if key_filename is None:
            found = [Path.home() / ".ssh" / name for name in DEFAULT_KEYS]
            return [paramiko.PKey.from_path(path) for path in found if path.exists()]
        # A missing, passphrase-protected or unreadable IdentityFile is skipped, as ssh
        # skips it: another key may work.
        if not os.path.exists(key_filename):
            return []
        try:
            return [paramiko.PKey.from_path(key_filename)]
        except (paramiko.PasswordRequiredException, TypeError):  # TypeError: cryptography's
            self.unusable[key_filename] = "needs a passphrase, which tpuctl cannot ask for"
        except (paramiko.SSHException, ValueError, OSError) as err:
            self.unusable[key_filename] = f"unreadable ({err})"
        return []


class SshContext:
    """State shared by all hosts of one fan-out call; `close` it when the fan-out ends."""

    def __init__(self, connect_timeout: float, max_handshakes: int = 64) -> None:
        self.connect_timeout = connect_timeout
        # Handshakes cost CPU here and on the hosts; commands, once started, cost nothing.
        self.handshakes = threading.BoundedSemaphore(max(1, max_handshakes))
        self.credentials = Credentials()
        self._known: dict[str | None, KnownHosts] = {}
        self._jumps: dict[tuple, paramiko.Transport | ConnectionError] = {}
        self._jump_hosts: dict[tuple, Host] = {}
        self._lent: set[tuple] = set()  # jump connections owned elsewhere: not closed here
        self._jump_locks: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()

    def known_hosts(self, path: str | None) -> KnownHosts:
        with self._lock:
            if path not in self._known:
                self._known[path] = KnownHosts(path)
            return self._known[path]

    def jump_transport(self, jump: Host, stop: StopSignal) -> paramiko.Transport:
        """One connection to a jump host, shared by every worker behind it: one handshake
        on the bastion instead of one per worker (sshd's MaxStartups, 10 by default, drops
        unauthenticated connections beyond it). A failure is remembered for the fan-out,
        so the workers behind a dead bastion fail at once rather than one after another."""
        key = _route(jump)
        with self._lock:
            lock = self._jump_locks.setdefault(key, threading.Lock())
        with lock:
            known = self._jumps.get(key)
            if isinstance(known, ConnectionError):
                raise ConnectionError(str(known))
            if known is not None and known.is_active():
                return known
            try:
                self._jumps[key], self._jump_hosts[key] = connect(jump, self, stop), jump
            except ConnectionError as err:
                reason = str(err).removeprefix(f"{UNREACHABLE}: ")
                self._jumps[key] = ConnectionError(f"{UNREACHABLE}: via {jump.label}: {reason}")
                raise self._jumps[key] from err
            return self._jumps[key]

    def lend_jump(self, jump: Host, transport: paramiko.Transport) -> None:
        """Reach the workers behind `jump` through `transport`, a connection to it owned
        elsewhere (a connection holder's): `close` leaves it open."""
        with self._lock:
            self._jumps[_route(jump)] = transport
            self._lent.add(_route(jump))

    def take_jumps(self) -> list[tuple[Host, paramiko.Transport]]:
        """The live jump-host connections this fan-out made, handed over to the caller:
        `close` no longer closes them."""
        with self._lock:
            taken = [
                (self._jump_hosts[key], transport)
                for key, transport in self._jumps.items()
                if key not in self._lent
                and isinstance(transport, paramiko.Transport)
                and transport.is_active()
            ]
            for jump, _ in taken:
                del self._jumps[_route(jump)]
        return taken

    def close(self) -> None:
        """Close the jump hosts' connections it made (the workers' close with their
        commands)."""
        with self._lock:
            for key, transport in self._jumps.items():
                if isinstance(transport, paramiko.Transport) and key not in self._lent:
                    transport.close()
            self._jumps.clear()


def _route(host: Host) -> tuple:
    """What identifies a connection to `host`, the way to it included."""
    through = _route(host.jump) if host.jump else None
    return (host.user, host.address, host.port, host.proxy_command, through)


def _user(host: Host) -> str:
    return host.user or os.environ.get("USER") or "root"


def _open_socket(
    host: Host, ctx: SshContext, jump: paramiko.Transport | None
) -> socket.socket | paramiko.Channel | paramiko.ProxyCommand:
    """Where the connection's bytes travel: a channel through the jump host's connection,
    a ProxyCommand's stdin/stdout, or a TCP socket of our own."""
    if jump is not None:
        try:
            return jump.open_channel(
                "direct-tcpip", (host.address, host.port), ("", 0), timeout=ctx.connect_timeout
            )
        except paramiko.ChannelException as err:  # the jump host could not connect
            raise ConnectionRefusedError(f"the jump host says: {err.text}") from err
        except paramiko.SSHException as err:
            if not jump.is_active():
                raise
            raise TimeoutError(str(err)) from err  # paramiko's "Timeout opening channel."
    if host.proxy_command:
        return paramiko.ProxyCommand(host.proxy_command)
    sock = socket.create_connection((host.address, host.port), timeout=ctx.connect_timeout)
    # Small request/response packets: without this, delayed ACKs add ~40 ms per round trip.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if _QUICKACK is None:
        return sock
    quick = _QuickAckSocket(fileno=sock.detach())
    quick.settimeout(ctx.connect_timeout)  # the timeout lives in the object, not the fd
    return quick


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class _QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges what it receives at once instead of up to 40 ms
    later. sshd sends small packets without TCP_NODELAY on non-interactive sessions: after
    authentication its hostkeys and debug messages go out, and Nagle holds the answer to
    our first channel open until they are acknowledged, which a delayed ACK makes 40 ms
    (measured: 43 ms of a cold connection's ~60). Linux leaves quick-ACK mode on its own,
    so it is set again after every read."""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return data


def _connect_once(
    host: Host, ctx: SshContext, jump: paramiko.Transport | None
) -> paramiko.Transport:
    transport = paramiko.Transport(_open_socket(host, ctx, jump))
    try:
        transport.banner_timeout = ctx.connect_timeout
        transport.handshake_timeout = ctx.connect_timeout
        known_hosts = ctx.known_hosts(host.known_hosts)
        pinned = known_hosts.pinned_algorithms(host)
        options = transport.get_security_options()
        if offered := [a for a in options.key_types if a in pinned]:
            options.key_types = offered  # verify() refuses any other type anyway
        try:
            transport.start_client(timeout=ctx.connect_timeout)
        except paramiko.IncompatiblePeer as err:
            if pinned and "host key" in str(err):  # the host no longer has a pinned type
                raise known_hosts.changed(host) from err
            raise
        known_hosts.verify(host, transport.get_remote_server_key())
        _authenticate(transport, host, ctx)
    except BaseException:
        transport.close()
        raise
    return transport


def _authenticate(transport: paramiko.Transport, host: Host, ctx: SshContext) -> None:
    files = [f for f in (host.key_filename, *host.identity_files) if f]
    keys = ctx.credentials.keys_for(None) if not files else []
    keys += [key for f in files for key in ctx.credentials.keys_for(f)]
    for key in keys:
        try:
            transport.auth_publickey(_user(host), key)
            return
        except paramiko.AuthenticationException:
            continue
    raise paramiko.AuthenticationException(_refusal(host, files, ctx.credentials))


def _refusal(host: Host, files: list[str], credentials: Credentials) -> str:
    """Why the login failed, naming the key files offered and those tpuctl could not use."""
    tried = [f for f in files if os.path.exists(f) and f not in credentials.unusable]
    message = f"{AUTH_FAILED}: no key accepted for user {_user(host)!r}"
    message += f" (tried {', '.join(tried)})" if tried else " (no key configured)"
    skipped = [f"{f} {credentials.unusable[f]}" for f in files if f in credentials.unusable]
    return "; ".join([message, *skipped])


def connect(host: Host, ctx: SshContext, stop: StopSignal) -> paramiko.Transport:
    """An authenticated transport, retrying transient failures a bounded number of times.
    Raises ConnectionError with a one-line reason when the host cannot be reached."""
    last: Exception | None = None
    for attempt in range(CONNECT_ATTEMPTS):
        if attempt and stop.wait(RETRY_PAUSE_S * attempt):
            break
        # Before taking a handshake slot: the jump host's own handshake needs one.
        jump = ctx.jump_transport(host.jump, stop) if host.jump else None
        try:
            with ctx.handshakes:
                return _connect_once(host, ctx, jump)
        except (paramiko.AuthenticationException, HostKeyChanged) as err:
            raise ConnectionError(f"{UNREACHABLE}: {err}") from err
        except (ValueError, OverflowError) as err:  # a name IDNA refuses (a..b), a bad port
            raise ConnectionError(
                f"{UNREACHABLE}: {host.address}:{host.port} is not an address to connect to ({err})"
            ) from err
        except TimeoutError as err:
            # A silent host has already cost a full connect timeout: do not wait again.
            raise ConnectionError(
                f"{UNREACHABLE}: no answer from {host.address}:{host.port} "
                f"within {ctx.connect_timeout:g} s"
            ) from err
        except (*TRANSIENT_ERRORS, OSError) as err:
            last = err
    reason = f"{type(last).__name__}: {last}" if last else "stopped"
    raise ConnectionError(f"{UNREACHABLE}: {host.address}:{host.port}: {reason}")


class ConnectionDead(ConnectionError):
    """The connection died before a session opened on it (the host dropped it unseen, a
    reboot, and reset it at this request): nothing ran, so another connection may try."""


class SessionRefused(Exception):
    """The connection is up, but sshd opens no further session on it (its MaxSessions,
    10 by default, counts the sessions of one connection)."""

    def reason(self, host: Host) -> str:
        """The one-line error of a connection of its own that `host` refused a session."""
        return f"{host.address} refused a session: {self}"


def run_on_host(
    host: Host,
    command: str,
    env: dict[str, str],
    ctx: SshContext,
    stop: StopSignal,
    timeout: float | None,
    output: Output,
) -> HostResult:
    """Run `command` on one host over a connection of its own and stream its lines; never
    raises for remote trouble."""
    started = time.monotonic()
    try:
        transport = connect(host, ctx, stop)
    except ConnectionError as err:
        return HostResult(host, None, "", "", str(err), time.monotonic() - started)
    try:
        return run_on_transport(transport, host, command, env, ctx, stop, timeout, output, started)
    except SessionRefused as refused:
        error = refused.reason(host)
        return HostResult(host, None, "", "", error, time.monotonic() - started)
    except ConnectionDead as dead:
        return HostResult(host, None, "", "", str(dead), time.monotonic() - started)
    finally:
        transport.close()


def run_on_transport(
    transport: paramiko.Transport,
    host: Host,
    command: str,
    env: dict[str, str],
    ctx: SshContext,
    stop: StopSignal,
    timeout: float | None,
    output: Output,
    started: float,
) -> HostResult:
    """Run `command` over an open connection (left open); never raises for remote trouble,
    except SessionRefused when sshd opens no further session on this connection, and
    ConnectionDead when it died before one opened (nothing ran). `ctx`
    connects anew to stop the command if this connection has no session to spare then."""
    try:
        channel = _open_session(transport, host, ctx.connect_timeout)
        # `exec` keeps one process: the login shell becomes bash, whatever the user's shell is.
        channel.exec_command(f"exec bash -c {shlex.quote(wrapped_command(command))}")
        channel.sendall(env_script(env))
        channel.shutdown_write()
        out = _MarkedStdout(output.splitter(host, "stdout"))
        err = output.splitter(host, "stderr")
        deadline = None if timeout is None else started + timeout
        error = _pump(channel, out, err, stop, deadline, timeout)
        if error is not None:
            _await_marker(channel, out, MARKER_WAIT_S)
        if error is not None and out.pgid is not None:
            _stop_remote(transport, host, ctx, out.pgid)
        exit_code = None
        if error is None:
            exit_code = channel.recv_exit_status()
            if exit_code == -1:  # killed by a signal: sshd reports no status
                exit_code, error = None, "terminated by a signal"
        channel.close()
    except Silent as silent:
        return HostResult(host, None, "", "", str(silent), time.monotonic() - started)
    except ConnectionDead:
        raise
    except (*TRANSIENT_ERRORS, OSError) as lost:
        # The host went away mid-command (preempted, rebooted): a result, not a crash.
        error = f"connection lost: {lost or type(lost).__name__}"
        return HostResult(host, None, "", "", error, time.monotonic() - started)
    stdout, stderr = out.close(), err.close()
    return HostResult(
        host, exit_code, stdout, stderr, error, time.monotonic() - started,
        out.splitter.dropped, err.dropped,
    )  # fmt: skip


class Silent(Exception):
    """A connected host that no longer answers (its network went down): unreachable."""


def _open_session(transport: paramiko.Transport, host: Host, timeout: float) -> paramiko.Channel:
    """A new session channel; SessionRefused (not a lost connection) when sshd refuses it.
    A host that does not answer within `timeout` (the connect timeout) is Silent, and its
    connection closed: a held one is never waited on again. ConnectionDead where the
    connection died instead."""
    try:
        return transport.open_session(timeout=timeout)
    except paramiko.ChannelException as refused:
        raise SessionRefused(refused) from refused
    except (paramiko.SSHException, EOFError, OSError) as silent:
        dead_before_session(transport, silent)
        if "Timeout" not in str(silent):  # paramiko's only sign of a channel not opened in time
            raise
        transport.close()
        raise Silent(
            f"{UNREACHABLE}: no answer from {host.address}:{host.port} within {timeout:g} s "
            "(opening a session)"
        ) from silent


def dead_before_session(transport: paramiko.Transport, err: BaseException) -> None:
    """Raise ConnectionDead for `err`, met opening a session, where the connection is gone."""
    if not transport.is_active():
        raise ConnectionDead(f"connection lost: {err or type(err).__name__}") from err


def _pump(
    channel: paramiko.Channel,
    out: _MarkedStdout,
    err: LineSplitter,
    stop: StopSignal,
    deadline: float | None,
    timeout: float | None,
) -> str | None:
    """Copy the channel's output until EOF; returns why it stopped early, or None."""
    while True:
        wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
        _wait_readable(channel, wait)
        drained = False
        while channel.recv_ready():
            out.feed(channel.recv(65536))
            drained = True
        while channel.recv_stderr_ready():
            err.feed(channel.recv_stderr(65536))
            drained = True
        if not drained and (channel.eof_received or channel.closed):
            # sshd always sends EOF before closing: a close without it is a dead connection.
            return None if channel.eof_received else "connection lost"
        if stop.is_set():
            return stop.reason
        if deadline is not None and time.monotonic() >= deadline:
            return f"timed out after {timeout:g} s"


def _wait_readable(channel: paramiko.Channel, seconds: float) -> None:
    # poll, not select: at hundreds of hosts the descriptors pass select's limit of 1024.
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)
    poller.poll(seconds * 1000)


def _await_marker(channel: paramiko.Channel, out: _MarkedStdout, seconds: float) -> None:
    """Stopped before the command announced its process group (it had barely started):
    give it a moment to, so that it can still be stopped rather than left running."""
    end = time.monotonic() + seconds
    while out.pgid is None and not channel.eof_received and time.monotonic() < end:
        _wait_readable(channel, POLL_S)
        while channel.recv_ready():
            out.feed(channel.recv(65536))


def _stop_remote(transport: paramiko.Transport, host: Host, ctx: SshContext, pgid: int) -> None:
    """Stop the command's process group over another channel of its connection or, where
    sshd has no session to spare there (a session ends only with its command), over a new
    connection."""
    if _kill_remote(transport, pgid):
        return
    try:
        spare = connect(host, ctx, StopSignal())
    except ConnectionError:
        return  # unreachable now: nothing more can be done from here
    try:
        _kill_remote(spare, pgid)
    finally:
        spare.close()


def _kill_remote(transport: paramiko.Transport, pgid: int) -> bool:
    """Signal the command's process group over a second channel of the same connection;
    False if sshd refused that channel (no session to spare)."""
    try:
        channel = transport.open_session(timeout=5)
        channel.exec_command(f"exec bash -c {shlex.quote(kill_group_script(pgid))}")
        channel.status_event.wait(5)
        channel.close()
    except paramiko.ChannelException:
        return False
    except (paramiko.SSHException, OSError, EOFError):
        pass  # the connection died with the command; nothing is left to stop
    return True


class _MarkedStdout:
    """Stdout carrying the wrapper's process-group marker line, which is not user output.
    Lines before it (a login script that prints something) pass through unchanged."""

    def __init__(self, splitter: LineSplitter) -> None:
        self.splitter = splitter
        self.pgid: int | None = None
        self._head = b""
        self._seen_marker = False

    def feed(self, data: bytes) -> None:
        if self._seen_marker:
            self.splitter.feed(data)
            return
        self._head += data
        while not self._seen_marker and b"\n" in self._head:
            line, self._head = self._head.split(b"\n", 1)
            marker, _, pgid = line.decode(errors="replace").partition(" ")
            if marker == PID_MARKER and pgid.strip().isdigit():
                self.pgid, self._seen_marker = int(pgid), True
            else:
                self.splitter.feed(line + b"\n")
        if self._seen_marker and self._head:
            self.splitter.feed(self._head)
            self._head = b""

    def close(self) -> str:
        if self._head:
            self.splitter.feed(self._head)
        return self.splitter.close()


# --- file transfer ---------------------------------------------------------------


def put_tree(sftp: paramiko.SFTPClient, local: Path, remote: str, skipped: list[str]) -> int:
    """Copy a local file or directory to `remote` as `tpuctl.fanout.tree` walks it (into
    `remote` if that is a directory, parents made, links and special files skipped and
    appended to `skipped`); returns the number of files copied."""
    target = tree.put_target(local, remote, lambda path: _sftp_is_dir(sftp, path))
    _sftp_makedirs(sftp, posixpath.dirname(target))

    def file(source: str, mode: int, target: str) -> None:
        with open(source, "rb") as data, _open_private(sftp, target) as copy:
            copy.set_pipelined(True)
            shutil.copyfileobj(data, copy, SFTP_CHUNK)
            copy.flush()
            _set_mode_and_mtime(copy, os.fstat(data.fileno()))

    writer = tree.Writer(lambda path, mode: _sftp_mkdir(sftp, path, mode), file, posixpath.join)
    return tree.put_tree(local, writer, target, skipped)


def get_tree(
    sftp: paramiko.SFTPClient, remote: str, local: Path, skipped: list[str] | None = None
) -> int:
    """Copy a remote file or directory tree to `local` as `tpuctl.fanout.tree` walks it
    (the worker's names untrusted, links and special files skipped and appended to
    `skipped`); returns the number of files copied. `remote` itself may be a link: the user
    named it."""

    def entries(directory: str) -> list[tuple[str, int]]:
        # listdir_attr's attributes are the entries' own (lstat): links show as links.
        return [(e.filename, e.st_mode or 0) for e in sftp.listdir_attr(directory)]

    def copy(path: str, out: BinaryIO) -> float | None:
        # sftp.getfo's requests, with the attributes it fetches kept: its time for ours.
        with sftp.open(path, "rb") as source:
            attributes = sftp.stat(path)
            source.prefetch(attributes.st_size)
            shutil.copyfileobj(source, out, SFTP_CHUNK)
        return attributes.st_mtime

    reader = tree.Reader(entries, copy, posixpath.join)
    mode = sftp.stat(remote).st_mode or 0
    return tree.get_tree(reader, remote, mode, local, [] if skipped is None else skipped)


# paramiko's own put() writes 32 KiB per request, the most an SFTP server must accept.
SFTP_CHUNK = 32768


def _open_private(sftp: paramiko.SFTPClient, remote: str) -> paramiko.SFTPFile:
    """`remote` opened for writing, created 0600 (one that existed is made 0600 before
    anything is written): a file copied to a shared directory is readable by nobody else
    until its own mode is set. paramiko's open() sends no mode, so sftp-server would create
    the file 0666 less its umask; this is that open() with the mode."""
    sftp_proto = paramiko.sftp
    attributes = paramiko.SFTPAttributes()
    attributes.st_mode = 0o600
    flags = sftp_proto.SFTP_FLAG_WRITE | sftp_proto.SFTP_FLAG_CREATE | sftp_proto.SFTP_FLAG_TRUNC
    kind, message = sftp._request(sftp_proto.CMD_OPEN, remote, flags, attributes)
    if kind != sftp_proto.CMD_HANDLE:
        raise paramiko.SFTPError("Expected handle")
    handle = paramiko.SFTPFile(sftp, message.get_binary(), "wb")
    handle.chmod(0o600)
    return handle


def _set_mode_and_mtime(copy: paramiko.SFTPFile, source: os.stat_result) -> None:
    """Give the remote file `source`'s mode and modification time (access time the same,
    as tar sets them) in one request: chmod and utime would wait for two answers."""
    attributes = paramiko.SFTPAttributes()
    attributes.st_mode = stat.S_IMODE(source.st_mode)
    attributes.st_atime = attributes.st_mtime = int(source.st_mtime)
    copy.sftp._request(paramiko.sftp.CMD_FSETSTAT, copy.handle, attributes)  # as chmod()


def _sftp_is_dir(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        return stat.S_ISDIR(sftp.stat(path).st_mode or 0)
    except FileNotFoundError:
        return False


def _sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """`mkdir -p path`, as the tar path's."""
    if path in ("", ".", "/") or _sftp_is_dir(sftp, path):
        return
    _sftp_makedirs(sftp, posixpath.dirname(path.rstrip("/")))
    _sftp_mkdir(sftp, path, 0o777)


def _sftp_mkdir(sftp: paramiko.SFTPClient, path: str, mode: int) -> None:
    """A directory at `path` (of `mode`, less sftp-server's umask), or the one there."""
    try:
        sftp.mkdir(path, stat.S_IMODE(mode))
    except OSError:
        if not _sftp_is_dir(sftp, path):
            raise FileExistsError(errno.EEXIST, "File exists, and is no directory", path) from None
