"""`tpuctl up`, `down`, `list`, `status` and `types`: the TPU VMs themselves."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer

from tpuctl import catalog, config
from tpuctl.cli.app import app
from tpuctl.cli.options import NODE_ARGUMENT, NODE_NAME_OPTION, chosen_node
from tpuctl.cli.output import StatusLine, console, err_console, print_json, print_table
from tpuctl.durations import format_duration, parse_duration
from tpuctl.errors import TpuctlError
from tpuctl.planning import NodePlan, create_planned, plan_node
from tpuctl.providers import (
    cloud_hint,
    describe_location,
    find_node,
    list_all,
    listed_cloud,
    missing_hint,
    only_node,
    provider_for,
    registry,
    resolve_node,
)
from tpuctl.providers.base import Node, NodeSpec
from tpuctl.wording import plural

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.providers.cloud_tpu import QueuedNode

DEFAULT_RETRY_FOR = "30m"
# A slice is READY in minutes, a large one in under half an hour; much longer is a node
# stuck (REPAIRING, an operation that never ends) that waiting will not fix.
DEFAULT_UP_TIMEOUT = "1h"

ZONE_OPTION = typer.Option(None, "--zone", "-z", help="Zone (default: config `zone`).")
PROJECT_OPTION = typer.Option(None, "--project", "-p", help="Project (default: config `project`).")
JSON_OPTION = typer.Option(False, "--json", help="Print JSON (documented in the README).")


def _age_s(created: datetime | None) -> int | None:
    return None if created is None else max(0, int((datetime.now(UTC) - created).total_seconds()))


def node_json(node: Node) -> dict[str, Any]:
    """A node as the stable JSON object `up`, `list` and `status` print."""
    return {
        "name": node.name,
        "project": node.project,
        "zone": node.zone,
        "accelerator_type": node.accelerator_type,
        "state": node.state,
        "health": node.health,
        "scheduling": node.scheduling,
        "spot": node.scheduling in ("spot", "preemptible"),
        "runtime_version": node.runtime_version,
        "created": node.created.isoformat() if node.created else None,
        "age_s": _age_s(node.created),
        "labels": dict(node.labels),
        "provider": node.provider,
        "workers": [
            {"index": w.index, "internal_ip": w.internal_ip, "external_ip": w.external_ip}
            for w in node.workers
        ],
    }


def queued_json(queued: QueuedNode) -> dict[str, Any]:
    """A queued resource whose node is not made yet, as the JSON object `list` prints."""
    return {
        "name": queued.name,
        "project": queued.project,
        "zone": queued.zone,
        "accelerator_type": queued.accelerator_type,
        "state": queued.state,
        "scheduling": queued.scheduling,
        "spot": queued.scheduling == "spot",
        "created": queued.created.isoformat() if queued.created else None,
        "age_s": _age_s(queued.created),
        "labels": dict(queued.labels),
    }


# -- up ---------------------------------------------------------------------------------


@app.command()
def up(
    accelerator_type: str = typer.Argument(..., help="TPU type, e.g. v3-8, v4-32, v5e-16."),
    name: str | None = typer.Option(None, "--name", help="Node name (default: USER-TYPE)."),
    zone: str | None = ZONE_OPTION,
    project: str | None = PROJECT_OPTION,
    spot: bool = typer.Option(False, "--spot", help="Spot capacity (cheaper, preemptible)."),
    preemptible: bool = typer.Option(False, "--preemptible", help="Legacy preemptible VMs."),
    reserved: bool = typer.Option(False, "--reserved", help="Use the project's reservation."),
    runtime_version: str | None = typer.Option(
        None, "--runtime-version", help="TPU software image (default: per generation)."
    ),
    network: str | None = typer.Option(None, "--network", help="VPC network."),
    subnetwork: str | None = typer.Option(None, "--subnetwork", help="VPC subnetwork."),
    label: list[str] = typer.Option([], "--label", help="Label k=v (repeatable)."),
    queued: bool | None = typer.Option(
        None, "--queued/--no-queued", help="Use the queued-resources API (default: catalogue)."
    ),
    retry_for: str = typer.Option(
        DEFAULT_RETRY_FOR, "--retry-for", help="Keep retrying stockouts this long (e.g. 2h)."
    ),
    valid_for: str | None = typer.Option(
        None, "--valid-for", help="Queued resources: give up waiting after this long."
    ),
    timeout: str = typer.Option(
        DEFAULT_UP_TIMEOUT,
        "--timeout",
        help="Stop waiting for the node to be READY after this long (a queue's wait not "
        "counted); nothing is deleted.",
    ),
    no_wait: bool = typer.Option(False, "--no-wait", help="Return once creation is requested."),
    local: bool = typer.Option(
        False, "--local", help="A simulated pod on this machine (same as provider: local)."
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Create a TPU VM or pod slice and wait until every worker is READY.

    Reuses an existing READY node of the same name and type. Stockouts are retried with
    exponential backoff (and fallback zones from `accelerators.TYPE.zones`).
    """
    settings = config.load(
        {"zone": zone, "project": project, "provider": "local" if local else None}
    )
    plan = plan_node(
        settings,
        accelerator_type,
        name=name,
        explicit_zone=zone,
        explicit_project=project,
        scheduling=_scheduling(spot, preemptible, reserved),
        runtime_version=runtime_version,
        network=network,
        subnetwork=subnetwork,
        labels=_parse_labels(label),
        queued=queued,
        retry_for=parse_duration(retry_for, "--retry-for", allow_zero=True),
        valid_for=parse_duration(valid_for, "--valid-for") if valid_for else None,
        timeout=parse_duration(timeout, "--timeout"),
    )
    with _stopped_like_ctrl_c_by_term_and_hangup():
        node = _bring_up(settings, plan, wait=not no_wait)
    if node is None:
        message = f"creation of {plan.spec.name} requested; follow it with `tpuctl status {plan.spec.name}`"
        if json_out:
            print_json({"name": plan.spec.name, "zone": plan.spec.zone, "requested": True})
        else:
            console.print(message)
        return
    if json_out:
        print_json(node_json(node))
    else:
        _print_node(node)


