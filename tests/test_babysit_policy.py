"""`decide`, table-driven: one row per line of the README's babysit table, plus each way a
babysitter on a shared project must not destroy or duplicate work."""

from __future__ import annotations

import dataclasses

import pytest

from tpuctl.babysit_policy import (
    EXIT_PREEMPTED,
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
from tpuctl.jobs import WorkerJob
from tpuctl.ownership import ownership_labels
from tpuctl.providers.base import Node
from trainer.contract import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PEER_LOST

NOW = 10_000.0
RUN = "llama-3.1-8b-20261123"
OURS = ownership_labels("alice", RUN)
OPTIONS = BabysitOptions("v4-16", "pod", "recipe.yaml", run_id=RUN, user="alice")
AUTH = (
    "unreachable: authentication failed: no key accepted for user 'alice' "
    "(tried /home/alice/.ssh/id_ed25519)"
)


def node(state="READY", labels=OURS, accelerator_type="v4-16", zone="us-central2-b") -> Node:
    return Node("pod", zone, accelerator_type, state, project="p", labels=labels)


def job(label="w00", state="running", exit_code=None, error=None) -> WorkerJob:
    return WorkerJob(label, state, run_id=RUN, exit_code=exit_code, error=error)


RUNNING = (job("w00"), job("w01"))
FINISHED = (job("w00", "exited", 0), job("w01", "exited", 0))


def launched(**changes) -> BabysitState:
    """A run launched once on its node, trained to step 40, last progress 10 s ago."""
    base = BabysitState(RUN, "pod", "v4-16", launches=1, step=40, progress_at=NOW - 10)
    return dataclasses.replace(base, **changes)


def look(**changes) -> Observation:
    return dataclasses.replace(Observation(NOW, node=node(), workers=RUNNING), **changes)


PREEMPTED_AT_40 = Event("preemption", "node pod PREEMPTED", NOW - 60, 40)
RECREATED_AFTER_40 = dataclasses.replace(PREEMPTED_AT_40, recreate_s=50.0)
CRASHED_AT_40 = Event("failure", "job ended without DONE", NOW - 60, 40, worker="w01")

ROWS = [
    # -- the README's table ------------------------------------------------------------
    ("node missing", launched(), look(node=None), ReplaceNode, "node pod missing"),
    ("PREEMPTED", launched(), look(node=node("PREEMPTED")), ReplaceNode, "node pod PREEMPTED"),
    ("TERMINATED", launched(), look(node=node("TERMINATED")), ReplaceNode, "TERMINATED"),
    ("STOPPED", launched(), look(node=node("STOPPED")), ReplaceNode, "STOPPED"),
    (
        "not READY beyond the grace",
        launched(not_ready_since=NOW - 301),
        look(node=node("REPAIRING"), workers=()),
        ReplaceNode,
        "node pod REPAIRING for 301 s",
    ),
    (
        "not READY within the grace",
        launched(not_ready_since=NOW - 100),
        look(node=node("REPAIRING"), workers=()),
        Wait,
        "waiting for pod (REPAIRING)",
    ),
    (
        "a worker crashed",
        launched(),
        look(workers=(job("w00"), job("w01", "exited", 137))),
        Relaunch,
        "job ended without DONE: w01 exited (exit 137)",
    ),
    (
        "workers that exited 0 wait for worker 0's DONE",
        launched(),
        look(workers=(job("w00"), job("w01", "exited", 0))),
        Wait,
        "finishing",
    ),
    (
        "worker 0 stuck in its final save while the others finished is a hang",
        launched(progress_at=NOW - 1801),
        look(workers=(job("w00"), job("w01", "exited", 0))),
        Relaunch,
        "no step progress for 1801 s",
    ),
    (
        "no new step for --hang-timeout",
        launched(progress_at=NOW - 1801),
        look(),
        Relaunch,
        "no step progress for 1801 s",
    ),
    (
        "the TPU API failing",
        launched(),
        look(node=None, api_error="the TPU API keeps failing (503)"),
        Wait,
        "waiting for the TPU API",
    ),
    ("DONE", launched(), look(workers=FINISHED, progress=Progress(done={"step": 50})), Finish, ""),
    (
        "DONE while the job still runs is an earlier run's (it goes on with more steps)",
        launched(),
        look(progress=Progress(done={"step": 50})),
        Wait,
        "training",
    ),
    (
        "DONE of a node whose workers are not looked at (PREEMPTED after it finished)",
        launched(),
        look(node=node("PREEMPTED"), workers=(), progress=Progress(done={"step": 50})),
        Finish,
        "",
    ),
    ("training", launched(), look(), Wait, "training"),
    (
        "a recreated node's sshd not up yet: a pending launch waits rather than fail",
        launched(pending_launch=True, events=[RECREATED_AFTER_40]),
        look(workers=(job("w00", "unreachable", error="unreachable: timed out"), job("w01"))),
        Wait,
        "w00 unreachable; looking again",
    ),
    (
        "a first launch with a worker unreachable waits too",
        BabysitState(RUN, "pod", "v4-16"),
        look(workers=(job("w00", "unreachable", error="unreachable: timed out"),)),
        Wait,
        "w00 unreachable; looking again",
    ),
    # -- first launch, relaunch, adoption ----------------------------------------------
    ("no node yet", BabysitState(RUN, "pod", "v4-16"), look(node=None), ReplaceNode, None),
    (
        "a recreation retried is the same preemption",
        launched(pending_launch=True, preemptions=2, events=[PREEMPTED_AT_40]),
        look(node=None),
        ReplaceNode,
        None,
    ),
    (
        "the recreated node preempted before its launch is a preemption of its own",
        launched(pending_launch=True, preemptions=2, events=[RECREATED_AFTER_40]),
        look(node=node("PREEMPTED")),
        GiveUp,
        "3 preemptions (--max-preemptions 2)",
    ),
    (
        "the node of a relaunch that failed, lost, is a preemption too",
        launched(pending_launch=True, preemptions=2, failures=1, events=[CRASHED_AT_40]),
        look(node=node("PREEMPTED")),
        GiveUp,
        "3 preemptions (--max-preemptions 2)",
    ),
    ("a new node gets the job", BabysitState(RUN, "pod", "v4-16"), look(workers=()), Launch, ""),
    ("a run already running is watched", BabysitState(RUN, "pod", "v4-16"), look(), Adopt, ""),
    # -- the findings ------------------------------------------------------------------
    (
        "1: SSH refuses our key on a READY node: stop and report, delete nothing",
        launched(),
        look(workers=(job("w00"), job("w01", "unreachable", error=AUTH))),
        GiveUp,
        "cannot log in to pod, which the TPU API says is READY: w01: unreachable: "
        "authentication failed: no key accepted for user 'alice' (tried /home/alice/.ssh/",
    ),
    (
        "1: a changed host key is refused the same way",
        launched(),
        look(workers=(job("w00", "unreachable", error="unreachable: host key of w00 changed"),)),
        GiveUp,
        "Nothing was deleted",
    ),
    (
        "1: unreachable over SSH for long on a READY node is no reason to delete",
        launched(unreachable_since=NOW - 3600),
        look(workers=(job("w00"), job("w01", "unreachable", error="unreachable: timed out"))),
        Wait,
        "w01 unreachable; looking again",
    ),
    (
        "2: the node found in its fallback zone is not recreated",
        launched(zone="us-east1-d"),
        look(node=node(zone="us-east1-d")),
        Wait,
        "training",
    ),
    (
        "3: a PREEMPTED node of another type is refused, not deleted",
        launched(),
        look(node=node("PREEMPTED", accelerator_type="v4-32")),
        GiveUp,
        "node pod is a v4-32, not a v4-16",
    ),
    (
        "3: a colleague's PREEMPTED node of the same name is refused, not deleted",
        launched(),
        look(node=node("PREEMPTED", labels=ownership_labels("bob", "bobs-run"))),
        GiveUp,
        "node pod is not yours (labels tpuctl-user=bob, tpuctl-run=bobs-run)",
    ),
    (
        "3: a colleague's node made for a run of the same id is not this run's",
        launched(),
        look(node=node("PREEMPTED", labels=ownership_labels("bob", RUN))),
        GiveUp,
        "node pod is not yours (labels tpuctl-user=bob, tpuctl-run=llama-3-1-8b-20261123)",
    ),
    (
        "3: a colleague's READY node is left alone",
        BabysitState(RUN, "pod", "v4-16"),
        look(node=node(labels=ownership_labels("bob"))),
        GiveUp,
        "babysit leaves it alone",
    ),
    (
        "3: our own node from `up` (not made for this run) is not deleted without --adopt",
        launched(),
        look(node=node("PREEMPTED", labels=ownership_labels("alice"))),
        GiveUp,
        "was not created for run llama-3.1-8b-20261123",
    ),
    (
        "3: a node without tpuctl labels is not deleted either",
        launched(),
        look(node=node("PREEMPTED", labels={})),
        GiveUp,
        "(no tpuctl labels (not created by tpuctl)): babysit does not delete it",
    ),
    (
        "4: after a replacement one flaky look is just a look again",
        launched(unreachable_since=None),
        look(workers=(job("w00"), job("w01", "unreachable", error="unreachable: timed out"))),
        Wait,
        "w01 unreachable; looking again",
    ),
    (
        "6: HTTP 429 from the TPU API means wait",
        launched(),
        look(node=None, api_error="429 Too Many Requests"),
        Wait,
        "waiting for the TPU API",
    ),
    (
        "6: metrics or DONE unreadable means wait",
        launched(progress_at=NOW - 4000),
        look(storage_error="cannot read gs://b/run: 503"),
        Wait,
        "cannot read the run's files",
    ),
    (
        "8: exit 75 on a READY node is a clean stop to relaunch",
        launched(failures=3),
        look(workers=(job("w00", "exited", EXIT_PREEMPTED), job("w01", "exited", 75))),
        Relaunch,
        "job stopped after saving (SIGTERM)",
    ),
    (
        "9: exit 2, a recipe the trainer rejects, stops at once: no relaunch can fix it",
        launched(failures=0),
        look(workers=(job("w00", "exited", EXIT_BAD_INPUT), job("w01"))),
        GiveUp,
        "the trainer on w00 rejected the run's input (exit 2), which no relaunch can fix",
    ),
    (
        "9: ... named for the worker that exited 2, not one that ended because it had",
        launched(),
        look(
            workers=(
                job("w00", "exited", EXIT_PEER_LOST),
                job("w01", "exited", EXIT_BAD_INPUT),
            )
        ),
        GiveUp,
        "the trainer on w01 rejected",
    ),
    (
        "9: exit 65, a run the trainer stopped as it diverged, stops at once: relaunched, it "
        "resumes from its newest checkpoint and diverges again",
        launched(failures=0),
        look(workers=(job("w00", "exited", EXIT_DIVERGED), job("w01", "exited", EXIT_DIVERGED))),
        GiveUp,
        "the trainer on w00 stopped the run, which diverged (exit 65), before saving a state "
        "that is not finite; relaunched with the same settings it diverges again",
    ),
    (
        "9: a pod that did not all join (exit 69, the missing one hung) is relaunched",
        launched(),
        look(workers=(job("w00", "exited", EXIT_PEER_LOST), job("w01"))),
        Relaunch,
        "job ended without DONE: w00 exited (exit 69)",
    ),
    # -- budgets -----------------------------------------------------------------------
    (
        "the preemption budget spent: report",
        launched(preemptions=2),
        look(node=node("PREEMPTED")),
        GiveUp,
        "3 preemptions (--max-preemptions 2)",
    ),
    (
        "the failure budget spent: report, the job stopped",
        launched(failures=3),
        look(workers=(job("w00", "exited", 1), job("w01"))),
        GiveUp,
        "4 job failures (--max-failures 3)",
    ),
]


@pytest.mark.parametrize(("why", "state", "obs", "kind", "text"), ROWS, ids=[r[0] for r in ROWS])
def test_decide(why, state, obs, kind, text):
    action = decide(state, obs, dataclasses.replace(OPTIONS, max_preemptions=2))
    assert isinstance(action, kind), action
    if text is None:  # creations that count nothing
        assert action.event is None
    elif isinstance(action, ReplaceNode | Relaunch):
        assert text in action.event.cause, action
    elif isinstance(action, Wait):
        assert text in action.activity, action
    elif isinstance(action, GiveUp):
        assert text in action.reason, action


def test_only_the_api_justifies_deleting_and_adopt_hands_the_node_over():
    mine_from_up = node("PREEMPTED", labels=ownership_labels("alice"))
    adopting = dataclasses.replace(OPTIONS, adopt=True)
    action = decide(launched(), look(node=mine_from_up), adopting)
    assert isinstance(action, ReplaceNode) and action.node == mine_from_up


def test_adopt_never_hands_over_a_colleagues_node():
    adopting = dataclasses.replace(OPTIONS, adopt=True, delete_when_done=True)
    bobs = node("PREEMPTED", labels=ownership_labels("bob", "bobs-run"))
    action = decide(launched(), look(node=bobs), adopting)
    assert isinstance(action, GiveUp) and "node pod is not yours" in action.reason
    done = Progress(done={"step": 100})
    bobs_ready = node(labels=ownership_labels("bob", RUN))
    action = decide(launched(), look(node=bobs_ready, workers=FINISHED, progress=done), adopting)
    assert isinstance(action, Finish) and not action.delete_node


def test_a_new_babysitter_stops_a_run_found_half_crashed_before_launching_it_again():
    half = look(workers=(job("w00"), job("w01", "exited", 1)))
    assert decide(BabysitState(RUN, "pod", "v4-16"), half, OPTIONS) == Launch(stop_first=True)
    nothing = look(workers=(job("w00", "absent"), job("w01", "absent")))
    assert decide(BabysitState(RUN, "pod", "v4-16"), nothing, OPTIONS) == Launch(stop_first=False)


def test_the_restart_budget_counts_every_kind_of_restart():
    options = dataclasses.replace(OPTIONS, max_restarts=2)
    action = decide(launched(preemptions=1, clean_stops=1), look(node=None), options)
    assert isinstance(action, GiveUp) and action.reason == "3 restarts (--max-restarts 2)"


def test_exit_75_spends_no_failure_budget_and_a_failure_does():
    clean = decide(launched(), look(workers=(job("w00", "exited", 75),)), OPTIONS)
    crash = decide(launched(), look(workers=(job("w00", "exited", 1),)), OPTIONS)
    state = launched()
    state.record(clean.event)
    assert (state.failures, state.clean_stops) == (0, 1)
    state.record(crash.event)
    assert (state.failures, state.clean_stops) == (1, 1)


def test_a_failure_past_the_budget_stops_the_job_and_a_preemption_does_not():
    options = dataclasses.replace(OPTIONS, max_failures=0, max_preemptions=0)
    failed = decide(launched(), look(workers=(job("w00", "exited", 1),)), options)
    preempted = decide(launched(), look(node=node("PREEMPTED")), options)
    assert failed.stop_job and failed.budget and failed.event.kind == "failure"
    assert not preempted.stop_job and preempted.event.kind == "preemption"


def test_a_failure_is_the_crashed_workers_not_the_one_the_pod_ended_after_it():
    """w01 was killed; w00 then ended with the trainer's peer-lost status (69). The event
    named w00, with w00's log tail, whenever both had ended by the next look."""
    ended = (job("w00", "exited", 69), job("w01", "exited", 137))
    action = decide(launched(), look(workers=ended), OPTIONS)
    assert (action.event.worker, action.event.exit_code) == ("w01", 137)
    assert "w00 exited (exit 69), w01 exited (exit 137)" in action.event.cause
    alone = decide(launched(), look(workers=(job("w00", "exited", 69), job("w01"))), OPTIONS)
    assert alone.event.worker == "w00"  # the only one that ended so far


def test_a_job_that_failed_before_its_first_step_is_reported_so_not_at_step_none():
    options = dataclasses.replace(OPTIONS, max_failures=0)
    failed = decide(launched(step=None), look(workers=(job("w00", "exited", 1),)), options)
    assert failed.reason == "1 job failures (--max-failures 0), at steps none yet"


def test_done_deletes_the_node_only_when_asked_and_it_is_the_runs():
    options = dataclasses.replace(OPTIONS, delete_when_done=True)
    done = Progress(done={"step": 50})
    ours = decide(launched(), look(workers=FINISHED, progress=done), options)
    theirs = decide(
        launched(), look(workers=FINISHED, progress=done, node=node(labels={})), options
    )
    assert ours.delete_node and not theirs.delete_node


def test_note_keeps_the_timers_and_where_the_run_node_lives():
    state, _ = note(
        launched(), look(node=node("REPAIRING", zone="us-east1-d"), workers=()), "alice"
    )
    assert (state.not_ready_since, state.zone) == (NOW, "us-east1-d")
    state, _ = note(state, look(node=node(zone="us-east1-d")), "alice")
    assert state.not_ready_since is None
    flaky = (job("w00", "unreachable", error="unreachable: timed out"),)
    state, _ = note(state, look(node=node(zone="us-east1-d"), workers=flaky), "alice")
    assert state.unreachable_since == NOW
    state.reset_timers(NOW + 5)  # the node replaced or the job relaunched
    assert (state.unreachable_since, state.not_ready_since, state.progress_at) == (
        None,
        None,
        NOW + 5,
    )
    # A colleague's node of the same name tells us nothing about where ours lives.
    state, _ = note(
        state, look(node=node(labels=ownership_labels("bob"), zone="elsewhere")), "alice"
    )
    assert state.zone == "us-east1-d"


def test_note_reports_what_a_restart_cost():
    state = launched(
        events=[Event("preemption", "node pod PREEMPTED", NOW - 30, 40, relaunched_s=5.0)]
    )
    state, lines = note(state, look(progress=Progress(first_step=37, step=38, loss=2.0)), "alice")
    event = state.events[0]
    assert (event.resumed_s, event.steps_lost, state.step, state.progress_at) == (30, 4, 38, NOW)
    assert lines == ["training again at step 37: 30.0 s after the preemption, 4 step(s) lost"]


def test_timers_are_not_saved_a_babysitter_that_carries_on_starts_them_afresh():
    state = launched(unreachable_since=NOW - 3600, not_ready_since=NOW, zone="us-east1-d")
    loaded = BabysitState.from_json(state.to_json())
    assert (loaded.unreachable_since, loaded.not_ready_since, loaded.progress_at) == (None,) * 3
    assert loaded.zone == "us-east1-d" and loaded.step == 40


def test_a_state_from_another_version_loads_and_a_cut_one_is_one_line(tmp_path, monkeypatch):
    """An event field this version does not know was a TypeError traceback, a state file
    cut short a JSONDecodeError one."""
    import json

    from tpuctl.babysit import load_state, local_state_path
    from tpuctl.errors import TpuctlError

    data = json.loads(launched(events=[CRASHED_AT_40]).to_json())
    data["events"][0]["added_later"] = 1
    assert BabysitState.from_json(json.dumps(data)).events == [CRASHED_AT_40]
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    path = local_state_path(RUN)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data)[:40])
    with pytest.raises(TpuctlError, match=r"babysit state .* cannot be read \(JSONDecodeError\)"):
        load_state(RUN)


