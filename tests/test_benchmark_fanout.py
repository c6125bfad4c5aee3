"""benchmarks/fanout.py runs, at one worker and one run, as the README's fan-out row runs it
at 1 to 128: tpuctl cold and warm against pdsh on its own sshd pod, the 512-worker local pod,
and put cold and warm, with the figures its JSON promises."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.benchmark_runs import run_benchmark
from tests.fixtures_pod import NOT_ROOT

pytestmark = pytest.mark.pod


def test_the_fanout_benchmark_times_tpuctl_cold_warm_and_put_against_pdsh(tmp_path):
    if os.geteuid() != 0:
        pytest.skip(NOT_ROOT)
    if not shutil.which("pdsh"):
        pytest.skip("pdsh is not installed (scripts/test installs it as root)")
    args = ["--sizes", "1", "--runs", "1"]
    figures, result = run_benchmark("fanout.py", args, tmp_path / "result.json", "--json")
    one = figures["workers"]["1"]
    assert set(one) == {"cold", "warm", "pdsh"} and all(t > 0 for t in one.values())
    assert all(t > 0 for t in figures["put_s"]["1"].values()) and figures["local_512_s"] > 0
    assert figures["cpu_s"]["warm-1"]["client_cpu"] > 0
    assert "512 local workers" in result.stdout
