"""From a node to the hosts the fan-out connects to: addresses, login (tpuctl's settings
over the user's ssh_config), host keys, worker selection, and a per-node address cache so
repeated commands skip the TPU API.

The cache lives in `state_dir()/nodes/PROJECT/ZONE/NAME.json`; tpuctl's own known_hosts
file for the node sits next to it. When a fresh lookup shows the node was recreated (its
creation time changed), the node's known host keys are dropped: TPU VM addresses are
reused, and the new VMs have new keys.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tpuctl.errors import TpuctlError
from tpuctl.fanout.base import Host
from tpuctl.providers.base import Node, Worker

if TYPE_CHECKING:
    from tpuctl.config import Settings

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_workers(spec: str | None, count: int | None = None) -> list[int] | None:
    """`--worker 0,3,5-7` -> [0, 3, 5, 6, 7]; None or "all" -> None (every worker).

    With `count`, indexes must be below it. Raises a TpuctlError naming the bad part.
    """
    if spec is None or spec.strip().lower() == "all":
        return None
    chosen: dict[int, None] = {}  # ordered, and linear however many workers
    for part in (p.strip() for p in spec.split(",")):
        match = _RANGE.match(part)
        if not match:
            raise TpuctlError(
                f"--worker {spec!r}: {part!r} is not a worker number or range; "
                "use e.g. --worker 0,3,5-7"
            )
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise TpuctlError(
                f"--worker {spec!r}: range {part!r} runs backwards; write {last}-{first}"
            )
        if count is not None and last >= count:  # before expanding: 0-40000 is not a list
            raise TpuctlError(
                f"--worker {spec!r}: worker {max(first, count)} does not exist; "
                f"the node has {f'workers 0-{count - 1}' if count > 1 else 'only worker 0'}"
            )
        chosen.update(dict.fromkeys(range(first, last + 1)))
    return list(chosen)


def worker_label(index: int, count: int) -> str:
    """`w03`: zero-padded to the node's width so prefixes line up (w007 on a 512-host pod)."""
    return f"w{index:0{max(2, len(str(count - 1)))}d}"


def hosts_for(settings: Settings, node: Node, workers: list[int] | None = None) -> list[Host]:
    """The fan-out hosts for a node's workers (all of them when `workers` is None)."""
    if workers is not None:
        parse_workers(",".join(map(str, workers)), len(node.workers))
    chosen = [w for w in node.workers if workers is None or w.index in workers]
    count = len(node.workers)
    if node.provider == "local":
        return [
            Host(worker_label(w.index, count), "localhost", workdir=w.workdir, transport="local")
            for w in chosen
        ]
    from tpuctl.sshconfig import user_ssh_config

    ssh_config, key = user_ssh_config(), _private_key(settings)
    # tpuctl's default user yields to ssh_config's User; one the user set does not.
    user = None if settings.source("ssh.user") == "default" else settings.get("ssh.user")
    known_hosts = str(known_hosts_path(settings, node.name))
    return [
        ssh_config.apply(
            Host(
                worker_label(w.index, count),
                _address(settings, node, w),
                user=user,
                key_filename=key,
                known_hosts=known_hosts,
            ),
            default_user=settings.get("ssh.user"),
            proxy_jump=settings.get("ssh.proxy_jump"),
            jump_known_hosts=str(jump_known_hosts_path()),
        )
        for w in chosen
    ]


def _address(settings: Settings, node: Node, worker: Worker) -> str:
    if _internal(settings) or not worker.external_ip:
        if not worker.internal_ip:
            raise TpuctlError(f"worker {worker.index} of {node.name} has no IP address yet")
        return worker.internal_ip
    return worker.external_ip


def _internal(settings: Settings) -> bool:
    """Internal IPs when asked for, or by default behind a jump host (it is in the VPC)."""
    if settings.source("ssh.internal_ip") == "default":
        return str(settings.get("ssh.proxy_jump") or "none").lower() != "none"
    return bool(settings.get("ssh.internal_ip"))


def _private_key(settings: Settings) -> str:
    """`ssh.key`, else the key pair tpuctl generated (whose public half `up` installs)."""
    from tpuctl.sshkeys import private_key_path

    return str(private_key_path(settings))


# --- address cache --------------------------------------------------------------------


def _node_dir(project: str | None, zone: str) -> Path:
    from tpuctl.config import state_dir

    return state_dir() / "nodes" / (project or "-") / zone


