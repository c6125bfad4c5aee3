"""Where TPU nodes come from: Cloud TPU (the v2 API) or a local simulated pod.

Providers create, describe and delete nodes. They never SSH: they hand out
workers' addresses, and the fan-out layer takes it from there.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tpuctl.errors import TpuctlError

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.providers.base import Node, Provider

# provider name -> (module, class). Imported lazily so the CLI starts fast. Each class
# has a `from_settings(settings)` classmethod that builds it from resolved settings.
PROVIDER_CLASSES: dict[str, tuple[str, str]] = {
    "cloud": ("tpuctl.providers.cloud_tpu", "CloudTpuProvider"),
    "local": ("tpuctl.providers.local", "LocalProvider"),
}


def provider_for(settings: Settings) -> Provider:
    """The provider named by the `provider` setting, configured from `settings`."""
    name = settings.get("provider", "cloud")
    if name not in PROVIDER_CLASSES:
        raise TpuctlError(
            f"provider {name!r} is not one of {', '.join(PROVIDER_CLASSES)}; "
            "fix it with `tpuctl config set provider cloud`"
        )
    module_name, class_name = PROVIDER_CLASSES[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_settings(settings)


def describe_location(settings: Settings) -> str:
    """Where the current provider looks for nodes, for messages ("zone Z of project P")."""
    if settings.get("provider") == "local":
        return "the local pod provider"
    return f"zone {settings.get('zone')} of project {settings.get('project')}"


def elsewhere_hint(provider: Provider, name: str) -> str:
    """How to reach a node that is not where we looked: its zone, if the provider can find it."""
    locate = getattr(provider, "locate", None)
    if locate is None:
        return "`tpuctl list` shows the nodes there are"
    found = locate(name)
    if found is not None:
        return f"it is in zone {found.zone}: pass --zone {found.zone}"
    return "it is in no zone of the project (`tpuctl list --all-zones`)"


def resolve_node(settings: Settings, name: str | None) -> Node:
    """The node a command acts on: `name`, else the `node` setting, else the only node.

    Raises a TpuctlError naming the node and location when it does not exist, or
    listing the candidates when there is more than one and none was named.
    """
    provider = provider_for(settings)
    chosen = name or settings.get("node")
    if chosen:
        node = provider.get(chosen)
        if node is None:
            raise TpuctlError(
                f"no node named {chosen!r} in {describe_location(settings)}; "
                + elsewhere_hint(provider, chosen),
                exit_code=1,
            )
        return node
    nodes = provider.list()
    if len(nodes) == 1:
        return nodes[0]
    if not nodes:
        raise TpuctlError(
            f"no nodes in {describe_location(settings)}; create one with `tpuctl up TYPE`",
            exit_code=1,
        )
    names = ", ".join(sorted(n.name for n in nodes))
    raise TpuctlError(
        f"{len(nodes)} nodes in {describe_location(settings)} ({names}); pick one with "
        "--name NAME or `tpuctl config set node NAME`"
    )