@pytest.mark.parametrize(
    "status, kind", [(EXIT_BAD_INPUT, "bad_input"), (EXIT_DIVERGED, "diverged")]
)
def test_bad_input_or_divergence_stops_the_job_and_records_the_failure_for_its_worker(status, kind):
    """The job is stopped (its other workers must not hold the TPU), and the failure is
    recorded for the worker whose line the report quotes."""
    crashed = look(workers=(job("w00", "exited", status), job("w01")))
    action = decide(launched(), crashed, OPTIONS)
    assert isinstance(action, GiveUp) and getattr(action, kind) and action.stop_job
    assert not action.budget
    assert (action.event.kind, action.event.worker, action.event.exit_code) == (
        "failure",
        "w00",
        status,
    )


def test_clean_stop_exit_is_the_trainers():
    from trainer.contract import EXIT_PREEMPTED

    assert EXIT_PREEMPTED == EXIT_PREEMPTED


def test_a_token_cache_build_record_is_progress_without_a_step():
    stalled = launched(progress_at=NOW - 1801)  # past --hang-timeout, no new step
    building = look(progress=Progress(building_cache=True))
    state, _ = note(stalled, building, "alice")
    assert (state.progress_at, state.step) == (NOW, 40)
    assert isinstance(decide(state, building, OPTIONS), Wait)
    assert isinstance(decide(stalled, look(), OPTIONS), Relaunch)  # without it: a hang


