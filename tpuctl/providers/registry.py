"""Where tpuctl created each node: provider, project and zone, remembered by node name.

The providers write it as they create and delete nodes (so `tpuctl up` and the
babysitter's recreations both count), and lookup reads it, so a node is found by name
wherever it lives: a local pod without `provider: local`, a cloud node in a fallback
zone. One small JSON file per name under `state_dir()/registry/`; a name may have
several locations (a local pod and a cloud node of the same name, which lookup refuses).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Location:
    """Where one node lives: `provider` cloud (in `project`, `zone`) or local (zone "local")."""

    provider: str
    zone: str
    project: str | None = None

    def describe(self) -> str:
        """For messages: "a local pod" or "zone Z of project P"."""
        if self.provider == "local":
            return "a local pod"
        return f"zone {self.zone} of project {self.project}"


def registry_dir() -> Path:
    from tpuctl.config import state_dir

    return state_dir() / "registry"


def locations(name: str) -> list[Location]:
    """Every place tpuctl created a node called `name` and has not deleted it since."""
    try:
        data = json.loads((registry_dir() / f"{name}.json").read_text())
    except (OSError, ValueError):
        return []
    return [Location(**entry) for entry in data.get("locations", [])]


def record(name: str, location: Location) -> None:
    """Remember that a node called `name` was created at `location`."""
    known = locations(name)
    if location not in known:
        _write(name, [*known, location])


def forget(name: str, location: Location) -> None:
    """The node called `name` at `location` is gone."""
    known = locations(name)
    if location in known:
        _write(name, [entry for entry in known if entry != location])


def _write(name: str, entries: list[Location]) -> None:
    path = registry_dir() / f"{name}.json"
    if not entries:
        path.unlink(missing_ok=True)
        return
    from tpuctl.config import write_private

    write_private(path, json.dumps({"locations": [asdict(entry) for entry in entries]}))
