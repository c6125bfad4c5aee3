"""One trainer per run directory: process 0 holds `{run_dir}/trainer.lock` while the run lives.

Two trainers on one run directory (a job started again by hand while it still runs, a
relaunch next to a job nobody stopped) would train side by side, save the same step numbers
over each other's checkpoints, delete each other's saves in progress (orbax clears what it
takes for leftovers of a killed save) and mix their metrics: neither fails, and the run's
checkpoints are no longer any one run's. The lock is an `flock` on a file beside the run's
files: the kernel drops it when its process ends, however it ends (SIGKILL included), so a
dead trainer never leaves it behind. Only local run directories are locked; a gs:// one has
no such lock (GCS has no lock that dies with its holder).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator

from trainer import io

LOCK_FILE = "trainer.lock"


class RunDirUnusable(Exception):
    """The run directory cannot be held; the message says why and what to do."""


class RunDirInUse(RunDirUnusable):
    """Another live trainer holds the run directory; the message names it."""


@contextlib.contextmanager
def hold(run_dir: str) -> Iterator[None]:
    """Hold `run_dir` for this trainer until the block ends; RunDirInUse when another
    trainer holds it, RunDirUnusable when it cannot be written. A no-op for gs:// run
    directories."""
    if io.is_gcs(run_dir):
        yield
        return
    path = os.path.join(os.path.abspath(run_dir), LOCK_FILE)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # read-only, no permission, a file in the way: nothing to train into
        raise RunDirUnusable(
            f"run_dir {os.path.dirname(path)} cannot be written ({e.strerror or e}): make it "
            "writable, or set another run_dir"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise RunDirInUse(
                f"run_dir {os.path.dirname(path)} is in use by another trainer ({holder}): "
                "a second one would save over its checkpoints; wait for it to end or stop it, "
                "or set another run_dir"
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {started}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