@contextlib.contextmanager
def _stopped_like_ctrl_c_by_term_and_hangup() -> Iterator[None]:
    """SIGTERM (a cancelled CI job, `timeout`) and SIGHUP (a closed terminal) stop `up` as
    Ctrl-C does: a queued resource it made is deleted, not left behind holding quota."""
    signums = (signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, signal.default_int_handler) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _bring_up(settings: Settings, plan: NodePlan, wait: bool) -> Node | None:
    """Create the node, or reuse/await an existing one of the same name and type."""
    from tpuctl.providers.local import LocalProvider

    provider = provider_for(settings)
    spec = plan.spec
    with StatusLine(f"up {spec.name}") as status:
        if not provider.capabilities.zones:
            existing = provider.get(spec.name)
            if existing is not None:
                return _reuse(provider, existing, plan, status, wait)
            clouds = [n for n in registry.locations(spec.name) if n.provider != "local"]
            _refuse_a_twin(spec.name, clouds)
            return create_planned(provider, plan, status.update)
        if LocalProvider().get(spec.name) is not None:
            _refuse_a_twin(spec.name, [registry.Location("local", "local")])
        # A node made earlier may sit in a fallback zone: reuse it rather than make a twin.
        for zone in plan.zones:
            existing = provider.get(spec.name, zone)
            if existing is not None and existing.state == "DELETING":
                existing = _await_deletion(provider, existing, plan, status)
            if existing is not None:
                return _reuse(provider, existing, plan, status, wait)
        how = "through a queued resource" if plan.queued else "directly"
        status.update(
            f"creating {spec.name} ({spec.accelerator_type}, {spec.scheduling}) {how}; "
            f"stockouts retried for up to {format_duration(plan.retry_for)}"
        )
        node = create_planned(provider, plan, status.update, wait=wait)
        if node is not None:
            status.update(f"{node.name} is READY with {plural(len(node.workers), 'worker')}")
        return node