def test_a_finished_saved_state_is_taken_up_unfinished_and_done_decides_again():
    """A babysitter over a saved finished state exited at once, though the run had been
    launched again with more steps and was training."""
    saved = dataclasses.replace(launched(), finished=True, final_step=4, final_loss=6.1)
    state = saved.carried_on()
    assert not state.finished and (state.final_step, state.final_loss) == (None, None)
    assert state.launches == saved.launches and state.events == saved.events
    assert decide(state, look(), OPTIONS) == Wait("training")
    finished = look(workers=FINISHED, progress=Progress(done={"step": 4}))
    assert isinstance(decide(state, finished, OPTIONS), Finish)


def test_a_job_the_user_stopped_with_tpuctl_kill_ends_babysitting_and_a_new_one_carries_on():
    """The kill's exit 75 was a clean stop, relaunched behind the user's back."""
    killed = tuple(
        dataclasses.replace(j, state="exited", exit_code=EXIT_PREEMPTED, stopped_by_tpuctl=True)
        for j in RUNNING
    )
    watching, _ = note(launched(), look(), "alice")
    action = decide(watching, look(workers=killed), OPTIONS)
    assert isinstance(action, GiveUp) and not action.stop_job and action.event is None
    assert action.reason.startswith("its job was stopped with `tpuctl kill` (on w00, w01)")
    carried_on = BabysitState.from_json(watching.to_json()).carried_on()
    assert isinstance(decide(carried_on, look(workers=killed), OPTIONS), Relaunch)
