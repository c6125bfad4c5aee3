"""The device mesh and the rules that shard parameters, optimizer state and batches over it.

Axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state
sharded), `tensor` (model parallel inside a layer). Batches are split over data x fsdp.
Parameters are matched by regular expressions on their path ("layers/attn/wq/kernel"), as in
EasyLM; a parameter that no rule matches is an error rather than silently replicated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from trainer.config import MESH_AXES, MeshConfig, RecipeError, mesh_shape

# Stacked layer parameters have a leading layer axis (nn.scan), never sharded.
DEFAULT_RULES: list[tuple[str, tuple]] = [
    (r"embed/embedding", ("tensor", "fsdp")),
    (r"layers/attn/(wq|wk|wv)/kernel", (None, "fsdp", "tensor")),
    (r"layers/attn/(wq|wk|wv)/bias", (None, "tensor")),  # qwen2
    (r"layers/attn/wo/kernel", (None, "tensor", "fsdp")),
    (r"layers/attn/(q_norm|k_norm)/weight", (None, None)),  # olmo2: small, kept whole
    (r"layers/mlp/(gate|up)/kernel", (None, "fsdp", "tensor")),
    (r"layers/mlp/down/kernel", (None, "tensor", "fsdp")),
    (r"layers/(attn_norm|mlp_norm)/weight", (None, None)),
    (r"norm/weight", (None,)),
    (r"lm_head/kernel", ("fsdp", "tensor")),
    (r"score/kernel", ("fsdp", None)),  # a reward model's scalar head
]
BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all devices (or `devices`) with the recipe's axis sizes, -1 resolved."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def path_name(path) -> str:
    """'layers/attn/wq/kernel' for a jax tree path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def _rule_for(name: str, rules: Sequence[tuple[str, tuple]]) -> tuple | None:
    for pattern, spec in rules:
        if re.search(rf"(^|/){pattern}$", name):
            return spec
    return None


def _fits(shape: tuple[int, ...], spec: tuple, mesh: Mesh) -> str | None:
    """Why `spec` cannot shard `shape` on `mesh`, or None if it can."""
    if len(spec) != len(shape):
        return f"rule has {len(spec)} axes but the tensor has {len(shape)}"
    for dim, (size, axis) in enumerate(zip(shape, spec, strict=True)):
        if axis is not None and size % mesh.shape[axis]:
            return f"dimension {dim} ({size}) is not divisible by mesh {axis}={mesh.shape[axis]}"
    return None


def param_specs(params, mesh: Mesh, rules: Sequence[tuple[str, tuple]] = DEFAULT_RULES):
    """PartitionSpecs for a params pytree (arrays or ShapeDtypeStructs); strict."""

    def spec(path, leaf):
        name = path_name(path)
        rule = _rule_for(name, rules)
        if rule is None:
            raise RecipeError(
                f"parameter {name} matches no sharding rule; add one to trainer/sharding.py"
            )
        problem = _fits(leaf.shape, rule, mesh)
        if problem:
            raise RecipeError(
                f"parameter {name} {tuple(leaf.shape)}: {problem}; change the mesh sizes"
            )
        return P(*rule)

    return jax.tree_util.tree_map_with_path(spec, params)


def state_specs(state, mesh: Mesh, rules: Sequence[tuple[str, tuple]] = DEFAULT_RULES):
    """PartitionSpecs for a whole train state: params strictly, optimizer statistics that mirror a
    parameter like it, and anything else (counters, factored second moments) replicated."""

    def spec(path, leaf):
        name = path_name(path)
        if name.startswith("params/"):
            return None  # filled in below, strictly
        rule = _rule_for(name, rules)
        shape = getattr(leaf, "shape", ())
        return P(*rule) if rule is not None and _fits(shape, rule, mesh) is None else P()

    specs = jax.tree_util.tree_map_with_path(spec, state)
    return specs.replace(params=param_specs(state.params, mesh, rules))


def named(mesh: Mesh, specs):
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are [grad_accum, micro_batch, seq]: micro-batch rows split over data x fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))
