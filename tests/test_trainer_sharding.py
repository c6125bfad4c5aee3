"""Mesh construction and the rules that place parameters, optimizer state and batches."""

from __future__ import annotations

import dataclasses

import jax
import pytest
from jax.sharding import PartitionSpec as P

from trainer import sharding
from trainer.config import MeshConfig, ModelConfig, OptimizerConfig, RecipeError
from trainer.model import init_params
from trainer.optim import make_optimizer
from trainer.train import TrainState

CFG = ModelConfig(preset=None, vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  mlp_dim=128, max_seq_len=64, dtype="float32")  # fmt: skip


def abstract_params(cfg: ModelConfig = CFG):
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def test_mesh_takes_all_devices_with_the_rest_axis():
    assert jax.device_count() == 8  # tests/fixtures_trainer.py sets eight CPU devices
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=-1, tensor=1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(RecipeError, match="needs 16 devices but there are 8"):
        sharding.make_mesh(MeshConfig(data=4, fsdp=4, tensor=1))


def test_every_parameter_is_sharded_by_its_rule():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    specs = sharding.param_specs(abstract_params(), mesh)
    assert specs["layers"]["attn"]["wq"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["layers"]["mlp"]["down"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["attn_norm"]["weight"] == P(None, None)
    assert specs["embed"]["embedding"] == P("tensor", "fsdp")
    params = jax.jit(
        lambda: init_params(CFG, jax.random.key(0)), out_shardings=sharding.named(mesh, specs)
    )()
    wq = params["layers"]["attn"]["wq"]["kernel"]
    assert wq.shape == (2, 64, 64) and wq.addressable_shards[0].data.shape == (2, 16, 32)


@pytest.mark.parametrize("family", ["qwen2", "olmo2"])
def test_each_family_new_parameter_has_a_rule(family):
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    specs = sharding.param_specs(abstract_params(dataclasses.replace(CFG, family=family)), mesh)
    attn = specs["layers"]["attn"]
    if family == "qwen2":
        assert attn["wq"]["bias"] == attn["wk"]["bias"] == P(None, "tensor")
    else:
        assert attn["q_norm"]["weight"] == attn["k_norm"]["weight"] == P(None, None)


def test_a_parameter_without_a_rule_is_an_error_not_replicated():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
    rules = [r for r in sharding.DEFAULT_RULES if "lm_head" not in r[0]]
    with pytest.raises(RecipeError, match="parameter lm_head/kernel matches no sharding rule"):
        sharding.param_specs(abstract_params(), mesh, rules)


def test_indivisible_dimensions_name_the_parameter_and_axis():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))
    odd = dataclasses.replace(CFG, mlp_dim=100)
    with pytest.raises(
        RecipeError,
        match=r"layers/mlp/down/kernel \(2, 100, 64\): dimension 1 \(100\) is not divisible by mesh tensor=8",
    ):
        sharding.param_specs(abstract_params(odd), mesh)


def test_optimizer_state_mirrors_the_parameters_and_counters_are_replicated():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
    optimizer, _ = make_optimizer(OptimizerConfig(weight_decay=0.1), 10)

    def fresh():
        params = init_params(CFG, jax.random.key(0))
        return TrainState(jax.numpy.int32(0), params, optimizer.init(params), jax.random.key(1))

    specs = sharding.state_specs(jax.eval_shape(fresh), mesh)
    flat = {
        sharding.path_name(p): s
        for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    }
    mu = [s for name, s in flat.items() if name.endswith("mu/layers/mlp/up/kernel")]
    assert mu == [P(None, "fsdp", "tensor")]
    assert flat["step"] == P() and all(s == P() for n, s in flat.items() if n.endswith("count"))


def test_batches_split_over_data_and_fsdp():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
    spec = sharding.batch_sharding(mesh)
    shards = spec.addressable_devices_indices_map((2, 16, 32))
    assert {idx[1].stop - idx[1].start for idx in shards.values()} == {2}  # 16 rows / 8 devices
