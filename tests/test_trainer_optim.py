"""Schedules, the weight-decay mask, clipping and the three optimizers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.config import OptimizerConfig
from trainer.optim import learning_rate_schedule, make_optimizer, weight_decay_mask


def test_warmup_then_cosine_to_end_lr():
    schedule = learning_rate_schedule(
        OptimizerConfig(lr=1.0, end_lr=0.1, warmup_steps=10, schedule="cosine"), 110
    )
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.55, abs=1e-3)  # halfway down the cosine
    assert float(schedule(110)) == pytest.approx(0.1)


def test_linear_decay_and_constant():
    linear = learning_rate_schedule(OptimizerConfig(lr=1.0, end_lr=0.0, schedule="linear"), 100)
    assert float(linear(50)) == pytest.approx(0.5) and float(linear(100)) == 0.0
    constant = learning_rate_schedule(OptimizerConfig(lr=0.3, schedule="constant"), 100)
    assert float(constant(99)) == pytest.approx(0.3)


def params():
    return {
        "embed": {"embedding": jnp.ones((4, 2))},
        "layers": {
            "attn_norm": {"weight": jnp.ones((3, 2))},
            "attn": {"wq": {"kernel": jnp.ones((3, 2, 2))}},
        },
        "norm": {"weight": jnp.ones((2,))},
    }


def test_weight_decay_skips_norms():
    mask = weight_decay_mask(params())
    assert mask["embed"]["embedding"] and mask["layers"]["attn"]["wq"]["kernel"]
    assert not mask["layers"]["attn_norm"]["weight"] and not mask["norm"]["weight"]


def test_decay_shrinks_matrices_but_not_norms_with_zero_gradients():
    optimizer, _ = make_optimizer(
        OptimizerConfig(lr=0.1, weight_decay=0.5, schedule="constant"), 10
    )
    p = params()
    updates, _ = optimizer.update(jax.tree_util.tree_map(jnp.zeros_like, p), optimizer.init(p), p)
    assert float(updates["layers"]["attn"]["wq"]["kernel"][0, 0, 0]) == pytest.approx(-0.05)
    assert float(updates["norm"]["weight"][0]) == 0.0


def test_global_norm_clipping_bounds_the_update_direction():
    cfg = OptimizerConfig(
        name="adamw", lr=1.0, clip_norm=1.0, schedule="constant", b1=0.0, b2=0.0, eps=0.0
    )
    optimizer, _ = make_optimizer(cfg, 10)
    p = {"w": {"kernel": jnp.zeros((2,))}}
    clipped = optimizer.update({"w": {"kernel": jnp.array([300.0, 400.0])}}, optimizer.init(p), p)[
        0
    ]
    np.testing.assert_allclose(clipped["w"]["kernel"], [-1.0, -1.0], rtol=1e-5)  # Adam's sign step


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
def test_each_optimizer_reduces_a_quadratic(name):
    optimizer, _ = make_optimizer(OptimizerConfig(name=name, lr=0.05, schedule="constant"), 100)
    p = {"w": {"kernel": jnp.full((4, 4), 3.0)}}
    state = optimizer.init(p)
    loss = lambda q: jnp.sum(q["w"]["kernel"] ** 2)  # noqa: E731
    for _ in range(30):
        updates, state = optimizer.update(jax.grad(loss)(p), state, p)
        p = jax.tree_util.tree_map(jnp.add, p, updates)
    assert float(loss(p)) < 0.5 * 16 * 9
