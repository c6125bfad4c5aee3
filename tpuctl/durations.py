"""Durations as users type them (`90s`, `30m`, `2h`, `1h30m`) and a clock that tests can speed up.

`TPUCTL_TIME_SCALE` (default 1) multiplies every wait tpuctl makes through a Clock (API
polling, stockout backoff) while the clock still counts the full, unscaled time. Tests
set it small so that a 2-hour retry schedule runs in milliseconds yet prints, and is
bounded by, the real schedule.
"""

from __future__ import annotations

import math
import os
import re
import time

from tpuctl.errors import TpuctlError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(text: str, flag: str = "duration", allow_zero: bool = False) -> float:
    """Seconds in `text` such as 45s, 30m, 2h, 1h30m or a bare number of seconds; more
    than 0 (or 0 too, with `allow_zero`) and finite, else a TpuctlError naming `flag`."""
    cleaned = text.strip().lower()
    try:
        return check_seconds(float(cleaned), flag, allow_zero)
    except ValueError:
        pass
    parts = _PART_RE.findall(cleaned)
    if not parts or "".join(n + u for n, u in parts) != cleaned:
        raise TpuctlError(f"{flag} {text!r} is not a duration; use e.g. 90s, 30m, 2h or 1h30m")
    return check_seconds(sum(float(n) * _UNITS[u] for n, u in parts), flag, allow_zero)


def check_seconds(seconds: float, flag: str, allow_zero: bool = False) -> float:
    """`seconds` if it is a finite number above 0 (or 0, with `allow_zero`), else a
    TpuctlError naming `flag`: -1 and nan would make waits that end at once or never."""
    if math.isfinite(seconds) and (seconds > 0 or (allow_zero and seconds == 0)):
        return seconds
    least = "0 or more" if allow_zero else "more than 0"
    raise TpuctlError(f"{flag} {seconds:g}: give a finite number of seconds, {least} (e.g. 90)")


def format_duration(seconds: float) -> str:
    """Short human duration: 42s, 3m05s, 2h10m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def time_scale() -> float:
    """The factor applied to real waits (TPUCTL_TIME_SCALE), 1.0 unless set."""
    raw = os.environ.get("TPUCTL_TIME_SCALE", "")
    try:
        scale = float(raw) if raw else 1.0
    except ValueError:
        raise TpuctlError(f"TPUCTL_TIME_SCALE={raw!r} must be a number such as 0.01") from None
    if scale <= 0:
        raise TpuctlError("TPUCTL_TIME_SCALE must be greater than 0")
    return scale


class Clock:
    """Elapsed time and sleeping, with sleeps shortened by the time scale but counted in full."""

    def __init__(self, scale: float | None = None):
        self.scale = time_scale() if scale is None else scale
        self._start = time.monotonic()
        self._skipped = 0.0  # seconds of sleep that the scale skipped

    def elapsed(self) -> float:
        """Seconds since the clock started, as if every sleep had been taken in full."""
        return time.monotonic() - self._start + self._skipped

    def sleep(self, seconds: float) -> None:
        """Wait `seconds` (scaled in real time)."""
        if seconds <= 0:
            return
        time.sleep(seconds * self.scale)
        self._skipped += seconds * (1 - self.scale)
