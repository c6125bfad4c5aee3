"""benchmarks/trainer_throughput.py runs, at the tiny size, as the README's Performance row
runs it at the reference size: our jitted step and the transformers + torch peer both train,
and the figures it reports agree with each other."""

from __future__ import annotations

import pytest

from tests.benchmark_runs import run_benchmark


def test_the_trainer_benchmark_times_both_sides_and_reports_their_ratio(tmp_path):
    args = ["--size", "tiny", "--batch", "2", "--seq", "64", "--rounds", "1", "--steps", "1",
            "--allocator", "system"]  # fmt: skip
    figures, result = run_benchmark("trainer_throughput.py", args, tmp_path / "result.json")
    assert (figures["model"], figures["batch"], figures["seq_len"]) == ("tiny", 2, 64)
    ours, peer = figures["ours_tokens_per_s"], figures["peer_tokens_per_s"]
    assert ours > 0 and peer > 0
    assert figures["speedup_over_peer"] == pytest.approx(ours / peer)
    assert 0 < figures["ours_mfu"] < 1 and len(figures["load_average_before"]) == 3
    assert f"ours/peer = {ours / peer:.2f}x" in result.stderr  # the summary line
