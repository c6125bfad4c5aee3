"""The Flax decoder against transformers' models of each family on the same weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures_hf import BASE, SHAPES, hf_logits, hf_model, hf_state
from tests.fixtures_trainer import dot_types
from trainer.config import REMAT_POLICIES, MeshConfig, RecipeError
from trainer.hf import params_from_hf
from trainer.model import (
    DTYPES,
    Decoder,
    RMSNorm,
    apply_rotary,
    attention_mask,
    attention_path,
    causal_attention,
    fused_attention,
    init_params,
    positions_from_segments,
    rope_inv_freq,
    rotary_tables,
    swiglu,
)
from trainer.sharding import make_mesh

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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_and_its_gradients_are_autodiffs_of_silu_times_up(dtype):
    """swiglu's fp32 computation and written-out VJP against autodiff of silu(gate) * up:
    equal in float32; in bfloat16 at least as close to float32's as autodiff's own."""
    rng = np.random.default_rng(0)
    gate, up, g = (jnp.asarray(rng.normal(size=(4, 9, 24)) * 3, dtype) for _ in range(3))

    def plain(gate, up):
        return jax.nn.silu(gate) * up

    def value_and_grads(f, gate, up, g):
        out, vjp = jax.vjp(f, gate, up)
        return [np.asarray(x, np.float32) for x in (out, *vjp(g))]

    ours = value_and_grads(swiglu, gate, up, g)
    autodiff = value_and_grads(plain, gate, up, g)
    exact = value_and_grads(plain, *(x.astype(jnp.float32) for x in (gate, up, g)))
    assert swiglu(gate, up).dtype == gate.dtype
    _assert_as_close_as_autodiff(dtype, ours, autodiff, exact)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_gradients_are_autodiffs_of_the_norm(dtype):
    """RMSNorm's weight gradient, summed over rows as a product with ones, against autodiff
    of the same formula: equal in float32; in bfloat16 at least as close to float32's as
    autodiff's own (which sums the bf16 products with less precision)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 12, 64)), dtype)
    params = {"weight": jnp.asarray(rng.normal(size=64), jnp.float32)}
    g = jnp.asarray(rng.normal(size=x.shape), dtype)
    norm = RMSNorm(1e-6, DTYPES[dtype], jnp.float32)

    def plain(params, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return params["weight"].astype(x.dtype) * normed.astype(x.dtype)

    def grads(f, x, g):
        out, vjp = jax.vjp(f, params, x)
        return out, [np.asarray(d, np.float32) for d in jax.tree_util.tree_leaves(vjp(g))]

    ours, ours_grads = grads(lambda p, x: norm.apply({"params": p}, x), x, g)
    autodiff, autodiff_grads = grads(plain, x, g)
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(autodiff, np.float32))
    exact_grads = grads(plain, x.astype(jnp.float32), g.astype(jnp.float32))[1]
    _assert_as_close_as_autodiff(dtype, ours_grads, autodiff_grads, exact_grads)


