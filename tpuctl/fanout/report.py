"""How fan-out output reaches the user: one prefixed line per remote line as it arrives,
progress while workers are still running, and a summary at the end.

Remote stdout goes to stdout and remote stderr to stderr, each line prefixed `[w03]`
(coloured on a terminal, plain when piped); progress and the summary go to stderr, so
`tpuctl exec -- cat f | sort` sees only the workers' output.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from tpuctl.fanout.base import Host, HostResult, StopSignal
from tpuctl.wording import plural

PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "bright_cyan", "bright_magenta")
TAIL_LINES = 5
WAITING_SHOWN = 8
READER_GONE = "stopped because the output's reader went away (a `| head` that had enough)"


class Reporter:
    """Streams lines and progress for one fan-out. Use `on_line`/`on_result` as the
    fan-out's callbacks, then `summary(results)`. A context manager: the progress ticker
    runs while inside."""

    def __init__(
        self,
        hosts: Sequence[Host],
        *,
        stream_lines: bool = True,
        progress_every: float = 5.0,
        color: bool | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
        stop: StopSignal | None = None,
    ) -> None:
        """`stop`: the fan-out's, set when a stream the lines go to is closed."""
        self.hosts = list(hosts)
        self.stop = stop
        self._gone: set[int] = set()  # ids of the streams whose reader went away
        self.stream_lines = stream_lines
        self.progress_every = progress_every
        self.out, self.err = out or sys.stdout, err or sys.stderr
        # Each stream is coloured only when it is a terminal: `exec ... | sort` gets plain
        # lines on stdout while the summary on the terminal stays coloured.
        self._colored = {
            id(stream): _wants_color(stream) if color is None else color
            for stream in (self.out, self.err)
        }
        self._styles = {h.label: PALETTE[i % len(PALETTE)] for i, h in enumerate(self.hosts)}
        self._lock = threading.Lock()
        self._done: set[str] = set()
        self._finished = threading.Event()
        self._ticker: threading.Thread | None = None
        self._console = None  # rich, created on first coloured line
        self.started = time.monotonic()

    def __enter__(self) -> Reporter:
        self.started = time.monotonic()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._finished.set()
        if self._ticker is not None:
            self._ticker.join()

    def on_line(self, host: Host, stream: str, line: str) -> None:
        if not self.stream_lines:
            return
        target = self.out if stream == "stdout" else self.err
        with self._lock:
            if id(target) in self._gone:
                return
            prefix = self._paint(f"[{host.label}]", self._styles.get(host.label), target)
            try:
                target.write(f"{prefix} {line}\n")
                target.flush()
            except BrokenPipeError:
                # `tpuctl exec -- cat LOG | head`: nobody reads the rest, so the workers
                # stop as after Ctrl-C, rather than run on unseen (or the write's error
                # passing for a lost connection).
                self._gone.add(id(target))
                if self.stop is not None:
                    self.stop.set(READER_GONE)

    def on_result(self, result: HostResult) -> None:
        with self._lock:
            self._done.add(result.host.label)

    def progress_line(self) -> str:
        """`29/32 done, waiting on w04 w17 w30` (at most WAITING_SHOWN names)."""
        with self._lock:
            waiting = [h.label for h in self.hosts if h.label not in self._done]
        shown = " ".join(waiting[:WAITING_SHOWN])
        more = f" (+{len(waiting) - WAITING_SHOWN} more)" if len(waiting) > WAITING_SHOWN else ""
        elapsed = time.monotonic() - self.started
        done = len(self.hosts) - len(waiting)
        return f"{done}/{len(self.hosts)} done after {elapsed:.0f} s, waiting on {shown}{more}"

    def _tick(self) -> None:
        while not self._finished.wait(self.progress_every):
            line = self.progress_line()
            with self._lock:
                self.err.write(self._paint(line, "dim", self.err) + "\n")
                self.err.flush()

    def summary(self, results: Sequence[HostResult], interrupted: bool = False) -> str:
        """The end-of-run summary (also written to stderr): who succeeded, who failed with
        which exit code and last lines, who could not be reached or timed out."""
        text = "\n".join(
            summary_lines(
                results, interrupted, lambda text, style: self._paint(text, style, self.err)
            )
        )
        with self._lock:
            self.err.write(text + "\n")
            self.err.flush()
        return text

    def _paint(self, text: str, style: str | None, stream: TextIO) -> str:
        if not self._colored[id(stream)] or style is None:
            return text
        from rich.text import Text

        if self._console is None:
            from rich.console import Console

            self._console = Console(force_terminal=True, color_system="standard", width=10_000)
        with self._console.capture() as capture:
            self._console.print(Text(text, style=style), end="")
        return capture.get()


