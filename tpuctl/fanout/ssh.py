"""The SSH transport: one paramiko connection per host, driven from a bounded thread pool.

paramiko (the SSH engine under fabric) is used directly rather than through fabric's
`Connection.run`, because the fan-out needs things fabric hides: feeding the script on
stdin, reading stdout and stderr from one loop, and signalling the remote process group
on timeout or Ctrl-C. Everything here is imported lazily by `tpuctl.fanout`.
"""

from __future__ import annotations

import os
import posixpath
import select
import shlex
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import paramiko

from tpuctl.fanout.base import (
    AUTH_FAILED,
    PID_MARKER,
    UNREACHABLE,
    Host,
    HostResult,
    LineFn,
    LineSplitter,
    StopSignal,
    env_script,
    kill_group_script,
    wrapped_command,
)

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
        self._lock = threading.Lock()

    def keys_for(self, key_filename: str | None) -> list[paramiko.PKey]:
        with self._lock:
            if key_filename not in self._cache:
                self._cache[key_filename] = self._load(key_filename)
            return self._cache[key_filename]

    @staticmethod
    def _load(key_filename: str | None) -> list[paramiko.PKey]:
        if key_filename is not None:
            return [paramiko.PKey.from_path(key_filename)]
        found = [Path.home() / ".ssh" / name for name in DEFAULT_KEYS]
        return [paramiko.PKey.from_path(path) for path in found if path.exists()]


class SshContext:
    """State shared by all hosts of one fan-out call."""

    def __init__(self, connect_timeout: float, max_handshakes: int = 64) -> None:
        self.connect_timeout = connect_timeout
        # Handshakes cost CPU here and on the hosts; commands, once started, cost nothing.
        self.handshakes = threading.BoundedSemaphore(max(1, max_handshakes))
        self.credentials = Credentials()
        self._known: dict[str | None, KnownHosts] = {}
        self._lock = threading.Lock()

    def known_hosts(self, path: str | None) -> KnownHosts:
        with self._lock:
            if path not in self._known:
                self._known[path] = KnownHosts(path)
            return self._known[path]


def _user(host: Host) -> str:
    return host.user or os.environ.get("USER") or "root"


def _connect_once(host: Host, ctx: SshContext) -> paramiko.Transport:
    sock = socket.create_connection((host.address, host.port), timeout=ctx.connect_timeout)
    # Small request/response packets: without this, delayed ACKs add ~40 ms per round trip.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock)
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
    keys = ctx.credentials.keys_for(host.key_filename)
    for key in keys:
        try:
            transport.auth_publickey(_user(host), key)
            return
        except paramiko.AuthenticationException:
            continue
    raise paramiko.AuthenticationException(
        f"{AUTH_FAILED}: no key accepted for user {_user(host)!r}"
        + (f" (tried {host.key_filename})" if host.key_filename else " (no key configured)")
    )


def connect(host: Host, ctx: SshContext, stop: StopSignal) -> paramiko.Transport:
    """An authenticated transport, retrying transient failures a bounded number of times.
    Raises ConnectionError with a one-line reason when the host cannot be reached."""
    last: Exception | None = None
    for attempt in range(CONNECT_ATTEMPTS):
        if attempt and stop.wait(RETRY_PAUSE_S * attempt):
            break
        try:
            with ctx.handshakes:
                return _connect_once(host, ctx)
        except (paramiko.AuthenticationException, HostKeyChanged) as err:
            raise ConnectionError(f"{UNREACHABLE}: {err}") from err
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


def run_on_host(
    host: Host,
    command: str,
    env: dict[str, str],
    ctx: SshContext,
    stop: StopSignal,
    timeout: float | None,
    on_line: LineFn | None,
) -> HostResult:
    """Run `command` on one host and stream its lines; never raises for remote trouble."""
    started = time.monotonic()
    try:
        transport = connect(host, ctx, stop)
    except ConnectionError as err:
        return HostResult(host, None, "", "", str(err), time.monotonic() - started)
    try:
        return _run_on_transport(transport, host, command, env, stop, timeout, on_line, started)
    except (*TRANSIENT_ERRORS, OSError) as err:
        # The host went away mid-command (preempted, rebooted): a result, not a crash.
        error = f"connection lost: {err or type(err).__name__}"
        return HostResult(host, None, "", "", error, time.monotonic() - started)
    finally:
        transport.close()


