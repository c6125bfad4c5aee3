"""Whose a run id is: the record `run` keeps beside a run's stored recipe.

`gs://BUCKET/tpuctl/runs/RUN_ID/owner.json` names the node the run id was first launched on
and who launched it. A launch under that id on another node, or with a recipe whose
`run_dir` is not the stored recipe's, is another run: storing its recipe there would make
every relaunch of the first run (a babysitter's, after a preemption) train it instead, on
the first run's node, so it is refused before anything is written. Relaunching the same run
(same node, same run_dir: what a babysitter does, or a resume with more steps) goes on; what
else a resume may change is the trainer's to check against the run's checkpoints.

A run stored before these records has none: its stored recipe's run_dir still decides, and
the launch that goes on records its node.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from tpuctl import storage
from tpuctl.errors import TpuctlError

OWNER_FILE = "owner.json"
_CLAIM_ATTEMPTS = 3  # a claim that loses a race reads the winner's record and decides again


@dataclass(frozen=True)
class RunOwner:
    """The node a run id belongs to, and the local user who first launched it there."""

    node: str
    user: str


def claim(recipe_uri: str, run_id: str, owner: RunOwner, run_dir: str) -> None:
    """Refuse (exit 2) a launch of `run_id` that is not its run's (`owner.node` is not the
    run's node, or `run_dir` is not its stored recipe's), else record `owner` as the run's
    when nothing does yet. `recipe_uri`: where the run's recipe is stored."""
    from google.api_core.exceptions import PreconditionFailed

    uri = f"{recipe_uri.rsplit('/', 1)[0]}/{OWNER_FILE}"
    for _ in range(_CLAIM_ATTEMPTS):
        recorded = _read_owner(uri, run_id)
        if recorded is not None and recorded.node != owner.node:
            raise TpuctlError(
                f"--run-id {run_id} is node {recorded.node}'s run (launched by {recorded.user}; "
                f"{recipe_uri}), not {owner.node}'s: give this run another --run-id, or "
                f"relaunch that run on its node with --name {recorded.node}"
            )
        _refuse_another_run_dir(recipe_uri, run_id, run_dir)
        if recorded is not None:
            return
        try:
            storage.upload_text(uri, json.dumps(asdict(owner)) + "\n", if_generation_match=0)
            return
        except PreconditionFailed:
            continue  # another launch recorded itself first: look at its record
    raise TpuctlError(f"--run-id {run_id}: could not record its node in {uri}; try again", 1)


def _read(uri: str) -> str | None:
    """The text of a run file, None when there is none; GCS trouble is one line, exit 1."""
    from google.api_core import exceptions

    try:
        return storage.read_text(uri)
    except (exceptions.GoogleAPIError, exceptions.RetryError) as err:  # unreachable, 5xx
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TpuctlError(f"could not read {uri}: {reason}", 1) from None


def _read_owner(uri: str, run_id: str) -> RunOwner | None:
    """The run's recorded owner; None when there is no record."""
    text = _read(uri)
    if text is None:
        return None
    try:
        data = json.loads(text)
        return RunOwner(str(data["node"]), str(data["user"]))
    except (ValueError, KeyError, TypeError):
        raise TpuctlError(
            f"--run-id {run_id}: {uri}, which names the node the run belongs to, cannot be "
            "read: give this run another --run-id"
        ) from None


def _refuse_another_run_dir(recipe_uri: str, run_id: str, run_dir: str) -> None:
    """Refuse a launch whose run_dir is not the one of the recipe stored for `run_id`."""
    stored = _stored_run_dir(recipe_uri, run_id)
    if stored is None or stored.rstrip("/") == run_dir.rstrip("/"):
        return
    raise TpuctlError(
        f"--run-id {run_id} is the run in {stored} ({recipe_uri}) and this recipe's run_dir "
        f"is {run_dir}: give this run another --run-id, or set run_dir={stored} to go on "
        "with that run"
    )


def _stored_run_dir(recipe_uri: str, run_id: str) -> str | None:
    """The run_dir of the recipe stored at `recipe_uri`; None when none is stored."""
    import yaml

    from trainer.yaml_input import YamlInputError, load_yaml

    text = _read(recipe_uri)
    if text is None:
        return None
    try:
        recipe = load_yaml(text.encode(), recipe_uri)
    except (YamlInputError, yaml.YAMLError):
        recipe = None
    run_dir = recipe.get("run_dir") if isinstance(recipe, dict) else None
    if not isinstance(run_dir, str):
        raise TpuctlError(
            f"--run-id {run_id}: its stored recipe {recipe_uri} names no run_dir that can be "
            "read: give this run another --run-id"
        )
    return run_dir
