"""An exclusive lease on a run, kept in one GCS object, so that babysitters on different
machines never act on the same run at once.

Every write is conditional on the object's generation (`if_generation_match`): claiming
an absent lease writes with generation 0 (only one of two simultaneous claims succeeds),
taking over a stale or released one writes against the generation that was read, and
each heartbeat writes against the generation of our own last write. A heartbeat whose
precondition fails means someone else wrote the lease: we lost it, and say so.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from tpuctl import storage
from tpuctl.errors import TpuctlError

_CLAIM_ATTEMPTS = 5  # a lost race re-reads the lease; the winner's record then refuses us


@dataclass(frozen=True)
class LeaseRecord:
    """The lease object's content."""

    holder: str  # "pid P on HOST (token)": who holds it, for messages
    heartbeat: float  # epoch seconds of the holder's last renewal
    released: bool = False

    def live(self, now: float, ttl_s: float) -> bool:
        return not self.released and now - self.heartbeat < ttl_s


class LeaseHeld(TpuctlError):
    """Another babysitter holds a live lease on the run."""


def default_holder() -> str:
    """This process, unambiguously: two babysitters never share a holder name."""
    return f"pid {os.getpid()} on {socket.gethostname()} ({uuid.uuid4().hex[:8]})"


class GcsLease:
    """Claim, renew and release the lease object at `uri` (gs://...)."""

    def __init__(
        self,
        uri: str,
        ttl_s: float,
        holder: str | None = None,
        now: Callable[[], float] = time.time,
    ):
        self.uri = uri
        self.ttl_s = ttl_s
        self.holder = holder or default_holder()
        self.now = now
        self.generation: int | None = None  # of our own last write; None: not held
        self.lost: str | None = None  # why we no longer hold it
        self._renewed_at: float | None = None
        self._lock = threading.Lock()  # the heartbeat thread and the main loop share it

    def claim(self, what: str) -> None:
        """Take the lease, or raise LeaseHeld naming the live holder. `what` names the
        run in the message."""
        from google.api_core.exceptions import PreconditionFailed

        for _ in range(_CLAIM_ATTEMPTS):
            record, generation = self._read()
            now = self.now()
            if record is not None and record.holder != self.holder and record.live(now, self.ttl_s):
                raise LeaseHeld(
                    f"{what} is already babysat by {record.holder} (lease {self.uri}, heartbeat "
                    f"{now - record.heartbeat:.0f} s ago); stop it, or wait "
                    f"{self.ttl_s:.0f} s after it died",
                    exit_code=1,
                )
            try:
                self._write(LeaseRecord(self.holder, now), generation)
                return
            except PreconditionFailed:
                continue  # someone wrote it between our read and our write: look again
        raise LeaseHeld(f"{what}: could not claim the lease {self.uri}; try again", exit_code=1)

    def heartbeat(self) -> bool:
        """Renew the lease; False (and `lost` says why) when it is no longer ours. A GCS
        error is retried on the next heartbeat, until the lease would have expired."""
        from google.api_core.exceptions import PreconditionFailed

        with self._lock:
            if self.generation is None:
                return False
            try:
                self._write(LeaseRecord(self.holder, self.now()), self.generation)
                return True
            except PreconditionFailed:
                record, generation = self._read()
                if record is not None and record.holder == self.holder and not record.released:
                    # our own write committed and its reply was lost: the client's retry of
                    # it found the generation moved on, by us
                    self.generation, self._renewed_at = generation, record.heartbeat
                    return True
                taker = record.holder if record else "nobody (it was deleted)"
                self._lose(f"the lease {self.uri} was taken over by {taker}")
            except Exception as err:  # GCS trouble: our lease may still be live
                if self.now() - (self._renewed_at or 0.0) >= self.ttl_s:
                    self._lose(
                        f"could not renew the lease {self.uri} for {self.ttl_s:.0f} s: {err}"
                    )
            return False

    def release(self) -> None:
        """Mark the lease released, if it is still ours (a babysitter elsewhere may take it
        at once)."""
        with self._lock:
            if self.generation is None:
                return
            # Not ours any more, or GCS down: then it expires on its own.
            with contextlib.suppress(Exception):
                self._write(LeaseRecord(self.holder, self.now(), released=True), self.generation)
            self.generation = None

    @property
    def holding(self) -> bool:
        return self.generation is not None

    def _lose(self, why: str) -> None:
        self.lost, self.generation = why, None

    def _read(self) -> tuple[LeaseRecord | None, int]:
        """The lease's record and generation; (None, 0) when there is none."""
        _bucket, path = storage.split_uri(self.uri)
        found = storage.blob(self.uri).bucket.get_blob(path)
        if found is None:
            return None, 0
        try:
            data = json.loads(found.download_as_text())
            record = LeaseRecord(
                str(data["holder"]), float(data["heartbeat"]), bool(data.get("released"))
            )
        except (ValueError, KeyError, TypeError):
            record = None  # unreadable: nobody's, but only taken against this generation
        return record, int(found.generation)

    def _write(self, record: LeaseRecord, generation: int) -> None:
        blob: Any = storage.blob(self.uri)
        blob.upload_from_string(
            json.dumps(asdict(record)),
            content_type="application/json",
            if_generation_match=generation,
        )
        self.generation = int(blob.generation)
        self._renewed_at = record.heartbeat


class Heartbeat:
    """Renews a lease every `period_s` from its own thread, so that long actions of the
    main loop (a day of stockout retries, a slow worker preparation) keep it live."""

    def __init__(self, lease: GcsLease, period_s: float):
        self.lease = lease
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            if not self.lease.heartbeat() and self.lease.lost:
                return
