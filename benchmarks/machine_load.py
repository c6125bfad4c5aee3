"""The machine's load around a benchmark run.

Figures mean something only when taken on a quiet machine, so every benchmark records the
load averages before and after its run and warns when the machine was busy before it
started. Only the load before the run tells other work apart: during the run and after it,
the benchmark's own processes (sshd hosts, trainer processes) count too.
"""

from __future__ import annotations

import os
import sys


def before_run() -> list[float]:
    """The 1, 5 and 15 minute load averages now, with a warning on stderr when the 1-minute
    one passes the CPU count: other work is running, and it skews every figure."""
    load = list(os.getloadavg())
    cpus = os.cpu_count() or 1
    if load[0] > cpus:
        print(
            f"warning: load average {load[0]:.1f} before the run on {cpus} CPUs: other work "
            f"skews every figure; rerun once the load average is under {cpus}",
            file=sys.stderr,
        )
    return load


def after_run() -> list[float]:
    """The 1, 5 and 15 minute load averages now (the benchmark's own load included)."""
    return list(os.getloadavg())
