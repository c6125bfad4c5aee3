"""What `tpuctl babysit` does about what it sees: pure functions, no I/O, no clock.

The babysitter (tpuctl.babysit) observes the node, the job and the run's files into an
`Observation`, folds it into its `BabysitState` with `note`, asks `decide` for one
`Action`, and carries that out. Every timer and budget lives in the state, so each
decision can be pinned down by a table of (state, observation) -> action.

What may be deleted: only a node whose labels say a babysitter created it for this run,
or one the user handed over with `--adopt`. SSH trouble on its own never justifies a
deletion; only the TPU API's view of the node does (missing, PREEMPTED/TERMINATED, or not
READY beyond the grace period).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tpuctl import jobs, ownership
from tpuctl.fanout.base import AUTH_FAILED
from tpuctl.providers.base import Node
from trainer.contract import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PEER_LOST, EXIT_PREEMPTED

# Node states that mean the node is gone for good: replace it at once.
LOST_STATES = frozenset({"PREEMPTED", "TERMINATED", "STOPPED", "HIDDEN"})
MAX_EVENTS = 100  # events kept in the state file; counts are kept separately
# What an SSH login refused looks like in a worker's error (tpuctl.fanout.ssh).
_ACCESS_REFUSED = (AUTH_FAILED, "host key of")


@dataclass(frozen=True)
class BabysitOptions:
    """What the user asked `tpuctl babysit` for."""

    accelerator_type: str
    node: str
    recipe: str  # local path or gs:// URI (the first launch; relaunches use the stored copy)
    overrides: list[str] = field(default_factory=list)
    env: Mapping[str, str] = field(default_factory=dict)  # secrets: never persisted or logged
    run_id: str | None = None
    user: str = "tpuctl"  # who babysits: the owner label of the nodes it creates
    adopt: bool = False  # the user hands the named node over: babysit may replace it
    scheduling: str = "on-demand"  # on-demand | spot | preemptible
    max_preemptions: int | None = None  # None: unbounded
    max_failures: int = 3
    max_restarts: int | None = None  # preemptions, failures and clean stops together
    poll_s: float = 30.0
    not_ready_grace_s: float = 300.0  # a node neither READY nor lost for this long is lost
    hang_timeout_s: float = 1800.0  # no new step for this long after launch or progress
    stop_grace_s: float = jobs.DEFAULT_GRACE_S
    retry_for_s: float = 24 * 3600.0  # stockout retries while recreating
    delete_when_done: bool = False


@dataclass
class Event:
    """One restart: why, when, at which step, and what it cost."""

    kind: str  # preemption | failure | hang | stop (a clean stop: exit 75)
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


# Timers: when this babysitter first saw a condition; not saved (a babysitter that
# carries on starts them afresh), and reset whenever the node is replaced or the job
# relaunched.
TIMERS = ("not_ready_since", "unreachable_since", "progress_at")
# Not saved either: what only this babysitter has seen.
UNSAVED = (*TIMERS, "saw_job_running")


@dataclass
class BabysitState:
    """Everything a babysitter needs to carry on where another one stopped."""

    run_id: str
    node: str
    accelerator_type: str
    zone: str | None = None  # where the run's node lives (a fallback zone, maybe)
    project: str | None = None
    recipe_uri: str | None = None  # the stored recipe, once launched
    run_dir: str | None = None
    preemptions: int = 0
    failures: int = 0
    clean_stops: int = 0
    launches: int = 0
    pending_launch: bool = False  # a (re)created node still needs the job
    finished: bool = False
    step: int | None = None  # newest logged step
    loss: float | None = None
    final_step: int | None = None
    final_loss: float | None = None
    started_at: float = 0.0
    updated_at: float = 0.0
    events: list[Event] = field(default_factory=list)
    not_ready_since: float | None = None
    unreachable_since: float | None = None
    progress_at: float | None = None  # last launch or new step
    # This babysitter saw the run's job running: if tpuctl stops it now, the user did.
    saw_job_running: bool = False

    @property
    def restarts(self) -> int:
        return self.preemptions + self.failures + self.clean_stops

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        for name in UNSAVED:
            data.pop(name)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> BabysitState:
        data = json.loads(text)
        fields = {f.name for f in dataclasses.fields(Event)}  # another version's: ignored
        events = [
            Event(**{k: v for k, v in e.items() if k in fields}) for e in data.pop("events", [])
        ]
        known = {f.name for f in dataclasses.fields(cls)} - set(UNSAVED)
        return cls(**{k: v for k, v in data.items() if k in known}, events=events)

    def carried_on(self) -> BabysitState:
        """This saved state as a new babysitter takes it up: not finished, whatever it says.
        The run may have been launched again since (more steps); DONE, if it is there still,
        says finished again on the first look."""
        return dataclasses.replace(self, finished=False, final_step=None, final_loss=None)

    def record(self, event: Event) -> None:
        """Add `event` and count it against its budget."""
        self.events = [*self.events, event][-MAX_EVENTS:]
        if event.kind == "preemption":
            self.preemptions += 1
        elif event.kind == "stop":
            self.clean_stops += 1
        else:
            self.failures += 1

    def reset_timers(self, now: float) -> None:
        """A new node or a new launch: nothing seen so far counts against it."""
        self.not_ready_since = self.unreachable_since = None
        self.progress_at = now


@dataclass(frozen=True)
class Progress:
    """What the run's files said this poll."""

    first_step: int | None = None  # the first step logged since the last poll
    step: int | None = None  # the newest
    loss: float | None = None
    done: dict[str, Any] | None = None  # the DONE record, once the run has finished
    building_cache: bool = False  # a token-cache build record came in: progress, no step


