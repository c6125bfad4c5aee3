"""The processes of a pod meet before jax joins them; one that fails first ends the others."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fixtures_trainer import free_port
from trainer.config import TrainerError
from trainer.contract import EXIT_BAD_INPUT, EXIT_PEER_LOST
from trainer.rendezvous import Failure, PodStartFailed, join, tell_failure

COUNT = 3
LONG_S = 600.0  # the deadline: a test that passed promptly did not wait for it


def _outcome(call) -> str | tuple[str, int]:
    try:
        call()
    except PodStartFailed as e:
        return str(e), e.status
    return "joined"


def test_every_process_arriving_joins():
    address = f"127.0.0.1:{free_port()}"
    with ThreadPoolExecutor(COUNT) as pool:
        outcomes = list(
            pool.map(lambda i: _outcome(lambda: join(address, COUNT, i, LONG_S)), range(COUNT))
        )
    assert outcomes == ["joined"] * COUNT


@pytest.mark.parametrize("failing", [0, 2], ids=["process 0", "another process"])
def test_a_process_that_fails_first_ends_the_others_with_its_line_and_status(failing):
    address = f"127.0.0.1:{free_port()}"
    failure = Failure(failing, "recipe key train.steps must be at least 1", EXIT_BAD_INPUT)

    def process(index: int):
        if index == failing:
            return _outcome(lambda: tell_failure(address, COUNT, failure))
        if index == 1:
            time.sleep(0.5)  # a slower process arrives after the failure is known
        return _outcome(lambda: join(address, COUNT, index, LONG_S))

    started = time.monotonic()
    with ThreadPoolExecutor(COUNT) as pool:
        outcomes = list(pool.map(process, range(COUNT)))
    told = (f"process {failing} failed before joining the pod: {failure.message}", 2)
    assert outcomes == [
        "joined" if i == failing else told for i in range(COUNT)
    ]  # the failing one only tells
    assert time.monotonic() - started < 30


def test_two_processes_that_fail_together_each_end_promptly():
    address = f"127.0.0.1:{free_port()}"
    failures = [Failure(i, f"broken on host {i}", 1) for i in range(2)]
    started = time.monotonic()
    with ThreadPoolExecutor(COUNT) as pool:
        told = [pool.submit(tell_failure, address, COUNT, f) for f in failures]
        waiting = pool.submit(_outcome, lambda: join(address, COUNT, 2, LONG_S))
        assert waiting.result() == ("process 0 failed before joining the pod: broken on host 0", 1)
        for future in told:
            future.result()
    assert time.monotonic() - started < 30


def test_a_process_missing_at_the_deadline_is_named():
    """...and the others exit as when a process dies (69), not with bad input's 2: the
    missing one died or hung while starting, so `tpuctl babysit` relaunches the run rather
    than give it up as a bad recipe."""
    address = f"127.0.0.1:{free_port()}"
    with ThreadPoolExecutor(2) as pool:
        zero = pool.submit(join, address, COUNT, 0, 1.0)
        one = pool.submit(join, address, COUNT, 1, 1.0)
        with pytest.raises(TrainerError, match=r"only 2 of 3 workers joined .* ids 2\)") as e0:
            zero.result()
        with pytest.raises(TrainerError, match="process 0 did not release this worker") as e1:
            one.result()
    assert e0.value.status == e1.value.status == EXIT_PEER_LOST != EXIT_BAD_INPUT
