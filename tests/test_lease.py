"""The cross-machine lease on a run: the real google-cloud-storage client against the GCS
emulator (which honours `ifGenerationMatch` as GCS does)."""

from __future__ import annotations

import threading

import pytest

from tpuctl.lease import GcsLease, Heartbeat, LeaseHeld

URI = "gs://test-bucket/tpuctl/runs/shared/babysit.lease"


def claim_at_once(leases: list[GcsLease]) -> list[BaseException | None]:
    """Every lease claims at the same instant, each from its own thread."""
    start = threading.Barrier(len(leases))
    outcomes: list[BaseException | None] = [None] * len(leases)

    def claim(index: int) -> None:
        start.wait()
        try:
            leases[index].claim("run shared")
        except BaseException as err:
            outcomes[index] = err

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def test_of_two_simultaneous_claims_exactly_one_wins_every_time(gcs):
    for repetition in range(20):
        uri = f"gs://test-bucket/tpuctl/runs/shared-{repetition}/babysit.lease"
        leases = [GcsLease(uri, ttl_s=120), GcsLease(uri, ttl_s=120)]
        outcomes = claim_at_once(leases)
        winners = [
            lease for lease, outcome in zip(leases, outcomes, strict=True) if outcome is None
        ]
        assert len(winners) == 1, (repetition, outcomes)
        loser = next(o for o in outcomes if o is not None)
        assert isinstance(loser, LeaseHeld), loser
        assert f"run shared is already babysat by {winners[0].holder}" in str(loser)


def test_a_released_or_expired_lease_is_taken_and_the_old_holder_learns_it_lost(gcs):
    clock = [1000.0]
    first = GcsLease(URI, ttl_s=60, now=lambda: clock[0])
    second = GcsLease(URI, ttl_s=60, now=lambda: clock[0])
    first.claim("run shared")
    with pytest.raises(LeaseHeld):
        second.claim("run shared")
    clock[0] += 61  # the first holder stopped renewing (a paused or dead machine)
    second.claim("run shared")
    assert second.heartbeat()
    assert not first.heartbeat()  # back from its pause: its precondition fails
    assert first.lost == f"the lease {URI} was taken over by {second.holder}"
    second.release()
    third = GcsLease(URI, ttl_s=60, now=lambda: clock[0])
    third.claim("run shared")  # released: taken at once
    assert third.holding and not second.holding


def test_the_heartbeat_thread_renews_while_the_main_thread_is_busy(gcs):
    lease = GcsLease(URI, ttl_s=60)
    lease.claim("run shared")
    claimed = lease.generation
    renewed = threading.Event()
    original = lease.heartbeat

    def heartbeat() -> bool:
        alive = original()
        renewed.set()
        return alive

    lease.heartbeat = heartbeat
    with Heartbeat(lease, period_s=0.05):
        assert renewed.wait(timeout=30)  # the main thread does nothing meanwhile
    assert lease.holding and lease.generation != claimed


def test_a_heartbeat_whose_write_committed_but_whose_reply_was_lost_keeps_the_lease(gcs):
    """google-cloud-storage retries a conditional write whose reply was lost; when the
    first attempt had committed, the retry fails its precondition against our own write.
    The heartbeat took that for a takeover and the babysitter stopped."""
    lease = GcsLease(URI, ttl_s=60)
    lease.claim("run shared")
    committed = GcsLease(URI, ttl_s=60, holder=lease.holder)  # that first attempt
    committed.generation = lease.generation
    assert committed.heartbeat()
    assert lease.heartbeat()  # its generation is stale, but the lease holds its own record
    assert lease.lost is None and lease.generation == committed.generation
    assert lease.heartbeat()
