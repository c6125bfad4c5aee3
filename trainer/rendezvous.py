"""Meet the pod's other processes before jax.distributed joins them, and end the start-up
everywhere when one of them fails before it got there.

jax aborts a process (no exception) when a peer never registers, and waits up to its
initialization timeout first, so tpuctl's processes meet here, on the coordinator's own
port (which jax's coordination service takes right after), under their own deadline.

A process that fails before joining (a recipe override only its copy got wrong, a broken
environment on one host, a crash while loading) tells the pod (`tell_failure`): a process
waiting to join then ends with that process's line and exit status at once, instead of idling
until the deadline (TPUCTL_INIT_TIMEOUT, 900 s by default). Process 0 answers every process
that arrives within TELL_WINDOW_S; any other process sends its failure to process 0.

Messages are one JSON object per line: a process sends {"index": i}, or {"index": i,
"failed": message, "status": s}; process 0 answers {"go": true} or the failure it knows of.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from trainer.config import TrainerError
from trainer.contract import EXIT_PEER_LOST

# How long a process that failed before joining goes on telling the others: long enough for
# processes of the same launch that are still loading to arrive.
TELL_WINDOW_S = 120.0
_POLL_S = 0.2


@dataclass(frozen=True)
class Failure:
    """A process that failed before joining: its index, its one-line message, its status."""

    index: int
    message: str
    status: int

    def as_json(self) -> dict:
        return {"index": self.index, "failed": self.message, "status": self.status}

    @classmethod
    def from_json(cls, message: dict) -> Failure:
        return cls(message["index"], str(message["failed"]), int(message.get("status", 1)))


class JoinFailed(TrainerError):
    """The pod did not come together, and every process that got here knows: no one to tell.
    Not bad input: the missing process died or hung while starting, and a launch again may
    well succeed (`tpuctl babysit` relaunches it)."""

    status = EXIT_PEER_LOST


class PodStartFailed(JoinFailed):
    """Another process failed before joining; this one ends with its status."""

    def __init__(self, failure: Failure):
        super().__init__(
            f"process {failure.index} failed before joining the pod: {failure.message}"
        )
        self.status = failure.status


def join(address: str, count: int, index: int, timeout_s: float) -> None:
    """Wait until all `count` processes reach this point. Raises PodStartFailed when one of
    them failed before joining, JoinFailed when they are not all there by `timeout_s`."""
    if count == 1:
        return
    host, port = _split(address)
    deadline = time.monotonic() + timeout_s
    if index == 0:
        _gather(port, count, deadline, address)
    else:
        _report(host, port, index, deadline, address)


def tell_failure(address: str, count: int, failure: Failure) -> None:
    """Tell the pod's other processes that this one failed before joining (see module doc);
    returns once they know, or after TELL_WINDOW_S at most."""
    if count == 1:
        return
    host, port = _split(address)
    if failure.index == 0:
        with contextlib.suppress(OSError), _listen(port) as server:  # OSError: port taken
            _answer_with(server, failure, count, told={0})
        return
    end = time.monotonic() + TELL_WINDOW_S
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 2) as conn:
            _send(conn, failure.as_json())
            conn.settimeout(10)
            conn.recv(1)  # process 0's answer: it has the message
            return
        time.sleep(_POLL_S)


def _gather(port: int, count: int, deadline: float, address: str) -> None:
    waiting: dict[int, socket.socket] = {}
    with _listen(port) as server:
        while len(waiting) < count - 1:
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, count)) - set(waiting))
                raise JoinFailed(
                    f"only {len(waiting) + 1} of {count} workers joined coordinator {address} "
                    f"(missing process ids {_ranges(missing)}): start the run on every worker of "
                    "the pod (tpuctl run does), or raise TPUCTL_INIT_TIMEOUT"
                )
            arrival = _accept(server)
            if arrival is None:
                continue
            conn, message = arrival
            if "failed" in message:
                failure = Failure.from_json(message)
                conn.close()
                _tell(waiting.values(), failure)
                _answer_with(server, failure, count, told={0, failure.index, *waiting})
                raise PodStartFailed(failure)
            waiting[message["index"]] = conn
        for conn in waiting.values():
            _send(conn, {"go": True})
        for conn in waiting.values():  # peers close first, so no port is left in TIME_WAIT here
            with contextlib.suppress(OSError):
                conn.recv(1)
            conn.close()


def _answer_with(server: socket.socket, failure: Failure, count: int, told: set[int]) -> None:
    """Answer each process that arrives with `failure` until every process has been told
    (or told us of its own failure), for TELL_WINDOW_S at most."""
    end = time.monotonic() + TELL_WINDOW_S
    while len(told) < count and time.monotonic() < end:
        if (arrival := _accept(server)) is None:
            continue
        conn, message = arrival
        with contextlib.suppress(OSError):
            _send(conn, failure.as_json())
        conn.close()
        told.add(message["index"])


def _tell(waiting: Iterable[socket.socket], failure: Failure) -> None:
    for conn in waiting:
        with contextlib.suppress(OSError):
            _send(conn, failure.as_json())
        conn.close()


def _report(host: str, port: int, index: int, deadline: float, address: str) -> None:
    while True:
        answer = None
        with contextlib.suppress(OSError), socket.create_connection((host, port), 2) as conn:
            _send(conn, {"index": index})
            conn.settimeout(max(deadline - time.monotonic(), 1))
            answer = _receive(conn)
        if answer is not None and answer.get("go"):
            return
        if answer is not None and "failed" in answer:
            raise PodStartFailed(Failure.from_json(answer))
        if time.monotonic() > deadline:
            raise JoinFailed(
                f"not all workers joined coordinator {address}: process 0 did not release this "
                "worker in time; start the run on every worker of the pod (tpuctl run does), or "
                "raise TPUCTL_INIT_TIMEOUT"
            )
        time.sleep(_POLL_S)


def _listen(port: int) -> socket.socket:
    server = socket.create_server(("", port), reuse_port=False)
    server.settimeout(0.5)
    return server


def _accept(server: socket.socket) -> tuple[socket.socket, dict] | None:
    """The next process to arrive and its message, or None after the server's timeout (or a
    connection that said nothing readable: a port scan, a process killed while it spoke)."""
    try:
        conn, _ = server.accept()
    except TimeoutError:
        return None
    conn.settimeout(10)
    message = _receive(conn)
    if message is None or not isinstance(message.get("index"), int):
        conn.close()
        return None
    return conn, message


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _receive(conn: socket.socket) -> dict | None:
    """One JSON line from `conn`, or None when it closed or sent something else."""
    with contextlib.suppress(OSError, ValueError), conn.makefile("rb") as stream:
        message = json.loads(stream.readline())
        return message if isinstance(message, dict) else None
    return None


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _ranges(ids: list[int]) -> str:
    return ",".join(str(i) for i in ids[:8]) + ("..." if len(ids) > 8 else "")
