"""Running a script of benchmarks/ the way a reader does, for the tests that check it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# What the suite's fixtures set and a reader's shell has not: test XLA_FLAGS (8 CPU
# devices), tpuctl settings, state and config directories.
DROPPED = ("XLA_FLAGS", "TPUCTL_", "XDG_")


def run_benchmark(
    script: str, args: list[str], out: Path, out_flag: str = "--out"
) -> tuple[dict[str, Any], subprocess.CompletedProcess]:
    """Run `benchmarks/script` with `args` in a reader's environment; the JSON it wrote to
    `out` and the finished process (which must have exited 0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED)}
    command = [sys.executable, str(REPO / "benchmarks" / script), *args, out_flag, str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result