def _refuse_a_twin(name: str, elsewhere: list[registry.Location]) -> None:
    """One name, one node: with a local pod and a cloud node of one name, every later
    command would refuse the name as ambiguous."""
    if elsewhere:
        where = elsewhere[0].describe()
        raise TpuctlError(
            f"{where if where == 'a local pod' else f'a node in {where}'} is named {name}: "
            f"pick another --name, or take it down first (`tpuctl down {name}`)"
        )


def _await_deletion(provider: Any, existing: Node, plan: NodePlan, status: StatusLine):
    """A node of the name is being deleted (`down` interrupted, say): wait until it is gone
    and then create the new one; None once gone. Someone else's is refused as ever: the
    name may be about to be theirs again."""
    _refuse_someone_elses(existing, plan.spec)
    status.update(f"{existing.name} is being deleted in {existing.zone}; waiting until it is gone")
    return provider.wait_while_deleting(
        existing.name, status.update, existing.zone, timeout=plan.timeout
    )


def _refuse_someone_elses(existing: Node, spec: NodeSpec) -> None:
    from tpuctl import ownership

    if ownership.someone_elses(existing.labels, config.local_user()):
        raise TpuctlError(
            f"node {spec.name} in {existing.zone} is not yours "
            f"({ownership.describe_owner(existing.labels)}): choose another --name",
            exit_code=1,
        )


def _reuse(provider: Any, existing: Node, plan: NodePlan, status: StatusLine, wait: bool):
    """Reuse (or wait for) the user's node of this name and type; refuse anyone else's."""
    from tpuctl import ownership

    spec = plan.spec
    user = config.local_user()
    _refuse_someone_elses(existing, spec)
    if existing.accelerator_type != spec.accelerator_type:
        # Deleting is suggested only for a node labelled as the user's: an unlabelled one
        # may be a colleague's, made without tpuctl.
        fix = (
            f"pick another --name or delete it with `tpuctl down {spec.name}`"
            if ownership.created_by(existing.labels, user)
            else "pick another --name"
        )
        raise TpuctlError(
            f"node {spec.name} already exists in {existing.zone} as {existing.accelerator_type}, "
            f"not {spec.accelerator_type}; {fix}"
        )
    if existing.ready:
        status.update(f"{spec.name} already exists and is READY; reusing it")
        return existing
    if existing.state in ("CREATING", "STARTING", "RESTARTING", "REPAIRING"):
        if not wait:  # on its way: `up --no-wait` says its creation was requested
            return None
        status.update(f"{spec.name} already exists and is {existing.state}; waiting for READY")
        return provider.wait_until_ready(
            spec.name, status.update, zone=existing.zone, timeout=plan.timeout
        )
    raise TpuctlError(
        f"node {spec.name} exists but is {existing.state}; delete it with "
        f"`tpuctl down {spec.name}` and run `tpuctl up` again",
        exit_code=1,
    )


def _scheduling(spot: bool, preemptible: bool, reserved: bool) -> str:
    chosen = [
        n for n, on in (("spot", spot), ("preemptible", preemptible), ("reserved", reserved)) if on
    ]
    if len(chosen) > 1:
        raise TpuctlError(
            f"choose one of --spot, --preemptible, --reserved (got {', '.join('--' + c for c in chosen)})"
        )
    return chosen[0] if chosen else "on-demand"


_KEY_RULE = (
    "a key is lowercase letters, digits, _ and -, starts with a lowercase letter and has at "
    "most 63 characters"
)
_VALUE_RULE = "a value is lowercase letters, digits, _ and - (or nothing), at most 63 characters"