def _wants_color(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


def summary_lines(results: Sequence[HostResult], interrupted: bool, paint) -> list[str]:
    total = len(results)
    ok = [r for r in results if r.ok]
    failed = [r for r in results if r.error is None and not r.ok]
    unreachable = [r for r in results if r.unreachable]
    stopped = [r for r in results if r.error is not None and not r.unreachable]
    if len(ok) == total:
        every = "all " if total > 1 else ""
        return [paint(f"✓ {every}{plural(total, 'worker')} succeeded", "bold green")]
    heading = "interrupted: " if interrupted else ""
    lines = [paint(f"✗ {heading}{len(ok)}/{plural(total, 'worker')} succeeded", "bold red")]
    if failed:
        by_code: dict[int | None, list[str]] = {}
        for result in failed:
            by_code.setdefault(result.exit_code, []).append(result.host.label)
        codes = ", ".join(f"{label_runs(labels)} (exit {code})" for code, labels in by_code.items())
        lines.append(paint(f"failed: {codes}", "red"))
    for result in unreachable:
        reason = result.error.split(": ", 1)[-1] if result.error else ""
        lines.append(
            paint(f"unreachable: {result.host.label} ({result.host.address}): {reason}", "red")
        )
    if stopped:
        by_reason: dict[str, list[str]] = {}
        for result in stopped:
            by_reason.setdefault(str(result.error), []).append(result.host.label)
        for reason, labels in by_reason.items():
            lines.append(paint(f"{reason}: {label_runs(labels)}", "yellow"))
    lines.extend(_last_lines_of(failed, paint))
    return lines


def _last_lines_of(failed: list[HostResult], paint) -> list[str]:
    """Each failing worker's last lines, shown once for all the workers that ended with the
    same ones: 32 workers failing alike are one block, not 32 copies of it."""
    groups: dict[tuple[str, ...], list[HostResult]] = {}
    for result in failed:
        if tail := last_lines(result):
            # A cut tail stays its worker's own: its note gives that worker's sizes.
            key = tuple(tail) if cut_note(result) is None else (result.host.label, *tail)
            groups.setdefault(key, []).append(result)
    lines = []
    for group in groups.values():
        label = label_runs([r.host.label for r in group])
        same = f" (the same on all {len(group)})" if len(group) > 1 else ""
        lines.append(f"--- last lines of {label}{same} ---")
        lines.extend(f"[{label}] {line}" for line in last_lines(group[0]))
        if note := cut_note(group[0]):
            lines.append(paint(note, "dim"))
    return lines


def label_runs(labels: list[str]) -> str:
    """Worker labels with each run of three or more consecutive workers as a range:
    `w00-w31`, `w01 w03 w05-w09`."""
    runs: list[list[tuple[str, int | None]]] = []
    for label in labels:
        number = int(label[1:]) if label[:1] == "w" and label[1:].isdigit() else None
        previous = runs[-1][-1][1] if runs else None
        if number is not None and previous is not None and number == previous + 1:
            runs[-1].append((label, number))
        else:
            runs.append([(label, number)])
    return " ".join(
        f"{run[0][0]}-{run[-1][0]}" if len(run) >= 3 else " ".join(label for label, _ in run)
        for run in runs
    )


def _shown(result: HostResult) -> tuple[str, str, int]:
    """The stream the summary shows of a failing worker: stderr if it wrote any, else
    stdout; (its name, its text, how many bytes before that text were not kept)."""
    if result.stderr.strip():
        return "stderr", result.stderr, result.stderr_dropped
    return "stdout", result.stdout, result.stdout_dropped


def last_lines(result: HostResult, count: int = TAIL_LINES) -> list[str]:
    """The failing worker's last lines: stderr's if it wrote any, else stdout's."""
    _, text, _ = _shown(result)
    return text.rstrip("\n").splitlines()[-count:] if text.strip() else []


def cut_note(result: HostResult, count: int = TAIL_LINES) -> str | None:
    """What to say under `last_lines` when they begin where the kept output does, so that
    the first of them, or lines before it, were cut off (the fan-out kept only a tail of a
    streamed command's output); None when they are whole."""
    stream, text, dropped = _shown(result)
    if not dropped or len(text.rstrip("\n").splitlines()) > count:
        return None
    return (
        f"({result.host.label}'s {stream} kept here is its last {_size(len(text.encode()))}; "
        f"the {_size(dropped)} before were streamed above, not kept, so the first line shown "
        "may be cut)"
    )


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / (1024 * 1024):.1f} MiB"