def _assert_as_close_as_autodiff(dtype, ours, autodiff, exact):
    """Our arrays equal autodiff's in float32; in bfloat16, at least as close to the float32
    results (`exact`) as autodiff's."""
    for got, want, best in zip(ours, autodiff, exact, strict=True):
        assert got.shape == want.shape
        if dtype == "float32":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert np.abs(got - best).max() <= 1.01 * np.abs(want - best).max() + 1e-6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rotary_gradients_are_autodiffs_of_the_rotation(dtype):
    """apply_rotary's written-out VJP against autodiff of the same formula, for x and for the
    cos/sin tables (broadcast over the heads)."""
    cfg = dataclasses.replace(TINY, n_heads=4, dim=64)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 12, 4, cfg.head_dim)), dtype)
    positions = jnp.asarray(rng.integers(0, 100, (2, 12)))
    cos, sin = rotary_tables(positions, rope_inv_freq(cfg))
    g = jnp.asarray(rng.normal(size=x.shape), dtype)

    def plain(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)

    ours, ours_vjp = jax.vjp(apply_rotary, x, cos, sin)
    expected, expected_vjp = jax.vjp(plain, x, cos, sin)
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(expected, np.float32))
    tolerance = 1e-6 if dtype == "float32" else 1e-2
    for got, want in zip(ours_vjp(g), expected_vjp(g), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(
            np.asarray(got, np.float32),
            np.asarray(want, np.float32),
            rtol=tolerance,
            atol=tolerance,
        )


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


@pytest.mark.parametrize("tied", [False, True], ids=["lm-head", "tied-embeddings"])
def test_bfloat16_training_on_cpu_runs_every_product_on_the_fast_kernels_and_tracks_float32(
    tied,
):
    # Every dot of the step, forward and backward (projections, MLP, head, chunked attention),
    # writes fp32 from bf16 operands: the only dots XLA:CPU runs on its bf16 kernels.
    seq = 256
    tokens, segments = _attention_batch(seq)
    cfg = dataclasses.replace(
        ATTENTION_CFG, max_seq_len=seq, attention_chunk=64, tie_embeddings=tied
    )
    params = init_params(cfg, jax.random.key(0))
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    probe = jax.random.normal(jax.random.key(9), (cfg.vocab_size,))

    def loss(p):
        return jnp.mean(
            Decoder(bf16).apply({"params": p}, tokens, segments).astype(jnp.float32) @ probe
        )

    dots = dot_types(jax.jit(jax.value_and_grad(loss)).lower(params).as_text())
    model_dots = [(ops, result) for ops, result in dots if "bf16" in ops]  # not the probe's
    assert len(model_dots) > 20
    assert all(ops.count("bf16") == 2 and "xf32>" in result for ops, result in model_dots), dots
    want = _loss_and_grads(cfg, params, tokens, segments)
    _assert_same(_loss_and_grads(bf16, params, tokens, segments), want, atol=0.05)


def _loss_and_grads(cfg, params, tokens, segments, mesh=None):
    """Decoder loss (a fixed random projection of the logits, so every position counts) and
    its parameter gradients."""
    probe = jax.random.normal(jax.random.key(9), (cfg.vocab_size,))

    def loss(p):
        logits = Decoder(cfg, mesh=mesh).apply({"params": p}, tokens, segments)
        return jnp.mean(logits.astype(jnp.float32) @ probe)

    return jax.jit(jax.value_and_grad(loss))(params)


def _assert_same(got, want, atol):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=atol, atol=atol)


# Grouped-query heads (4 over 2), two packed documents and padding in one row, a Mistral
# window shorter than the documents: what every attention path must honour.
ATTENTION_CFG = dataclasses.replace(
    TINY, family="mistral", n_kv_heads=2, dtype="float32", param_dtype="float32"
)


def _attention_batch(seq: int):
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 128, (2, seq)))
    split, pad = seq * 2 // 3, seq - seq // 8
    segments = jnp.asarray([[1] * split + [2] * (seq - split), [1] * pad + [0] * (seq - pad)])
    return tokens, segments


@pytest.mark.parametrize("window", [None, 37], ids=["causal", "mistral-window"])
@pytest.mark.parametrize("path", ["chunked", "splash"])
def test_attention_paths_match_xla_in_outputs_and_gradients(path, window):
    # splash runs in Pallas' interpreter on CPU: the TPU kernel's own code, masks and blocks
    # (seq 384 = three 128-token blocks, so whole blocks are skipped).
    seq = 384
    tokens, segments = _attention_batch(seq)
    cfg = dataclasses.replace(ATTENTION_CFG, sliding_window=window, max_seq_len=seq)
    params = init_params(cfg, jax.random.key(0))
    want = _loss_and_grads(dataclasses.replace(cfg, attention="xla"), params, tokens, segments)
    got = _loss_and_grads(
        dataclasses.replace(cfg, attention=path, attention_chunk=128), params, tokens, segments
    )
    _assert_same(got, want, atol=1e-4)