def _parse_labels(pairs: list[str]) -> dict[str, str]:
    """--label KEY=VALUE pairs as labels, checked against GCP's label rules before any API
    call (whose error names its own field, not the flag); a key tpuctl sets itself is
    refused, not overridden."""
    from tpuctl import ownership

    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TpuctlError(f"--label {pair!r} must be KEY=VALUE, e.g. --label team=nlp")
        if key in ownership.RESERVED_LABELS:
            raise TpuctlError(
                f"--label {pair!r}: {key} is tpuctl's own label, "
                f"{ownership.RESERVED_LABELS[key]}; use another key"
            )
        if not ownership.LABEL_KEY.match(key):
            raise TpuctlError(
                f"--label {pair!r}: key {key!r} breaks GCP's label rules: {_KEY_RULE}"
            )
        if not ownership.LABEL_VALUE.match(value):
            raise TpuctlError(
                f"--label {pair!r}: value {value!r} breaks GCP's label rules: {_VALUE_RULE}"
            )
        labels[key] = value
    room = ownership.MAX_LABELS - 1  # `up` adds tpuctl-user
    if len(labels) > room:
        raise TpuctlError(
            f"--label: {len(labels)} labels, and GCP allows {ownership.MAX_LABELS} on a node, "
            f"one of them tpuctl's own {ownership.USER_LABEL}: give at most {room}"
        )
    return labels


# -- down -------------------------------------------------------------------------------


