"""The Llama decoder and its families in Flax, numerically the same models as transformers'
LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM and Olmo2ForCausalLM.

RMSNorm, rotary position embeddings (the "rotate half" layout HF uses, with Llama 3's
frequency scaling), SwiGLU MLP and grouped-query attention through
`jax.nn.dot_product_attention` (fused where the backend has a fused kernel). What a family adds
(trainer/models.py: q/k/v biases, q/k norms, post-norms, a sliding window) is decided when the
model is traced, so a family pays only for what it uses. Layers are stacked with `nn.scan`, so
compile time does not grow with depth and every layer parameter has a leading layer axis.
Packed sequences are supported by segment ids: attention never crosses a document boundary and
positions restart per document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from trainer.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Rotary frequencies [head_dim / 2] (float32, as transformers computes them), with Llama 3's
    scaling: long wavelengths divided by `rope_factor`, short ones kept, a smooth blend between."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
    inv_freq = (1.0 / np.float32(cfg.rope_theta) ** exponents).astype(np.float32)
    if cfg.rope_scaling != "llama3":
        return inv_freq
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(
        wavelen > cfg.rope_original_max_len / low, inv_freq / cfg.rope_factor, inv_freq
    )
    smooth = (cfg.rope_original_max_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= cfg.rope_original_max_len / high) & (
        wavelen <= cfg.rope_original_max_len / low
    )
    return np.where(medium, blended, scaled).astype(np.float32)


def rotary_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables of shape [batch, seq, 1, head_dim] for integer positions [batch, seq]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        cfg = self.cfg
        dense = _dense_factory(cfg)
        batch, seq, _ = x.shape
        q_BxLxQ = dense(cfg.n_heads * cfg.head_dim, name="wq", bias=cfg.qkv_bias)(x)
        k_BxLxK = dense(cfg.kv_heads * cfg.head_dim, name="wk", bias=cfg.qkv_bias)(x)
        v_BxLxK = dense(cfg.kv_heads * cfg.head_dim, name="wv", bias=cfg.qkv_bias)(x)
        if cfg.qk_norm:  # OLMo 2: over all heads together, before the split into heads
            q_BxLxQ = _norm(cfg, "q_norm")(q_BxLxQ)
            k_BxLxK = _norm(cfg, "k_norm")(k_BxLxK)
        q = q_BxLxQ.reshape(batch, seq, cfg.n_heads, cfg.head_dim)
        k = k_BxLxK.reshape(batch, seq, cfg.kv_heads, cfg.head_dim)
        v = v_BxLxK.reshape(batch, seq, cfg.kv_heads, cfg.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        window = cfg.sliding_window if cfg.sliding_window and seq > cfg.sliding_window else None
        out = causal_attention(q, k, v, segment_ids, cfg.attention_chunk, window)
        return dense(cfg.dim, name="wo")(out.reshape(batch, seq, cfg.n_heads * cfg.head_dim))


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        dense = _dense_factory(self.cfg)
        gate = dense(self.cfg.mlp_dim, name="gate")(x)
        up = dense(self.cfg.mlp_dim, name="up")(x)
        return dense(self.cfg.dim, name="down")(nn.silu(gate) * up)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        cfg = self.cfg
        attn, mlp = Attention(cfg, name="attn"), MLP(cfg, name="mlp")
        attn_norm, mlp_norm = _norm(cfg, "attn_norm"), _norm(cfg, "mlp_norm")
        if cfg.post_norms:  # OLMo 2: normalise each sublayer's output, not its input
            x = x + attn_norm(attn(x, cos, sin, segment_ids))
            return x + mlp_norm(mlp(x)), None
        x = x + attn(attn_norm(x), cos, sin, segment_ids)
        return x + mlp(mlp_norm(x)), None


def _norm(cfg: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.norm_eps, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype], name=name)


class Decoder(nn.Module):
    """Call with tokens [batch, seq] (and optionally segment_ids, positions); returns logits
    [batch, seq, vocab], or with `head="score"` (a reward model, as transformers'
    *ForSequenceClassification with one label) a scalar per token [batch, seq]."""

    cfg: ModelConfig
    head: str = "lm"  # lm | score

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None):
        cfg = self.cfg
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = positions_from_segments(segment_ids)
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.dim,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nn.initializers.normal(cfg.init_std),
            name="embed",
        )
        x = embed(tokens)
        cos, sin = rotary_tables(positions, rope_inv_freq(cfg))
        block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.n_layers,
            unroll=cfg.scan_unroll,
        )(cfg, name="layers")
        x, _ = layers(x, cos, sin, segment_ids)
        x = _norm(cfg, "norm")(x)
        if self.head == "score":
            return _dense_factory(cfg)(1, name="score")(x)[..., 0]
        if cfg.tie_embeddings:
            return embed.attend(x)
        return _dense_factory(cfg)(cfg.vocab_size, name="lm_head")(x)


def _dense_factory(cfg: ModelConfig):
    def dense(features: int, name: str, bias: bool = False) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=bias,
            dtype=DTYPES[cfg.dtype],
            param_dtype=DTYPES[cfg.param_dtype],
            kernel_init=nn.initializers.normal(cfg.init_std),
            name=name,
        )

    return dense


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its own document (restarting at 0 per segment)."""
    seq = segment_ids.shape[-1]
    index = jnp.arange(seq)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    last_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - last_start


def attention_mask(
    segment_ids: jax.Array, queries: slice | None = None, window: int | None = None
) -> jax.Array:
    """Causal same-document mask [batch, 1, queries, keys] for the query rows `queries` (all by
    default) against the keys up to the last of them; padding (segment 0) sees padding only.
    With `window`, a query sees only the `window` keys ending at itself (Mistral)."""
    queries = queries or slice(0, segment_ids.shape[-1])
    position = jnp.arange(queries.stop)
    visible = position[queries, None] >= position[None, :]
    if window is not None:
        visible &= position[queries, None] - position[None, :] < window
    same = segment_ids[:, queries, None] == segment_ids[:, None, : queries.stop]
    return (same & visible)[:, None]


def causal_attention(q, k, v, segment_ids, chunk: int, window: int | None = None) -> jax.Array:
    """Causal attention within documents; with `chunk`, query chunk i only attends to keys
    [0, (i + 1) * chunk), so the fully masked blocks are neither computed nor stored."""
    seq = q.shape[1]
    if not chunk or chunk >= seq or seq % chunk:
        return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment_ids, None, window))
    outputs = []
    for start in range(0, seq, chunk):
        rows = slice(start, start + chunk)
        keys = slice(0, start + chunk)
        mask = attention_mask(segment_ids, rows, window)
        outputs.append(jax.nn.dot_product_attention(q[:, rows], k[:, keys], v[:, keys], mask=mask))
    return jnp.concatenate(outputs, axis=1)


def count_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8, head: str = "lm"):
    """Parameters for `cfg` (use under jax.jit with out_shardings to create them sharded)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return Decoder(cfg, head).init(rng, tokens)["params"]
