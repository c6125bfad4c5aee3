"""`tpuctl babysit`: keep one run alive through preemptions, crashes and stockouts until
its DONE marker exists.

Each cycle has three parts a reader can see at once:

- `observe()`: the node as the TPU API sees it (in the zone where it actually lives,
  with its labels), each worker's job, the run's newest step and DONE, and the time;
- `tpuctl.babysit_policy.decide`: a pure function from the state and that observation
  to one action (wait, replace the node, launch, relaunch, finish, give up);
- `act(action)`: the only place with side effects (the provider, SSH, GCS, state files).

The babysitter's state (restarts, causes, timings, the node's zone) lives in a JSON file
per run under `state_dir()/babysit/`, and for Cloud TPU nodes also next to the run's
recipe in GCS, so that a babysitter started elsewhere carries on. A lock on this machine
and a lease in GCS (generation preconditions, its own heartbeat thread) keep a second
babysitter off the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpuctl import jobs, storage
from tpuctl.babysit_policy import (
    Action,
    Adopt,
    BabysitOptions,
    BabysitState,
    Event,
    Finish,
    GiveUp,
    Launch,
    Observation,
    Progress,
    Relaunch,
    ReplaceNode,
    Wait,
    decide,
    note,
)
from tpuctl.config import private_dir, private_opener, write_private
from tpuctl.errors import TpuctlError
from tpuctl.naming import RUN_ID_RE
from tpuctl.wording import plural

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.fanout import Host
    from tpuctl.lease import GcsLease
    from tpuctl.planning import NodePlan
    from tpuctl.providers.base import Node, Provider

__all__ = ["BabysitOptions", "BabysitState", "Babysitter", "Event", "LogFile", "last_run"]

LOG_LINES = 20  # lines of a failed worker's log kept with its event
LEASE_FILE = "babysit.lease"
STATE_FILE = "babysit.json"
# What start_run sets in this process to reach a local pod's GCS emulator.
STORAGE_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")


@dataclass
class View:
    """What the live display shows: a snapshot made from the latest observation and action."""

    node_state: str = "?"
    workers: list[jobs.WorkerJob] = field(default_factory=list)
    step: int | None = None
    loss: float | None = None
    activity: str = "starting"


# -- progress from the run directory -----------------------------------------------------


class MetricsTail:
    """The records appended to `{run_dir}/metrics.jsonl` since the last poll (local, gs://,
    or on a worker's own disk).

    Only the newest record is kept, so memory stays bounded however long the run.
    """

    def __init__(self, run_dir: str):
        self.path = f"{run_dir.rstrip('/')}/metrics.jsonl"
        self.offset = 0
        self.last_step: int | None = None
        self.last_loss: float | None = None
        self.cache_progress = False  # the last poll read a data-cache build record

    def poll(self, worker: Host | None = None) -> list[dict[str, Any]]:
        """The new complete records; `worker`: read the file on that worker's own disk."""
        self.cache_progress = False
        data = self._read_from(self.offset, worker)
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

    def _read_from(self, offset: int, worker: Host | None) -> bytes | None:
        from tpuctl.jobs.runs import read_on_worker

        # gs:// through google-cloud-storage, a CLI dependency: the trainer's gcsfs may not
        # be installed where babysit runs (`pip install tpuctl` on a laptop).
        if worker is not None:
            found = read_on_worker(worker, self.path, offset)
        elif "://" in self.path:
            found = storage.read_from(self.path, offset)
        else:
            found = self._local(offset)
        if found is None:
            return None
        size, data = found
        if size < offset:  # the file was recreated: start over
            self.offset = 0
            return self._read_from(0, worker)
        return data

    def _local(self, offset: int) -> tuple[int, bytes] | None:
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(min(offset, size))
                return size, f.read()
        except FileNotFoundError:
            return None


def read_done(run_dir: str, worker: Host | None = None) -> dict[str, Any] | None:
    """The run's DONE record, or None while it is not finished; `worker`: read on that
    worker's own disk."""
    from tpuctl.jobs.runs import run_summary

    return run_summary(run_dir, polling=True, worker=worker)


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
    bucket = settings.get("bucket")
    if settings.get("provider") == "local" or not bucket:
        return None
    return storage.recipe_uri(str(bucket), run_id).rsplit("/", 1)[0]


def load_state(run_id: str, remote_dir: str | None = None) -> BabysitState | None:
    """The newest saved state of a run: this machine's file, or the copy in GCS."""
    found = []
    path = local_state_path(run_id)
    if path.is_file():
        found.append(_parsed_state(path.read_text(), str(path)))
    if remote_dir:
        with contextlib.suppress(TpuctlError):
            text = storage.read_text(f"{remote_dir}/{STATE_FILE}")
            if text:
                found.append(_parsed_state(text, f"{remote_dir}/{STATE_FILE}"))
    return max(found, key=lambda s: s.updated_at) if found else None


def _parsed_state(text: str, where: str) -> BabysitState:
    try:
        return BabysitState.from_json(text)
    except (ValueError, TypeError, AttributeError) as e:  # cut short, or edited
        raise TpuctlError(
            f"babysit state {where} cannot be read ({type(e).__name__}); move it away to "
            "start afresh (the run itself resumes from its checkpoints)",
            exit_code=1,
        ) from None


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


class LocalLock:
    """One babysitter per run on this machine: an exclusive lock file, which names its holder."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self._file: Any = None

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

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# -- the babysitter --------------------------------------------------------------------


class StopBabysitting(TpuctlError):
    """Babysitting stops with a report (a budget spent, a node that is not ours, ...)."""


class BudgetExhausted(StopBabysitting):
    """Too many preemptions or failures."""


@contextlib.contextmanager
def stop_on_signals(stopping: threading.Event, signums=(signal.SIGINT, signal.SIGTERM)):
    """While inside, Ctrl-C or SIGTERM sets `stopping`, which `Babysitter` looks at before
    every observation, in long actions and while it waits between polls; a second one
    interrupts at once.

    The first one raises nothing: a KeyboardInterrupt raised wherever the main thread
    happens to be is lost when that is a callback Python runs for itself (an import's
    module-lock cleanup, a finaliser: "Exception ignored"), and the babysitter went on
    for good; one raised inside an import can also leave Python exiting by SIGINT after
    the interrupt was handled."""

    def stop(_signum: int, _frame: object) -> None:
        if stopping.is_set():
            raise KeyboardInterrupt
        stopping.set()
        os.write(2, b"babysit: stopping after the current action (again to stop at once)\n")

    previous = {signum: signal.signal(signum, stop) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _shown(override: str) -> str:
    """`override` as a message may show it: an `env.NAME=` value may be a secret."""
    key, sep, _ = override.partition("=")
    return f"{key}=..." if sep and key.startswith("env.") else override


class Babysitter:
    """The loop: `run()` returns the final state once the run's DONE marker exists."""

    def __init__(
        self,
        settings: Settings,
        options: BabysitOptions,
        log: Callable[[str], None] = lambda _line: None,
        on_update: Callable[[BabysitState, View], None] = lambda _state, _view: None,
        clock: Callable[[], float] = time.time,
    ):
        from tpuctl.planning import plan_node
        from tpuctl.providers import provider_for

        self.settings = settings
        self.options = options
        self.log = log
        self.on_update = on_update
        self.clock = clock
        self.run_id = options.run_id or self._new_run_id()
        # Where the node goes (zone, project, fallback zones, labels): as `up` plans it.
        self.plan: NodePlan = plan_node(
            settings,
            options.accelerator_type,
            name=options.node,
            run_id=self.run_id,
            scheduling=options.scheduling,
            retry_for=options.retry_for_s,
        )
        self.provider: Provider = provider_for(settings)
        self.lock = LocalLock(self.run_id)
        self.remote_dir = remote_dir(settings, self.run_id)
        self.lease: GcsLease | None = None
        self.state = BabysitState(
            self.run_id, options.node, options.accelerator_type, started_at=clock()
        )
        self.view = View()
        self.metrics: MetricsTail | None = None
        self._action_errors = 0
        self._last_note: str | None = None
        self._api_down = False
        self._user_storage_env = {name: os.environ.get(name) for name in STORAGE_ENV}
        # Set by stop_on_signals (Ctrl-C, SIGTERM): _check_stopping raises KeyboardInterrupt
        # at the loop's next look, wait or progress report.
        self.stopping = threading.Event()
        # --env, then every env value of the first launch: stored recipes keep names only.
        self._run_env = dict(options.env)

    def _new_run_id(self) -> str:
        return jobs.new_run_id(self._load_recipe().run_id)

    def _stored_recipe(self) -> str | None:
        """The copy of the recipe `run` stored for this run, when it did."""
        from tpuctl.jobs.runs import stored_recipe_uri

        self._use_local_gcs()
        try:
            uri = stored_recipe_uri(self.settings, self._current_node(), self.run_id)
            return uri if storage.read_text(uri, polling=True) is not None else None
        except Exception:  # no bucket, the node gone, GCS unreadable: the file given it is
            return None

    def _use_local_gcs(self) -> None:
        """Point this process where `run` puts a local pod's run files (`emulator_for`)."""
        from tpuctl.gcs_emulator import emulator_env
        from tpuctl.jobs.runs import emulator_for

        if self.settings.get("provider") == "local" and (url := emulator_for("local")):
            os.environ.update(emulator_env(url))

    def _load_recipe(self) -> Any:
        """The recipe babysit was given, read where it is (a local pod's gs:// recipe from
        the local pods' GCS emulator)."""
        from tpuctl.jobs.runs import load_recipe

        if self.options.recipe.startswith("gs://"):
            self._use_local_gcs()
        return load_recipe(self.options.recipe, self.options.overrides)

    @property
    def lease_ttl_s(self) -> float:
        return max(120.0, 4 * self.options.poll_s)

    # -- the loop ---------------------------------------------------------------------

    def claim(self) -> None:
        """Take the run's lock here and its lease in GCS, or raise a TpuctlError naming
        the babysitter that holds them, or the run_dir it cannot babysit."""
        from tpuctl.lease import GcsLease

        if not self.lock.holding:
            self.refuse_a_run_dir_it_would_lose()
            self.lock.acquire()
        if self.remote_dir and self.lease is None:
            lease = GcsLease(f"{self.remote_dir}/{LEASE_FILE}", self.lease_ttl_s)
            try:
                lease.claim(f"run {self.run_id}")
            except BaseException:
                self.lock.release()
                raise
            self.lease = lease

    def run(self) -> BabysitState:
        """Babysit until DONE; raises StopBabysitting (or another TpuctlError) to give up."""
        from tpuctl.lease import Heartbeat

        self.claim()
        heartbeat = Heartbeat(self.lease, self.lease_ttl_s / 4) if self.lease else None
        try:
            with heartbeat or contextlib.nullcontext():
                saved = load_state(self.run_id, self.remote_dir)
                if saved is not None:
                    self._refuse_overrides_it_would_drop(saved)
                    self._note_edits_it_does_not_apply(saved)
                    self.state = saved.carried_on()
                    self.log(f"carrying on from saved state: {self._summary()}")
                self._start_metrics()
                while not self.cycle():
                    self._save()
                    self.on_update(self.state, self.view)
                    self.stopping.wait(self.options.poll_s)  # returns at once on a signal
                    self._check_stopping()
                self.on_update(self.state, self.view)
                return self.state
        finally:
            if self.lease is not None:
                self.lease.release()
            self.lock.release()

    def refuse_a_run_dir_it_would_lose(self) -> None:
        """Before anything is done: refuse a run whose run_dir is on each worker's own disk
        when babysitting it may mean recreating its node, which starts with empty disks."""
        saved = load_state(self.run_id, self.remote_dir)
        run_dir = saved.run_dir if saved and saved.run_dir else self._load_recipe().run_dir
        self._check_run_dir(run_dir)

    def _check_run_dir(self, run_dir: str) -> None:
        from tpuctl.babysit_policy import never_recreates

        if self._run_dir_is_here(run_dir) or never_recreates(self.options):
            return
        bucket = self.settings.get("bucket") or "BUCKET"
        raise StopBabysitting(
            f"run_dir {run_dir} is on each worker's own disk: babysit cannot read the run's "
            "progress or DONE from here, and a node it recreates after a preemption starts "
            "with empty disks, so the run would start over from step 0; give the run a gs:// "
            f"run_dir (`-- run_dir=gs://{bucket}/runs/{self.run_id}`, or `run_dir:` in the "
            "recipe), or pass --max-preemptions 0 to babysit it without ever recreating its "
            "node",
            exit_code=2,
        )

    def _run_dir_is_here(self, run_dir: str) -> bool:
        from tpuctl.jobs.runs import run_dir_is_here

        return run_dir_is_here(run_dir, str(self.settings.get("provider", "cloud")))

    def _refuse_overrides_it_would_drop(self, saved: BabysitState) -> None:
        """A saved run relaunches from its stored recipe: overrides that would change it
        are refused rather than ignored (a finished run would stay finished). The stored
        recipe keeps env names only, so `env.NAME=VALUE` overrides change nothing there:
        their values go to the relaunches, as `--env` values do (which win)."""
        from tpuctl.jobs.runs import load_recipe

        uri, overrides = saved.recipe_uri, self.options.overrides
        if not overrides or uri is None:
            return
        if uri.startswith("gs://"):
            self._use_local_gcs()
        given = load_recipe(uri, overrides)
        if dataclasses.replace(given, env=dict.fromkeys(given.env)) == load_recipe(uri, []):
            values = {name: value for name, value in given.env.items() if value is not None}
            self._run_env = {**values, **self._run_env}
            return  # the overrides it was first started with, stored already
        shown = " ".join(map(_shown, overrides))
        raise TpuctlError(
            f"run {self.run_id} carries on from its saved state, relaunching its stored recipe "
            f"{uri}, which {shown} would change; to go on with them, run "
            f"`tpuctl run {uri} --name {self.options.node} --run-id {self.run_id} -- "
            f"{shown}` first, then babysit without them"
        )

    def _note_edits_it_does_not_apply(self, saved: BabysitState) -> None:
        """A saved run relaunches from its stored recipe, not from the file babysit was given:
        say so when that file (with the overrides given) now differs from it, an edit made
        since the run started, say, which no relaunch would apply."""
        from tpuctl.jobs.runs import load_recipe
        from trainer.config import recipe_differences

        uri, given = saved.recipe_uri, self.options.recipe
        if uri is None or not given or "://" in given or not Path(given).is_file():
            return
        if uri.startswith("gs://"):
            self._use_local_gcs()
        try:
            edited = load_recipe(given, self.options.overrides)
        except TpuctlError:  # an edit that broke it: nothing relaunches it either
            return
        if not (changes := recipe_differences(edited, load_recipe(uri, []))):
            return
        shown = ", ".join(
            f"{key} {value!r} (the run's: {stored!r})" for key, value, stored in changes[:3]
        )
        more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
        self.log(
            f"note: {given} differs from run {self.run_id}'s stored recipe in {shown}{more}; "
            f"babysit relaunches the stored one ({uri}). To train with {given} as it is now, "
            f"run `tpuctl run {given} --name {self.options.node} --run-id {self.run_id}` "
            "first, then babysit"
        )

    def cycle(self) -> bool:
        """One observation and the action it calls for; True once the run is finished.

        An action that fails (a launch refused, a worker unreachable while stopping the
        job) is retried on the next cycle, up to --max-failures times in a row."""
        try:
            while True:  # a fresh node is looked at again at once, not a poll later
                self._check_stopping()
                self._check_lease()
                observation = self.observe()
                self.state, lines = note(self.state, observation, self.options.user)
                for line in lines:
                    self.log(line)
                action = decide(self.state, observation, self.options)
                self._render(observation, action)
                if not self.act(action):
                    break
        except StopBabysitting:
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
        return self.state.finished

    def _check_lease(self) -> None:
        """A babysitter that lost its lease stops acting at once, and says so."""
        if self.lease is not None and self.lease.lost:
            raise StopBabysitting(
                f"stopped babysitting run {self.run_id}: {self.lease.lost}; that babysitter "
                "acts on the run now",
                exit_code=1,
            )

    def _check_stopping(self) -> None:
        if self.stopping.is_set():
            raise KeyboardInterrupt

    def _progress(self, line: str) -> None:
        """Progress of a long action (stockout retries, worker preparation): logged, and
        the action stops if the babysitter is stopping or lost its lease meanwhile."""
        self.log(line)
        self._check_stopping()
        self._check_lease()

    # -- observe ----------------------------------------------------------------------

    def observe(self) -> Observation:
        """Look at everything a decision needs; reads only, changes nothing. The run's files
        are read after its jobs: worker 0 writes DONE before it exits, so jobs seen ended
        without DONE have ended without it. Its time is read last: an event's `at` is when
        the babysitter knew, never before it happened."""
        node, api_error = self._look_up_node()
        workers: tuple[jobs.WorkerJob, ...] = ()
        hosts: list[Host] = []
        if node is not None and node.ready:
            hosts = self._hosts(node)
            workers = tuple(jobs.status(hosts, self.run_id))
            if any(w.state != "running" for w in workers):
                # A preemption kills the jobs before the API says so: look at the node again
                # before calling a job that ended on a READY node a failure.
                node, api_error = self._look_up_node()
        progress, storage_error = self._read_progress(hosts)
        return Observation(
            now=self.clock(),
            node=node,
            api_error=api_error,
            workers=workers,
            progress=progress,
            storage_error=storage_error,
        )

    def _read_progress(self, hosts: list[Host]) -> tuple[Progress, str | None]:
        """New metrics records and DONE (a run directory on the workers' own disks: worker
        0's, as long as the node is READY); a read error is a reason to look again."""
        run_dir, worker = self.state.run_dir, None
        if run_dir and not self._run_dir_is_here(run_dir):
            if not hosts:
                return Progress(), None  # nothing to read it on until the node is READY
            worker = hosts[0]
        try:
            records = self.metrics.poll(worker) if self.metrics is not None else []
            done = read_done(run_dir, worker) if run_dir else None
        except Exception as err:  # GCS or SSH trouble (503, timeouts, a dropped connection)
            return Progress(), f"cannot read {run_dir}: {type(err).__name__}: {err}"
        building = self.metrics is not None and self.metrics.cache_progress
        if not records:
            return Progress(done=done, building_cache=building), None
        last = records[-1]
        first = records[0]["step"]
        return Progress(first, last["step"], last.get("loss"), done, building), None

    def _look_up_node(self) -> tuple[Node | None, str | None]:
        """The node where it lives: the zone remembered in the state, else the plan's zones
        in order (a node made earlier may sit in a fallback zone). The TPU API failing (a
        500, a 429, a timeout) is an error to wait out, never a missing node."""
        from google.api_core.exceptions import GoogleAPICallError, RetryError

        try:
            if not self.provider.capabilities.zones:
                return self.provider.get(self.options.node), None
            if self.state.zone:
                node = self._provider_at(self.state.zone, self.state.project).get(self.options.node)
                if node is not None:
                    return node, None
            # Not remembered, or not there: a replacement interrupted (Ctrl-C, a lost lease)
            # while it came up in a fallback zone goes on coming up there.
            for zone in self.plan.zones:
                if zone == self.state.zone and self.plan.spec.project == self.state.project:
                    continue  # just looked
                node = self._provider_at(zone, self.plan.spec.project).get(self.options.node)
                if node is not None:
                    return node, None
            return None, None
        except (TpuctlError, GoogleAPICallError, RetryError) as err:
            return None, str(err)

    def _provider_at(self, zone: str | None, project: str | None) -> Any:
        if not self.provider.capabilities.zones or not zone:
            return self.provider
        return self.provider.at(zone, project)

    def _hosts(self, node: Node) -> list[Host]:
        from tpuctl.hosts import hosts_for

        return hosts_for(self.settings, node)

    # -- act --------------------------------------------------------------------------

    def act(self, action: Action) -> bool:
        """Carry out `action`; True when the node should be looked at again at once."""
        if isinstance(action, Wait):
            self.view.activity = action.activity
            if action.note and action.note != self._last_note:
                self.log(action.note)
            self._last_note = action.note
            return False
        self._last_note = None
        if isinstance(action, ReplaceNode):
            return self._replace_node(action)
        if isinstance(action, Launch):
            self._launch(action.stop_first)
        elif isinstance(action, Adopt):
            self._adopt()
        elif isinstance(action, Relaunch):
            self._relaunch(action.event)
        elif isinstance(action, Finish):
            self._finish(action)
        elif isinstance(action, GiveUp):
            self._give_up(action)
        return False

    def _replace_node(self, action: ReplaceNode) -> bool:
        name = self.options.node
        if action.event is not None:
            self._record(action.event)
        elif self.state.launches == 0 and action.node is None:
            self.log(f"{name} does not exist yet: creating it")
        self.state.pending_launch = self.state.launches > 0
        self._save()
        started = self.clock()
        self.view.activity = f"deleting {name}"
        self._delete_node(action.node)
        self.view.activity = f"creating {name}"
        node = self._create_node()
        if action.event is not None:
            self.state.events[-1].recreate_s = self.clock() - started
        self.state.zone, self.state.project = node.zone, node.project
        self.state.reset_timers(self.clock())
        self._save()
        return True

    def _delete_node(self, node: Node | None) -> None:
        """Delete the run's lost node and its queued resource; a node that vanished can
        leave its queued resource behind, holding quota and blocking the new one."""
        name = self.options.node
        if node is not None:
            self._provider_at(node.zone, node.project).delete(name, self._progress)
        elif self.state.zone and self.provider.capabilities.queued_resources:
            provider = self._provider_at(self.state.zone, self.state.project)
            provider.delete_queued(provider.queued_path(name), self._progress)

    def _create_node(self) -> Node:
        """Create the node as `up` would (stockouts retried across the fallback zones);
        returns it READY, wherever it came up."""
        from tpuctl.hosts import remember
        from tpuctl.planning import create_planned

        plan = self.plan
        provider = self._provider_at(plan.spec.zone, plan.spec.project)
        node = create_planned(provider, plan, self._progress)
        assert node is not None  # waited for: READY
        if self.provider.capabilities.zones:
            remember(self.settings, node)  # new VMs, new host keys: forget the old ones
        return node

    def _adopt(self) -> None:
        """Watch the run instead of launching it: it already runs on every worker
        (`tpuctl run` first, `tpuctl babysit` after)."""
        from tpuctl.jobs.runs import load_recipe

        # A local file may have been edited since `run` stored the run's copy: relaunches
        # read that copy, as they do after a launch of this babysitter's own.
        stored = None if "://" in self.options.recipe else self._stored_recipe()
        recipe = self._load_recipe() if stored is None else load_recipe(stored, [])
        self._check_run_dir(recipe.run_dir)  # the stored copy's, which may not be the file's
        self.state.recipe_uri = stored or (
            self.options.recipe if "://" in self.options.recipe else None
        )
        self.state.run_dir = recipe.run_dir
        self.state.launches = 1
        self.state.reset_timers(self.clock())
        self.log(
            f"run {self.run_id} already runs on every worker of {self.options.node}: watching it"
        )
        self._start_metrics()
        self._save()

    def _relaunch(self, event: Event) -> None:
        node = self._current_node()
        hosts = self._hosts(node)
        self._keep_log_tail(event, hosts)
        self._record(event)
        self.state.pending_launch = True
        self._save()
        self._stop_job(hosts)
        self._launch(stop_first=False, node=node, hosts=hosts)

    def _launch(
        self, stop_first: bool, node: Node | None = None, hosts: list[Host] | None = None
    ) -> None:
        from tpuctl.jobs.runs import ResumeRefused, RunRequest, start_run

        node = node or self._current_node()
        hosts = hosts or self._hosts(node)
        if stop_first:  # whatever is left of the previous attempt goes first
            self._stop_job(hosts)
        self._restore_storage_env()
        first = self.state.recipe_uri is None
        recipe = self.options.recipe if first else str(self.state.recipe_uri)
        overrides = self.options.overrides if first else []
        self.view.activity = f"launching run {self.run_id} on {node.name}"
        self.log(f"launching run {self.run_id} on {plural(len(hosts), 'worker')} of {node.name}")
        request = RunRequest(recipe, overrides, self._run_env, self.run_id, force=False)
        try:
            started = start_run(self.settings, node, hosts, request, self._progress)
        except ResumeRefused as err:  # not a failure to retry: every launch is refused alike
            raise StopBabysitting(
                f"stopped babysitting run {self.run_id}: {err} (nothing was stored or launched)",
                exit_code=2,
            ) from None
        self._run_env = dict(started.env)
        self.state.recipe_uri, self.state.run_dir = started.recipe_uri, started.run_dir
        self.state.launches += 1
        self.state.pending_launch = False
        self.state.reset_timers(self.clock())
        events = self.state.events
        if events and events[-1].relaunched_s is None:
            events[-1].relaunched_s = self.clock() - events[-1].at
        self._start_metrics()
        self._save()

    def _current_node(self) -> Node:
        """The node as it is now, for its workers' addresses."""
        node, error = self._look_up_node()
        if node is None:
            raise TpuctlError(f"node {self.options.node} is gone ({error or 'missing'})", 1)
        return node

    def _finish(self, action: Finish) -> None:
        done = action.done
        self.state.finished = True
        self.state.final_step = done.get("step")
        self.state.final_loss = (done.get("final") or {}).get("loss")
        self.view.activity = "finished"
        self.log(f"run {self.run_id} finished at step {self.state.final_step}: {self._summary()}")
        self._save()
        if action.delete_node:
            node = self._current_node()
            self._provider_at(node.zone, node.project).delete(node.name, self.log)
        elif self.options.delete_when_done:
            self.log(f"not deleting {self.options.node}: it was not created for this run")

    def _give_up(self, action: GiveUp) -> None:
        event = action.event
        hosts: list[Host] = []
        if event is not None and (event.worker is not None or action.stop_job):
            with contextlib.suppress(TpuctlError):  # the report goes out all the same
                hosts = self._hosts(self._current_node())
                self._keep_log_tail(event, hosts)
        if event is not None:
            self._record(event)
        self._save()
        if action.stop_job and hosts:
            with contextlib.suppress(TpuctlError):
                self._stop_job(hosts)
        if action.bad_input or action.diverged:
            said = _error_line(event.log_tail if event else [])
            fix = (
                "fix the recipe"
                if action.bad_input
                else "lower optimizer.lr in the recipe (or raise optimizer.warmup_steps)"
            )
            raise StopBabysitting(
                f"stopped babysitting run {self.run_id}: {action.reason}"
                f"{f': {said}' if said else ''}; {fix}, then `tpuctl run RECIPE --name "
                f"{self.options.node} --run-id {self.run_id} --all-workers` (it resumes from the "
                "run's checkpoints) and babysit it again, which carries on what you ran (nothing "
                f"was recreated or relaunched; see {log_path(self.run_id)})",
                exit_code=2 if action.bad_input else 1,
            )
        if not action.budget:
            raise StopBabysitting(f"stopped babysitting run {self.run_id}: {action.reason}", 1)
        last = f"; last: {event.cause}" if event and event.kind != "preemption" else ""
        raise BudgetExhausted(
            f"stopped babysitting run {self.run_id} after {action.reason}{last}; the node and "
            f"the checkpoints are left as they are (see {log_path(self.run_id)})",
            exit_code=1,
        )

    def _stop_job(self, hosts: list[Host]) -> None:
        """SIGTERM to each worker's job, wait, SIGKILL what remains, then clear lockfiles."""
        self.view.activity = "stopping the job on every worker"
        for report in jobs.kill(hosts, grace=self.options.stop_grace_s, only=self.run_id):
            if report.error:
                raise TpuctlError(f"could not stop the job on {report.label}: {report.error}", 1)
            if report.other_run:
                raise StopBabysitting(
                    f"stopped babysitting run {self.run_id}: {report.label} runs another "
                    f"run, {report.other_run}, and babysit stops only its own; stop that one "
                    f"yourself (`tpuctl kill {self.options.node}`) and babysit again",
                    1,
                )

    def _keep_log_tail(self, event: Event, hosts: list[Host]) -> None:
        """Keep the last lines of the log of the worker `event` is recorded for."""
        worker = [h for h in hosts if h.label == event.worker]
        if worker:
            event.log_tail = self._log_tail(worker)

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

    def _render(self, obs: Observation, action: Action) -> None:
        """The display's snapshot, and the log's lines about the API coming and going."""
        if obs.api_error is None and self._api_down:
            self.log("TPU API answering again")
        self._api_down = obs.api_error is not None
        node_state = (
            "API unavailable" if obs.api_error else obs.node.state if obs.node else "missing"
        )
        self.view = dataclasses.replace(
            self.view,
            node_state=node_state,
            workers=list(obs.workers) or self.view.workers,
            step=self.state.step,
            loss=self.state.loss,
        )

    def _record(self, event: Event) -> None:
        self.state.record(event)
        where = "before its first step" if event.step is None else f"at step {event.step}"
        self.log(f"{event.kind} {where}: {event.cause}")

    def _start_metrics(self) -> None:
        if self.state.run_dir and self.metrics is None:
            self.metrics = MetricsTail(self.state.run_dir)

    def _save(self) -> None:
        self.state.updated_at = self.clock()
        text = self.state.to_json()
        write_private(local_state_path(self.run_id), text)
        if self.remote_dir:
            remote = f"{self.remote_dir}/{STATE_FILE}"
            try:
                storage.upload_text(remote, text)
            except Exception as err:  # GCS trouble must not stop the babysitter
                self.log(f"could not save the state to {remote}: {err}")

    def _summary(self) -> str:
        state = self.state
        return (
            f"{state.launches} launch(es), {state.preemptions} preemption(s), "
            f"{state.failures} failure(s)"
        )


def _error_line(log_tail: list[str]) -> str | None:
    """The trainer's own one-line account of a failure (`error: ...`, its last), without
    the prefix the CLI's own message has already."""
    for line in reversed(log_tail):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    return None


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
        (worker,) = jobs.status(hosts_for(settings, node, [0]))
        if worker.state == "unreachable":  # not "no run yet": nobody could tell
            raise TpuctlError(
                f"cannot ask {worker.label} of {node.name} for its latest run: {worker.error}; "
                "fix the SSH access, or name the run with --run-id RUN",
                exit_code=1,
            )
        run_id = worker.run_id
        # The worker's answer names files here and in GCS: a path is no run of ours.
        if run_id is not None and not RUN_ID_RE.match(run_id):
            raise TpuctlError(
                f"{worker.label} of {node.name} names its latest run {run_id!r:.80}, which is "
                "no run id tpuctl makes; name the run to babysit with --run-id RUN",
                exit_code=1,
            )
    if run_id is None:
        raise TpuctlError(
            f"no run on {node.name} yet: give the recipe, "
            f"`tpuctl babysit {node.accelerator_type} RECIPE --name {node.name}`"
        )
    bucket = settings.get("bucket") or (LOCAL_POD_BUCKET if node.provider == "local" else None)
    if not bucket:
        raise TpuctlError("no bucket: set one with `tpuctl config set bucket NAME`")
    return node.accelerator_type, node.name, run_id, storage.recipe_uri(str(bucket), run_id)
