"""Shared pytest configuration. Fixtures live in tests/fixtures_*.py, one file per real part
(the fake Cloud TPU API, the sshd test pod, the GCS emulator, offline worker
preparation), registered here."""

import os
import signal

pytest_plugins: list[str] = [
    "tests.fixtures_gcs",
    "tests.fixtures_tpu",
    "tests.fixtures_pod",
    "tests.fixtures_trainer",
    "tests.fixtures_workerenv",
]

# Connection holders (tpuctl.fanout.holder) outlive the command that starts them: the
# suite's commands run cold, and tests/test_holder.py turns reuse on where it tests it.
os.environ["TPUCTL_SSH_REUSE"] = "off"


def pytest_configure(config) -> None:
    """pytest-xdist starts its workers with SIGINT ignored, and every process a test starts
    would inherit that: the tests of Ctrl-C need it delivered, as in a user's shell."""
    if hasattr(config, "workerinput"):
        signal.signal(signal.SIGINT, signal.default_int_handler)
