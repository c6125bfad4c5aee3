"""One trainer per run directory: process 0 holds `{run_dir}/trainer.lock` while the run lives.

Two trainers on one run directory (a job started again by hand while it still runs, a
relaunch next to a job nobody stopped, `tpuctl run` on two nodes with one run_dir) would train
side by side, save the same step numbers over each other's checkpoints, delete each other's
saves in progress (orbax clears what it takes for leftovers of a killed save) and mix their
metrics: neither fails, and the run's checkpoints are no longer any one run's.

A local run directory's lock is an `flock` on a file beside the run's files: the kernel drops
it when its process ends, however it ends (SIGKILL included), so a dead trainer never leaves
it behind.

GCS has no lock that dies with its holder, so a gs:// run directory's is a lease: the object
names its holder (host, pid, run id, a random nonce), is created only where there is none
(generation precondition 0), and is rewritten by its holder every TTL/3, each time only over
the generation it last wrote; a clean end (SIGTERM's stop included) deletes it. A trainer that
finds one held watches its generation on its own monotonic clock, never comparing clocks
across machines: renewed within TTL seconds, the holder lives (RunDirInUse); unchanged for
TTL seconds, the holder is dead (SIGKILL, a preempted VM) and the newcomer takes the lease
over, again only over that generation. A holder whose renewal finds its lease taken over (it
stopped renewing for TTL seconds: paused, or cut off) ends the run at once rather than go on
saving over the newcomer's checkpoints. TTL is
`TPUCTL_LEASE_TTL` seconds, 60 by default: a preempted node takes minutes to come back, so
its relaunch rarely waits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

from trainer import io
from trainer.config import RecipeError

LOCK_FILE = "trainer.lock"
LEASE_TTL_ENV = "TPUCTL_LEASE_TTL"
DEFAULT_LEASE_TTL_S = 60.0
MAX_WAIT_POLL_S = 5.0  # how often a waiter reads a held lease's generation, at most


class RunDirUnusable(Exception):
    """The run directory cannot be held; the message says why and what to do."""


class RunDirInUse(RunDirUnusable):
    """Another live trainer holds the run directory; the message names it."""


def _in_use(run_dir: str, holder: str) -> RunDirInUse:
    return RunDirInUse(
        f"run_dir {run_dir} is in use by another trainer ({holder}): a second one would save "
        "over its checkpoints; wait for it to end or stop it, or set another run_dir"
    )


def _unusable(run_dir: str, reason: str) -> RunDirUnusable:
    return RunDirUnusable(
        f"run_dir {run_dir} cannot be written ({reason}): make it writable, or set another run_dir"
    )


def _exit_lost(message: str) -> None:
    """The default for a lost lease: this process ends at once, with one line, status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)  # from the renewing thread: the training one may be anywhere


@contextlib.contextmanager
def hold(
    run_dir: str, run_id: str | None = None, on_lost: Callable[[str], None] = _exit_lost
) -> Iterator[None]:
    """Hold `run_dir` for this trainer until the block ends; RunDirInUse when another
    trainer holds it, RunDirUnusable when it cannot be written. A gs:// run directory's
    lease may first wait up to TTL seconds for a holder that stopped renewing it; should
    another trainer take it over later, `on_lost(message)` is called (from another thread)
    and must end the run."""
    if io.is_gcs(run_dir):
        lease = Lease(run_dir.rstrip("/"), run_id, lease_ttl(), on_lost)
        lease.acquire()
        try:
            yield
        finally:
            lease.release()
        return
    with _flock(run_dir):
        yield


