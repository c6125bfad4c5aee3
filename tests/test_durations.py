"""Durations as users type them, and the clock that TPUCTL_TIME_SCALE speeds up."""

import re
import time

import pytest

from tpuctl.durations import Clock, check_seconds, format_duration, parse_duration, time_scale
from tpuctl.errors import TpuctlError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("45s", 45),
        ("30m", 1800),
        ("2h", 7200),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("1d", 86400),
    ],
)
def test_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "2 hours", "h2", "1h-5m"])
def test_parse_rejects_with_the_flag_name(text):
    with pytest.raises(TpuctlError, match=r"--retry-for .* is not a duration; use e\.g\. 90s"):
        parse_duration(text, "--retry-for")


def test_format():
    assert [format_duration(s) for s in (4.6, 65, 3600, 7260)] == ["5s", "1m05s", "1h00m", "2h01m"]


def test_scaled_clock_counts_full_sleeps_but_waits_little():
    clock = Clock(scale=0.001)
    start = time.monotonic()
    clock.sleep(100)
    assert time.monotonic() - start < 5
    assert 100 <= clock.elapsed() < 105


def test_time_scale_from_env(monkeypatch):
    monkeypatch.setenv("TPUCTL_TIME_SCALE", "0.5")
    assert time_scale() == 0.5
    monkeypatch.setenv("TPUCTL_TIME_SCALE", "fast")
    with pytest.raises(TpuctlError, match="TPUCTL_TIME_SCALE='fast' must be a number"):
        time_scale()


def test_the_example_a_bad_number_of_seconds_suggests_works_for_every_flag():
    """--grace takes a number, --interval a duration: the hint said 90s, which --grace refused."""
    with pytest.raises(TpuctlError) as refused:
        check_seconds(-5, "--grace")
    example = re.search(r"\(e\.g\. (.+)\)", str(refused.value))[1]
    assert float(example) == parse_duration(example, "--interval") == 90
