"""Low-precision matmuls that write fp32 accumulators, forward and backward.

With bf16 operands, XLA:CPU picks its fast bf16 kernels (AVX-512 BF16) only for dots whose
result is fp32: on a 2-core AMD EPYC about 380 GFLOP/s against about 180 for the same dot
returning bf16, which XLA:CPU computes through fp32 converts. Autodiff of a dot
with `preferred_element_type=float32` does not help the backward pass: the cotangent arrives
in fp32, so both gradient dots mix fp32 with bf16 and run at fp32 speed. `accumulating_einsum`
therefore carries its own VJP whose gradient dots take bf16 operands and return fp32 too.
Each result is rounded to the operands' dtype once, as a bf16 dot with fp32 accumulation
does on an accelerator, so the numerics are those of the plain bf16 dot or closer.
"""

from __future__ import annotations

import functools
import string

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# checkpoint_name tags of `accumulating_einsum`'s results, with and without batch dimensions
# (indices in both operands and the result). A remat policy cannot see the dot inside a
# custom VJP, so the dot-saving policies of `model.remat` save these names too.
DOT_NAME = "accumulated_dot"
BATCHED_DOT_NAME = "accumulated_batched_dot"


def accumulating_einsum(spec: str, a: jax.Array, b: jax.Array, fp32_out: bool = False) -> jax.Array:
    """`jnp.einsum(spec, a, b)`, accumulated and written in fp32 by every dot of the forward
    and backward pass, and returned in the operands' dtype (in fp32 with `fp32_out`, e.g.
    attention logits for a softmax; their gradient is rounded to the operands' dtype before
    the gradient dots, as flash attention kernels do). `spec` is explicit ("ab,bc->ac"),
    without ellipsis, and every index of an operand appears in the other operand or the
    output."""
    a_idx, b_idx, out = _indices(spec)
    batched = set(a_idx) & set(b_idx) & set(out)
    return checkpoint_name(
        _accumulating(spec, fp32_out, a, b), BATCHED_DOT_NAME if batched else DOT_NAME
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _accumulating(spec: str, fp32_out: bool, a: jax.Array, b: jax.Array) -> jax.Array:
    out = plain_einsum(spec, a, b, fp32_out=True)
    return out if fp32_out else out.astype(a.dtype)


def _forward(spec: str, fp32_out: bool, a: jax.Array, b: jax.Array):
    return _accumulating(spec, fp32_out, a, b), (a, b)


def _backward(spec: str, fp32_out: bool, residuals, g: jax.Array):
    a, b = residuals
    a_idx, b_idx, out = _indices(spec)
    g = g.astype(a.dtype)
    da = plain_einsum(f"{out},{b_idx}->{a_idx}", g, b, fp32_out=True).astype(a.dtype)
    db = plain_einsum(f"{a_idx},{out}->{b_idx}", a, g, fp32_out=True).astype(b.dtype)
    return da, db


_accumulating.defvjp(_forward, _backward)


def _indices(spec: str) -> tuple[str, str, str]:
    """An explicit two-operand einsum spec's index strings: ab,bc->ac gives ab, bc, ac."""
    inputs, out = spec.split("->")
    a_idx, b_idx = inputs.split(",")
    return a_idx, b_idx, out


def plain_einsum(spec: str, a: jax.Array, b: jax.Array, fp32_out: bool = False) -> jax.Array:
    """`accumulating_einsum`'s signature over XLA's own products and their autodiff."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32 if fp32_out else None)


def copied_operands_einsum(spec: str, a: jax.Array, b: jax.Array, fp32_out: bool = False):
    """`plain_einsum` with both operands copied into a plain matmul's layout first, for
    products of slices and transposes (attention's chunks). XLA:CPU otherwise folds an
    operand's transpose into the dot, finds no bf16 kernel for the folded dot and runs it in
    fp32, about 3x slower. A second contracted axis of size 1 makes XLA's dot
    canonicalisation copy the operands instead (it merges the two axes)."""
    a_idx, b_idx, out = _indices(spec)
    first = next(i for i in a_idx if i in b_idx and i not in out)
    extra = next(i for i in string.ascii_letters if i not in spec)
    a = jnp.expand_dims(a, a_idx.index(first))
    b = jnp.expand_dims(b, b_idx.index(first))
    spec = f"{a_idx.replace(first, extra + first)},{b_idx.replace(first, extra + first)}->{out}"
    return plain_einsum(spec, a, b, fp32_out)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`flax.linen.Dense(dot_general=...)`: the layer's product inputs[..., in] @ kernel[in,
    out] through `accumulating_einsum`. Other contractions are not a Dense layer's and are
    refused."""
    del precision, preferred_element_type  # fixed: fp32 accumulation, the operands' dtype out
    expected = (((lhs.ndim - 1,), (0,)), ((), ()))
    if dimension_numbers != expected or rhs.ndim != 2:
        raise ValueError(f"dense_dot_general: {dimension_numbers} is not a Dense layer's product")
    rows = string.ascii_lowercase[: lhs.ndim - 1]
    return accumulating_einsum(f"{rows}y,yz->{rows}z", lhs, rhs)