@contextlib.contextmanager
def _flock(run_dir: str) -> Iterator[None]:
    path = os.path.join(os.path.abspath(run_dir), LOCK_FILE)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # read-only, no permission, a file in the way: nothing to train into
        raise _unusable(os.path.dirname(path), str(e.strerror or e)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise _in_use(os.path.dirname(path), holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{_holder(os.getpid(), socket.gethostname(), _now())}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def lease_ttl() -> float:
    """`TPUCTL_LEASE_TTL` in seconds (default 60); RecipeError for anything but a number > 0."""
    value = os.environ.get(LEASE_TTL_ENV, "").strip()
    if not value:
        return DEFAULT_LEASE_TTL_S
    try:
        ttl = float(value)
    except ValueError:
        ttl = 0.0
    if not 0 < ttl < float("inf"):
        raise RecipeError(
            f"{LEASE_TTL_ENV}={value!r:.40} is not a number of seconds > 0: unset it (default "
            f"{DEFAULT_LEASE_TTL_S:g}) or set e.g. {LEASE_TTL_ENV}=60"
        )
    return ttl


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _holder(pid: object, host: object, since: object, run_id: object = None) -> str:
    """How a lock's holder is named in messages: `pid P on HOST since T[, run R]`."""
    return f"pid {pid} on {host} since {since}" + (f", run {run_id}" if run_id else "")


class Lease:
    """Process 0's lease on a gs:// run directory (see the module's docstring)."""

    def __init__(
        self,
        run_dir: str,
        run_id: str | None,
        ttl_s: float,
        on_lost: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_dir, self.ttl_s, self.on_lost, self.clock = run_dir, ttl_s, on_lost, clock
        self.path = io.join(run_dir, LOCK_FILE)
        self.nonce = secrets.token_hex(16)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
        self.record = json.dumps({**record, "run_id": run_id, "nonce": self.nonce}).encode()
        self.generation = 0  # the generation this lease last wrote; 0 while not held
        self._stopped = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="run-dir-lease", daemon=True)

    def acquire(self) -> None:
        """Take the lease, waiting out one that its holder may have left (at most TTL
        seconds); RunDirInUse when its holder renews it, RunDirUnusable when GCS refuses."""
        try:
            while not self._try_acquire():
                pass
        except RunDirUnusable:
            raise
        except Exception as e:  # no such bucket, no permission, GCS unreachable
            raise _unusable(self.run_dir, _first_line(e)) from None
        self._renewer.start()

    def _try_acquire(self) -> bool:
        """One attempt: True once held; False when the lease went away meanwhile (try again)."""
        try:
            self.generation = io.write_if_generation(self.path, self.record, 0)
            return True
        except io.GenerationMismatch:
            pass
        held = io.read_with_generation(self.path)
        if held is None:
            return False
        data, generation = held
        if self._mine(data):  # our own write, retried after it had landed
            self.generation = generation
            return True
        return self._wait_out(data, generation)

    def _wait_out(self, data: bytes, generation: int) -> bool:
        """Watch a held lease for TTL seconds and take it over if its generation stayed
        `generation`; RunDirInUse if its holder renewed it; False if it went away."""
        holder = _describe(data)
        print(f"trainer: run_dir {self.run_dir} is leased to {holder}: waiting up to "
              f"{self.ttl_s:g} s for it to renew the lease (a live trainer: this one stops) "
              "or not (a dead one: this one takes it over)", flush=True)  # fmt: skip
        seen_at = self.clock()
        poll_s = min(MAX_WAIT_POLL_S, self.ttl_s / 10)
        while (left := seen_at + self.ttl_s - self.clock()) > 0:
            time.sleep(min(poll_s, left))
            held = io.read_with_generation(self.path)
            if held is None:
                return False
            if held[1] != generation:
                raise _in_use(self.run_dir, _describe(held[0]))
        try:
            self.generation = io.write_if_generation(self.path, self.record, generation)
        except io.GenerationMismatch:  # renewed at the last moment, or another waiter won
            held = io.read_with_generation(self.path)
            if held is None:
                return False
            raise _in_use(self.run_dir, _describe(held[0])) from None
        print(f"trainer: took run_dir {self.run_dir} over from {holder}, which did not renew "
              f"its lease for {self.ttl_s:g} s", flush=True)  # fmt: skip
        return True

    def _renew(self) -> None:
        """Rewrite the lease every TTL/3 over the generation it last wrote; on finding
        another there, tell `on_lost` and stop."""
        while not self._stopped.wait(self.ttl_s / 3):
            try:
                self.generation = io.write_if_generation(self.path, self.record, self.generation)
            except io.GenerationMismatch:
                held = io.read_with_generation(self.path)
                if held is not None and self._mine(held[0]):  # a retried renewal had landed
                    self.generation = held[1]
                    continue
                taker = _describe(held[0]) if held else "nobody: it was deleted"
                self.on_lost(
                    f"run_dir {self.run_dir}'s lease was taken over by {taker}, which found it "
                    f"not renewed for {self.ttl_s:g} s (this trainer was stopped, or cut off "
                    "from GCS): stopping before this one saves over its checkpoints"
                )
                return
            except Exception as e:  # GCS unreachable for now: the next renewal may get through
                print(f"trainer: could not renew the lease on run_dir {self.run_dir} "
                      f"({_first_line(e)}); trying again", flush=True)  # fmt: skip

    def release(self) -> None:
        """Stop renewing and delete the lease (only the generation this lease wrote), so
        that the next trainer on the run directory starts at once."""
        self._stopped.set()
        if self._renewer.is_alive():
            self._renewer.join()
        with contextlib.suppress(Exception):  # taken over, or GCS away: it expires by itself
            io.remove_if_generation(self.path, self.generation)

    def _mine(self, data: bytes) -> bool:
        return _parse(data).get("nonce") == self.nonce


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _describe(data: bytes) -> str:
    """A lease's holder as messages name it."""
    record = _parse(data)
    if "pid" not in record:
        return "another trainer"
    return _holder(record["pid"], record.get("host"), record.get("since"), record.get("run_id"))


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
