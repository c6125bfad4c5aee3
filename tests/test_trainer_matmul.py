"""trainer.matmul: low-precision products accumulated and written in fp32, forward and back."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures_trainer import dot_types
from trainer.matmul import (
    accumulating_einsum,
    copied_operands_einsum,
    dense_dot_general,
    plain_einsum,
)

# spec, shape of a, shape of b: the products the model makes
SPECS = {
    "dense": ("aby,yz->abz", (2, 12, 32), (32, 24)),
    "attention logits": ("bkrd,bksd->bkrs", (2, 2, 8, 16), (2, 2, 12, 16)),
    "attention values": ("bkrs,bksd->bkrd", (2, 2, 8, 12), (2, 2, 12, 16)),
    "attention key gradients": ("bkrd,bkrs->bkds", (2, 2, 8, 16), (2, 2, 8, 12)),
}


def _operands(name: str, dtype):
    spec, a_shape, b_shape = SPECS[name]
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(size=s), dtype) for s in (a_shape, b_shape))
    return spec, a, b


def _value_and_grads(einsum, spec, a, b, fp32_out=False):
    """The product, and the gradients of a fixed random projection of it."""
    out_shape = jax.eval_shape(lambda: jnp.einsum(spec, a, b)).shape
    probe = jax.random.normal(jax.random.key(1), out_shape)

    def loss(a, b):
        out = einsum(spec, a, b, fp32_out)
        return jnp.sum(out.astype(jnp.float32) * probe), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(a, b)
    return out, grads


@pytest.mark.parametrize("name", SPECS)
def test_in_float32_the_products_and_gradients_are_autodiffs(name):
    spec, a, b = _operands(name, jnp.float32)
    got_out, got_grads = _value_and_grads(accumulating_einsum, spec, a, b)
    want_out, want_grads = _value_and_grads(plain_einsum, spec, a, b)
    for got, want in zip((got_out, *got_grads), (want_out, *want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SPECS)
def test_in_bfloat16_the_results_are_as_close_to_float32_as_xlas_own(name):
    spec, a, b = _operands(name, jnp.bfloat16)
    exact = _value_and_grads(plain_einsum, spec, a.astype(jnp.float32), b.astype(jnp.float32))
    ours = _value_and_grads(accumulating_einsum, spec, a, b)
    xlas = _value_and_grads(plain_einsum, spec, a, b)
    assert [x.dtype for x in (ours[0], *ours[1])] == [jnp.bfloat16] * 3
    for got, plain, want in zip(
        jax.tree_util.tree_leaves(ours),
        jax.tree_util.tree_leaves(xlas),
        jax.tree_util.tree_leaves(exact),
        strict=True,
    ):
        error = np.abs(np.asarray(got, np.float32) - want).max()
        assert error <= 1.01 * np.abs(np.asarray(plain, np.float32) - want).max() + 1e-6


def test_fp32_out_keeps_the_accumulator_and_the_gradients_match_float32():
    spec, a, b = _operands("attention logits", jnp.bfloat16)
    out, grads = _value_and_grads(accumulating_einsum, spec, a, b, fp32_out=True)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, jnp.einsum(spec, a.astype(jnp.float32), b), rtol=1e-5)
    exact = _value_and_grads(plain_einsum, spec, a.astype(jnp.float32), b.astype(jnp.float32))
    for got, want in zip(grads, exact[1], strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", SPECS)
def test_every_bfloat16_product_of_forward_and_backward_writes_float32(name):
    # XLA:CPU reaches its fast bf16 kernels only for dots with an fp32 result; a bf16 result
    # is computed through fp32 converts at fp32 speed (about half).
    spec, a, b = _operands(name, jnp.bfloat16)

    def step(einsum):
        return jax.jit(lambda a, b: _value_and_grads(einsum, spec, a, b)).lower(a, b).as_text()

    ours = dot_types(step(accumulating_einsum))
    assert len(ours) == 3  # the product and both gradients
    assert all("bf16" in operands and "xf32>" in result for operands, result in ours), ours
    assert any("xbf16>" in result for _, result in dot_types(step(plain_einsum)))


@pytest.mark.parametrize("name", SPECS)
def test_copied_operands_einsum_is_the_einsum_and_its_autodiff(name):
    spec, a, b = _operands(name, jnp.bfloat16)
    for fp32_out in (False, True):
        got = _value_and_grads(copied_operands_einsum, spec, a, b, fp32_out)
        want = _value_and_grads(plain_einsum, spec, a, b, fp32_out)
        for x, y in zip(*map(jax.tree_util.tree_leaves, (got, want)), strict=True):
            assert x.dtype == y.dtype  # equal up to the order of the fp32 sums
            tolerance = 2 * float(jnp.finfo(x.dtype).eps)
            np.testing.assert_allclose(
                np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=tolerance, atol=1e-6
            )


def test_copied_operands_keep_a_chunks_product_on_xla_cpus_bf16_kernels():
    # Attention's products take chunks of transposed arrays. XLA:CPU folds such a transpose
    # into a 4-d dot, finds no bf16 kernel for the folded dot and computes it in fp32
    # (about 3x slower); with the operands copied first the dot stays bf16. If the plain
    # einsum stops falling back, `copied_operands_einsum` has become unneeded.
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 64, 2, 16)), jnp.bfloat16)  # [batch, seq, head, dim]
    k = jnp.asarray(rng.normal(size=(2, 2, 16, 64)), jnp.bfloat16)  # [batch, head, dim, seq]

    def compiled_dot_operands(einsum) -> list[str]:
        def chunk_logits(q, k):
            q_chunk = q[:, 16:32].transpose(0, 2, 1, 3)  # [batch, head, chunk, dim]
            return einsum("bkrd,bkds->bkrs", q_chunk, k, fp32_out=True)

        text = jax.jit(chunk_logits).lower(q, k).compile().as_text()
        types = dict(re.findall(r"%(\S+) = (\w+)\[", text))
        return [types[x] for pair in re.findall(r" dot\(%(\S+), %(\S+)\)", text) for x in pair]

    assert set(compiled_dot_operands(copied_operands_einsum)) == {"bf16"}
    assert "f32" in compiled_dot_operands(plain_einsum)


def test_dense_dot_general_is_the_dense_product_and_refuses_others():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 4)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(3).normal(size=(4, 5)), jnp.float32)
    np.testing.assert_allclose(dense_dot_general(x, w, (((2,), (0,)), ((), ()))), x @ w, rtol=1e-6)
    with pytest.raises(ValueError, match="not a Dense layer's product"):
        dense_dot_general(x, w.T, (((2,), (1,)), ((), ())))
