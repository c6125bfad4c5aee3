"""A simulated pod on this machine: each worker is a directory, its commands local processes.

`tpuctl up v3-32 --local` makes one. The node record and one working directory per
worker live under `state_dir()/local/pods/NAME/`; the fan-out layer runs commands there
with the local transport, so `run`, `logs`, `kill`, `ps`, `exec` and `down` work unchanged.
Deleting a pod removes only that directory: run outputs (a recipe's local `run_dir`, or
the local GCS emulator's data under `state_dir()/local/gcs/`) live elsewhere and stay.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tpuctl.config import private_dir, private_opener, write_private
from tpuctl.errors import TpuctlError
from tpuctl.providers import registry
from tpuctl.providers.base import Capabilities, Node, NodeSpec, ProgressFn, Worker
from tpuctl.wording import plural

if TYPE_CHECKING:
    from tpuctl.config import Settings

LOCAL_ZONE = "local"
LOCATION = registry.Location("local", LOCAL_ZONE)
RECORD_FILE = "node.json"
EMULATOR_START_S = 30.0


def local_root() -> Path:
    """The directory that holds everything local pods keep (pods, the GCS emulator's data)."""
    from tpuctl.config import state_dir

    return state_dir() / "local"


class LocalProvider:
    """Nodes that are directories under `root`; creating one is instant and it is READY at once."""

    LOCATION = LOCATION
    # No zones, no queued resources; the workers are directories of this machine.
    capabilities = Capabilities(shared_filesystem=True)

    def __init__(self, root: Path | None = None):
        self.pods_dir = (root or local_root()) / "pods"

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalProvider:
        """The provider for `provider: local`; settings carry nothing it needs beyond state_dir."""
        return cls()

    def get(self, name: str) -> Node | None:
        """The pod called `name`, or None. A pod whose record cannot be read (a full disk,
        an edit) is still listed, as state UNKNOWN, so that `down NAME` can remove it."""
        record = self.pods_dir / name / RECORD_FILE
        if not record.is_file():
            return None
        try:
            return _node_from_record(json.loads(record.read_text()))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            return self._unreadable(name, e)

    def _unreadable(self, name: str, error: Exception) -> Node:
        """A pod known only by its directory: its workers are the directories it holds."""
        workdirs = sorted((self.pods_dir / name / "workers").glob("w[0-9][0-9]*"))
        workers = [
            Worker(index=int(w.name[1:]), internal_ip="127.0.0.1", workdir=str(w))
            for w in workdirs
            if w.name[1:].isdecimal()
        ]
        return Node(
            name=name,
            zone=LOCAL_ZONE,
            accelerator_type="unknown",
            state="UNKNOWN",
            health=f"its record {RECORD_FILE} cannot be read ({type(error).__name__}); "
            f"`tpuctl down {name}` removes it",
            workers=tuple(workers),
            provider="local",
        )

    def list(self) -> list[Node]:
        """Every local pod, by name."""
        if not self.pods_dir.is_dir():
            return []
        names = sorted(p.name for p in self.pods_dir.iterdir() if (p / RECORD_FILE).is_file())
        return [node for node in map(self.get, names) if node is not None]

    def create(self, spec: NodeSpec, progress: ProgressFn) -> Node:
        """Make the pod's directory, one working directory per worker, and its record."""
        if self.get(spec.name) is not None:
            raise TpuctlError(
                f"a local pod named {spec.name!r} already exists; pick another name or "
                f"remove it with `tpuctl down {spec.name}`",
                exit_code=1,
            )
        hosts = hosts_per_type(spec.accelerator_type)
        pod_dir = self.pods_dir / spec.name
        workers = []
        for index in range(hosts):
            workdir = pod_dir / "workers" / f"w{index:02d}"
            # The local transport points TMPDIR here, so each worker has its own lockfiles.
            private_dir(workdir / "tmp")
            workers.append(Worker(index=index, internal_ip="127.0.0.1", workdir=str(workdir)))
        node = Node(
            name=spec.name,
            zone=LOCAL_ZONE,
            accelerator_type=spec.accelerator_type,
            state="READY",
            project=None,
            scheduling=spec.scheduling,
            runtime_version=spec.runtime_version,
            created=datetime.now(UTC),
            workers=tuple(workers),
            labels=dict(spec.labels),
            provider="local",
        )
        _write_record(pod_dir / RECORD_FILE, node)
        registry.record(spec.name, LOCATION)
        progress(f"READY: {plural(hosts, 'local worker')} under {pod_dir / 'workers'}")
        return node

    def delete(self, name: str, progress: ProgressFn) -> bool:
        """Stop the pod's jobs as a VM's deletion would (SIGTERM first, so the trainer saves),
        then remove its directory; False if there was no such pod."""
        node = self.get(name)
        if node is None:
            registry.forget(name, LOCATION)
            return False
        _stop_jobs(node, progress)
        shutil.rmtree(self.pods_dir / name)
        registry.forget(name, LOCATION)
        progress(f"deleted local pod {name}")
        if not self.list() and stop_gcs_emulator():
            progress(f"stopped the local GCS emulator (its data stays in {gcs_dir() / 'data'})")
        return True

    def preempt(self, name: str, *, vanish: bool = False) -> None:
        """Take the pod away as a preemption does (fault injection for tests and demos):
        every process running in its workers' directories dies at once (SIGKILL), then
        the pod shows PREEMPTED, or with `vanish` disappears without a word."""
        node = self.get(name)
        if node is None:
            raise TpuctlError(f"no local pod named {name!r}", exit_code=1)
        pod_dir = self.pods_dir / name
        # The state changes first, as the API reports it before anyone sees the jobs die.
        if vanish:
            gone = pod_dir.with_name(f".{name}.vanished")
            pod_dir.rename(gone)
            _kill_processes_in(gone)
            shutil.rmtree(gone)
        else:
            _write_record(pod_dir / RECORD_FILE, replace(node, state="PREEMPTED"))
            _kill_processes_in(pod_dir)


def _kill_processes_in(directory: Path) -> None:
    """SIGKILL every process whose working directory is inside `directory`."""
    root = str(directory.resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + "/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def _stop_jobs(node: Node, progress: ProgressFn) -> None:
    from tpuctl import jobs
    from tpuctl.fanout import Host

    hosts = [
        Host(f"w{w.index:02d}", "localhost", workdir=w.workdir, transport="local")
        for w in node.workers
    ]
    for report in jobs.kill(hosts):
        if report.run_id:
            progress(f"{report.label}: stopped run {report.run_id} ({report.signal})")


def gcs_dir() -> Path:
    """The local pods' GCS emulator: its record, log and (persistent) data."""
    return local_root() / "gcs"


def running_gcs_emulator_url() -> str | None:
    """The URL of the local pods' GCS emulator if it runs (never starts it), else None."""
    record = _emulator_record()
    return record["url"] if record and _answers(record["url"]) else None


def gcs_emulator_url() -> str:
    """The URL of the local pods' GCS emulator, starting it if it is not running.

    It runs detached (it must outlive this command: the workers read and write through
    it), keeps its objects on disk under `gcs_dir()/data`, and stops with the last pod.
    """
    url = running_gcs_emulator_url()
    if url is not None:
        return url
    record = gcs_dir() / "emulator.json"
    if importlib.util.find_spec("gcp_storage_emulator") is None:
        raise TpuctlError(
            "local pods keep gs:// files in a GCS emulator: `pip install 'tpuctl[local]'` "
            "(gcp-storage-emulator), or point STORAGE_EMULATOR_HOST at one you run"
        )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    private_dir(gcs_dir())
    command = [sys.executable, "-m", "tpuctl.gcs_emulator", "--port", str(port)]
    with open(gcs_dir() / "emulator.log", "ab", opener=private_opener) as log:
        process = subprocess.Popen(
            [*command, "--data-dir", str(gcs_dir() / "data")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            umask=0o077,  # the emulator's objects (run files, recipes) are this user's only
        )
    deadline = time.monotonic() + EMULATOR_START_S
    while not _answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise TpuctlError(
                f"the local GCS emulator did not start; see {gcs_dir() / 'emulator.log'}", 1
            )
        time.sleep(0.1)
    write_private(record, json.dumps({"pid": process.pid, "url": url}))
    return url


def stop_gcs_emulator() -> bool:
    """Stop the local pods' GCS emulator if it runs (its data stays); True if it did. The
    record may be stale (the emulator crashed, the machine rebooted, its pid reused), so
    only a process that is the emulator the record describes is stopped."""
    record = _emulator_record()
    (gcs_dir() / "emulator.json").unlink(missing_ok=True)
    if record is None or not _is_emulator(record["pid"], record["url"]):
        return False
    try:
        os.kill(record["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def _emulator_record() -> dict | None:
    """The running emulator's record ({pid, url}), or None: none, or one no longer readable
    (then it is started again as if there were none)."""
    try:
        record = json.loads((gcs_dir() / "emulator.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("url"), str):
        return None
    pid = record.get("pid")
    return record if isinstance(pid, int) and not isinstance(pid, bool) and pid > 1 else None


def _is_emulator(pid: int, url: str) -> bool:
    """Whether process `pid` is the emulator serving `url`, as `gcs_emulator_url` started it."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    port = url.rpartition(":")[2]
    return "tpuctl.gcs_emulator" in argv and port in argv


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request  # here: ~20 ms that every command naming a node would pay

    try:
        urllib.request.urlopen(f"{url}/storage/v1/b?project=local", timeout=1).close()
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def hosts_per_type(accelerator_type: str) -> int:
    """How many hosts (workers) a pod of this type has, e.g. 4 for v3-32."""
    from tpuctl import catalog

    return catalog.parse(accelerator_type).hosts


def devices_per_host(accelerator_type: str) -> int:
    """How many JAX devices each host of this type has: one per TensorCore on v2 and v3,
    one per chip from v4 on (megacore), e.g. 8 for v3-32 and 4 for v4-32."""
    from tpuctl import catalog

    accelerator = catalog.parse(accelerator_type)
    if accelerator.generation.name in ("v2", "v3"):
        return accelerator.cores_per_host
    return accelerator.chips_per_host


def _write_record(path: Path, node: Node) -> None:
    data = asdict(node)
    data["created"] = node.created.isoformat() if node.created else None
    write_private(path, json.dumps(data, indent=2))


def _node_from_record(data: dict) -> Node:
    workers = tuple(Worker(**w) for w in data.pop("workers", []))
    created = data.pop("created", None)
    return Node(
        **data, workers=workers, created=datetime.fromisoformat(created) if created else None
    )
