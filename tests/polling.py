"""Waiting on a condition with a deadline: the tests' only way to synchronise (no fixed sleeps)."""

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Generous: the suite shares 2 cores, and a met condition returns at once anyway.
DEFAULT_TIMEOUT_S = 120.0


def wait_for(
    condition: Callable[[], T], timeout: float = DEFAULT_TIMEOUT_S, what: str = "condition"
) -> T:
    """Poll `condition` until it returns something truthy, and return that; fail the test
    with `what` named if the deadline passes first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def stopped(pid: int) -> bool:
    """Whether every thread of process `pid` has stopped (SIGSTOP is delivered
    asynchronously: a thread may still write for a moment after `send_signal` returns)."""
    from pathlib import Path

    states = [
        (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        for task in Path(f"/proc/{pid}/task").iterdir()
    ]
    return all(state in ("T", "t") for state in states)
