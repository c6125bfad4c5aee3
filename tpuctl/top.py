"""`tpuctl top`'s data: every node in the configured zones and every local pod, each with
the progress of the latest run tpuctl launched on it.

One refresh costs one list call per (project, zone) and, per run, one small read: the
tail of its `metrics.jsonl` (a ranged read on gs://; on worker 0, over SSH, for a run
directory on the workers' own disks). Which run is on which node comes from this
machine's launch records (tpuctl.jobs.launches), restarts from the run's babysitter state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpuctl.errors import TpuctlError
from tpuctl.jobs import launches

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.fanout import Host
    from tpuctl.providers.base import Node

# Enough for the newest few metrics records (each ~200 bytes), however long the run.
METRICS_TAIL_BYTES = 8192


@dataclass(frozen=True)
class RunProgress:
    """Where a run stands, from the newest record of its metrics.jsonl."""

    run_id: str
    run_dir: str
    step: int | None
    total_steps: int | None
    loss: float | None
    tokens_per_s: float | None
    mfu: float | None
    eta_s: float | None  # steps left x the latest step time
    restarts: int | None  # preemptions + failures, when a babysitter has state for the run
    babysitter: str | None  # "pid P" of a live babysitter on this machine


@dataclass(frozen=True)
class TopRow:
    node: Node
    run: RunProgress | None


def places(settings: Settings) -> list[tuple[str, str]]:
    """(project, zone) of the `zone` setting and of every `accelerators.TYPE.zone(s)`."""
    from tpuctl import config

    project = settings.get("project")
    found: list[tuple[str, str]] = []

    def add(project_: str | None, zones: Any) -> None:
        for zone in [zones] if isinstance(zones, str) else zones or []:
            if project_ and zone and (project_, zone) not in found:
                found.append((project_, zone))

    add(project, settings.get("zone"))
    for accelerator in settings.get("accelerators", {}) or {}:
        per_type = config.accelerator_settings(settings, accelerator)
        add(per_type.get("project") or project, per_type.get("zone"))
        add(per_type.get("project") or project, per_type.get("zones"))
    return found


def list_nodes(settings: Settings) -> list[Node]:
    """Cloud nodes of every configured place (one API call each), then the local pods;
    only the local pods when the `provider` setting is local."""
    from tpuctl.providers.cloud_tpu import CloudTpuProvider
    from tpuctl.providers.local import LocalProvider

    cloud = []
    if settings.get("provider") != "local":
        for project, zone in places(settings):
            cloud += CloudTpuProvider(project, zone).list()
    return [*cloud, *LocalProvider().list()]


def last_metrics(run_dir: str, worker: Host | None = None) -> dict[str, Any] | None:
    """The newest step record (one with a loss) of `{run_dir}/metrics.jsonl`, or None;
    `worker`: the file on that worker's own disk."""
    path = f"{run_dir.rstrip('/')}/metrics.jsonl"
    data = _read_tail(path, METRICS_TAIL_BYTES, worker)
    for line in reversed((data or b"").splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by the tail read, or still being written
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "loss" in record:
            return record
    return None


def _read_tail(path: str, max_bytes: int, worker: Host | None) -> bytes | None:
    if worker is not None:
        from tpuctl.jobs.runs import read_on_worker

        try:
            found = read_on_worker(worker, path, last=max_bytes)
        except TpuctlError:  # the worker unreachable: the row shows no metrics, top goes on
            return None
        return found[1] if found else None
    if path.startswith("gs://"):
        from tpuctl import storage

        try:
            return storage.read_tail(path, max_bytes)
        except TpuctlError:  # no credentials, say: the row shows no metrics, top goes on
            return None
    try:
        with Path(path).open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            return f.read()
    except OSError:
        return None


def progress(launch: launches.Launch, record: dict[str, Any] | None) -> RunProgress:
    """The run's progress from its newest metrics `record`, restarts and babysitter from
    this machine."""
    from tpuctl import babysit

    record = record or {}
    step, total = record.get("step"), launch.total_steps
    step_time = record.get("step_time_s")
    eta = None
    if isinstance(step, int) and total is not None and isinstance(step_time, int | float):
        eta = max(0, total - step) * step_time
    try:
        state = babysit.load_state(launch.run_id)
    except TpuctlError:  # a state file cut short: the row shows no restarts, not an error
        state = None
    return RunProgress(
        run_id=launch.run_id,
        run_dir=launch.run_dir,
        step=step,
        total_steps=total,
        loss=record.get("loss"),
        tokens_per_s=record.get("tokens_per_s"),
        mfu=record.get("mfu"),
        eta_s=eta,
        restarts=state.restarts if state else None,
        babysitter=babysit.live_babysitter(launch.run_id),
    )


def collect(
    settings: Settings,
    nodes: Callable[[Settings], list[Node]] = list_nodes,
    run_of: Callable[[str], launches.Launch | None] = launches.latest,
) -> list[TopRow]:
    """One snapshot: every node, with the progress of the latest run launched on it."""
    from tpuctl import storage
    from tpuctl.jobs.runs import emulator_for

    rows = []
    for node in nodes(settings):
        launch = run_of(node.name)
        if launch is None:
            rows.append(TopRow(node, None))
            continue
        gcs = launch.run_dir.startswith("gs://")  # a local pod's: in the local pods' emulator
        with storage.emulated(emulator_for(node.provider) if gcs else None):
            rows.append(TopRow(node, progress(launch, _newest_record(settings, node, launch))))
    return rows


def _newest_record(
    settings: Settings, node: Node, launch: launches.Launch
) -> dict[str, Any] | None:
    """`last_metrics` of the run, read where its workers write it: a run directory on their
    own disks (this machine's file of that name is another one) on worker 0, while the
    node is READY."""
    from tpuctl.hosts import hosts_for
    from tpuctl.jobs.runs import run_dir_is_here

    if run_dir_is_here(launch.run_dir, node.provider):
        return last_metrics(launch.run_dir)
    if not node.ready:
        return None
    return last_metrics(launch.run_dir, hosts_for(settings, node, [0])[0])


def row_json(row: TopRow, now: datetime) -> dict[str, Any]:
    """A row as `top --json` prints it (documented in the README)."""
    node = row.node
    age = int((now - node.created).total_seconds()) if node.created else None
    run = row.run
    return {
        "name": node.name,
        "provider": node.provider,
        "project": node.project,
        "zone": node.zone,
        "accelerator_type": node.accelerator_type,
        "state": node.state,
        "scheduling": node.scheduling,
        "age_s": max(0, age) if age is not None else None,
        "run": None if run is None else {
            "run_id": run.run_id,
            "run_dir": run.run_dir,
            "step": run.step,
            "total_steps": run.total_steps,
            "loss": run.loss,
            "tokens_per_s": run.tokens_per_s,
            "mfu": run.mfu,
            "eta_s": run.eta_s,
            "restarts": run.restarts,
            "babysitter": run.babysitter,
        },
    }  # fmt: skip