@pytest.mark.slow  # the interpreted kernel on 8 devices
def test_splash_runs_per_shard_over_the_runs_mesh():
    # batch over data x fsdp, heads over tensor: each of 8 devices runs the kernel on its part
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    tokens, segments = _attention_batch(256)
    tokens, segments = jnp.tile(tokens, (2, 1)), jnp.tile(segments, (2, 1))
    cfg = dataclasses.replace(ATTENTION_CFG, max_seq_len=256)
    params = init_params(cfg, jax.random.key(0))
    want = _loss_and_grads(dataclasses.replace(cfg, attention="xla"), params, tokens, segments)
    splash = dataclasses.replace(cfg, attention="splash")
    _assert_same(_loss_and_grads(splash, params, tokens, segments, mesh), want, atol=1e-4)


@pytest.mark.parametrize("window", [None, 5], ids=["causal", "mistral-window"])
def test_cudnn_call_masks_match_the_reference_mask(window):
    # No GPU here: the cuDNN path's call (kernel-side causal and window masks, the document
    # mask as input) run through XLA's implementation of the same API.
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 24, h, 16)), jnp.float32) for h in (4, 2, 2))
    segments = jnp.asarray([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4])
    want = causal_attention(q, k, v, segments, 0, window)
    np.testing.assert_allclose(fused_attention(q, k, v, segments, window, "xla"), want, atol=1e-5)


def test_attention_auto_picks_the_platform_kernel_and_falls_back():
    bf16 = dataclasses.replace(TINY, dtype="bfloat16")
    assert attention_path(bf16, "cpu", 512) == "chunked"
    assert attention_path(bf16, "gpu", 512) == "cudnn"
    assert attention_path(dataclasses.replace(bf16, dtype="float32"), "gpu", 512) == "xla"
    assert attention_path(bf16, "tpu", 512) == "splash"
    assert attention_path(bf16, "tpu", 100) == "xla"  # not a whole number of kernel blocks
    assert attention_path(dataclasses.replace(bf16, attention="xla"), "tpu", 512) == "xla"


def test_an_attention_path_the_platform_cannot_run_is_a_recipe_error():
    cfg = dataclasses.replace(TINY, attention="cudnn", dtype="bfloat16")
    with pytest.raises(
        RecipeError, match=r"^model.attention: cudnn runs on gpu, not cpu; use auto$"
    ):
        attention_path(cfg, "cpu", 512)
    with pytest.raises(RecipeError, match=r"^model.attention: splash runs on tpu or cpu, not gpu"):
        attention_path(dataclasses.replace(cfg, attention="splash"), "gpu", 512)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_remat_policies_that_save_dots_recompute_none_of_them(dtype):
    # In bf16 on CPU the products are trainer.matmul's custom-VJP einsums, whose dots a policy
    # cannot see: it must save them by name, or dots_saveable recomputes as much as full.
    seq = 128
    tokens, segments = _attention_batch(seq)
    cfg = dataclasses.replace(ATTENTION_CFG, dtype=dtype, max_seq_len=seq, attention_chunk=64)
    params = init_params(cfg, jax.random.key(0))
    probe = jax.random.normal(jax.random.key(9), (cfg.vocab_size,))

    def dots_in_step(remat: str) -> int:
        model = Decoder(dataclasses.replace(cfg, remat=remat))

        def loss(p):
            return jnp.mean(
                model.apply({"params": p}, tokens, segments).astype(jnp.float32) @ probe
            )

        return len(dot_types(jax.jit(jax.value_and_grad(loss)).lower(params).as_text()))

    kept, recomputed = dots_in_step("none"), dots_in_step("full")
    assert dots_in_step("dots_saveable") == kept < recomputed
    # Attention's products have batch dimensions: that policy recomputes them, and only them.
    assert kept < dots_in_step("dots_with_no_batch_dims_saveable") < recomputed


def test_remat_policies_give_the_same_loss_and_gradients():
    tokens, segments = _attention_batch(16)
    cfg = dataclasses.replace(ATTENTION_CFG, sliding_window=5)
    params = init_params(cfg, jax.random.key(0))
    want = _loss_and_grads(cfg, params, tokens, segments)
    for policy in REMAT_POLICIES[1:]:  # all but none
        got = _loss_and_grads(dataclasses.replace(cfg, remat=policy), params, tokens, segments)
        _assert_same(got, want, atol=1e-5)
