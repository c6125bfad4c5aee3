"""`tpuctl babysit`: keep one run alive through preemptions, crashes and stockouts until
its DONE marker exists.

One observe-act cycle every `poll_s` seconds, as plain code:

- observe the node through the provider, the job on each worker through `tpuctl.jobs`,
  and progress through the run's `metrics.jsonl` and `DONE`;
- node missing, PREEMPTED/TERMINATED, or not READY beyond a grace period: a preemption.
  Delete it explicitly (with its queued resource), recreate it (stockouts retried with
  the same backoff and fallback zones as `up`), relaunch the same run id, which resumes
  from its newest checkpoint;
- node READY but the job exited on some worker without DONE, or no step progress
  within `hang_timeout_s`: a failure. Stop the job everywhere (SIGTERM, wait, SIGKILL,
  then clear lockfiles: `jobs.kill`), record the exit code and last log lines, relaunch;
- the TPU API failing: wait and look again. An outage never deletes a node or launches.

Preemptions and failures have separate budgets. The babysitter's state (restarts,
causes, timings) lives in a JSON file per run under `state_dir()/babysit/`, and for
Cloud TPU nodes also next to the run's recipe in GCS, so that a babysitter started
elsewhere carries on. A lock (and, in GCS, a lease with a heartbeat) keeps a second
babysitter off the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpuctl import jobs
from tpuctl.config import private_dir, private_opener, write_private
from tpuctl.errors import TpuctlError

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.fanout import Host
    from tpuctl.providers.base import Node, Provider

# Node states that mean the node is gone for good: replace it at once.
LOST_STATES = frozenset({"PREEMPTED", "TERMINATED", "STOPPED", "HIDDEN"})
MAX_EVENTS = 100  # events kept in the state file; counts are kept separately
LOG_LINES = 20  # lines of a failed worker's log kept with its event
LEASE_FILE = "babysit.lease"
STATE_FILE = "babysit.json"
# What start_run sets in this process to reach a local pod's GCS emulator.
STORAGE_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")


@dataclass(frozen=True)
class BabysitOptions:
    """What the user asked `tpuctl babysit` for."""

    accelerator_type: str
    node: str
    recipe: str  # local path or gs:// URI (the first launch; relaunches use the stored copy)
    overrides: list[str] = field(default_factory=list)
    env: Mapping[str, str] = field(default_factory=dict)  # secrets: never persisted or logged
    run_id: str | None = None
    scheduling: str = "on-demand"  # on-demand | spot | preemptible
    max_preemptions: int | None = None  # None: unbounded
    max_failures: int = 3
    max_restarts: int | None = None  # preemptions and failures together
    poll_s: float = 30.0
    not_ready_grace_s: float = 300.0  # a node neither READY nor lost for this long is lost
    hang_timeout_s: float = 1800.0  # no new step for this long after launch or progress
    stop_grace_s: float = jobs.DEFAULT_GRACE_S
    retry_for_s: float = 24 * 3600.0  # stockout retries while recreating
    delete_when_done: bool = False


@dataclass
class Event:
    """One restart: why, when, at which step, and what it cost."""

    kind: str  # preemption | failure | hang
    cause: str
    at: float  # epoch seconds of detection
    step: int | None  # newest logged step at detection
    recreate_s: float | None = None  # the provider's delete + create (preemptions)
    relaunched_s: float | None = None  # detection -> job launched again
    resumed_s: float | None = None  # detection -> first new step logged
    steps_lost: int | None = None  # steps trained again after the restart
    worker: str | None = None  # failures: the worker that failed first
    exit_code: int | None = None
    log_tail: list[str] = field(default_factory=list)


@dataclass
class BabysitState:
    """Everything a babysitter needs to carry on where another one stopped."""

    run_id: str
    node: str
    accelerator_type: str
    recipe_uri: str | None = None  # the stored recipe, once launched
    run_dir: str | None = None
    preemptions: int = 0
    failures: int = 0
    launches: int = 0
    pending_launch: bool = False  # a (re)created node still needs the job
    finished: bool = False
    final_step: int | None = None
    final_loss: float | None = None
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    events: list[Event] = field(default_factory=list)

    @property
    def restarts(self) -> int:
        return self.preemptions + self.failures

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> BabysitState:
        data = json.loads(text)
        events = [Event(**e) for e in data.pop("events", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}, events=events)


@dataclass
class View:
    """What the live display shows; refreshed every cycle."""

    node_state: str = "?"
    workers: list[jobs.WorkerJob] = field(default_factory=list)
    step: int | None = None
    loss: float | None = None
    activity: str = "starting"


# -- progress from the run directory -----------------------------------------------------


class MetricsTail:
    """The records appended to `{run_dir}/metrics.jsonl` since the last poll (local or gs://).

    Only the newest record is kept, so memory stays bounded however long the run.
    """

    def __init__(self, run_dir: str):
        self.path = f"{run_dir.rstrip('/')}/metrics.jsonl"
        self.offset = 0
        self.last_step: int | None = None
        self.last_loss: float | None = None
        self.cache_progress = False  # a data-cache build record came in: progress, no step

    def poll(self) -> list[dict[str, Any]]:
        data = self._read_from(self.offset)
        if data is None:
            return []
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += end
        records = []
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record.get("step"), int) and "loss" in record:
                    records.append(record)
                self.cache_progress |= "data_cache" in record
        if records:
            self.last_step = records[-1]["step"]
            self.last_loss = records[-1].get("loss")
        return records

    def _read_from(self, offset: int) -> bytes | None:
        from trainer import io

        if not io.exists(self.path):
            return None
        with io.open_file(self.path, "rb") as f:  # on gs://, a ranged read of the new bytes
            size = f.seek(0, os.SEEK_END)
            if size < offset:  # the file was recreated: start over
                self.offset = offset = 0
            f.seek(offset)
            return f.read()


def read_done(run_dir: str) -> dict[str, Any] | None:
    """The run's DONE record, or None while it is not finished."""
    from tpuctl.jobs.runs import run_summary

    if "://" in run_dir:
        from trainer import io

        path = f"{run_dir.rstrip('/')}/DONE"
        return json.loads(io.read_text(path)) if io.exists(path) else None
    return run_summary(run_dir)


# -- state files and the lease ---------------------------------------------------------


def local_dir() -> Path:
    """Where babysitters keep their state files, locks and logs on this machine."""
    from tpuctl.config import state_dir

    return state_dir() / "babysit"


def local_state_path(run_id: str) -> Path:
    return local_dir() / f"{run_id}.json"


def log_path(run_id: str) -> Path:
    """The babysitter's own log for a run (every decision, timestamped)."""
    return local_dir() / f"{run_id}.log"


def remote_dir(settings: Settings, run_id: str) -> str | None:
    """The run's directory in GCS, next to its stored recipe, where the state and the
    lease are shared between machines. None for local pods (everything is on this
    machine) and when no bucket is configured."""
    from tpuctl import storage

    bucket = settings.get("bucket")
    if settings.get("provider") == "local" or not bucket:
        return None
    return storage.recipe_uri(str(bucket), run_id).rsplit("/", 1)[0]


def load_state(run_id: str, remote_dir: str | None = None) -> BabysitState | None:
    """The newest saved state of a run: this machine's file, or the copy in GCS."""
    from tpuctl import storage

    found = []
    path = local_state_path(run_id)
    if path.is_file():
        found.append(BabysitState.from_json(path.read_text()))
    if remote_dir:
        with contextlib.suppress(TpuctlError):
            text = storage.read_text(f"{remote_dir}/{STATE_FILE}")
            if text:
                found.append(BabysitState.from_json(text))
    return max(found, key=lambda s: s.updated_at) if found else None


def lock_path(run_id: str) -> Path:
    """The babysitter's lock on this machine; it names the holder ("pid P on HOST since T")."""
    return local_dir() / f"{run_id}.lock"


def live_babysitter(run_id: str) -> str | None:
    """ "pid P" of the babysitter of `run_id` running on this machine, or None. Reads the
    lock's holder line without taking the lock (which would stop a babysitter starting)."""
    try:
        words = lock_path(run_id).read_text().split()
    except OSError:
        return None
    if words[:1] != ["pid"] or len(words) < 4 or words[3] != socket.gethostname():
        return None
    try:
        os.kill(int(words[1]), 0)
    except (ValueError, ProcessLookupError):
        return None
    except PermissionError:
        pass  # alive, another user's
    return f"pid {words[1]}"


class Lease:
    """One babysitter per run: an exclusive lock on this machine, and for runs whose
    files are in GCS a lease object there that another machine's babysitter respects
    while its heartbeat is fresh."""

    def __init__(self, run_id: str, ttl_s: float):
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self._file: Any = None
        self.remote: str | None = None

    def acquire(self) -> None:
        private_dir(local_dir())
        path = lock_path(self.run_id)
        handle = open(path, "a+", opener=private_opener)  # noqa: SIM115 (held while babysitting)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise TpuctlError(
                f"run {self.run_id} is already babysat by {holder}; stop that babysitter "
                "first (its lock is " + str(path) + ")",
                exit_code=1,
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{self.holder} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._file = handle

    @property
    def holding(self) -> bool:
        return self._file is not None

    def claim_remote(self, remote: str | None) -> None:
        """Take (or refresh) the GCS lease; refuse if another babysitter holds a fresh one."""
        from tpuctl import storage

        if remote is None:
            return
        text = storage.read_text(remote)
        if text and self.remote is None:
            lease = json.loads(text)
            fresh = time.time() - lease.get("heartbeat", 0) < self.ttl_s
            if fresh and lease.get("holder") != self.holder and not lease.get("released"):
                raise TpuctlError(
                    f"run {self.run_id} is already babysat by {lease.get('holder')} (lease "
                    f"{remote}, heartbeat {time.time() - lease['heartbeat']:.0f} s ago); stop "
                    f"it, or wait {self.ttl_s:.0f} s after it died",
                    exit_code=1,
                )
        self.remote = remote
        self.heartbeat()

    def heartbeat(self, released: bool = False) -> None:
        from tpuctl import storage

        if self.remote:
            record = {"holder": self.holder, "heartbeat": time.time(), "released": released}
            storage.upload_text(self.remote, json.dumps(record))

    def release(self) -> None:
        if self.remote:
            with contextlib.suppress(TpuctlError, OSError):
                self.heartbeat(released=True)
        if self._file is not None:
            self._file.close()
            self._file = None


# -- the babysitter --------------------------------------------------------------------


class GiveUp(TpuctlError):
    """A reason to stop babysitting at once rather than retry on the next cycle."""


class BudgetExhausted(GiveUp):
    """Too many preemptions or failures: babysitting stops with a report."""


class Babysitter:
    """The loop: `run()` returns the final state once the run's DONE marker exists."""

    def __init__(
        self,
        settings: Settings,
        options: BabysitOptions,
        log: Callable[[str], None] = lambda _line: None,
        on_update: Callable[[Babysitter], None] = lambda _b: None,
    ):
        from tpuctl.providers import provider_for

        self.settings = settings
        self.options = options
        self.provider: Provider = provider_for(settings)
        self.log = log
        self.on_update = on_update
        self.view = View()
        self.run_id = options.run_id or self._new_run_id()
        self.lease = Lease(self.run_id, ttl_s=max(120.0, 4 * options.poll_s))
        self.state = BabysitState(self.run_id, options.node, options.accelerator_type)
        self._check_scheduling()
        self.remote_dir = remote_dir(settings, self.run_id)
        self.metrics: MetricsTail | None = None
        self._not_ready_since: float | None = None
        self._unreachable_since: float | None = None
        self._progress_at = time.monotonic()
        self._api_down = False
        self._action_errors = 0
        self._user_storage_env = {name: os.environ.get(name) for name in STORAGE_ENV}
        # --env, then every env value of the first launch: stored recipes keep names only.
        self._run_env = dict(options.env)

    def _check_scheduling(self) -> None:
        from tpuctl import catalog

        accelerator = catalog.parse(self.options.accelerator_type)
        cloud = self.settings.get("provider", "cloud") == "cloud"
        if cloud and self.options.scheduling == "preemptible" and accelerator.needs_queued():
            raise TpuctlError(
                f"--preemptible does not work for {accelerator.name}, which comes through "
                "queued resources; use --spot"
            )

    def _new_run_id(self) -> str:
        from tpuctl.jobs.runs import load_recipe

        return jobs.new_run_id(load_recipe(self.options.recipe, self.options.overrides).run_id)

    # -- the loop ---------------------------------------------------------------------

    def claim(self) -> None:
        """Take the run's lock, or raise a TpuctlError naming the babysitter that holds it."""
        if self.lease.holding:
            return
        self.lease.acquire()

    def run(self) -> BabysitState:
        """Babysit until DONE; raises BudgetExhausted (or another TpuctlError) to give up."""
        self.claim()
        try:
            if self.remote_dir:
                self.lease.claim_remote(f"{self.remote_dir}/{LEASE_FILE}")
            saved = load_state(self.run_id, self.remote_dir)
            if saved is not None:
                self.state = saved
                self.log(f"carrying on from saved state: {self._summary()}")
            self._start_metrics()
            while not self.cycle():
                self._save()  # also the lease's heartbeat, through API outages too
                self.on_update(self)
                time.sleep(self.options.poll_s)
            self.on_update(self)
            return self.state
        finally:
            self.lease.release()

    def cycle(self) -> bool:
        """One observation and the action it calls for; True once the run is finished.

        An action that fails (a launch refused, a worker unreachable while stopping the
        job) is retried on the next cycle, up to --max-failures times in a row."""
        try:
            finished = self._cycle()
        except GiveUp:
            raise
        except Exception as err:  # a babysitter that runs for days must not die of one
            self._action_errors += 1
            if not isinstance(err, TpuctlError):  # unexpected: keep the whole story in the log
                self.log(traceback.format_exc().rstrip())
                err = TpuctlError(f"{type(err).__name__}: {err}")
            self.log(f"action failed ({self._action_errors} in a row): {err}")
            if self._action_errors > self.options.max_failures:
                raise TpuctlError(
                    f"stopped babysitting run {self.run_id}: {self._action_errors} actions "
                    f"failed in a row; the last: {err}",
                    exit_code=1,
                ) from None
            self._save()  # an interrupted relaunch stays pending: the next cycle redoes it
            return False
        self._action_errors = 0
        return finished

    def _cycle(self) -> bool:
        self._observe_progress()
        if self._finished():
            return True
        node = self._get_node()
        if self._api_down:
            return False
        if node is None or node.state in LOST_STATES or self._not_ready_too_long(node):
            self._replace_node(node)
            return False
        if node.accelerator_type != self.options.accelerator_type:
            raise GiveUp(
                f"node {node.name} is a {node.accelerator_type}, not a "
                f"{self.options.accelerator_type}; babysit another --name or `tpuctl down` it",
                exit_code=1,
            )
        if not node.ready:
            self.view.activity = f"waiting for {node.name} ({node.state})"
            return False
        self._tend_job(node)
        return False

    # -- observations -----------------------------------------------------------------

    def _get_node(self) -> Node | None:
        try:
            node = self.provider.get(self.options.node)
        except TpuctlError as err:  # the API is failing: never a reason to act
            if not self._api_down:
                self.log(f"TPU API unavailable, waiting: {err}")
            self._api_down = True
            self.view.node_state = "API unavailable"
            self.view.activity = "waiting for the TPU API"
            return None
        if self._api_down:
            self.log("TPU API answering again")
        self._api_down = False
        self.view.node_state = node.state if node else "missing"
        return node

    def _not_ready_too_long(self, node: Node) -> bool:
        if node.ready:
            self._not_ready_since = None
            return False
        now = time.monotonic()
        if self._not_ready_since is None:
            self._not_ready_since = now
        return now - self._not_ready_since > self.options.not_ready_grace_s

    def _start_metrics(self) -> None:
        if self.state.run_dir and self.metrics is None:
            self.metrics = MetricsTail(self.state.run_dir)

    def _observe_progress(self) -> None:
        if self.metrics is None:
            return
        records = self.metrics.poll()
        if self.metrics.cache_progress:  # the trainer is still building its token cache
            self.metrics.cache_progress = False
            self._progress_at = time.monotonic()
        if not records:
            return
        self._progress_at = time.monotonic()
        self.view.step, self.view.loss = self.metrics.last_step, self.metrics.last_loss
        pending = [e for e in self.state.events if e.resumed_s is None and e.relaunched_s]
        for event in pending:  # the first steps after a restart: what it cost
            event.resumed_s = time.time() - event.at
            if event.step is not None:
                event.steps_lost = max(0, event.step - (records[0]["step"] - 1))
            self.log(
                f"training again at step {records[0]['step']}: {event.resumed_s:.1f} s after "
                f"the {event.kind}, {event.steps_lost} step(s) lost"
            )

    def _finished(self) -> bool:
        if not self.state.run_dir:
            return False
        done = read_done(self.state.run_dir)
        if done is None:
            return False
        self.state.finished = True
        self.state.final_step = done.get("step")
        self.state.final_loss = (done.get("final") or {}).get("loss")
        self.view.activity = "finished"
        self.log(f"run {self.run_id} finished at step {self.state.final_step}: {self._summary()}")
        self._save()
        if self.options.delete_when_done:
            self.provider.delete(self.options.node, self.log)
        return True

    # -- actions ----------------------------------------------------------------------

    def _tend_job(self, node: Node) -> None:
        from tpuctl.hosts import hosts_for

        hosts = hosts_for(self.settings, node)
        if self.state.launches == 0 and self._adopt(node, hosts):
            return
        if self.state.pending_launch or self.state.launches == 0:
            if self.state.launches:  # whatever is left of the previous attempt goes first
                self._stop_job(hosts)
            self._launch(node, hosts)
            return
        workers = jobs.status(hosts, self.run_id)
        self.view.workers = workers
        unreachable = [w.label for w in workers if w.state == "unreachable"]
        if unreachable:
            self._unreachable_since = self._unreachable_since or time.monotonic()
            if time.monotonic() - self._unreachable_since > self.options.not_ready_grace_s:
                self._replace_node(node, f"READY but {', '.join(unreachable)} unreachable")
            else:
                self.view.activity = f"{', '.join(unreachable)} unreachable; looking again"
            return
        self._unreachable_since = None
        ended = [w for w in workers if w.state != "running"]
        if ended:
            if self._finished_after_exit():
                return
            if len(ended) < len(workers) and all(w.exit_code == 0 for w in ended):
                self.view.activity = "finishing"  # process 0 writes DONE last
                return
            current = self._get_node()
            if current is None or not current.ready:  # taken away: the next cycle replaces it
                return
            self._fail_and_relaunch(node, hosts, "failure", self._exit_cause(ended), ended[0])
            return
        stalled = time.monotonic() - self._progress_at
        if stalled > self.options.hang_timeout_s:
            cause = f"no step progress for {stalled:.0f} s (hung collective or stranded worker)"
            self._fail_and_relaunch(node, hosts, "hang", cause, None)
            return
        self.view.activity = "training"

    def _adopt(self, node: Node, hosts: list[Host]) -> bool:
        """Watch the run instead of launching it when it already runs on every worker
        (`tpuctl run` first, `tpuctl babysit` after)."""
        if not all(w.state == "running" for w in jobs.status(hosts, self.run_id)):
            return False
        from tpuctl.jobs.runs import load_recipe

        if node.provider == "local" and self.options.recipe.startswith("gs://"):
            from tpuctl.gcs_emulator import emulator_env
            from tpuctl.providers.local import gcs_emulator_url

            os.environ.update(emulator_env(gcs_emulator_url()))
        recipe = load_recipe(self.options.recipe, self.options.overrides)
        self.state.recipe_uri = self.options.recipe if "://" in self.options.recipe else None
        self.state.run_dir = recipe.run_dir
        self.state.launches = 1
        self.log(f"run {self.run_id} already runs on every worker of {node.name}: watching it")
        self._start_metrics()
        self._save()
        return True

    def _finished_after_exit(self) -> bool:
        self._observe_progress()
        return self._finished()

    @staticmethod
    def _exit_cause(ended: list[jobs.WorkerJob]) -> str:
        parts = []
        for worker in ended:
            code = "no exit status" if worker.exit_code is None else f"exit {worker.exit_code}"
            parts.append(f"{worker.label} {worker.state} ({code})")
        return "job ended without DONE: " + ", ".join(parts)

    def _fail_and_relaunch(
        self, node: Node, hosts: list[Host], kind: str, cause: str, worker: jobs.WorkerJob | None
    ) -> None:
        event = self._record(kind, cause)
        if worker is not None:
            event.worker, event.exit_code = worker.label, worker.exit_code
            event.log_tail = self._log_tail([h for h in hosts if h.label == worker.label])
        self.state.failures += 1
        self.state.pending_launch = True
        self._save()
        self._stop_job(hosts)  # also before giving up: a hung job must not hold the TPU
        self._check_budgets()
        self._launch(node, hosts)

    def _stop_job(self, hosts: list[Host]) -> None:
        """SIGTERM to each worker's job, wait, SIGKILL what remains, then clear lockfiles."""
        self.view.activity = "stopping the job on every worker"
        for report in jobs.kill(hosts, grace=self.options.stop_grace_s):
            if report.error:
                raise TpuctlError(f"could not stop the job on {report.label}: {report.error}", 1)

    def _log_tail(self, hosts: list[Host]) -> list[str]:
        lines: list[str] = []
        jobs.logs(
            hosts,
            run_id=self.run_id,
            lines=LOG_LINES,
            all_lines=True,
            on_line=lambda _h, _s, line: lines.append(line),
        )
        return lines[-LOG_LINES:]

    def _replace_node(self, node: Node | None, why: str | None = None) -> None:
        name = self.options.node
        if self.state.launches == 0 and node is None:
            self.log(f"{name} does not exist yet: creating it")
        elif not self.state.pending_launch:  # a retried recreation is the same preemption
            what = why or ("missing" if node is None else node.state)
            self._record("preemption", f"node {name} {what}")
            self.state.preemptions += 1
            self._check_budgets()
        self.state.pending_launch = self.state.launches > 0
        self._save()
        started = time.monotonic()
        self.view.activity = f"deleting {name}"
        self._delete_node(node)
        self.view.activity = f"creating {name}"
        new_node = self._create_node()
        if self.state.events and self.state.launches:
            self.state.events[-1].recreate_s = time.monotonic() - started
        self._not_ready_since = None
        self._save()
        if new_node is not None and new_node.ready:
            self._tend_job(new_node)

    def _delete_node(self, node: Node | None) -> None:
        """Delete the lost node and its queued resource; a node that vanished can leave its
        queued resource behind, holding quota and blocking the new one."""
        from tpuctl.providers.cloud_tpu import CloudTpuProvider

        name = self.options.node
        if node is not None or self.provider.get(name) is not None:
            self.provider.delete(name, self.log)  # its queued resource too
        elif isinstance(self.provider, CloudTpuProvider):
            provider = self.provider
            path = f"projects/{provider.project}/locations/{provider.zone}/queuedResources/{name}"
            provider.delete_queued(path, self.log)

    def _create_node(self) -> Node | None:
        from tpuctl.providers.cloud_tpu import CloudTpuProvider

        spec, fallback, queued = self._node_spec()
        if not isinstance(self.provider, CloudTpuProvider):
            return self.provider.create(spec, self.log)
        # A fresh provider: its clock bounds this recreation's stockout retries, not the
        # babysitter's whole lifetime.
        provider = CloudTpuProvider.from_settings(self.settings)
        node = provider.create_with_retries(
            spec,
            self.log,
            fallback_zones=fallback,
            retry_for=self.options.retry_for_s,
            queued=queued,
        )
        if node is not None:
            from tpuctl.hosts import remember

            remember(self.settings, node)  # new VMs, new host keys: forget the old ones
        return node

    def _node_spec(self) -> tuple[Any, list[str], bool]:
        from tpuctl import catalog, config
        from tpuctl.providers.base import NodeSpec
        from tpuctl.sshkeys import ensure_keypair, metadata_ssh_keys

        accelerator = catalog.parse(self.options.accelerator_type)
        per_type = config.accelerator_settings(self.settings, accelerator.name)
        local = self.settings.get("provider") == "local"
        _key, public_line = ensure_keypair(self.settings)
        spec = NodeSpec(
            name=self.options.node,
            zone="local" if local else str(per_type.get("zone") or self.settings.get("zone")),
            accelerator_type=accelerator.name,
            runtime_version=per_type.get("runtime_version") or accelerator.runtime_version,
            project=per_type.get("project") or self.settings.get("project"),
            scheduling=self.options.scheduling,
            labels={"tpuctl-run": self.run_id.lower()[:63]},
            metadata={"ssh-keys": metadata_ssh_keys(self.settings.get("ssh.user"), public_line)},
        )
        fallback = per_type.get("zones") or []
        fallback = [fallback] if isinstance(fallback, str) else list(fallback)
        return spec, fallback, accelerator.needs_queued(spot=self.options.scheduling == "spot")

    def _launch(self, node: Node, hosts: list[Host]) -> None:
        from tpuctl.jobs.runs import RunRequest, start_run

        self._restore_storage_env()
        first = self.state.recipe_uri is None
        recipe = self.options.recipe if first else str(self.state.recipe_uri)
        overrides = self.options.overrides if first else []
        self.view.activity = f"launching run {self.run_id} on {node.name}"
        self.log(f"launching run {self.run_id} on {len(hosts)} worker(s) of {node.name}")
        request = RunRequest(recipe, overrides, self._run_env, self.run_id, force=False)
        started = start_run(self.settings, node, hosts, request, self.log)
        self._run_env = dict(started.env)
        self.state.recipe_uri, self.state.run_dir = started.recipe_uri, started.run_dir
        self.state.launches += 1
        self.state.pending_launch = False
        self._progress_at = time.monotonic()
        if self.state.events and self.state.events[-1].relaunched_s is None:
            self.state.events[-1].relaunched_s = time.time() - self.state.events[-1].at
        self._start_metrics()
        self._save()

    def _restore_storage_env(self) -> None:
        """start_run points this process at the local pods' GCS emulator; that emulator
        stops with the last pod and comes back on another port, so forget the old address
        unless the user set it."""
        for name in STORAGE_ENV:
            if self._user_storage_env.get(name) is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = self._user_storage_env[name]

    # -- bookkeeping ------------------------------------------------------------------

    def _record(self, kind: str, cause: str) -> Event:
        step = self.metrics.last_step if self.metrics else None
        event = Event(kind=kind, cause=cause, at=time.time(), step=step)
        self.state.events = [*self.state.events, event][-MAX_EVENTS:]
        self.log(f"{kind} at step {step}: {cause}")
        return event

    def _check_budgets(self) -> None:
        options, state = self.options, self.state
        over = None
        if options.max_preemptions is not None and state.preemptions > options.max_preemptions:
            over = f"{state.preemptions} preemptions (--max-preemptions {options.max_preemptions})"
        elif state.failures > options.max_failures:
            steps = [e.step for e in state.events if e.kind != "preemption"]
            over = (
                f"{state.failures} job failures (--max-failures {options.max_failures}), at "
                f"steps {', '.join(map(str, steps))}; last: {state.events[-1].cause}"
            )
        elif options.max_restarts is not None and state.restarts > options.max_restarts:
            over = f"{state.restarts} restarts (--max-restarts {options.max_restarts})"
        if over:
            self._save()
            raise BudgetExhausted(
                f"stopped babysitting run {self.run_id} after {over}; the node and the "
                f"checkpoints are left as they are (see {log_path(self.run_id)})",
                exit_code=1,
            )

    def _save(self) -> None:
        from tpuctl import storage

        self.state.updated_at = time.time()
        text = self.state.to_json()
        write_private(local_state_path(self.run_id), text)
        if self.remote_dir:
            remote = f"{self.remote_dir}/{STATE_FILE}"
            try:
                storage.upload_text(remote, text)
                self.lease.heartbeat()
            except Exception as err:  # GCS trouble must not stop the babysitter
                self.log(f"could not save the state to {remote}: {err}")

    def _summary(self) -> str:
        state = self.state
        return (
            f"{state.launches} launch(es), {state.preemptions} preemption(s), "
            f"{state.failures} failure(s)"
        )


class LogFile:
    """The babysitter's log: timestamped lines appended to a file, line-buffered, so that
    a babysitter running for days under nohup keeps a readable history."""

    def __init__(self, run_id: str, path: Path | None = None):
        self.path = path or log_path(run_id)
        private_dir(self.path.parent)
        # A log tail can hold what a job printed: readable by this user only.
        self._handle = open(self.path, "a", buffering=1, opener=private_opener)  # noqa: SIM115

    def __call__(self, line: str) -> None:
        self._handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def __enter__(self) -> LogFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def last_run(
    settings: Settings, node_name: str | None, run_id: str | None
) -> tuple[str, str, str, str]:
    """For `tpuctl babysit --preemptible` alone: the node's type and name, the run id of its
    latest run (worker 0's) and that run's stored recipe."""
    from tpuctl import storage
    from tpuctl.hosts import hosts_for
    from tpuctl.jobs.runs import LOCAL_POD_BUCKET
    from tpuctl.providers import resolve_node

    node = resolve_node(settings, node_name)
    if not node.ready:
        raise TpuctlError(
            f"node {node.name} is {node.state}: name the run to babysit with "
            f"`tpuctl babysit {node.accelerator_type} RECIPE --name {node.name} --run-id RUN`",
            exit_code=1,
        )
    if run_id is None:
        run_id = jobs.status(hosts_for(settings, node, [0]))[0].run_id
    if run_id is None:
        raise TpuctlError(
            f"no run on {node.name} yet: give the recipe, "
            f"`tpuctl babysit {node.accelerator_type} RECIPE --name {node.name}`"
        )
    bucket = settings.get("bucket") or (LOCAL_POD_BUCKET if node.provider == "local" else None)
    if not bucket:
        raise TpuctlError("no bucket: set one with `tpuctl config set bucket NAME`")
    return node.accelerator_type, node.name, run_id, storage.recipe_uri(str(bucket), run_id)
