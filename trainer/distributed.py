"""Join the other processes of a multi-host run with jax.distributed.

tpuctl sets TPUCTL_COORDINATOR (host:port), TPUCTL_NUM_PROCESSES and TPUCTL_PROCESS_ID on CPU
test pods and local pods; on a TPU VM, jax detects the pod itself. Either way a worker waits at
most TPUCTL_INIT_TIMEOUT seconds (default 900, long enough for cold restarts after a
preemption) for the others, then fails with a message saying the run was not started everywhere.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from trainer.config import MESH_AXES, MeshConfig, RecipeError, TrainerError

DEFAULT_TIMEOUT_S = 900
CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


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


def cpu_devices_flags(mesh: MeshConfig, environ: Mapping[str, str]) -> str | None:
    """XLA_FLAGS giving a plain machine's CPU the devices the recipe's mesh needs, or None.

    A single process on a machine without TPUs (no TPUCTL_COORDINATOR: tpuctl sets the
    device count on its pods itself) and without a device count in XLA_FLAGS has one CPU
    device, so `python -m trainer recipes/tiny.yaml` (data=2) would stop at the mesh check.
    The flag only shapes the CPU platform: on a GPU or TPU the mesh check stays as it is.
    """
    flags = environ.get("XLA_FLAGS", "")
    if CPU_DEVICES_FLAG in flags or environ.get("TPUCTL_COORDINATOR") or on_tpu_vm():
        return None
    needed = math.prod(size for axis in MESH_AXES if (size := getattr(mesh, axis)) != -1)
    if needed <= 1:
        return None
    return f"{flags} {CPU_DEVICES_FLAG}={needed}".strip()


def provide_cpu_devices(mesh: MeshConfig) -> None:
    """Set XLA_FLAGS from `cpu_devices_flags`; call before jax starts (it reads them once)."""
    flags = cpu_devices_flags(mesh, os.environ)
    if flags is not None:
        os.environ["XLA_FLAGS"] = flags


def initialize() -> None:
    """Call before any other jax use. Single process when neither TPUCTL_* nor a TPU is present."""
    import jax

    timeout = int(os.environ.get("TPUCTL_INIT_TIMEOUT", DEFAULT_TIMEOUT_S))
    explicit = coordinator_env()
    if explicit:
        address, count, index = explicit
        # jax aborts the whole process (no exception) when a peer never registers, so first
        # make sure every worker is there, with an error that says what happened.
        rendezvous(address, count, index, timeout)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, count, index, initialization_timeout=timeout)
    elif on_tpu_vm():
        jax.distributed.initialize(initialization_timeout=timeout)


def rendezvous(address: str, count: int, index: int, timeout: float) -> None:
    """Wait until all `count` processes reach this point, on the coordinator's own port (which
    jax's coordination service takes over right after), or raise TrainerError."""
    if count == 1:
        return
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    if index == 0:
        _gather(int(port), count, deadline, address)
    else:
        _report(host, int(port), index, deadline, address)


def _gather(port: int, count: int, deadline: float, address: str) -> None:
    peers: dict[int, socket.socket] = {}
    with socket.create_server(("", port), reuse_port=False) as server:
        server.settimeout(0.5)
        while len(peers) < count - 1:
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, count)) - set(peers))
                raise TrainerError(
                    f"only {len(peers) + 1} of {count} workers joined coordinator {address} "
                    f"(missing process ids {_ranges(missing)}): start the run on every worker of the "
                    "pod (tpuctl run does), or raise TPUCTL_INIT_TIMEOUT"
                )
            with contextlib.suppress(TimeoutError):
                conn, _ = server.accept()
                conn.settimeout(10)
                peers[int(conn.recv(16).decode() or -1)] = conn
        for conn in peers.values():
            conn.sendall(b"go")
        for conn in peers.values():  # peers close first, so no port is left in TIME_WAIT here
            with contextlib.suppress(OSError):
                conn.recv(1)
            conn.close()


def _report(host: str, port: int, index: int, deadline: float, address: str) -> None:
    while True:
        try:
            with socket.create_connection((host, port), timeout=2) as conn:
                conn.sendall(str(index).encode())
                conn.settimeout(max(deadline - time.monotonic(), 1))
                if conn.recv(2) == b"go":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TrainerError(
                f"not all workers joined coordinator {address}: process 0 did not release this "
                "worker in time; start the run on every worker of the pod (tpuctl run does), or "
                "raise TPUCTL_INIT_TIMEOUT"
            )
        time.sleep(0.2)


def _ranges(ids: list[int]) -> str:
    return ",".join(str(i) for i in ids[:8]) + ("..." if len(ids) > 8 else "")