def cache_path(project: str | None, zone: str, name: str) -> Path:
    return _node_dir(project, zone) / f"{name}.json"


def jump_known_hosts_path() -> Path:
    """tpuctl's known_hosts file for jump hosts (bastions outlive nodes)."""
    from tpuctl.config import state_dir

    return state_dir() / "jump_hosts.known_hosts"


def known_hosts_path(settings: Settings, name: str) -> Path:
    """tpuctl's known_hosts file for one node."""
    return _node_dir(settings.get("project"), str(settings.get("zone"))) / f"{name}.known_hosts"


def cached_node(settings: Settings, name: str) -> Node | None:
    """The node as last seen by the API, if tpuctl has looked it up before."""
    path = cache_path(settings.get("project"), str(settings.get("zone")), name)
    try:
        record = json.loads(path.read_bytes())
    except OSError:
        return None
    except ValueError as err:  # not JSON, or not UTF-8
        return _corrupt_cache(path, err)
    try:
        workers = tuple(Worker(**w) for w in record.pop("workers"))
        created = record.pop("created")
        return Node(
            **record, workers=workers, created=datetime.fromisoformat(created) if created else None
        )
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        return _corrupt_cache(path, err)


def _corrupt_cache(path: Path, err: Exception) -> None:
    """A cache entry that cannot be read is no entry: say so, and let the lookup rebuild it."""
    reason = f"{type(err).__name__}: {err}".splitlines()[0][:120]
    print(f"warning: ignoring the unreadable node cache {path} ({reason})", file=sys.stderr)


def remember(settings: Settings, node: Node) -> None:
    """Store a freshly looked-up node; forget its host keys if it was recreated."""
    path = cache_path(settings.get("project"), str(settings.get("zone")), node.name)
    previous = _read_created(path)
    if previous is not None and previous != _created_text(node):
        known_hosts_path(settings, node.name).unlink(missing_ok=True)
    from tpuctl.config import write_private

    record = asdict(node)
    record["created"] = _created_text(node)
    write_private(path, json.dumps(record))


def forget(settings: Settings, name: str) -> None:
    """Drop a node's cached addresses (its workers could not be reached)."""
    cache_path(settings.get("project"), str(settings.get("zone")), name).unlink(missing_ok=True)


def _read_created(path: Path) -> str | None:
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return (record.get("created") or "") if isinstance(record, dict) else None


def _created_text(node: Node) -> str:
    return node.created.isoformat() if node.created else ""


def lookup_node(settings: Settings, name: str | None, *, use_cache: bool = True) -> Node:
    """The node a command targets, from the cache when it has an entry for the name,
    else from the provider (and then cached). Local pods are never cached: reading
    them is as cheap as reading the cache."""
    return lookup_node_noting_cache(settings, name, use_cache=use_cache)[0]


def lookup_node_noting_cache(
    settings: Settings, name: str | None, *, use_cache: bool = True
) -> tuple[Node, bool]:
    """`lookup_node`, also saying whether the node came from the cache (whose addresses
    may be stale: see `moved_hosts`)."""
    from tpuctl.providers import point_at_registered, resolve_node

    chosen = name or settings.get("node")
    if chosen:
        point_at_registered(settings, chosen)  # the cache is kept per zone
    if use_cache and chosen and settings.get("provider") != "local":
        node = cached_node(settings, chosen)
        if node is not None:
            return node, True
    node = resolve_node(settings, chosen)  # points settings at the node's own place
    if node.provider != "local" and node.ready:
        remember(settings, node)
    return node, False


def moved_hosts(
    settings: Settings, name: str, workers: list[int] | None, unreachable: list[Host]
) -> list[Host]:
    """After cached addresses failed: look the node up again (refreshing the cache) and
    return fresh hosts for the unreachable ones worth another try: those whose address
    changed, and all of them when the node was recreated (its new VMs have new host keys,
    which the refresh lets in). Raises a TpuctlError when the node is gone or not READY."""
    before = cached_node(settings, name)
    try:
        fresh = lookup_node(settings, name, use_cache=False)
    except TpuctlError:
        forget(settings, name)
        raise
    if not fresh.ready:
        raise TpuctlError(f"node {fresh.name} is now {fresh.state}", exit_code=1)
    recreated = before is not None and _created_text(before) != _created_text(fresh)
    current = {h.label: h for h in hosts_for(settings, fresh, workers)}
    return [
        current[h.label]
        for h in unreachable
        if h.label in current and (recreated or current[h.label].address != h.address)
    ]
