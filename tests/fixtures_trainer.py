"""Trainer test fixtures: eight virtual CPU devices, the tiny recipe, multi-process launches.

XLA reads the device count once, when jax's CPU backend starts, so it is set here at plugin
import time, before any test module imports jax. Eight devices let one process hold the same
data=2 x fsdp=4 mesh that the 4-process tests spread over four processes.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pytest

DEVICES_FLAG = "--xla_force_host_platform_device_count"
if DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICES_FLAG}=8".strip()

REPO = Path(__file__).resolve().parent.parent
TINY_RECIPE = REPO / "recipes" / "tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPUCTL_")}
    env["XLA_FLAGS"] = f"{DEVICES_FLAG}={devices}"
    env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


def launch_trainer(
    args: list[str],
    processes: int,
    devices_per_process: int,
    cwd: Path,
    args_of: Mapping[int, list[str]] | None = None,
    meet_at: str = "TPUCTL_COORDINATOR",
    **extra_env: str,
) -> list[subprocess.Popen]:
    """Start `python -m trainer ARGS` as `processes` jax.distributed processes (or one plain
    one); process i gets `args_of[i]` after ARGS too."""
    command = [sys.executable, "-m", "trainer", *args]
    return launch_processes(
        command, processes, devices_per_process, cwd, args_of, meet_at, **extra_env
    )


def launch_processes(
    command: list[str],
    processes: int,
    devices_per_process: int,
    cwd: Path,
    args_of: Mapping[int, list[str]] | None = None,
    meet_at: str = "TPUCTL_COORDINATOR",
    **extra_env: str,
) -> list[subprocess.Popen]:
    """Start `command` as `processes` jax.distributed processes joined as tpuctl joins them
    (TPUCTL_COORDINATOR and friends), or as one plain process; process i gets `args_of[i]`
    after `command`'s arguments. `meet_at` TPUCTL_RENDEZVOUS names the meeting point as
    tpuctl does on a TPU pod, where jax finds the coordinator itself."""
    port = free_port()
    procs = []
    for index in range(processes):
        env = trainer_env(devices_per_process, **extra_env)
        if processes > 1:
            env |= {
                meet_at: f"127.0.0.1:{port}",
                "TPUCTL_NUM_PROCESSES": str(processes),
                "TPUCTL_PROCESS_ID": str(index),
            }
        procs.append(
            subprocess.Popen(
                [*command, *(args_of or {}).get(index, [])],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(exit code, output) of each process; kills the rest if one overruns the deadline."""
    results = []
    try:
        for proc in procs:
            output, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, output))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


COMPILE_CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
# A trainer the suite kills on a gs:// run directory (SIGKILL, a test pod taken away, a
# failure's exit) leaves its lease (trainer.run_lock) behind, which the relaunch waits out:
# 5 s rather than a real run's 60, for every trainer the suite starts.
LEASE_TTL_ENV, LEASE_TTL_S = "TPUCTL_LEASE_TTL", "5"
_COMPILE_CACHE = pytest.StashKey[str]()  # the suite's cache directory, for its removal


def pytest_configure(config: pytest.Config) -> None:
    """One jax compile cache for every trainer process the suite starts: the suite's hundreds
    of starts compile a handful of distinct programs, and each start after the first loads
    them. Made once, by the process that starts the run: pytest-xdist's workers inherit it
    from its environment, as processes started by tests and a local pod's workers do; an SSH
    test pod's hosts get it through `--env` (`worker_env_args`), and see it because it
    is in /var/tmp, not in their private /tmp. As a user's own JAX_COMPILATION_CACHE_DIR
    does, it takes the place of the run directory's cache; tests/test_trainer_compile_cache.py
    removes it to test that one, and tests/test_readme.py because a reader's shell has no
    such setting."""
    if hasattr(config, "workerinput"):  # an xdist worker: its controller made the cache
        return
    path = tempfile.mkdtemp(prefix="tpuctl-jax-cache-", dir="/var/tmp")
    config.stash[_COMPILE_CACHE] = path
    os.environ[COMPILE_CACHE_ENV[0]] = path
    os.environ[COMPILE_CACHE_ENV[1]] = "0"  # small programs too
    os.environ[LEASE_TTL_ENV] = LEASE_TTL_S


def pytest_unconfigure(config: pytest.Config) -> None:
    if path := config.stash.get(_COMPILE_CACHE, None):
        shutil.rmtree(path, ignore_errors=True)


def worker_env_args() -> list[str]:
    """`tpuctl run`/`babysit` flags that hand remote workers the suite's settings: the shared
    compile cache and the short lease TTL."""
    return [arg for name in (*COMPILE_CACHE_ENV, LEASE_TTL_ENV) for arg in ("--env", name)]


@pytest.fixture
def tiny_recipe() -> Path:
    return TINY_RECIPE


class SmallDisk:
    """A filesystem of its own (tmpfs of `size`) mounted at `path`, to fill up or make
    read-only: what a run directory on a full or read-only disk sees, errno and all."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True
        )

    def fill(self) -> None:
        """Write a file until the filesystem has no byte left."""
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        finally:
            os.close(fd)

    def make_read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path) -> SmallDisk:
    """A 16 MiB tmpfs (mounting needs root, as the suite runs), unmounted after the test."""
    disk = SmallDisk(tmp_path / "disk", "16m")
    yield disk
    disk.unmount()


def assert_all_exited_0(results: list[tuple[int, str]]) -> None:
    """Fail naming the first process that did not exit 0, with the end of its own output."""
    for index, (code, output) in enumerate(results):
        assert code == 0, (
            f"process {index} exited {code} (all: {[c for c, _ in results]}):\n{output[-3000:]}"
        )


def dot_types(lowered_text: str) -> list[tuple[str, str]]:
    """(operand types, result type) of every dot_general in a lowered StableHLO module."""
    return re.findall(r"dot_general.*?: \((.*?)\) -> (\S+)", lowered_text)