@dataclass(frozen=True)
class Observation:
    """One look at everything: the node as the API sees it, each worker's job, progress."""

    now: float
    node: Node | None = None
    api_error: str | None = None  # the TPU API could not say (500, 429, timeout)
    workers: tuple[jobs.WorkerJob, ...] = ()  # looked at only on a READY node
    progress: Progress = Progress()
    storage_error: str | None = None  # metrics or DONE unreadable this time


# -- actions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    """Nothing to do but look again; `note` is worth a line in the log."""

    activity: str
    note: str | None = None


@dataclass(frozen=True)
class ReplaceNode:
    """Delete the node (if there is one, or its queued resource) and create it anew.
    `event` is None for the first creation and for a retried recreation."""

    event: Event | None
    node: Node | None


@dataclass(frozen=True)
class Launch:
    """Start the run on the READY node (after stopping what is left of an attempt)."""

    stop_first: bool


@dataclass(frozen=True)
class Adopt:
    """The run already runs on every worker (`tpuctl run` first): watch it."""


@dataclass(frozen=True)
class Relaunch:
    """Stop the job everywhere, record why, launch it again."""

    event: Event


@dataclass(frozen=True)
class Finish:
    """DONE exists: report, and delete the node when asked (and allowed)."""

    done: dict[str, Any]
    delete_node: bool


@dataclass(frozen=True)
class GiveUp:
    """Stop babysitting with a report (exit 1, or 2 for `bad_input`); nothing is deleted.
    `event` is recorded first; `stop_job` stops the job so that it does not hold the TPU."""

    reason: str
    event: Event | None = None
    stop_job: bool = False
    budget: bool = False  # a budget ran out (the report says where the log is)
    bad_input: bool = False  # the trainer rejected the run's input: the report quotes its line
    diverged: bool = False  # the trainer stopped a run that diverged: the report quotes its line


Action = Wait | ReplaceNode | Launch | Adopt | Relaunch | Finish | GiveUp


# -- noting an observation --------------------------------------------------------------


