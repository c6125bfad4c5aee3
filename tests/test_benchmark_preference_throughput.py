"""benchmarks/preference_throughput.py runs, at the tiny size, as the README's DPO row runs
it at the reference size: our DPO step and TRL's DPOTrainer both train on the same pairs,
and the figures it reports agree with each other."""

from __future__ import annotations

import pytest

from tests.benchmark_runs import run_benchmark


def test_the_dpo_benchmark_times_both_sides_and_reports_their_ratio(tmp_path):
    args = ["--size", "tiny", "--batch", "2", "--seq-len", "32", "--rounds", "1", "--steps", "1",
            "--allocator", "system"]  # fmt: skip
    out = tmp_path / "result.json"
    figures, _ = run_benchmark("preference_throughput.py", args, out, out_flag="--json")
    assert (figures["model"], figures["pairs_per_step"], figures["seq_len"]) == ("tiny", 2, 32)
    ours, peer = figures["ours_pairs_per_s"], figures["peer_pairs_per_s"]
    assert ours > 0 and peer > 0 and "DPOTrainer" in figures["peer"]
    assert figures["speedup_over_peer"] == pytest.approx(ours / peer)
    assert figures["target_met"] == (ours / peer >= figures["target_speedup"])
