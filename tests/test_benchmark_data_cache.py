"""benchmarks/data_cache.py runs, at a tiny size, as its README row says: our builder and
Hugging Face `datasets` make the same number of tokens of one corpus, and the first batch
comes from the existing cache."""

from __future__ import annotations

from tests.benchmark_runs import run_benchmark


def test_the_token_cache_benchmark_runs_both_sides_on_the_same_tokens(tmp_path):
    figures, _ = run_benchmark(
        "data_cache.py", ["--corpus-mb", "2", "--rounds", "1"], tmp_path / "result.json"
    )
    medians = figures["medians"]
    assert medians["ours"]["tokens"] == medians["datasets"]["tokens"] > 0
    assert medians["first_batch"]["rows"] == 512