def note(state: BabysitState, obs: Observation, user: str) -> tuple[BabysitState, list[str]]:
    """The state with the observation folded in (timers, progress, the location of the node
    `user` made for the run), and lines worth logging."""
    state = dataclasses.replace(state, events=list(state.events))
    lines: list[str] = []
    if state.progress_at is None:
        state.progress_at = obs.now
    progress = obs.progress
    if progress.building_cache:  # a long token-cache build is not a hang
        state.progress_at = obs.now
    if progress.step is not None:
        state.step, state.loss, state.progress_at = progress.step, progress.loss, obs.now
        state.events = [_resumed(e, progress, obs.now, lines) for e in state.events]
    node = obs.node
    if node is not None and ownership.created_for_run(node.labels, state.run_id, user):
        state.zone, state.project = node.zone, node.project
    if obs.api_error is None:
        if node is None or node.ready:
            state.not_ready_since = None
        elif state.not_ready_since is None:
            state.not_ready_since = obs.now
    if any(w.state == "running" for w in obs.workers):
        state.saw_job_running = True
    if any(w.state == "unreachable" for w in obs.workers):
        state.unreachable_since = state.unreachable_since or obs.now
    elif obs.workers:
        state.unreachable_since = None
    return state, lines


def _resumed(event: Event, progress: Progress, now: float, lines: list[str]) -> Event:
    """The first steps after a restart: what it cost."""
    if event.resumed_s is not None or not event.relaunched_s or progress.first_step is None:
        return event
    lost = None if event.step is None else max(0, event.step - (progress.first_step - 1))
    resumed = dataclasses.replace(event, resumed_s=now - event.at, steps_lost=lost)
    lines.append(
        f"training again at step {progress.first_step}: {resumed.resumed_s:.1f} s after the "
        f"{event.kind}, {lost} step(s) lost"
    )
    return resumed


def run_may_replace(node: Node, run_id: str, options: BabysitOptions) -> bool:
    """Whether babysitting `run_id` may delete and recreate this node: its labels say the
    user's babysitter created it for this run, or the user handed it over with --adopt.
    Never a node labelled as someone else's, --adopt or not."""
    if ownership.someone_elses(node.labels, options.user):
        return False
    return options.adopt or ownership.created_for_run(node.labels, run_id, options.user)


def never_recreates(options: BabysitOptions) -> bool:
    """Whether babysitting stops rather than replace a node it has launched on
    (`--max-preemptions 0`, `--max-restarts 0`): whatever the workers wrote to their own
    disks is then there for every relaunch. It may still create a node that is missing
    before the first launch."""
    return options.max_preemptions == 0 or options.max_restarts == 0


# -- deciding ---------------------------------------------------------------------------


def decide(state: BabysitState, obs: Observation, options: BabysitOptions) -> Action:
    """The one thing to do about `obs`. Pure: reads nothing but its arguments."""
    # A DONE while the job still runs is an earlier run's (a finished run going on): the
    # trainer removes it once it trains. Ending here would stop the job, and with
    # --delete-when-done delete its node.
    running = any(w.state == "running" for w in obs.workers)
    if obs.progress.done is not None and not running:
        node = obs.node
        mine = node is not None and run_may_replace(node, state.run_id, options)
        return Finish(obs.progress.done, delete_node=options.delete_when_done and mine)
    if obs.storage_error is not None:
        return Wait("cannot read the run's files; looking again", f"{obs.storage_error}")
    if obs.api_error is not None:
        return Wait("waiting for the TPU API", f"TPU API unavailable, waiting: {obs.api_error}")
    node = obs.node
    if node is None:
        return _replace(state, obs, options, None, "missing")
    refusal = _refuse(node, options)
    if refusal is not None:
        return refusal
    lost_since = state.not_ready_since
    if node.state in LOST_STATES:
        return _replace(state, obs, options, node, node.state)
    if lost_since is not None and obs.now - lost_since > options.not_ready_grace_s:
        return _replace(state, obs, options, node, f"{node.state} for {obs.now - lost_since:.0f} s")
    if not node.ready:
        return Wait(f"waiting for {node.name} ({node.state})")
    return _tend_job(state, obs, options)


