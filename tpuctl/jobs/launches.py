"""The latest run tpuctl launched on each node, remembered on this machine.

`tpuctl run` and the babysitter's relaunches (both through `start_run`) write it, so
`tpuctl top` knows which run to show for a node and where its metrics are without
asking the workers. One small JSON file per node under `state_dir()/launches/`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Launch:
    """A run started on a node: its id, its run directory and how many steps it is to take."""

    node: str
    run_id: str
    run_dir: str
    total_steps: int | None  # None when the recipe counts epochs
    launched_at: float  # epoch seconds


def launches_dir() -> Path:
    from tpuctl.config import state_dir

    return state_dir() / "launches"


def record(launch: Launch) -> None:
    """Remember `launch` as the node's latest run."""
    from tpuctl.config import write_private

    write_private(launches_dir() / f"{launch.node}.json", json.dumps(asdict(launch)))


def latest(node: str) -> Launch | None:
    """The latest run tpuctl launched on `node` from this machine, if any."""
    try:
        return Launch(**json.loads((launches_dir() / f"{node}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def forget(node: str) -> None:
    """The node is gone (`down`): a new node of the same name has run nothing yet."""
    (launches_dir() / f"{node}.json").unlink(missing_ok=True)
