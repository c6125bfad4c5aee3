"""The Flax Llama against Hugging Face transformers' LlamaForCausalLM on the same weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.config import ModelConfig
from trainer.hf import hf_config_from_model, params_from_hf
from trainer.model import Llama, attention_mask, init_params, positions_from_segments

TINY = ModelConfig(
    vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_dim=96,
    max_seq_len=64, dtype="float32", param_dtype="float32", rope_theta=10000.0, norm_eps=1e-6,
)  # fmt: skip


def hf_model(cfg: ModelConfig):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**hf_config_from_model(cfg), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # random norms too, so a swapped norm weight would show
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if "norm" not in name else 0.5) + ("norm" in name))
    return model


@pytest.mark.parametrize(
    ("n_kv_heads", "tie"), [(4, False), (2, False), (1, True)], ids=["mha", "gqa", "mqa-tied"]
)
def test_logits_match_hf_llama_in_float32(n_kv_heads, tie):
    import torch

    cfg = dataclasses.replace(TINY, n_kv_heads=n_kv_heads, tie_embeddings=tie)
    model = hf_model(cfg)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = params_from_hf(state, cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, jnp.asarray(tokens)))
    assert np.abs(expected).max() > 1.0  # a meaningful comparison, not two near-zero tensors
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_packed_documents_do_not_see_each_other():
    cfg = TINY
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(0, 128, 10), rng.integers(0, 128, 6)
    packed = np.concatenate([doc_a, doc_b])[None]
    segments = np.array([[1] * 10 + [2] * 6])
    apply = jax.jit(Llama(cfg).apply)
    logits_packed = apply({"params": params}, packed, segments)
    logits_b = apply({"params": params}, doc_b[None])
    np.testing.assert_allclose(logits_packed[0, 10:], logits_b[0], atol=1e-5)


def test_chunked_attention_matches_whole_sequence_attention_with_packing():
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 128, (2, 32)))
    segments = jnp.asarray([[1] * 20 + [2] * 12, [1] * 7 + [2] * 21 + [0] * 4])
    params = init_params(TINY, jax.random.key(0))
    whole = Llama(TINY).apply({"params": params}, tokens, segments)
    chunked_cfg = dataclasses.replace(TINY, attention_chunk=8, scan_unroll=2)
    chunked = Llama(chunked_cfg).apply({"params": params}, tokens, segments)
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
    logits = Llama(cfg).apply({"params": params}, jnp.zeros((1, 8), jnp.int32))
    assert logits.dtype == jnp.bfloat16


def test_remat_gives_the_same_gradients():
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 128, (2, 16)))
    params = init_params(TINY, jax.random.key(0))

    def grads(cfg):
        loss = lambda p: Llama(cfg).apply({"params": p}, tokens).sum()  # noqa: E731
        return jax.grad(loss)(params)

    plain, remat = grads(TINY), grads(dataclasses.replace(TINY, remat=True))
    for a, b in zip(
        jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
