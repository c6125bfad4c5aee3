"""The Flax decoder against transformers' models of each family on the same weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures_hf import BASE, SHAPES, hf_logits, hf_model, hf_state
from trainer.hf import params_from_hf
from trainer.model import (
    Decoder,
    attention_mask,
    init_params,
    positions_from_segments,
    rope_inv_freq,
)

TINY = BASE


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers_in_float32_unpacked_and_packed(shape):
    cfg = SHAPES[shape]
    model = hf_model(cfg)
    params = params_from_hf(hf_state(model), cfg)
    apply = jax.jit(Decoder(cfg).apply)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 24))
    expected = hf_logits(model, tokens)
    assert np.abs(expected).max() > 1.0  # a meaningful comparison, not two near-zero tensors
    got = np.asarray(apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    # Packed: three documents (one longer than the Mistral window) in one row, each of which
    # must get the logits transformers gives it alone.
    docs = [rng.integers(0, cfg.vocab_size, n) for n in (13, 5, 10)]
    segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
    packed = np.asarray(
        apply({"params": params}, jnp.asarray(np.concatenate(docs)[None]), jnp.asarray(segments))
    )
    np.testing.assert_allclose(
        packed[0],
        np.concatenate([hf_logits(model, d[None])[0] for d in docs]),
        atol=1e-4,
        rtol=1e-4,
    )


def test_llama3_rope_scaling_changes_only_the_long_wavelengths():
    llama31 = dataclasses.replace(BASE, rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0)
    plain = rope_inv_freq(dataclasses.replace(llama31, rope_scaling=None))
    scaled = rope_inv_freq(llama31)
    assert scaled[0] == plain[0]  # wavelength 2*pi, far under 8192/4: kept
    np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)  # far over 8192: divided
    assert ((scaled <= plain) & (scaled >= plain / 8.0)).all()


def test_sliding_window_mask_sees_only_the_window():
    segments = jnp.ones((1, 6), jnp.int32)
    mask = attention_mask(segments, window=3)[0, 0]
    assert mask[5].tolist() == [False, False, False, True, True, True]
    assert mask[1].tolist() == [True, True, False, False, False, False]


def test_packed_documents_do_not_see_each_other():
    cfg = TINY
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(0, 128, 10), rng.integers(0, 128, 6)
    packed = np.concatenate([doc_a, doc_b])[None]
    segments = np.array([[1] * 10 + [2] * 6])
    apply = jax.jit(Decoder(cfg).apply)
    logits_packed = apply({"params": params}, packed, segments)
    logits_b = apply({"params": params}, doc_b[None])
    np.testing.assert_allclose(logits_packed[0, 10:], logits_b[0], atol=1e-5)


@pytest.mark.parametrize("window", [None, 5], ids=["full", "mistral-window"])
def test_chunked_attention_matches_whole_sequence_attention_with_packing(window):
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 128, (2, 32)))
    segments = jnp.asarray([[1] * 20 + [2] * 12, [1] * 7 + [2] * 21 + [0] * 4])
    cfg = dataclasses.replace(TINY, family="mistral", sliding_window=window)
    params = init_params(cfg, jax.random.key(0))
    whole = Decoder(cfg).apply({"params": params}, tokens, segments)
    chunked_cfg = dataclasses.replace(cfg, attention_chunk=8, scan_unroll=2)
    chunked = Decoder(chunked_cfg).apply({"params": params}, tokens, segments)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_positions_restart_per_document_and_padding_is_isolated():
    segments = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
    assert positions_from_segments(segments).tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    mask = attention_mask(segments)[0, 0]
    assert bool(mask[4, 3]) and not bool(mask[3, 2]) and not bool(mask[4, 5])
    assert not bool(mask[3, 4])  # causal
    assert (attention_mask(segments, slice(3, 5))[0, 0] == mask[3:5, :5]).all()


def test_bfloat16_compute_keeps_float32_master_weights():
    cfg = dataclasses.replace(TINY, dtype="bfloat16", param_dtype="float32")
    params = init_params(cfg, jax.random.key(0))
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}
    logits = Decoder(cfg).apply({"params": params}, jnp.zeros((1, 8), jnp.int32))
    assert logits.dtype == jnp.bfloat16


def test_remat_gives_the_same_gradients():
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 128, (2, 16)))
    params = init_params(TINY, jax.random.key(0))

    def grads(cfg):
        loss = lambda p: Decoder(cfg).apply({"params": p}, tokens).sum()  # noqa: E731
        return jax.grad(loss)(params)

    plain, remat = grads(TINY), grads(dataclasses.replace(TINY, remat=True))
    for a, b in zip(
        jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
