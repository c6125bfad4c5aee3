"""The one place that turns a TPU type, flags and config into what to ask a provider for:
`tpuctl up` and `tpuctl babysit` (recreating a node) plan a node the same way."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tpuctl import catalog, config, ownership
from tpuctl.errors import TpuctlError
from tpuctl.naming import default_node_name, validate_node_name
from tpuctl.providers.base import NodeSpec

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.providers.base import Node, ProgressFn, Provider


@dataclass(frozen=True)
class NodePlan:
    """Everything decided before calling the API, from flags, config and the catalogue."""

    spec: NodeSpec
    fallback_zones: list[str]
    queued: bool
    retry_for: float
    valid_for: float | None = None
    timeout: float | None = None  # how long to wait for the node (not counting a queue)

    @property
    def zones(self) -> list[str]:
        """Where the node may be: its zone, then the fallback zones."""
        return [self.spec.zone, *(z for z in self.fallback_zones if z != self.spec.zone)]


def plan_node(
    settings: Settings,
    accelerator_type: str,
    *,
    name: str | None = None,
    run_id: str | None = None,
    explicit_zone: str | None = None,
    explicit_project: str | None = None,
    scheduling: str = "on-demand",
    runtime_version: str | None = None,
    network: str | None = None,
    subnetwork: str | None = None,
    labels: Mapping[str, str] | None = None,
    queued: bool | None = None,
    retry_for: float = 1800.0,
    valid_for: float | None = None,
    timeout: float | None = None,
) -> NodePlan:
    """The node to create. Per-accelerator zone and project (`accelerators.TYPE.zone`)
    beat the general ones, and are written into `settings` so that the provider built
    from them looks there; only an explicit flag beats them. The node carries the
    ownership labels (this user; `run_id` when a babysitter creates it for a run)."""
    from tpuctl.sshkeys import ensure_keypair, metadata_ssh_keys

    accelerator = catalog.parse(accelerator_type)
    per_type = config.accelerator_settings(settings, accelerator.name)
    explicit = {"zone": explicit_zone, "project": explicit_project}
    for key in ("zone", "project"):
        if not explicit[key] and per_type.get(key):
            settings.values[key] = per_type[key]
            settings.sources[key] = f"accelerators.{accelerator.name}.{key}"
    zone, project = settings.get("zone"), settings.get("project")
    if settings.get("provider") == "local":
        zone = "local"  # local pods live on this machine, whatever the configured zone
    if not zone:
        raise TpuctlError(
            f"no zone for {accelerator.name}: pass --zone, set TPUCTL_ZONE or run "
            f"`tpuctl config set accelerators.{accelerator.name}.zone ZONE`"
        )
    use_queued = accelerator.needs_queued(spot=scheduling == "spot") if queued is None else queued
    if settings.get("provider") == "local":
        use_queued = False  # local pods come at once, without queued resources
    if valid_for is not None and not use_queued:
        _refuse_valid_for(accelerator.name, settings.get("provider") == "local", queued)
    if use_queued and scheduling == "preemptible":
        raise TpuctlError(
            f"--preemptible does not work for {accelerator.name} through queued resources; "
            "use --spot"
        )
    node_name = validate_node_name(name) if name else None
    node_name = node_name or default_node_name(config.local_user(), accelerator.name)
    _private_key, public_line = ensure_keypair(settings)
    spec = NodeSpec(
        name=node_name,
        zone=str(zone),
        accelerator_type=accelerator.name,
        runtime_version=runtime_version
        or per_type.get("runtime_version")
        or accelerator.runtime_version,
        project=project,
        scheduling=scheduling,
        network=network,
        subnetwork=subnetwork,
        labels={**(labels or {}), **ownership.ownership_labels(config.local_user(), run_id)},
        metadata={"ssh-keys": metadata_ssh_keys(settings.get("ssh.user"), public_line)},
    )
    fallback = per_type.get("zones") or []
    return NodePlan(
        spec=spec,
        fallback_zones=[fallback] if isinstance(fallback, str) else list(fallback),
        queued=use_queued,
        retry_for=retry_for,
        valid_for=valid_for,
        timeout=timeout,
    )


def _refuse_valid_for(accelerator_type: str, local: bool, queued: bool | None) -> None:
    """--valid-for is the queued-resources API's `valid_until_duration`; a node created
    directly has no such field, and would wait as if the flag were not there."""
    if local:
        why, fix = "local pods are not queued", "drop --valid-for"
    else:
        how = "--no-queued creates it" if queued is False else f"a {accelerator_type} is created"
        why = f"{how} directly"
        fix = "add --queued, or drop --valid-for"
    raise TpuctlError(f"--valid-for bounds a queued resource's wait, and {why}: {fix}")


def create_planned(
    provider: Provider, plan: NodePlan, progress: ProgressFn, wait: bool = True
) -> Node | None:
    """Create the planned node: where the provider has zones, stockouts are retried with
    backoff across the plan's zones for `plan.retry_for` (through a queued resource when
    planned) and the node waited for at most `plan.timeout`; elsewhere it is created at once."""
    if not provider.capabilities.zones:
        return provider.create(plan.spec, progress)
    return provider.create_with_retries(  # type: ignore[attr-defined]
        plan.spec,
        progress,
        fallback_zones=plan.fallback_zones,
        retry_for=plan.retry_for,
        queued=plan.queued,
        valid_for=plan.valid_for,
        wait=wait,
        timeout=plan.timeout,
    )
