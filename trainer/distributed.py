"""Join the other processes of a multi-host run with jax.distributed.

tpuctl sets TPUCTL_COORDINATOR (host:port), TPUCTL_NUM_PROCESSES and TPUCTL_PROCESS_ID on CPU
test pods and local pods; on a TPU VM, jax detects the pod itself, and tpuctl sets
TPUCTL_RENDEZVOUS (worker 0's address) in place of TPUCTL_COORDINATOR, so that the processes
meet first (`trainer.rendezvous`) on jax's own coordinator port. Either way a worker waits at
most TPUCTL_INIT_TIMEOUT seconds (default 900, long enough for cold restarts after a
preemption) for the others, then fails with a message saying the run was not started
everywhere, and one that fails before joining ends the others at once.

Once joined, a pod fails as one: a watcher thread in every process ends it within seconds
when another process has stopped sending heartbeats for TPUCTL_HEARTBEAT_TIMEOUT seconds
(default 20; it died, was SIGKILLed or OOM-killed), naming that process, instead of leaving
it blocked in the next collective. `fail_everywhere` is how a process that hits a fatal error
(a failed checkpoint save) makes every process exit with the same line and status.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import math
import os
import secrets
import socket
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from trainer import io, preemption, rendezvous
from trainer.config import MESH_AXES, MeshConfig, RecipeError, TrainerError
from trainer.contract import EXIT_BAD_INPUT, EXIT_PEER_LOST, EXIT_PREEMPTED

DEFAULT_TIMEOUT_S = 900
CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"
DEFAULT_HEARTBEAT_TIMEOUT_S = 20
_WATCH_POLL_S = 0.5
_FAILURE_KEY = "tpuctl/fatal"  # in jax's coordination key-value store
_ACK_DIR = "tpuctl/fatal_ack/"
_MACHINE_DIR = "tpuctl/machine/"  # each process's machine, for `machine_count`
_MACHINE_WAIT_S = 60
_ACK_TIMEOUT_S = 30.0
_PROBE_KEY = "tpuctl/run_dir_probe"  # the token process 0 wrote into the run directory
_SEEN_DIR = "tpuctl/run_dir_seen/"  # whether each other process read it back, and its host
_PROBE_TIMEOUT_S = 300  # process 0 first takes the run dir (a gs:// lease may wait its TTL)
_watch: list[PodWatch] = []  # this process's PodWatch, once joined
_stacks_shown = threading.Lock()  # held once this process has printed its stacks
_met = threading.Event()  # set once every process reached the rendezvous
_leaving = threading.Lock()  # held by the thread that ends this process in `_leave`


def coordinator_env() -> tuple[str, int, int] | None:
    """(address, num_processes, process_id) from TPUCTL_COORDINATOR and friends, None if unset:
    where jax.distributed joins the processes (and where they meet first)."""
    return _pod_env("TPUCTL_COORDINATOR")


def meeting_env() -> tuple[str, int, int] | None:
    """(address, num_processes, process_id) where the processes meet before joining
    (`rendezvous.join`), None if they do not: TPUCTL_COORDINATOR, or on a TPU VM, where jax
    finds its coordinator itself, TPUCTL_RENDEZVOUS: worker 0's host, on jax's coordinator
    port unless it names another."""
    explicit = coordinator_env()
    if explicit:
        return explicit
    meeting = _pod_env("TPUCTL_RENDEZVOUS")
    if meeting is None or ":" in meeting[0]:
        return meeting
    host, count, index = meeting
    return f"{host}:{tpu_coordinator_port()}", count, index


def tpu_coordinator_port() -> int:
    """The port jax's coordinator takes on a Cloud TPU pod's worker 0 (JAX_COORDINATOR_PORT,
    else jax's default, 8482 now): the one port the pod's network surely lets through
    between its workers, since jax needs it too."""
    from jax._src.clusters import cloud_tpu_cluster

    return int(os.environ.get("JAX_COORDINATOR_PORT") or cloud_tpu_cluster.coordinator_port)


def _pod_env(variable: str) -> tuple[str, int, int] | None:
    address = os.environ.get(variable)
    if not address:
        return None
    try:
        count = int(os.environ["TPUCTL_NUM_PROCESSES"])
        index = int(os.environ["TPUCTL_PROCESS_ID"])
    except (KeyError, ValueError) as e:
        raise RecipeError(
            f"{variable} is set, so TPUCTL_NUM_PROCESSES and TPUCTL_PROCESS_ID must be integers too"
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
    """Call before any other jax use. Single process when neither TPUCTL_* nor a TPU is present.
    From here on a SIGTERM on any process stops the run (`trainer.preemption`): at once until
    `preemption.started()`, after a save of the current step from then on."""
    import jax

    # First, so that a process that got through the rendezvous below takes SIGTERM as the
    # trainer does; jax's own notifier would swallow it.
    preemption.watch()
    preemption.while_starting(stop_while_starting)
    jax.config.update("jax_enable_preemption_service", False)
    timeout = int(os.environ.get("TPUCTL_INIT_TIMEOUT", DEFAULT_TIMEOUT_S))
    heartbeat = _heartbeat_timeout_s()
    # Recoverable: a dead peer does not make jax abort the survivors with a C++ stack trace;
    # the watcher below notices it (jax's heartbeats) and ends them with a line naming it.
    jax.config.update("jax_enable_recoverability", True)
    limits = {
        "initialization_timeout": timeout,
        "heartbeat_timeout_seconds": heartbeat,
        "shutdown_timeout_seconds": heartbeat * 2,
    }
    explicit = coordinator_env()
    meeting = meeting_env()
    if meeting:
        # jax aborts the whole process (no exception) when a peer never registers, so first
        # make sure every worker is there, with an error that says what happened.
        rendezvous.join(*meeting, timeout)
        _met.set()
    if explicit:
        address, count, index = explicit
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, count, index, **limits)
    elif on_tpu_vm():
        jax.distributed.initialize(**limits)
    else:
        return
    if jax.process_count() > 1:
        _client().key_value_set(f"{_MACHINE_DIR}{jax.process_index()}", _machine_id())
        _watch.append(PodWatch(jax.process_index(), jax.process_count(), heartbeat))
        _watch[0].start()


def failed_before_joining(error: Exception) -> int:
    """Print `error: ...` for an error that ended this process before it joined the pod,
    tell the pod's other processes, which wait to join, to end with it too
    (`rendezvous.tell_failure`, where `meeting_env` says they meet), and return the exit
    status: EXIT_BAD_INPUT for a recipe or start-up error, 1 for any other exception,
    another process's status when it failed first, and EXIT_PEER_LOST when the pod's other
    processes did not all come."""
    preemption.wait_if_stopping(_ACK_TIMEOUT_S)  # an error a SIGTERM's stop caused is that stop
    if isinstance(error, rendezvous.JoinFailed):
        _print_line(f"error: {error}")
        return error.status
    expected = isinstance(error, RecipeError | TrainerError | ImportError)
    message = str(error) if expected else f"crashed: {type(error).__name__}: {first_line(error)}"
    status = EXIT_BAD_INPUT if expected else 1
    if not expected:
        traceback.print_exception(error)
    _print_line(f"error: {message}")
    # No pod to tell when its variables are wrong, or when the jax that names a TPU pod's
    # port cannot be imported (its processes then wait out TPUCTL_INIT_TIMEOUT).
    with contextlib.suppress(RecipeError, ImportError):
        if (meeting := meeting_env()) and not _met.is_set():
            address, count, index = meeting
            rendezvous.tell_failure(address, count, rendezvous.Failure(index, message, status))
    return status


def failed_after_joining(error: RecipeError | TrainerError | ImportError) -> int:
    """End the run on bad input found once the pod had joined (the data, the tokenizer, a
    checkpoint of another model): every process with this one's `error:` line and
    EXIT_BAD_INPUT (or the error's own `status`: a checkpoint that storage failed to read, a
    run that diverged), at once. Returning would take jax's coordination service down with process 0, and every
    process, process 0 too, would exit EXIT_PEER_LOST without the line. A single process
    prints the line and returns the status."""
    status = getattr(error, "status", EXIT_BAD_INPUT)
    if _client() is None:
        _print_line(f"error: {error}")
        return status
    fail_everywhere(str(error), status)


def check_shared_run_dir(run_dir: str) -> None:
    """Raise RecipeError on every process of a multi-process run when some process does not
    see the files process 0 writes into `run_dir` (a plain path on each worker's own disk):
    orbax's multi-host save waits for files the others never see, and the run would idle
    after its last step instead of ending. Process 0 writes a file with a random token, the
    others read it back, all meet at a barrier, and process 0 removes it; a no-op for a
    single process. Call once the pod has joined, before anything else is written there."""
    import jax

    client = _client()
    if client is None or jax.process_count() == 1:
        return
    index, count, timeout_ms = jax.process_index(), jax.process_count(), _PROBE_TIMEOUT_S * 1000
    if index == 0:
        token = secrets.token_hex(16)
        probe = io.join(run_dir, f".shared-probe-{token}")
        io.write_text(probe, token)
        client.key_value_set(_PROBE_KEY, token)
    else:
        token = client.blocking_key_value_get(_PROBE_KEY, timeout_ms)
        probe = io.join(run_dir, f".shared-probe-{token}")
        seen = {"seen": _read_or_none(probe) == token, "host": socket.gethostname()}
        client.key_value_set(f"{_SEEN_DIR}{index}", json.dumps(seen))
    client.wait_at_barrier("tpuctl/run_dir_probed", timeout_ms)
    if index == 0:
        io.remove(probe)
    reports = sorted(
        (int(key.rsplit("/", 1)[1]), json.loads(value))
        for key, value in client.key_value_dir_get(_SEEN_DIR)
    )
    blind = [f"{i} (on {report['host']})" for i, report in reports if not report["seen"]]
    if blind:
        raise RecipeError(
            f"run_dir {run_dir} is not shared by the run's processes: "
            f"process{'es' if len(blind) > 1 else ''} {', '.join(blind)} of {count} "
            "cannot see the file process 0 wrote there (a plain path is on each worker's own "
            "disk), and their checkpoints need one directory they all see: set run_dir to a "
            "gs:// path, or to a filesystem every worker mounts"
        )


def _read_or_none(path: str) -> str | None:
    """The text of `path`, None when there is no such file (or directory)."""
    try:
        return io.read_text(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _machine_id() -> str:
    """The kernel's boot id: processes under one kernel (a local pod's workers, the test
    pod's hosts in their network namespaces) share its CPU cores; a TPU VM has its own."""
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return socket.gethostname()


def machine_count() -> int:
    """How many machines the run's processes are on: 1 for a single process, or for a local
    pod however many processes it has (a CPU's measured peak counts once per machine)."""
    import jax

    client = _client()
    if client is None or jax.process_count() == 1:
        return 1
    try:
        keys = [f"{_MACHINE_DIR}{i}" for i in range(jax.process_count())]
        return len({client.blocking_key_value_get(k, _MACHINE_WAIT_S * 1000) for k in keys})
    except Exception:  # a process that never said: count each process as a machine
        return jax.process_count()


def stop_while_starting() -> NoReturn:
    """End every process of a run that got SIGTERM before it trained (`preemption`); the
    entry point's stop from its first line, before jax is even imported."""
    where = ""
    if _client() is not None:
        import jax

        where = f" (process {jax.process_index()} of {jax.process_count()})"
    fail_everywhere(
        f"stopped on SIGTERM while starting up{where}: before training, nothing new to save",
        EXIT_PREEMPTED,
        prefix="trainer",
    )


def finish() -> None:
    """Leave the pod after the run ended normally (done, or stopped on SIGTERM): stop
    watching, meet the others, and let process 0, which hosts jax's coordination service,
    leave last, so that no process takes another's normal exit for a death (a process still
    disconnecting when the service goes away is aborted by jax)."""
    import jax

    client = _client()
    if client is None or not _watch:
        return
    watch = _watch[0]
    watch.stopped.set()
    timeout_s = 2 * _heartbeat_timeout_s()
    try:
        client.wait_at_barrier("tpuctl/finish", timeout_s * 1000)
        if jax.process_index() != 0:
            with contextlib.suppress(Exception):
                jax.distributed.shutdown()
        else:
            _wait_until_alone(client, jax.process_count(), timeout_s)
    except Exception:  # a peer gone by now, or the coordinator: nothing left to wait for
        pass
    # The watch may be inside a jax call that returns once the others have left; woken there
    # while Python finalizes, a daemon thread aborts the process ("FATAL: exception not
    # rethrown"), so it must be out before this process exits.
    watch.join(timeout_s)


def _wait_until_alone(client, count: int, timeout_s: float) -> None:
    """Wait until every other process has disconnected (or died), at most `timeout_s`.

    jax's get_live_nodes is a barrier of the live processes, which must include the caller:
    it returns once each other one has either called it too or left. After `finish` the
    others only leave, but their PodWatch may have called it just before it stopped, so one
    call can return at once with them still there; it is called until it names only this
    process. It has no timeout of its own, hence the thread."""
    alone = threading.Event()

    def wait() -> None:
        with contextlib.suppress(Exception):  # the others gone by now, at worst
            while len(client.get_live_nodes(list(range(count)))) > 1:
                pass
        alone.set()

    threading.Thread(target=wait, name="wait-for-others", daemon=True).start()
    alone.wait(timeout_s)


def _client():
    """jax's coordination-service client, or None in a single-process run (or before jax
    was imported: nothing has joined yet)."""
    if "jax" not in sys.modules:
        return None
    from jax._src import distributed as jax_distributed  # no public accessor for the client

    return jax_distributed.global_state.client


def _exit(line: str, status: int) -> NoReturn:
    _print_line(line)
    _hard_exit(status)


def _hard_exit(status: int) -> NoReturn:
    """os._exit: other threads (orbax's savers, collectives) may be blocked for good. It skips
    multiprocessing's exit handler, so its finalizers run here first: a tokenising pool still
    building the token cache (trainer.cache) frees its semaphores, which multiprocessing's
    resource tracker would otherwise report as leaked in the run's log."""
    if "multiprocessing" in sys.modules:
        from multiprocessing import util

        util._run_finalizers(0)  # what its exit handler runs first; no public equivalent
    os._exit(status)


def _print_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def show_stacks(header: str) -> None:
    """Print `trainer: header` and the Python stack of every thread to stderr (once per
    process): where each one waits when a run stalls."""
    if _stacks_shown.acquire(blocking=False):
        print(f"trainer: {header}; the stack of every thread follows", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def fail_everywhere(
    message: str, status: int, stacks: bool = False, prefix: str = "error"
) -> NoReturn:
    """End every process of the run with `{prefix}: message` and exit `status`: this one
    now, the others within a second (their PodWatch reads it from jax's key-value store).
    Process 0 hosts that store, so it leaves last, once the others have read it (or after
    30 s). With `stacks`, every other process shows its threads' stacks (`show_stacks`) as
    it leaves."""
    client, line = _client(), f"{prefix}: {message}"
    if client is None:
        _exit(line, status)
    try:
        failure = {"line": line, "status": status, "stacks": stacks}
        client.key_value_set(_FAILURE_KEY, json.dumps(failure))
    except Exception:  # another process failed first: end with its line
        with contextlib.suppress(Exception):
            failure = json.loads(client.key_value_try_get(_FAILURE_KEY))
            line, status = failure["line"], failure["status"]
    _leave(client, line, status)


def _leave(client, line: str, status: int, leaving: int | None = None) -> NoReturn:
    """Exit with `line` on stderr as one of `leaving` processes that are ending the run
    together. Process 0 hosts jax's coordination service, and a process still connected when
    it goes away is aborted by jax (a C++ stack trace instead of the line), so the others
    acknowledge in its key-value store just before they exit and process 0 waits for their
    acknowledgements (at most 30 s). `leaving` defaults to every process."""
    import jax

    if not _leaving.acquire(blocking=False):  # PodWatch and the main thread, both: one line
        threading.Event().wait()  # the other one is ending this process
    index, leaving = jax.process_index(), leaving or jax.process_count()
    _print_line(line)  # before the acknowledgement, after which process 0 may be gone
    with contextlib.suppress(Exception):
        client.key_value_set(f"{_ACK_DIR}{index}", "1")
    if index == 0:
        deadline = time.monotonic() + _ACK_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if len(client.key_value_dir_get(_ACK_DIR)) >= leaving:
                    break
            time.sleep(0.1)
    _hard_exit(status)


def crash(error: BaseException) -> NoReturn:
    """End a multi-process run on an unexpected exception in this process. When another
    process died first (this one's collective then fails too), PodWatch names that one within
    a heartbeat timeout; otherwise the error is this process's own: its traceback, then every
    process ends promptly (not after a heartbeat timeout, or in the next collective). An
    error while a SIGTERM stops the start-up is part of that stop (`preemption`)."""
    import jax

    preemption.wait_if_stopping(_ACK_TIMEOUT_S + 30)
    if _client() is None:
        raise error
    deadline = time.monotonic() + _heartbeat_timeout_s() + 5 * _WATCH_POLL_S
    while time.monotonic() < deadline:  # PodWatch ends the process if a peer is gone
        time.sleep(_WATCH_POLL_S)
    traceback.print_exception(error)
    fail_everywhere(f"process {jax.process_index()} crashed: {first_line(error)}", 1)


def _heartbeat_timeout_s() -> int:
    return int(os.environ.get("TPUCTL_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT_S))


class PodWatch(threading.Thread):
    """Ends this process when another one has died or failed fatally (see module doc)."""

    def __init__(self, index: int, count: int, heartbeat_timeout_s: int):
        super().__init__(name="pod-watch", daemon=True)
        self.index, self.count, self.heartbeat_timeout_s = index, count, heartbeat_timeout_s
        self.stopped = threading.Event()  # set by finish(): the run ended normally

    def run(self) -> None:
        client = _client()
        while not self.stopped.wait(_WATCH_POLL_S):
            if (ending := self.poll(client)) is not None:
                line, status, leaving = ending
                _leave(client, line, status, leaving=leaving)

    def poll(self, client) -> tuple[str, int, int | None] | None:
        """How this process must end now (`_leave`'s line, status and leaving count), or
        None while the pod is whole. The failure key is read first: liveness is a barrier
        of the live processes, which waits for one that has just failed and left until its
        heartbeats time out. It is read again when liveness shows a process gone: one that fails sets the key and
        then leaves, so its line and status win over "stopped (no heartbeat)" even when it
        left between the two reads (a process slowed there took a peer's SIGTERM stop for
        a death)."""
        everyone = list(range(self.count))
        if (failure := self._failure(client)) is not None:
            return failure
        try:
            live = client.get_live_nodes(everyone)
        except Exception as e:
            if self.stopped.is_set():
                return None
            _exit(
                f"error: lost the coordinator (process 0 of {self.count}): {first_line(e)}; "
                f"stopping process {self.index} too",
                EXIT_PEER_LOST,
            )
        if not (dead := sorted(set(everyone) - set(live))) or self.stopped.is_set():
            return None
        if (failure := self._failure(client)) is not None:
            return failure
        names = ", ".join(map(str, dead))
        return (
            f"error: process {names} of {self.count} stopped (no heartbeat for "
            f"{self.heartbeat_timeout_s} s); stopping process {self.index} too",
            EXIT_PEER_LOST,
            self.count - len(dead),
        )

    def _failure(self, client) -> tuple[str, int, None] | None:
        """The line and status another process ended the run with, if one did."""
        try:
            failure = client.key_value_try_get(_FAILURE_KEY)
        except Exception:  # not set yet (NOT_FOUND), or the coordinator is gone
            return None
        if not failure:
            return None
        failure = json.loads(failure)
        if failure.get("stacks"):
            show_stacks(f"process {self.index} of {self.count} as the run ends")
        return failure["line"], failure["status"], None


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
