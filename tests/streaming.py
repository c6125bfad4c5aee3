"""A chatty command for the tests of streamed output: 64 MiB of stdout, as `tail -f` on a
busy log or a long verbose command on many workers adds up to, and what it costs here."""

from __future__ import annotations

import threading
import tracemalloc
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

LINE_BYTES = 1024
LINES = 65536  # of LINE_BYTES each, then `last`: 64 MiB
CHATTY = f"""yes "$(printf '%0{LINE_BYTES - 1}d' 0)" | head -n {LINES}; echo last; echo err >&2"""
CHATTY_STDOUT_BYTES = LINES * LINE_BYTES + len("last\n")


class Counter:
    """An `on_line` that counts what each stream brings, keeping none of it."""

    def __init__(self) -> None:
        self.lines = {"stdout": 0, "stderr": 0}
        self.chars = {"stdout": 0, "stderr": 0}
        self.last = {"stdout": "", "stderr": ""}
        self._lock = threading.Lock()

    def __call__(self, _host: object, stream: str, line: str) -> None:
        with self._lock:
            self.lines[stream] += 1
            self.chars[stream] += len(line) + 1
            self.last[stream] = line


def peak_traced(action: Callable[[], T]) -> tuple[T, int]:
    """`action()`'s value, and the most memory Python held for it at once, in bytes."""
    tracemalloc.start()
    try:
        value = action()
        return value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_streamed_with_its_tail_kept(result: Any, counter: Counter, tail_bytes: int) -> None:
    """`result` (a HostResult of CHATTY run with `keep_tail=tail_bytes`) kept only the last
    `tail_bytes` of stdout, and `counter` saw every line of it."""
    assert result.ok, result.stderr
    assert counter.lines == {"stdout": LINES + 1, "stderr": 1}
    assert counter.chars["stdout"] == CHATTY_STDOUT_BYTES and counter.last["stdout"] == "last"
    assert len(result.stdout) == tail_bytes and result.stdout.endswith("0\nlast\n")
    assert result.stdout_dropped == CHATTY_STDOUT_BYTES - tail_bytes
    assert (result.stderr, result.stderr_dropped) == ("err\n", 0)
