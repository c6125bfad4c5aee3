"""Where TPU nodes come from: Cloud TPU (the v2 API) or a local simulated pod.

Providers create, describe and delete nodes. They never SSH: they hand out
workers' addresses, and the fan-out layer takes it from there.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING

from tpuctl.errors import TpuctlError
from tpuctl.providers import registry
from tpuctl.providers.registry import Location

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.providers.base import Capabilities, Node, Provider
    from tpuctl.providers.cloud_tpu import CloudTpuProvider

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


def capabilities_of(name: str) -> Capabilities:
    """What the provider called `name` (a node's `provider`) can do."""
    module_name, class_name = PROVIDER_CLASSES[name]
    return getattr(importlib.import_module(module_name), class_name).capabilities


SET_PROJECT = "pass --project, set TPUCTL_PROJECT or run `tpuctl config set project PROJECT`"


def describe_location(settings: Settings) -> str:
    """Where the current provider looks for nodes, for messages ("zone Z of project P")."""
    if settings.get("provider") == "local":
        return "the local pod provider"
    if _no_project(settings):
        return "the local pods"
    if not settings.get("zone"):  # a name is then looked up in every zone (`find_node`)
        return f"any zone of project {settings.get('project')}"
    return f"zone {settings.get('zone')} of project {settings.get('project')}"


def _cloud_configured(settings: Settings) -> bool:
    """Whether to ask the Cloud TPU API: a project is set, or the user chose the cloud."""
    return bool(settings.get("project")) or _explicit(settings, "provider", "any")


def _no_project(settings: Settings) -> bool:
    """Whether only the local pods are looked at for want of a project (rather than because
    `provider: local` says so)."""
    return settings.get("provider") != "local" and not _cloud_configured(settings)


def cloud_hint(settings: Settings) -> str:
    """How to look for Cloud TPU nodes too, when only the local pods were looked at for want
    of a project: a second clause for messages that name the local pods; else ""."""
    return (
        f"; to look for Cloud TPU nodes too, set a project: {SET_PROJECT}"
        if _no_project(settings)
        else ""
    )


def missing_hint(settings: Settings, name: str) -> str:
    """ "; did you mean 'mine'? (local pods: mine)", "; it is in zone Z: pass --zone Z" and
    the like for a node `find_node` did not find where `describe_location` says: where it
    is, or that no zone has it (and the name it most likely misspells)."""
    if settings.get("provider") == "local" or _no_project(settings):
        return "; " + _local_pods_hint(name) + cloud_hint(settings)
    if not settings.get("zone"):  # every zone was looked at already
        return ""
    everywhere = _any_zone(settings).list(all_zones=True)
    found = [node.zone for node in everywhere if node.name == name]
    if len(found) == 1:
        return f"; it is in zone {found[0]}: pass --zone {found[0]}"
    if found:
        return f"; zones {', '.join(found)} have one: pass --zone with one of them"
    # Every zone was looked at: `list --all-zones` would not find it either, but a
    # misspelling of a name that is there is worth naming.
    nowhere = "; no other zone of the project has one either"
    close = difflib.get_close_matches(name, [node.name for node in everywhere], n=1)
    near = [node for node in everywhere if node.name in close]
    return nowhere + (f"; did you mean {near[0].name!r} (zone {near[0].zone})?" if near else "")


def _any_zone(settings: Settings) -> CloudTpuProvider:
    """The cloud provider of the configured project, to look in every zone of it."""
    from tpuctl.providers.cloud_tpu import CloudTpuProvider

    if not settings.get("project"):
        provider_for(settings)  # the missing-project error
    return CloudTpuProvider(str(settings.get("project")), None)


def _local_pods_hint(name: str) -> str:
    """The local pods, the one `name` most likely misspells first; or how to make one."""
    from tpuctl.providers.local import LocalProvider

    names = [pod.name for pod in LocalProvider().list()]
    if not names:
        return "there are no local pods (`tpuctl up TYPE --local` makes one)"
    close = difflib.get_close_matches(name, names, n=1)
    if not close:
        return f"the local pods are {', '.join(names)}"
    return f"did you mean {close[0]!r}? (local pods: {', '.join(names)})"


def _explicit(settings: Settings, key: str, kind: str = "") -> bool:
    """Whether the user chose `key` (a flag, or with `kind` "any" also env or a file)."""
    source = settings.source(key)
    return source != "default" if kind == "any" else source.startswith("flag")


def _point_at(settings: Settings, location: Location, why: str) -> None:
    """Make `settings` name the node's place, so providers, caches and known_hosts follow."""
    values = {"provider": location.provider}
    if location.provider == "cloud":
        values |= {"zone": location.zone, "project": location.project}
    for key, value in values.items():
        if value and not _explicit(settings, key) and settings.get(key) != value:
            settings.values[key] = value
            settings.sources[key] = why


def point_at_registered(settings: Settings, name: str) -> None:
    """Point `settings` at where tpuctl created `name`, when that is one place the user's
    flags and provider setting allow (no API call)."""
    places = _allowed(settings, registry.locations(name))
    if len(places) == 1:
        _point_at(settings, places[0], f"where tpuctl created {name}")


def _allowed(settings: Settings, places: list[Location]) -> list[Location]:
    """The places the user did not rule out with `provider` or --zone/--project."""
    if _explicit(settings, "provider", "any"):
        places = [p for p in places if p.provider == settings.get("provider")]
    if _explicit(settings, "zone") or _explicit(settings, "project"):
        places = [
            p for p in places
            if p.provider == "cloud" and p.zone == settings.get("zone")
            and p.project == settings.get("project")
        ]  # fmt: skip
    return places


def find_node(settings: Settings, name: str) -> Node | None:
    """The node called `name` wherever it lives, pointing `settings` at it; None if nowhere.

    Looks where tpuctl created it (the registry), at the local pods, and for a name it did
    not create in the configured zone, then every zone of the project (one list call).
    `provider` (env, file) and --zone/--project flags narrow the search. A name that is
    both a local pod and a cloud node is an error naming both.
    """
    from tpuctl.naming import validate_node_name
    from tpuctl.providers.local import LocalProvider

    validate_node_name(name)  # `status a/b` must not reach the API as a path
    local_allowed = _allowed(settings, [LocalProvider.LOCATION]) != []
    found = [node] if local_allowed and (node := LocalProvider().get(name)) else []
    clouds = [p for p in _allowed(settings, registry.locations(name)) if p.provider == "cloud"]
    for place in clouds:
        cloud = _cloud_at(place).get(name)
        found += [cloud] if cloud else []
    unknown_to_us = not found and not clouds
    if unknown_to_us and settings.get("provider") == "cloud" and _cloud_configured(settings):
        found += _look_up_in_the_cloud(settings, name)
    if len(found) > 1:
        places = " and ".join(_describe(node) for node in found)
        raise TpuctlError(
            f"node name {name!r} is {places}: say which with TPUCTL_PROVIDER=local "
            f"or TPUCTL_PROVIDER=cloud (and --zone), or rename one"
        )
    if not found:
        return None
    node = found[0]
    _point_at(settings, _location_of(node), f"where {name} lives")
    return node


def _look_up_in_the_cloud(settings: Settings, name: str) -> list[Node]:
    """A name tpuctl did not create: the configured zone, then, unless --zone or --project
    said where, every zone of the project (the only place to look when no zone is set). A
    name in several zones is an error naming them: `down` must not pick one."""
    if settings.get("zone"):
        node = provider_for(settings).get(name)
        if node is not None or _explicit(settings, "zone") or _explicit(settings, "project"):
            return [node] if node else []
    everywhere = _any_zone(settings).locate(name)
    if len(everywhere) > 1:
        zones = ", ".join(node.zone for node in everywhere)
        raise TpuctlError(
            f"zones {zones} of project {settings.get('project')} each have a node named "
            f"{name!r}: say which with --zone"
        )
    return everywhere


def list_all(settings: Settings, all_zones: bool = False) -> list[Node]:
    """Cloud nodes in the configured zone (or `all_zones`), sorted by zone and name, then
    the local pods: both unless the `provider` setting names one. Without a cloud
    project, the local pods alone, if any; unless --zone or `all_zones` asks for the
    cloud (the missing-project error)."""
    from tpuctl.providers.local import LocalProvider

    chosen = settings.get("provider") if _explicit(settings, "provider", "any") else None
    local = LocalProvider().list() if chosen != "cloud" else []
    cloud = listed_cloud(settings, all_zones)
    return [*(cloud.list(all_zones=all_zones) if cloud else []), *local]


def listed_cloud(settings: Settings, all_zones: bool = False) -> CloudTpuProvider | None:
    """The Cloud TPU provider whose nodes `list_all` lists (in the configured zone, or in
    every zone with `all_zones`); None where it lists the local pods alone."""
    from tpuctl.config import Settings
    from tpuctl.providers.cloud_tpu import CloudTpuProvider

    chosen = settings.get("provider") if _explicit(settings, "provider", "any") else None
    cloud_asked = settings.get("project") or all_zones or _explicit(settings, "zone")
    if chosen == "local" or (chosen is None and not cloud_asked):
        return None
    if all_zones and settings.get("project") and not settings.get("zone"):
        return _any_zone(settings)
    cloud = provider_for(Settings({**settings.values, "provider": "cloud"}, settings.sources))
    assert isinstance(cloud, CloudTpuProvider)
    return cloud


def _cloud_at(place: Location) -> Provider:
    from tpuctl.providers.cloud_tpu import CloudTpuProvider

    return CloudTpuProvider(str(place.project), place.zone)


def _location_of(node: Node) -> Location:
    return Location(node.provider, node.zone, node.project if node.provider == "cloud" else None)


def _describe(node: Node) -> str:
    if node.provider == "local":
        return "a local pod"
    return f"a cloud node in zone {node.zone} of project {node.project}"


def only_node(settings: Settings, nodes: list[Node]) -> Node | None:
    """The node a command given no name acts on: the one node of `nodes` (those `list_all`
    shows, or `down`'s own among them), with `settings` pointed at it; None unless one."""
    if len(nodes) != 1:
        return None
    _point_at(settings, _location_of(nodes[0]), f"where {nodes[0].name} lives")
    return nodes[0]


def resolve_node(settings: Settings, name: str | None) -> Node:
    """The node a command acts on: `name`, else the `node` setting, else the only node
    that `list` shows (the zone's and the local pods; the local pods alone without a
    project).

    A named node is found wherever it lives (`find_node`), and `settings` then point at
    it. Raises a TpuctlError naming the node and location when it does not exist (exit
    1: a lookup that found nothing, as `status` of a node deleted meanwhile), or listing
    the candidates when there is more than one and none was named (exit 2).
    """
    chosen = name or settings.get("node")
    if chosen:
        node = find_node(settings, chosen)
        if node is None:
            raise TpuctlError(
                f"no node named {chosen!r} in {describe_location(settings)}"
                + missing_hint(settings, chosen),
                exit_code=1,
            )
        return node
    nodes = list_all(settings)
    if (node := only_node(settings, nodes)) is not None:
        return node
    if not nodes:
        local = " --local" if _no_project(settings) else ""  # else `up` asks for one
        raise TpuctlError(
            f"no nodes in {describe_location(settings)}; create one with `tpuctl up TYPE{local}`"
            + cloud_hint(settings),
            exit_code=1,
        )
    names = ", ".join(sorted(n.name for n in nodes))
    # Every command that takes a node takes --name NAME (most take NAME too).
    raise TpuctlError(
        f"{len(nodes)} nodes in {describe_location(settings)} ({names}); pick one with "
        "--name NAME, or `tpuctl config set node NAME`"
    )