def _refuse(node: Node, options: BabysitOptions) -> GiveUp | None:
    """A node babysit must leave alone: of another type, or someone else's."""
    if node.accelerator_type != options.accelerator_type:
        return GiveUp(
            f"node {node.name} is a {node.accelerator_type}, not a {options.accelerator_type}; "
            f"babysit another --name or `tpuctl down {node.name}` it"
        )
    if ownership.someone_elses(node.labels, options.user):
        return GiveUp(
            f"node {node.name} is not yours ({ownership.describe_owner(node.labels)}): "
            "babysit leaves it alone; babysit another --name"
        )
    return None


def _replace(
    state: BabysitState, obs: Observation, options: BabysitOptions, node: Node | None, what: str
) -> Action:
    first = state.launches == 0 and not state.events and node is None
    if node is not None and not run_may_replace(node, state.run_id, options):
        return GiveUp(
            f"node {node.name} is {what} but was not created for run {state.run_id} "
            f"({ownership.describe_owner(node.labels)}): babysit does not delete it; delete it "
            f"yourself (`tpuctl down {node.name}`), or pass --adopt to let babysit replace it"
        )
    if first or _replacing(state):  # nothing yet, or a retried recreation: same event
        return ReplaceNode(None, node)
    event = Event("preemption", f"node {state.node} {what}", obs.now, state.step)
    over = _over_budget(state, options, "preemption")
    if over:
        return GiveUp(over, event=event, budget=True)
    return ReplaceNode(event, node)


def _replacing(state: BabysitState) -> bool:
    """A lost node's replacement began and its new node was not created yet. A node lost
    after that (the new one preempted before the launch, or the node of a relaunch that
    failed) is a preemption of its own."""
    last = state.events[-1] if state.events else None
    return (
        state.pending_launch
        and last is not None
        and last.kind == "preemption"
        and last.recreate_s is None
    )


def _tend_job(state: BabysitState, obs: Observation, options: BabysitOptions) -> Action:
    workers = obs.workers
    refused = [w for w in workers if w.state == "unreachable" and _access_refused(w)]
    if refused:
        details = "; ".join(f"{w.label}: {w.error}" for w in refused)
        return GiveUp(
            f"cannot log in to {state.node}, which the TPU API says is READY: {details}. "
            "Nothing was deleted. Use the key and user the node accepts (`tpuctl config set "
            "ssh.key PATH`, `ssh.user USER`), or add this machine's key to the node's ssh-keys "
            "metadata, then babysit again"
        )
    if state.launches == 0 and workers and all(w.state == "running" for w in workers):
        return Adopt()
    unreachable = [w.label for w in workers if w.state == "unreachable"]
    if not unreachable and (state.launches == 0 or state.pending_launch):
        # a run found half ended (a worker crashed before this babysitter) goes first too
        running = any(w.state == "running" for w in workers)
        return Launch(stop_first=state.launches > 0 or running)
    if unreachable:  # a new VM's sshd not up yet, too: a launch now could only fail
        since = state.unreachable_since if state.unreachable_since is not None else obs.now
        note = None
        if obs.now - since > options.not_ready_grace_s:
            note = (
                f"{', '.join(unreachable)} unreachable over SSH for longer than "
                "--not-ready-grace while the TPU API says READY; not deleting the node for that "
                "(only the API's view can justify it)"
            )
        return Wait(f"{', '.join(unreachable)} unreachable; looking again", note)
    stalled = obs.now - (state.progress_at if state.progress_at is not None else obs.now)
    ended = [w for w in workers if w.state != "running"]
    stopped = [w.label for w in ended if w.stopped_by_tpuctl]
    if stopped and state.saw_job_running:  # the babysitter's own stops relaunch at once
        return GiveUp(
            f"its job was stopped with `tpuctl kill` (on {', '.join(stopped)}), not by a "
            "preemption: babysit does not start it again. The node and the checkpoints are "
            f"left as they are; babysit again (--run-id {state.run_id}) to carry the run on "
            "from its newest checkpoint"
        )
    if ended and (len(ended) == len(workers) or any(w.exit_code != 0 for w in ended)):
        return _relaunch(state, obs, options, ended)
    if stalled > options.hang_timeout_s:  # worker 0 stuck in its final save counts too
        cause = f"no step progress for {stalled:.0f} s (hung collective or stranded worker)"
        return _failure(state, options, Event("hang", cause, obs.now, state.step))
    return Wait("finishing" if ended else "training")  # process 0 writes DONE last


