"""benchmarks/data_cache.py runs, at a tiny size, as its README row says: our builder and
Hugging Face `datasets` make the same number of tokens of one corpus, and the first batch
comes from the existing cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_token_cache_benchmark_runs_both_sides_on_the_same_tokens(tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, str(REPO / "benchmarks" / "data_cache.py"),
               "--corpus-mb", "2", "--rounds", "1", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    medians = json.loads(out.read_text())["medians"]
    assert medians["ours"]["tokens"] == medians["datasets"]["tokens"] > 0
    assert medians["first_batch"]["rows"] == 512
