"""benchmarks/preference_throughput.py runs, at the tiny size, as the README's DPO row runs
it at the reference size: our DPO step and TRL's DPOTrainer both train on the same pairs,
and the figures it reports agree with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_dpo_benchmark_times_both_sides_and_reports_their_ratio(tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, str(REPO / "benchmarks" / "preference_throughput.py"),
               "--size", "tiny", "--batch", "2", "--seq-len", "32", "--rounds", "1",
               "--steps", "1", "--allocator", "system", "--json", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a reader's
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert (figures["model"], figures["pairs_per_step"], figures["seq_len"]) == ("tiny", 2, 32)
    ours, peer = figures["ours_pairs_per_s"], figures["peer_pairs_per_s"]
    assert ours > 0 and peer > 0 and "DPOTrainer" in figures["peer"]
    assert figures["speedup_over_peer"] == pytest.approx(ours / peer)
    assert figures["target_met"] == (ours / peer >= figures["target_speedup"])
