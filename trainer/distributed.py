"""Join the other processes of a multi-host run with jax.distributed.

tpuctl sets TPUCTL_COORDINATOR (host:port), TPUCTL_NUM_PROCESSES and TPUCTL_PROCESS_ID on CPU
test pods and local pods; on a TPU VM, jax detects the pod itself. Either way a worker waits at
most TPUCTL_INIT_TIMEOUT seconds (default 900, long enough for cold restarts after a
preemption) for the others, then fails with a message saying the run was not started everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.config import RecipeError

DEFAULT_TIMEOUT_S = 900


class TrainerError(RuntimeError):
    """A run-time failure with a one-line explanation (printed as `error: ...`)."""


def coordinator_env() -> tuple[str, int, int] | None:
    """(address, num_processes, process_id) from TPUCTL_* variables, None if unset."""
    address = os.environ.get("TPUCTL_COORDINATOR")
    if not address:
        return None
    try:
        count = int(os.environ["TPUCTL_NUM_PROCESSES"])
        index = int(os.environ["TPUCTL_PROCESS_ID"])
    except (KeyError, ValueError) as e:
        raise RecipeError(
            "TPUCTL_COORDINATOR is set, so TPUCTL_NUM_PROCESSES and TPUCTL_PROCESS_ID must be integers too"
        ) from e
    if not 0 <= index < count:
        raise RecipeError(f"TPUCTL_PROCESS_ID={index} must be in [0, TPUCTL_NUM_PROCESSES={count})")
    return address, count, index


def on_tpu_vm() -> bool:
    """A TPU VM exposes its chips as /dev/accel* or vfio devices; pods also name their workers."""
    return (
        bool(os.environ.get("TPU_WORKER_HOSTNAMES"))
        or any(Path("/dev").glob("accel*"))
        or Path("/dev/vfio").is_dir()
    )


def initialize() -> None:
    """Call before any other jax use. Single process when neither TPUCTL_* nor a TPU is present."""
    import jax

    timeout = int(os.environ.get("TPUCTL_INIT_TIMEOUT", DEFAULT_TIMEOUT_S))
    explicit = coordinator_env()
    if explicit is None and not on_tpu_vm():
        return
    try:
        if explicit:
            address, count, index = explicit
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(address, count, index, initialization_timeout=timeout)
        else:
            jax.distributed.initialize(initialization_timeout=timeout)
    except Exception as e:  # jax reports a missing peer as a generic runtime error
        where = f"coordinator {explicit[0]}" if explicit else "the TPU pod's coordinator"
        raise TrainerError(
            f"not all workers joined {where} within {timeout} s: start the run on every worker "
            f"of the pod (tpuctl run does), or raise TPUCTL_INIT_TIMEOUT ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
