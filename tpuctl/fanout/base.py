"""What every transport shares: the host description, the per-host result, and how a
command and its environment are handed to a worker without exposing secrets."""

from __future__ import annotations

import codecs
import re
import resource
import shlex
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# (host, "stdout" | "stderr", line without its newline)
LineFn = Callable[["Host", str, str], None]
# (host, "stdout" | "stderr", the lines one read brought, without their newlines): what the
# transports hand out, so that the holder sends a read's lines as one message
LinesFn = Callable[["Host", str, list[str]], None]
ResultFn = Callable[["HostResult"], None]

# The wrapper prints this before anything else, so the caller learns the process group
# it must signal to stop the command (sshd makes every session its own group).
PID_MARKER = "__tpuctl_pgid__"
FDS_PER_HOST = 4
# What a caller that streams the lines keeps of each host's stdout and of its stderr
# (`run`'s `keep_tail`): room for the summaries' last lines, long ones included, while
# `tail -f` or a chatty command on 32 workers costs no more memory the longer it runs.
STREAMED_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class Host:
    """One worker as the fan-out sees it: where to reach it and what it is called."""

    label: str  # "w03": the prefix users see
    address: str  # IP or hostname (SSH); "localhost" for local hosts
    user: str | None = None
    port: int = 22
    key_filename: str | None = None
    identity_files: tuple[str, ...] = ()  # further keys to offer (ssh_config IdentityFile)
    known_hosts: str | None = None  # tpuctl's per-node known_hosts file
    workdir: str | None = None  # local transport: the worker's directory
    env: Mapping[str, str] = field(default_factory=dict)  # e.g. TPUCTL_PROCESS_ID
    transport: str = "ssh"  # "ssh" | "local"
    jump: Host | None = None  # reached through this host (ProxyJump)
    proxy_command: str | None = None  # reached through this command's stdin/stdout


@dataclass
class HostResult:
    """What happened on one host. `exit_code` is None when the command never finished
    (unreachable, timed out, interrupted); `error` then says why."""

    host: Host
    exit_code: int | None
    stdout: str
    stderr: str
    error: str | None
    duration: float
    # How many bytes at the start of stdout / stderr the result does not hold: the caller
    # streamed the lines and kept only a tail (`run`'s `keep_tail`).
    stdout_dropped: int = 0
    stderr_dropped: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.error is None

    @property
    def unreachable(self) -> bool:
        return self.error is not None and self.error.startswith(UNREACHABLE)


UNREACHABLE = "unreachable"
AUTH_FAILED = "authentication failed"  # in `error` when the host refused every key


class StopSignal:
    """Shared between the caller and every host's worker thread: set it and each host stops
    its remote command and reports `reason`."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


# What every shell takes as a variable name. Not str.isidentifier(): a Unicode name passes
# that, and bash then echoes the whole `NAME=value` as an error, value included.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def env_problem(name: str, value: str) -> str | None:
    """Why `name=value` cannot go through the environment channel, or None if it can.
    The value is never quoted back: it may be a secret."""
    if not ENV_NAME.match(name):
        return f"{name!r} is not a variable name: use letters, digits and _, not first a digit"
    if "\0" in value:  # the channel is NUL-terminated: the rest of the environment is lost
        return f"the value of {name} contains a NUL byte, which no environment can hold"
    try:
        value.encode()  # bytes that are not UTF-8 come from os.environ as lone surrogates
    except UnicodeEncodeError:
        return f"the value of {name} is not UTF-8 text, which the SSH channel carries"
    return None


def merged_env(host: Host, env: Mapping[str, str] | None) -> dict[str, str]:
    """The call's environment overlaid with the host's own (the host wins: TPUCTL_PROCESS_ID)."""
    merged = {**(env or {}), **host.env}
    for name, value in [*(env or {}).items(), *host.env.items()]:
        if problem := env_problem(name, value):
            raise ValueError(f"environment variable {problem}")
    return merged


def wrapped_command(command: str) -> str:
    """The script run with `bash -c` on each host: read the environment from stdin (so
    values never reach any argv), detach stdin, announce the process group, then run the
    user's command in the same shell (one bash per host, no nesting)."""
    return (
        "IFS= read -r -d '' __tpuctl_env; eval \"$__tpuctl_env\"; unset __tpuctl_env\n"
        "exec </dev/null\n"
        f'printf "%s %s\\n" {PID_MARKER} "$$"\n'
        f"{command}\n"
    )


