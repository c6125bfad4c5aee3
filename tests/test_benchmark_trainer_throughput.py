"""benchmarks/trainer_throughput.py runs, at the tiny size, as the README's Performance row
runs it at the reference size: our jitted step and the transformers + torch peer both train,
and the figures it reports agree with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_trainer_benchmark_times_both_sides_and_reports_their_ratio(tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, str(REPO / "benchmarks" / "trainer_throughput.py"),
               "--size", "tiny", "--batch", "2", "--seq", "64", "--rounds", "1", "--steps", "1",
               "--allocator", "system", "--out", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a reader's
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert (figures["model"], figures["batch"], figures["seq_len"]) == ("tiny", 2, 64)
    ours, peer = figures["ours_tokens_per_s"], figures["peer_tokens_per_s"]
    assert ours > 0 and peer > 0
    assert figures["speedup_over_peer"] == pytest.approx(ours / peer)
    assert 0 < figures["ours_mfu"] < 1 and len(figures["load_average_before"]) == 3
    assert f"ours/peer = {ours / peer:.2f}x" in result.stderr  # the summary line
