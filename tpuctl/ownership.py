"""Who a node belongs to: the labels tpuctl puts on every node it creates, and the rules
that decide what `babysit` and `down` may delete on a project shared with colleagues.

GCP label values allow only `[a-z0-9_-]{0,63}` (keys must also start with a letter), so a
user or run id is lowercased, every other character becomes `-`, and one longer than 63
characters keeps its start and gains a short hash of the whole, so that two long run ids
that share a prefix still get different labels.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

USER_LABEL = "tpuctl-user"  # the local user who created the node
RUN_LABEL = "tpuctl-run"  # the run a babysitter created the node for
# Why a user may not set them (`up --label`): a forged one would make a node someone else's.
RESERVED_LABELS = {
    USER_LABEL: "tpuctl sets it to who created the node (ownership: tpuctl deletes only "
    "nodes it created for that user)",
    RUN_LABEL: "tpuctl sets it to the run a babysitter created the node for (ownership: a "
    "babysitter replaces only nodes it created for its run)",
}
MAX_LABEL = 63
MAX_LABELS = 64  # on one node, tpuctl's own included
LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}\Z")
LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}\Z")
_NOT_ALLOWED = re.compile(r"[^a-z0-9_-]")


def label_value(text: str) -> str:
    """`text` as a valid GCP label value (`Llama-3.1-8B` -> `llama-3-1-8b`)."""
    value = _NOT_ALLOWED.sub("-", text.lower())
    if len(value) <= MAX_LABEL:
        return value
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{value[: MAX_LABEL - len(digest) - 1]}-{digest}"


def ownership_labels(user: str, run_id: str | None = None) -> dict[str, str]:
    """The labels of a node `user` creates (for `run_id`, when a babysitter creates it)."""
    labels = {USER_LABEL: label_value(user)}
    if run_id is not None:
        labels[RUN_LABEL] = label_value(run_id)
    return labels


def created_by(labels: Mapping[str, str], user: str) -> bool:
    """Whether the node's labels say that `user` created it with tpuctl."""
    return labels.get(USER_LABEL) == label_value(user)


def someone_elses(labels: Mapping[str, str], user: str) -> bool:
    """Whether the node's labels say tpuctl created it for a user other than `user`."""
    return USER_LABEL in labels and not created_by(labels, user)


def created_for_run(labels: Mapping[str, str], run_id: str, user: str) -> bool:
    """Whether the node's labels say `user`'s babysitter created it for `run_id`: a
    colleague's run of the same id is not this one."""
    return created_by(labels, user) and labels.get(RUN_LABEL) == label_value(run_id)


def describe_owner(labels: Mapping[str, str]) -> str:
    """Who the labels say the node is for, for messages."""
    user, run = labels.get(USER_LABEL), labels.get(RUN_LABEL)
    if user is None and run is None:
        return "no tpuctl labels (not created by tpuctl)"
    parts = [f"{USER_LABEL}={user}" if user else "", f"{RUN_LABEL}={run}" if run else ""]
    return "labels " + ", ".join(p for p in parts if p)
