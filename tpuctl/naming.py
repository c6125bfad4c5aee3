"""Node names: the `<user>-<type>` default TPU users already follow, checked against the API's rules."""

from __future__ import annotations

import re

from tpuctl.errors import TpuctlError

# Cloud TPU node ids: lowercase letters, digits and hyphens, starting with a letter and
# not ending with a hyphen, at most 63 characters (RFC 1035 labels).
NODE_ID_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")  # \Z: `$` lets a "\n" end pass
MAX_NODE_ID = 63
# Run ids name directories (state files, the run's folder in GCS, each worker's job
# records): one path segment, no hidden files, nothing a shell or a URI has to quote.
MAX_RUN_ID = 128  # a file name on every worker, and part of GCS object names
RUN_ID_RE = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9_.-]{{0,{MAX_RUN_ID - 1}}}\Z")


def default_node_name(user: str, accelerator_type: str) -> str:
    """`alice-v3-256`: the user name made node-id safe, then the type."""
    safe_user = re.sub(r"[^a-z0-9-]+", "-", user.lower()).strip("-")
    if not safe_user or not safe_user[0].isalpha():
        safe_user = f"u{safe_user}".rstrip("-") or "tpuctl"
    suffix = f"-{accelerator_type.lower()}"  # kept whole: a cut type names another node
    safe_user = safe_user[: MAX_NODE_ID - len(suffix)].rstrip("-")
    return validate_node_name(f"{safe_user}{suffix}")


def validate_node_name(name: str) -> str:
    """Return `name` if the TPU API accepts it as a node id; otherwise raise a clear error."""
    if len(name) > MAX_NODE_ID:
        raise TpuctlError(
            f"node name {name!r} is {len(name)} characters; --name allows at most {MAX_NODE_ID}"
        )
    if not NODE_ID_RE.match(name):
        raise TpuctlError(
            f"node name {name!r} is not a valid TPU node id: use lowercase letters, digits "
            "and hyphens, start with a letter and do not end with a hyphen (e.g. alice-v3-8)"
        )
    return name


def validate_run_id(run_id: str, flag: str = "--run-id") -> str:
    """Return `run_id` if it is safe as a path segment and a GCS object name; otherwise
    raise a clear error (`../../x` would write outside the state directory)."""
    if not RUN_ID_RE.match(run_id):
        raise TpuctlError(
            f"{flag} {run_id!r:.{MAX_RUN_ID + 20}} is not a run id: use at most {MAX_RUN_ID} "
            "letters, digits, '_', '-' and '.', not starting with '.' (e.g. llama-3.1-8b-sft)"
        )
    return run_id