@app.command()
def down(
    name: str | None = typer.Argument(
        None, help="Node name (default: config `node`, or the only node you created)."
    ),
    name_option: str | None = NODE_NAME_OPTION,
    zone: str | None = ZONE_OPTION,
    project: str | None = PROJECT_OPTION,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a node and wait until it is gone. A node that does not exist is not an error.
    Without NAME (and no `node` setting) only a node you created with tpuctl is picked."""
    name = chosen_node(name, name_option)
    settings = config.load({"zone": zone, "project": project})
    chosen = name or settings.get("node")
    node = find_node(settings, chosen) if chosen else _own_node(settings)
    if node is None and chosen and _down_queued(settings, chosen, yes):
        return
    if node is None:
        err_console.print(
            f"node {chosen} does not exist in {describe_location(settings)}; nothing deleted"
            + missing_hint(settings, str(chosen))
        )
        return
    summary = f"{node.name} ({node.accelerator_type}, {plural(len(node.workers), 'worker')}, {node.state}) in {describe_location(settings)}"
    if not yes:
        typer.confirm(f"Delete {summary}?", abort=True)
    provider = provider_for(settings)  # pointed at the node's place by find_node
    with StatusLine(f"down {node.name}") as status:
        status.update(f"deleting {summary}")
        deleted = provider.delete(node.name, status.update)
    from tpuctl.fanout import holder
    from tpuctl.jobs import launches

    holder.tell_to_exit(holder.socket_path(settings, node.name))  # its workers are gone
    launches.forget(node.name)  # else `top` shows its last run on a new node of that name
    if deleted:
        console.print(f"deleted {node.name}")
    else:  # deleted by someone else meanwhile: not our deletion to claim
        err_console.print(f"node {node.name} was gone before `down` deleted it; nothing deleted")


def _down_queued(settings: Settings, name: str, yes: bool) -> bool:
    """Delete the queued resource of a node not made yet (`up --no-wait`, or an `up` that
    stopped waiting): it holds quota, and becomes a billed node once granted. False when
    there is none."""
    queued = _queued_only(settings, name)
    if queued is None:
        return False
    provider, state = queued
    where = f"queued resource {name} ({state}, no node yet) in {describe_location(settings)}"
    if not yes:
        typer.confirm(f"Delete {where}?", abort=True)
    with StatusLine(f"down {name}") as status:
        status.update(f"deleting {where}")
        deleted = provider.delete_queued(provider.queued_path(name), status.update)
    registry.forget(name, provider.location())  # else later commands look for it there
    if deleted:
        console.print(f"deleted queued resource {name}")
    else:
        err_console.print(f"queued resource {name} was gone before `down` deleted it")
    return True


def _queued_only(settings: Settings, name: str) -> tuple[Any, str] | None:
    """(provider, state) of the queued resource of a node `name` not made yet (`up --no-wait`,
    or an `up` that stopped waiting); None when there is none, or nowhere to look."""
    try:
        provider = provider_for(settings)
    except TpuctlError:  # no cloud project or zone: no queued resource to look for
        return None
    if not provider.capabilities.queued_resources:
        return None
    state = provider.queued_state(name)
    return (provider, state) if state else None


def _own_node(settings: Settings) -> Node:
    """The one node that this user created with tpuctl (its labels say so), among the zone's
    and the local pods (as `list` shows them); on a shared project anything else is a
    colleague's until named. `settings` then point at it."""
    from tpuctl import ownership

    nodes = list_all(settings)
    user = config.local_user()
    mine = [n for n in nodes if ownership.created_by(n.labels, user)]
    if (node := only_node(settings, mine)) is not None:
        return node
    if not nodes:
        raise TpuctlError(
            f"no nodes in {describe_location(settings)}; nothing to delete" + cloud_hint(settings),
            1,
        )
    candidates = ", ".join(
        f"{n.name} ({'yours' if n in mine else ownership.describe_owner(n.labels)})"
        for n in sorted(nodes, key=lambda n: n.name)
    )
    why = "none of them was created by you" if not mine else "several are yours"
    raise TpuctlError(
        f"{plural(len(nodes), 'node')} in {describe_location(settings)} and {why}: {candidates}; "
        "name the one to delete: `tpuctl down NAME`"
    )


# -- list / status ----------------------------------------------------------------------


@app.command("list")
def list_nodes(
    zone: str | None = ZONE_OPTION,
    project: str | None = PROJECT_OPTION,
    all_zones: bool = typer.Option(False, "--all-zones", help="Every zone of the project."),
    json_out: bool = JSON_OPTION,
) -> None:
    """List nodes: name, type, zone, state, health, spot, age, workers; and the queued
    resources whose node is not made yet (`up --no-wait`), with their state."""
    settings = config.load({"zone": zone, "project": project})
    nodes = list_all(settings, all_zones=all_zones)
    queued = _queued_without_node(settings, nodes, all_zones)
    if json_out:
        queued_resources = [queued_json(q) for q in queued]
        print_json({"nodes": [node_json(n) for n in nodes], "queued_resources": queued_resources})
        return
    if not nodes and not queued:
        where = describe_location(settings) if not all_zones else "any zone"
        err_console.print(f"no nodes in {where}" + cloud_hint(settings))
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("NAME", "PROVIDER", "TYPE", "ZONE", "STATE", "HEALTH", "SPOT", "AGE", "WORKERS"):
        table.add_column(column, no_wrap=True)
    table.add_column("IPS")
    for node in nodes:
        data = node_json(node)
        table.add_row(
            node.name,
            node.provider,
            node.accelerator_type,
            node.zone,
            node.state,
            node.health or "-",
            "yes" if data["spot"] else "no",
            format_duration(data["age_s"]) if data["age_s"] is not None else "-",
            str(len(node.workers)),
            _ip_summary(node),
        )
    for waiting in queued:
        data = queued_json(waiting)
        age = format_duration(data["age_s"]) if data["age_s"] is not None else "-"
        spot = "yes" if data["spot"] else "no"
        table.add_row(
            waiting.name, "cloud", waiting.accelerator_type, waiting.zone, waiting.state, "-",
            spot, age, "-", "queued resource, no node yet",
        )  # fmt: skip
    print_table(table)


def _queued_without_node(
    settings: Settings, nodes: list[Node], all_zones: bool
) -> list[QueuedNode]:
    """The queued resources where `list` lists cloud nodes whose node is not made yet (`up
    --no-wait`): else a user who asked for one sees nothing. One with a node shows as it."""
    cloud = listed_cloud(settings, all_zones)
    if cloud is None:
        return []
    made = {(node.zone, node.name) for node in nodes if node.provider == "cloud"}
    return [q for q in cloud.list_queued(all_zones=all_zones) if (q.zone, q.name) not in made]


@app.command()
def status(
    name: str | None = NODE_ARGUMENT,
    name_option: str | None = NODE_NAME_OPTION,
    zone: str | None = ZONE_OPTION,
    project: str | None = PROJECT_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Show one node: state, health, scheduling, age and every worker's IPs."""
    name = chosen_node(name, name_option)
    settings = config.load({"zone": zone, "project": project})
    chosen = name or settings.get("node")
    node = find_node(settings, chosen) if chosen else None
    if chosen and node is None and (queued := _queued_only(settings, chosen)):
        where = describe_location(settings)
        if json_out:
            print_json({"name": chosen, "queued_resource": queued[1], "node": None})
        else:
            console.print(
                f"queued resource {chosen}: {queued[1]}, no node yet, in {where} "
                f"(`tpuctl up TYPE --name {chosen}` waits on it, `tpuctl down {chosen}` deletes it)"
            )
        return
    node = node or resolve_node(settings, name)
    if json_out:
        print_json(node_json(node))
    else:
        _print_node(node)


def _ip_summary(node: Node) -> str:
    ips = [w.internal_ip for w in node.workers]
    if len(ips) <= 2:
        return " ".join(ips) or "-"
    return f"{ips[0]} … {ips[-1]}"


def _print_node(node: Node) -> None:
    from rich.table import Table

    data = node_json(node)
    age = format_duration(data["age_s"]) if data["age_s"] is not None else "-"
    console.print(
        f"[bold]{node.name}[/bold]  {node.accelerator_type}  {node.zone}  {node.state}"
        f"  health={node.health or '-'}  {node.scheduling}  age={age}"
    )
    table = Table(box=None, header_style="bold")
    for column in ("WORKER", "INTERNAL IP", "EXTERNAL IP"):
        table.add_column(column)
    for worker in node.workers:
        table.add_row(f"w{worker.index:02d}", worker.internal_ip, worker.external_ip or "-")
    print_table(table)


# -- types ------------------------------------------------------------------------------


@app.command()
def types(
    generation: str | None = typer.Argument(None, help="Only this generation, e.g. v4 or v5e."),
    json_out: bool = JSON_OPTION,
) -> None:
    """List the accelerator types tpuctl knows: hosts, chips and cores per host, runtime."""
    known = catalog.all_types()
    if generation:
        wanted = catalog.ALIASES.get(generation.lower(), generation.lower())
        if wanted not in catalog.GENERATIONS:
            raise TpuctlError(
                f"unknown generation {generation!r}; known: {', '.join(catalog.GENERATIONS)}"
            )
        known = [t for t in known if t.generation.name == wanted]
    rows = [
        {
            "type": t.name,
            "hosts": t.hosts,
            "chips": t.chips,
            "chips_per_host": t.chips_per_host,
            "cores_per_host": t.cores_per_host,
            "runtime_version": t.runtime_version,
            "queued": t.needs_queued(),
            "queued_spot": t.needs_queued(spot=True),
        }
        for t in known
    ]
    if json_out:
        print_json({"types": rows})
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("TYPE", "HOSTS", "CHIPS", "CHIPS/HOST", "CORES/HOST", "RUNTIME", "QUEUED"):
        table.add_column(column)
    for row in rows:
        queued = "yes" if row["queued"] else ("spot" if row["queued_spot"] else "no")
        table.add_row(
            row["type"], str(row["hosts"]), str(row["chips"]), str(row["chips_per_host"]),
            str(row["cores_per_host"]), row["runtime_version"], queued,
        )  # fmt: skip
    print_table(table)
    console.print("v5e-N is an alias of v5litepod-N. QUEUED: provisioned through queued resources.")