def _relaunch(
    state: BabysitState, obs: Observation, options: BabysitOptions, ended: list[jobs.WorkerJob]
) -> Action:
    parts = []
    for worker in ended:
        code = "no exit status" if worker.exit_code is None else f"exit {worker.exit_code}"
        parts.append(f"{worker.label} {worker.state} ({code})")
    first = _culprit(ended)
    if all(w.exit_code == EXIT_PREEMPTED for w in ended):
        cause = "job stopped after saving (SIGTERM): " + ", ".join(parts)
        event = Event("stop", cause, obs.now, state.step, worker=first.label, exit_code=75)
        over = _over_budget(state, options, "stop")
        return GiveUp(over, event=event, budget=True) if over else Relaunch(event)
    cause = "job ended without DONE: " + ", ".join(parts)
    event = Event(
        "failure", cause, obs.now, state.step, worker=first.label, exit_code=first.exit_code
    )
    if first.exit_code == EXIT_BAD_INPUT:  # the same recipe fails the same way every launch
        reason = (
            f"the trainer on {first.label} rejected the run's input (exit {EXIT_BAD_INPUT}), "
            "which no relaunch can fix"
        )
        return GiveUp(reason, event=event, stop_job=True, bad_input=True)
    if first.exit_code == EXIT_DIVERGED:  # resumed with the same settings, it diverges again
        reason = (
            f"the trainer on {first.label} stopped the run, which diverged (exit "
            f"{EXIT_DIVERGED}), before saving a state that is not finite; relaunched with the "
            "same settings it diverges again"
        )
        return GiveUp(reason, event=event, stop_job=True, diverged=True)
    return _failure(state, options, event)


def _culprit(ended: list[jobs.WorkerJob]) -> jobs.WorkerJob:
    """The worker a failure is recorded for (its log tail kept): the first that failed of its
    own accord, not one that ended because another process of the pod had failed."""
    failed = [w for w in ended if w.exit_code != 0]
    # EXIT_PEER_LOST: another process of the pod failed first, so the failure is that one's
    own = [w for w in failed if w.exit_code != EXIT_PEER_LOST]
    return (own or failed or ended)[0]


def _failure(state: BabysitState, options: BabysitOptions, event: Event) -> Action:
    over = _over_budget(state, options, event.kind)
    if over:  # the failed job is stopped first: a hung job must not hold the TPU
        return GiveUp(over, event=event, stop_job=True, budget=True)
    return Relaunch(event)


def _over_budget(state: BabysitState, options: BabysitOptions, kind: str) -> str | None:
    """What budget one more restart of `kind` would exceed, or None."""
    preemptions = state.preemptions + (kind == "preemption")
    failures = state.failures + (kind in ("failure", "hang"))
    restarts = state.restarts + 1
    if options.max_preemptions is not None and preemptions > options.max_preemptions:
        return f"{preemptions} preemptions (--max-preemptions {options.max_preemptions})"
    if failures > options.max_failures:
        steps = [e.step for e in state.events if e.kind in ("failure", "hang")] + [state.step]
        return (
            f"{failures} job failures (--max-failures {options.max_failures}), at steps "
            f"{', '.join(_step(step) for step in steps)}"
        )
    if options.max_restarts is not None and restarts > options.max_restarts:
        return f"{restarts} restarts (--max-restarts {options.max_restarts})"
    return None


def _step(step: int | None) -> str:
    """A step for a message: a job that failed before its first step has none."""
    return "none yet" if step is None else str(step)


def _access_refused(worker: jobs.WorkerJob) -> bool:
    return any(marker in (worker.error or "") for marker in _ACCESS_REFUSED)