def env_script(env: Mapping[str, str]) -> bytes:
    """What is written to the wrapper's stdin: one `export` line per variable."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items()).encode()


def kill_group_script(pgid: int) -> str:
    """Stop a process group politely, then for good: TERM, wait up to 2 s, KILL."""
    return (
        f"kill -TERM -- -{pgid} 2>/dev/null || exit 0\n"
        f"for _ in $(seq 20); do kill -0 -- -{pgid} 2>/dev/null || exit 0; sleep 0.1; done\n"
        f"kill -KILL -- -{pgid} 2>/dev/null; exit 0\n"
    )


def each_line(on_line: LineFn | None) -> LinesFn | None:
    """A `LinesFn` that calls `on_line` for every line."""
    if on_line is None:
        return None

    def on_lines(host: Host, stream: str, lines: list[str]) -> None:
        for line in lines:
            on_line(host, stream, line)

    return on_lines


@dataclass(frozen=True)
class Output:
    """What becomes of one command's output: `on_lines` sees every line as it arrives, and
    the result holds the last `keep` bytes of each stream (None: all of them)."""

    on_lines: LinesFn | None = None
    keep: int | None = None

    def splitter(self, host: Host, stream: str) -> LineSplitter:
        """Where one stream ("stdout" or "stderr") of `host` is fed."""
        return LineSplitter(host, stream, self.on_lines, self.keep)


class LineSplitter:
    """Turns a byte stream into complete lines for `on_lines`, those of each `feed` at
    once, and keeps the whole text, or only its last `keep` bytes. With `keep`, a line
    longer than that reaches `on_lines` in pieces, so that nothing grows without bound."""

    def __init__(
        self, host: Host, stream: str, on_lines: LinesFn | None, keep: int | None = None
    ) -> None:
        self.host, self.stream, self.on_lines, self.keep = host, stream, on_lines, keep
        self._partial: list[bytes] = []  # the line under way: no newline among them
        self._partial_size = 0
        # A character a piece of a long line cut waits here for its other bytes.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._kept = bytearray()
        self.dropped = 0  # bytes at the start that were not kept

    def feed(self, data: bytes) -> None:
        self._kept += data
        # Trimmed once it holds twice the tail: each byte is moved at most once more.
        if self.keep is not None and len(self._kept) > 2 * self.keep:
            self._drop(len(self._kept) - self.keep)
        if self.on_lines is None:
            return
        head, newline, rest = data.rpartition(b"\n")
        if newline:
            # A newline is never part of a multi-byte character: decoding the complete lines
            # at once replaces what is not UTF-8 exactly as decoding them one by one would.
            complete = b"".join([*self._partial, head])
            self._partial, self._partial_size = [], 0
            self._send(self._decoder.decode(complete, final=True).split("\n"))
        if rest:
            self._partial.append(rest)
            self._partial_size += len(rest)
            if self.keep is not None and self._partial_size > self.keep:
                piece = b"".join(self._partial)
                self._partial, self._partial_size = [], 0
                self._send([self._decoder.decode(piece)])

    def _send(self, lines: list[str]) -> None:
        assert self.on_lines is not None
        self.on_lines(self.host, self.stream, lines)

    def _drop(self, count: int) -> None:
        del self._kept[:count]
        self.dropped += count

    def close(self) -> str:
        """Send the last line if it had no newline; the text kept."""
        if self.on_lines is not None and (self._partial or self._decoder.getstate()[0]):
            self._send([self._decoder.decode(b"".join(self._partial), final=True)])
            self._partial, self._partial_size = [], 0
        if self.keep is not None and len(self._kept) > self.keep:
            self._drop(len(self._kept) - self.keep)
        if self.dropped:  # the cut may have split a character: its other bytes go too
            self._drop(min(3, len(self._kept) - len(self._kept.lstrip(_CONTINUATION))))
        return self._kept.decode(errors="replace")


# The bytes 0x80-0xbf: the second to fourth of a UTF-8 character, never its first.
_CONTINUATION = bytes(range(0x80, 0xC0))


def ensure_descriptors(hosts: int) -> None:
    """Raise the soft open-files limit (often 1024, 256 on macOS) to what a fan-out to
    `hosts` needs: a socket and a wake-up pipe per SSH host, pipes and a selector per
    local one."""
    needed = FDS_PER_HOST * hosts + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        limit = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