def _run_on_transport(
    transport: paramiko.Transport,
    host: Host,
    command: str,
    env: dict[str, str],
    stop: StopSignal,
    timeout: float | None,
    on_line: LineFn | None,
    started: float,
) -> HostResult:
    channel = transport.open_session(timeout=10)
    # `exec` keeps one process: the login shell becomes bash, whatever the user's shell is.
    channel.exec_command(f"exec bash -c {shlex.quote(wrapped_command(command))}")
    channel.sendall(env_script(env))
    channel.shutdown_write()
    out = _MarkedStdout(LineSplitter(host, "stdout", on_line))
    err = LineSplitter(host, "stderr", on_line)
    deadline = None if timeout is None else started + timeout
    error = _pump(channel, out, err, stop, deadline, timeout)
    if error is not None:
        _await_marker(channel, out, MARKER_WAIT_S)
    if error is not None and out.pgid is not None:
        _kill_remote(transport, out.pgid)
    exit_code = None
    if error is None:
        exit_code = channel.recv_exit_status()
        if exit_code == -1:  # killed by a signal: sshd reports no status
            exit_code, error = None, "terminated by a signal"
    channel.close()
    return HostResult(host, exit_code, out.close(), err.close(), error, time.monotonic() - started)


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


def _kill_remote(transport: paramiko.Transport, pgid: int) -> None:
    """Signal the command's process group over a second channel of the same connection."""
    try:
        channel = transport.open_session(timeout=5)
        channel.exec_command(f"exec bash -c {shlex.quote(kill_group_script(pgid))}")
        channel.status_event.wait(5)
        channel.close()
    except (paramiko.SSHException, OSError, EOFError):
        pass  # the connection died with the command; nothing is left to stop


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


def put_tree(sftp: paramiko.SFTPClient, local: Path, remote: str) -> int:
    """Copy a file or directory tree to `remote`; returns the number of files copied."""
    if local.is_file():
        sftp.put(str(local), remote)
        sftp.chmod(remote, stat.S_IMODE(local.stat().st_mode))
        return 1
    _sftp_makedirs(sftp, remote)
    copied = 0
    for child in sorted(local.iterdir()):
        copied += put_tree(sftp, child, posixpath.join(remote, child.name))
    return copied


class UnsafeRemoteName(OSError):
    """A worker's listing named something that would land outside the local target."""


def get_tree(
    sftp: paramiko.SFTPClient, remote: str, local: Path, skipped: list[str] | None = None
) -> int:
    """Copy a remote file or directory tree to `local`; returns the number of files copied.

    The names a worker lists are untrusted (a compromised worker can say anything): a name
    with `/`, `.` or `..` is refused (UnsafeRemoteName), every target must resolve inside
    `local`'s parent (LOCAL_DIR/wNN), and symlinks inside the tree are not followed but
    skipped and appended to `skipped`. `remote` itself may be a link: the user named it."""
    root = os.path.realpath(local.parent)
    found = [] if skipped is None else skipped
    return _get_entry(sftp, remote, local, sftp.stat(remote), root, found)


def _get_entry(
    sftp: paramiko.SFTPClient,
    remote: str,
    local: Path,
    attrs: paramiko.SFTPAttributes,
    root: str,
    skipped: list[str],
) -> int:
    resolved = os.path.realpath(local)
    if os.path.commonpath([resolved, root]) != root:
        raise UnsafeRemoteName(f"refusing to write {local}: it resolves outside {root}")
    mode = attrs.st_mode or 0
    if stat.S_ISLNK(mode):
        skipped.append(remote)
        return 0
    if not stat.S_ISDIR(mode):
        local.parent.mkdir(parents=True, exist_ok=True)
        sftp.get(remote, str(local))
        return 1
    local.mkdir(parents=True, exist_ok=True)
    copied = 0
    # listdir_attr's attributes are the entries' own (lstat): links show as links.
    for entry in sorted(sftp.listdir_attr(remote), key=lambda e: e.filename):
        name = entry.filename
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise UnsafeRemoteName(
                f"refusing the name {name!r} that the worker listed in {remote}: "
                "entries of a directory cannot contain '/' or be '.' or '..'"
            )
        copied += _get_entry(sftp, posixpath.join(remote, name), local / name, entry, root, skipped)
    return copied


def _sftp_makedirs(sftp: paramiko.SFTPClient, remote: str) -> None:
    try:
        sftp.mkdir(remote)
    except OSError:
        if not stat.S_ISDIR(sftp.stat(remote).st_mode or 0):
            raise
