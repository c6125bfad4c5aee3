"""The provider-neutral description of a TPU node and the interface providers implement."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True)
class Worker:
    """One host of a node. `index` is the worker number JAX and gcloud use (0 is the coordinator)."""

    index: int
    internal_ip: str
    external_ip: str | None = None
    # Local pods: the worker's own directory, which stands in for its filesystem.
    workdir: str | None = None


@dataclass(frozen=True)
class Node:
    """A TPU VM (one host) or pod slice (many hosts) as tpuctl sees it."""

    name: str
    zone: str
    accelerator_type: str
    state: str  # the Cloud TPU API's state name: CREATING, READY, PREEMPTED, ...
    project: str | None = None
    health: str | None = None
    scheduling: str = "on-demand"  # on-demand | spot | preemptible | reserved
    runtime_version: str | None = None
    created: datetime | None = None
    workers: tuple[Worker, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    provider: str = "cloud"  # cloud | local

    @property
    def ready(self) -> bool:
        return self.state == "READY"


@dataclass(frozen=True)
class NodeSpec:
    """What `tpuctl up` asks a provider for."""

    name: str
    zone: str
    accelerator_type: str
    runtime_version: str
    project: str | None = None
    scheduling: str = "on-demand"
    network: str | None = None
    subnetwork: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do beyond get/list/create/delete, so that callers ask it
    rather than test its class."""

    zones: bool = False  # nodes live in zones: `at(zone, project)`, `get(name, zone)`, fallbacks
    queued_resources: bool = False  # `create_with_retries(queued=...)`, `delete_queued(path)`
    # The workers' files are this machine's (a local pod): a plain path names the same file
    # here and on every worker, and it outlives the node. Elsewhere each worker has its own
    # disk, which a recreated node does not have any more.
    shared_filesystem: bool = False


# Providers report progress (state transitions, retries) through this callback so that
# the CLI can draw a live status line without the provider knowing about rich.
ProgressFn = Callable[[str], None]


class Provider(Protocol):
    """Create, describe and delete nodes in one place (a zone of a project, or this machine)."""

    capabilities: Capabilities

    def get(self, name: str) -> Node | None: ...

    def list(self) -> list[Node]: ...

    def create(self, spec: NodeSpec, progress: ProgressFn) -> Node: ...

    def delete(self, name: str, progress: ProgressFn) -> bool: ...
