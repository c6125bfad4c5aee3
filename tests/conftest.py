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


def pytest_collection_modifyitems(config, items) -> None:
    """Files with slow tests first: the two test processes take whole files in collection
    order (scripts/test turns off xdist's reordering by test count), so a file of a few long
    tests started last (test_readme.py) no longer ends the run alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
