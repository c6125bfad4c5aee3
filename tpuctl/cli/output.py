"""Shared rendering for commands: consoles, JSON output, a live status line.

Progress and diagnostics go to stderr so that stdout stays clean for `--json`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tpuctl.durations import format_duration

if TYPE_CHECKING:
    from rich.console import Console


class _LazyConsole:
    """A rich Console made on first use: importing rich is a tenth of a cold `tpuctl exec`,
    whose lines and summary are plain writes. Everything else is the Console's own."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return getattr(self._console, name)


console: Console = _LazyConsole(highlight=False, soft_wrap=True)  # type: ignore[assignment]
err_console: Console = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)  # type: ignore[assignment]


def print_json(data: Any) -> None:
    """Write `data` as indented JSON on stdout (no colour, no wrapping: for scripts). NaN
    and infinities (a diverged run's loss) become null: they are not JSON, and strict
    parsers (jq, JavaScript's JSON.parse) reject the whole document."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data


PIPED_WIDTH = 250  # piped tables get whole rows (for grep and scripts), not 80 squeezed columns


def print_table(table: Any) -> None:
    """Print a rich Table on stdout: at the terminal's width there, and wide when piped."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.console import Console

    Console(highlight=False, width=PIPED_WIDTH).print(table)


class StatusLine:
    """A live spinner line on stderr; each `update` also leaves a permanent, timestamped line.

    The permanent lines keep the history (state transitions, retries) visible in logs and
    non-terminal output; the spinner shows the current state and elapsed time.

        with StatusLine("creating alice-v3-32") as status:
            status.update("CREATING")
    """

    def __init__(self, title: str, console: Console | None = None):
        self.title = title
        self.console = console or err_console
        self.started = time.monotonic()
        self._live = None

    def __enter__(self) -> StatusLine:
        self.started = time.monotonic()
        if self.console.is_terminal:
            self._live = self.console.status(self.title)
            self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def update(self, message: str) -> None:
        """Record a new state or event: printed once, and shown on the spinner."""
        from rich.markup import escape

        stamp = format_duration(self.elapsed)
        self.console.print(f"[dim]{stamp:>6}[/dim]  {escape(message)}")
        if self._live is not None:
            self._live.update(f"{self.title}: {message} ({stamp})")
