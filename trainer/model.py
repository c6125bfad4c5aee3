"""The Llama decoder and its families in Flax, numerically the same models as transformers'
LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM and Olmo2ForCausalLM.

RMSNorm, rotary position embeddings (the "rotate half" layout HF uses, with Llama 3's
frequency scaling), SwiGLU MLP and grouped-query attention through the platform's kernel
(`model.attention`: Pallas splash on TPU, cuDNN flash attention on GPU, causal chunks on
CPU, or one `jax.nn.dot_product_attention`). What a family adds
(trainer/models.py: q/k/v biases, q/k norms, post-norms, a sliding window) is decided when the
model is traced, so a family pays only for what it uses. Layers are stacked with `nn.scan`, so
compile time does not grow with depth and every layer parameter has a leading layer axis.
Packed sequences are supported by segment ids: attention never crosses a document boundary and
positions restart per document.
"""

from __future__ import annotations

import functools
import string

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from trainer.config import ModelConfig, RecipeError, cudnn_problem
from trainer.matmul import (
    BATCHED_DOT_NAME,
    DOT_NAME,
    accumulating_einsum,
    copied_operands_einsum,
    dense_dot_general,
    plain_einsum,
)
from trainer.sharding import BATCH_AXES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# model.remat: what a layer keeps for the backward pass (the rest is recomputed). The names
# are the checkpoint_name tags in Attention and those of trainer.matmul's products (CPU bf16).
_policies = jax.checkpoint_policies
REMAT = {
    "full": None,  # nothing: the whole layer is recomputed
    "dots_saveable": _policies.save_from_both_policies(
        _policies.dots_saveable, _policies.save_only_these_names(DOT_NAME, BATCHED_DOT_NAME)
    ),
    "dots_with_no_batch_dims_saveable": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _policies.save_only_these_names(DOT_NAME)
    ),
    "save_qkv_proj": _policies.save_only_these_names("qkv_proj"),
    "save_attention_out": _policies.save_only_these_names("attention_out"),
}


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return _scale(weight.astype(self.dtype), normed.astype(self.dtype))


@jax.custom_vjp
def _scale(weight_D: jax.Array, x: jax.Array) -> jax.Array:
    """weight_D * x, whose weight gradient sums g * x over every row as a product with a
    vector of ones, accumulated in fp32: XLA:CPU rewrote autodiff's sum into a reduce-window
    of about 7 ms a norm on one Xeon core (16 norms a step); the step is about 3% faster."""
    return weight_D * x


def _scale_forward(weight_D, x):
    return weight_D * x, (weight_D, x)


def _scale_backward(residuals, g):
    weight_D, x = residuals
    products = g * x
    # No reshape into rows: the leading axes may be sharded differently (batch, sequence).
    rows = string.ascii_lowercase[: x.ndim - 1]
    ones = jnp.ones(x.shape[:-1], products.dtype)
    dweight_D = plain_einsum(f"{rows},{rows}z->z", ones, products, fp32_out=True)
    return dweight_D.astype(weight_D.dtype), (g * weight_D).astype(x.dtype)


_scale.defvjp(_scale_forward, _scale_backward)


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


@jax.custom_vjp
def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding of x [batch, seq, heads, head_dim], in x's dtype.

    Its gradient is written out (the rotation's transpose is minus the rotation): autodiff's
    own gives XLA:CPU one fused loop of transposes, slices and pads per layer that took about
    5% of the reference model's step on a CPU."""
    return _rotate(x, cos, sin)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    return (x * cos.astype(x.dtype) + _rotate_half(x) * sin.astype(x.dtype)).astype(x.dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rotary_forward(x, cos, sin):
    return _rotate(x, cos, sin), (x, cos, sin)


def _rotary_backward(residuals, g):
    x, cos, sin = residuals
    dx = g * cos.astype(g.dtype) - _rotate_half(g * sin.astype(g.dtype))
    # The tables' cotangents, summed over the heads the [batch, seq, 1, head_dim] tables were
    # broadcast to. A train step never uses them (the tables come from integer positions),
    # so XLA drops them: the step's memory is what it was with autodiff's VJP.
    dcos = jnp.sum((g * x).astype(cos.dtype), axis=2, keepdims=True)
    dsin = jnp.sum((g * _rotate_half(x)).astype(sin.dtype), axis=2, keepdims=True)
    return dx.astype(x.dtype), dcos, dsin


apply_rotary.defvjp(_rotary_forward, _rotary_backward)


class Attention(nn.Module):
    cfg: ModelConfig
    mesh: Mesh | None = None

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
        q, k, v = (checkpoint_name(x, "qkv_proj") for x in (q, k, v))
        window = cfg.sliding_window if cfg.sliding_window and seq > cfg.sliding_window else None
        out = attend(cfg, q, k, v, segment_ids, window, self.mesh)
        out = checkpoint_name(out, "attention_out")
        return dense(cfg.dim, name="wo")(out.reshape(batch, seq, cfg.n_heads * cfg.head_dim))


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        dense = _dense_factory(self.cfg)
        gate = dense(self.cfg.mlp_dim, name="gate")(x)
        up = dense(self.cfg.mlp_dim, name="up")(x)
        return dense(self.cfg.dim, name="down")(swiglu(gate, up))


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, computed in fp32 and rounded once to the inputs' dtype, with its
    gradient written out: one pass over gate, up and the cotangent, where autodiff's took
    several (the sigmoid computed and stored in the forward pass, then re-read)."""
    return _swiglu_forward(gate, up)[0]


def _swiglu_forward(gate, up):
    gate32 = gate.astype(jnp.float32)
    return (gate32 * jax.nn.sigmoid(gate32) * up.astype(jnp.float32)).astype(up.dtype), (gate, up)


def _swiglu_backward(residuals, g):
    gate, up = residuals
    gate32, up32, g32 = gate.astype(jnp.float32), up.astype(jnp.float32), g.astype(jnp.float32)
    sigmoid = jax.nn.sigmoid(gate32)
    dgate = g32 * up32 * sigmoid * (1 + gate32 * (1 - sigmoid))
    return dgate.astype(gate.dtype), (g32 * gate32 * sigmoid).astype(up.dtype)


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


class Block(nn.Module):
    cfg: ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        cfg = self.cfg
        attn, mlp = Attention(cfg, self.mesh, name="attn"), MLP(cfg, name="mlp")
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
    *ForSequenceClassification with one label) a scalar per token [batch, seq]. `mesh`: the
    run's device mesh, over which the splash kernel runs per shard (batch x heads)."""

    cfg: ModelConfig
    head: str = "lm"  # lm | score
    mesh: Mesh | None = None

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
        policy = cfg.remat_policy
        block = (
            Block if policy == "none" else nn.remat(Block, prevent_cse=False, policy=REMAT[policy])
        )
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.n_layers,
            unroll=cfg.scan_unroll,
        )(cfg, self.mesh, name="layers")
        x, _ = layers(x, cos, sin, segment_ids)
        x = _norm(cfg, "norm")(x)
        if self.head == "score":
            return _dense_factory(cfg)(1, name="score")(x)[..., 0]
        if cfg.tie_embeddings and _accumulates_in_fp32(cfg):
            return accumulating_einsum(
                "bld,vd->blv", x.astype(dtype), embed.embedding.astype(dtype)
            )
        if cfg.tie_embeddings:
            return embed.attend(x)
        return _dense_factory(cfg)(cfg.vocab_size, name="lm_head")(x)


def _dense_factory(cfg: ModelConfig):
    products = {"dot_general": dense_dot_general} if _accumulates_in_fp32(cfg) else {}

    def dense(features: int, name: str, bias: bool = False) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=bias,
            dtype=DTYPES[cfg.dtype],
            param_dtype=DTYPES[cfg.param_dtype],
            kernel_init=nn.initializers.normal(cfg.init_std),
            name=name,
            **products,
        )

    return dense


def _accumulates_in_fp32(cfg: ModelConfig) -> bool:
    """Whether the model's matmuls go through `trainer.matmul`: low-precision compute on a
    CPU, where only fp32-result dots reach the fast bf16 kernels. Accelerators accumulate
    bf16 dots in fp32 natively and keep XLA's own products."""
    return cfg.dtype != "float32" and backend_platform() == "cpu"


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


def backend_platform() -> str:
    """cpu, gpu or tpu: the default backend (CUDA's own name, "cuda", is gpu here)."""
    name = jax.default_backend()
    return "gpu" if name in ("cuda", "rocm") else name


def attention_path(cfg: ModelConfig, platform: str, seq: int) -> str:
    """The attention implementation `model.attention` picks on `platform` (cpu, gpu, tpu) for
    sequences of `seq` tokens; an explicit choice the platform cannot run is a RecipeError."""
    choice = cfg.attention
    needs = {"cudnn": ("gpu",), "splash": ("tpu", "cpu")}.get(choice)
    if needs and platform not in needs:
        raise RecipeError(
            f"model.attention: {choice} runs on {' or '.join(needs)}, not {platform}; use auto"
        )
    if choice != "auto":
        return choice
    if platform == "tpu":
        return "splash" if seq % SPLASH_BLOCK == 0 else "xla"
    if platform == "gpu":
        return "xla" if cudnn_problem(cfg) or seq % 2 else "cudnn"
    return "chunked"


def attend(
    cfg: ModelConfig, q, k, v, segment_ids, window: int | None, mesh: Mesh | None = None
) -> jax.Array:
    """Causal attention within documents [batch, seq, heads, head_dim] through the path
    `attention_path` picks; every path honours segment ids, grouped-query heads and `window`."""
    platform = backend_platform()
    path = attention_path(cfg, platform, q.shape[1])
    if path == "splash":
        # Pallas TPU kernel; elsewhere (CPU tests) Pallas' interpreter runs the same kernel.
        kernel = functools.partial(splash_attention, window=window, interpret=platform != "tpu")
        return _per_shard(kernel, mesh, cfg)(q, k, v, segment_ids)
    if path == "cudnn":
        return fused_attention(q, k, v, segment_ids, window, "cudnn")
    chunk = cfg.attention_chunk if path == "chunked" else 0
    return causal_attention(q, k, v, segment_ids, chunk, window)


def fused_attention(q, k, v, segment_ids, window: int | None, implementation: str) -> jax.Array:
    """One `jax.nn.dot_product_attention` with the causal mask and the window as the kernel's
    own masks (cuDNN skips the masked blocks) and only the document mask as an input."""
    same_document = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=same_document,
        is_causal=True,
        local_window_size=(window - 1, 0) if window else None,
        implementation=implementation,
    )


def _per_shard(kernel, mesh: Mesh | None, cfg: ModelConfig):
    """`kernel(q, k, v, segment_ids)` on each device's rows (and heads, where the tensor axis
    divides them) of `mesh`: XLA cannot partition a Pallas call itself, and would otherwise
    gather the whole batch onto every device."""
    if mesh is None or mesh.size == 1:
        return kernel
    tensor = mesh.shape["tensor"]
    heads = "tensor" if cfg.n_heads % tensor == 0 and cfg.kv_heads % tensor == 0 else None
    qkv = P(BATCH_AXES, None, heads, None)
    return jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, P(BATCH_AXES, None)),
        out_specs=qkv,
        check_vma=False,
    )


SPLASH_BLOCK = 128  # the splash kernel's query/key block: sequences must be a multiple
SPLASH_BLOCK_FIELDS = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                       "block_kv_dkv_compute", "block_q_dq", "block_kv_dq")  # fmt: skip


def splash_attention(q, k, v, segment_ids, window: int | None, interpret: bool) -> jax.Array:
    """The Pallas TPU splash attention kernel: causal (or local, for a window) block-sparse
    masks, so fully masked blocks are skipped, and segment ids for packed documents; grouped
    query heads share their key/value head inside the kernel."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    _, seq, heads, head_dim = q.shape
    block = next((b for b in (512, 256, SPLASH_BLOCK) if seq % b == 0), seq)
    if window:
        head_mask = masks.LocalMask((seq, seq), (window - 1, 0), offset=0)
    else:
        head_mask = masks.CausalMask((seq, seq))
    kernel = splash.make_splash_mha(
        masks.MultiHeadMask([head_mask] * heads),
        block_sizes=splash.BlockSizes(**dict.fromkeys(SPLASH_BLOCK_FIELDS, block)),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    q_BxHxLxD, k_BxKxLxD, v_BxKxLxD = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    q_BxHxLxD = q_BxHxLxD * jnp.asarray(head_dim**-0.5, q.dtype)  # the kernel does not scale

    def one_row(q_HxLxD, k_KxLxD, v_KxLxD, segments_L):
        return kernel(
            q_HxLxD, k_KxLxD, v_KxLxD, segment_ids=splash.SegmentIds(segments_L, segments_L)
        )

    out_BxHxLxD = jax.vmap(one_row)(q_BxHxLxD, k_BxKxLxD, v_BxKxLxD, segment_ids)
    return out_BxHxLxD.transpose(0, 2, 1, 3)


def causal_attention(q, k, v, segment_ids, chunk: int, window: int | None = None) -> jax.Array:
    """Causal attention within documents; with `chunk`, query chunk i only attends to keys
    [0, (i + 1) * chunk), so the fully masked blocks are neither computed nor stored."""
    seq = q.shape[1]
    if not chunk or chunk >= seq or seq % chunk:
        return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment_ids, None, window))
    return _chunked_attention(q, k, v, segment_ids, chunk, window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_attention(q, k, v, segment_ids, chunk: int, window: int | None) -> jax.Array:
    """`causal_attention` by query chunks, computed head-major ([batch, kv head, rows,
    head_dim], a kv head's query heads' rows stacked) so each head's products are contiguous
    4-d matmuls: on CPU, XLA's batched dots and their gradients run about a third faster than
    in jax.nn.dot_product_attention's sequence-major layout. Numerics as that function's XLA
    path: fp32 logits and softmax, probabilities cast back to the value dtype; every product
    accumulates in fp32. The products copy their operands (`copied_operands_einsum`): a
    chunk's slices and transposes folded into the dots send XLA:CPU to its fp32 kernels.

    Its own VJP is flash attention's backward pass (`_attention_chunk_grads`), with each key
    chunk's gradient summed over the query chunks in fp32 and cast before one transpose:
    autodiff's version, bf16 sums of slices, a concatenation and a transpose in one loop,
    took about 9 ms per layer and operand on one Xeon core, this about 1."""
    return _chunked_attention_forward(q, k, v, segment_ids, chunk, window)[0]


def _chunked_attention_forward(q, k, v, segment_ids, chunk, window):
    seq, kv_heads = q.shape[1], k.shape[2]
    group = q.shape[2] // kv_heads
    q_chunks = _row_chunks(q, kv_heads, chunk)
    k_BxKxLxD, v_BxKxLxD = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    probs, outputs = [], []
    for i, start in enumerate(range(0, seq, chunk)):
        keys = slice(0, start + chunk)
        mask_Bx1xCxS = attention_mask(segment_ids, slice(start, start + chunk), window)
        out_BxKxRxD, probs_BxKxRxS = _attention_chunk(
            q_chunks[i], k_BxKxLxD[:, :, keys], v_BxKxLxD[:, :, keys],
            jnp.tile(mask_Bx1xCxS, (1, 1, group, 1)),
        )  # fmt: skip
        probs.append(probs_BxKxRxS)
        outputs.append(out_BxKxRxD)
    out = _seq_major(outputs, q.shape)
    return out, (q_chunks, k_BxKxLxD, v_BxKxLxD, probs, outputs)


def _chunked_attention_backward(chunk, window, residuals, g):
    q_chunks, k_BxKxLxD, v_BxKxLxD, probs, outputs = residuals
    batch, seq, _, head_dim = g.shape
    kv_heads = k_BxKxLxD.shape[1]
    g_chunks = _row_chunks(g, kv_heads, chunk)
    dq_chunks = []
    dk_chunks = [jnp.zeros((batch, kv_heads, head_dim, chunk), jnp.float32) for _ in g_chunks]
    dv_chunks = list(dk_chunks)
    for i, start in enumerate(range(0, seq, chunk)):
        keys = slice(0, start + chunk)
        dq_BxKxRxD, dk_BxKxDxS, dv_BxKxDxS = _attention_chunk_grads(
            q_chunks[i], k_BxKxLxD[:, :, keys], v_BxKxLxD[:, :, keys], probs[i], outputs[i],
            g_chunks[i],
        )  # fmt: skip
        dq_chunks.append(dq_BxKxRxD.astype(g.dtype))
        for j in range(i + 1):
            block = slice(j * chunk, (j + 1) * chunk)
            dk_chunks[j] += dk_BxKxDxS[..., block]
            dv_chunks[j] += dv_BxKxDxS[..., block]
    dq = _seq_major(dq_chunks, g.shape)
    dk = _keys_seq_major(dk_chunks, k_BxKxLxD.dtype)
    dv = _keys_seq_major(dv_chunks, v_BxKxLxD.dtype)
    return dq, dk, dv, None  # segment ids are not differentiated


_chunked_attention.defvjp(_chunked_attention_forward, _chunked_attention_backward)


def _row_chunks(x_BxLxHxD: jax.Array, kv_heads: int, chunk: int) -> list[jax.Array]:
    """[batch, seq, heads, head_dim] as seq // chunk chunks [batch, kv head, rows, head_dim]:
    a kv head's rows are its query heads' rows of the chunk one after another (group x
    chunk). A separate group axis, of size 1 without grouped-query heads, costs XLA:CPU a
    copy of every product's result. Each chunk is transposed on its own (cheaper than the
    whole)."""
    batch, seq, heads, head_dim = x_BxLxHxD.shape
    x_BxLxKxGxD = x_BxLxHxD.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    return [
        c.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, -1, head_dim)
        for c in jnp.split(x_BxLxKxGxD, seq // chunk, axis=1)
    ]


def _seq_major(chunks_BxKxRxD: list[jax.Array], shape) -> jax.Array:
    """The inverse of `_row_chunks`: one [batch, seq, heads, head_dim] array of `shape`, each
    chunk transposed on its own."""
    batch, kv_heads, rows, head_dim = chunks_BxKxRxD[0].shape
    group = shape[2] // kv_heads
    chunks = [c.reshape(batch, kv_heads, group, rows // group, head_dim) for c in chunks_BxKxRxD]
    return jnp.concatenate([c.transpose(0, 3, 1, 2, 4) for c in chunks], axis=1).reshape(shape)


def _keys_seq_major(chunks_BxKxDxC: list[jax.Array], dtype) -> jax.Array:
    """Key gradients, chunks [batch, kv head, head_dim, chunk] in fp32, as one [batch, seq,
    kv head, head_dim] array of `dtype`, concatenated and cast before the transpose (fused
    with the concatenation, XLA:CPU's transpose runs several times slower)."""
    x_BxKxDxL = jnp.concatenate(chunks_BxKxDxC, -1).astype(dtype)
    return x_BxKxDxL.transpose(0, 3, 1, 2)


def _attention_chunk(q_BxKxRxD, k_BxKxSxD, v_BxKxSxD, mask_Bx1xRxS):
    """One query chunk's attention over its keys: the output and the probabilities. R is
    the chunk's rows of every query head that shares the kv head."""
    scale = q_BxKxRxD.shape[-1] ** -0.5
    logits_BxKxRxS = _product("bkrd,bksd->bkrs", q_BxKxRxD, k_BxKxSxD)
    logits_BxKxRxS = jnp.where(mask_Bx1xRxS, logits_BxKxRxS * scale, jnp.finfo(jnp.float32).min)
    probs_BxKxRxS = jax.nn.softmax(logits_BxKxRxS, axis=-1).astype(v_BxKxSxD.dtype)
    out_BxKxRxD = _product("bkrs,bksd->bkrd", probs_BxKxRxS, v_BxKxSxD)
    return out_BxKxRxD.astype(v_BxKxSxD.dtype), probs_BxKxRxS


def _attention_chunk_grads(q_BxKxRxD, k_BxKxSxD, v_BxKxSxD, probs_BxKxRxS, out_BxKxRxD, g_BxKxRxD):
    """Flash attention's gradient of one chunk, in fp32: the softmax's row sums come from
    the output and its cotangent (sum over keys of p * dp = g . out, per query), not from a
    reduction over the keys, so the logits' gradient is one elementwise pass (masked keys
    have p = 0). Key gradients come out [.., head_dim, keys], so that their products take
    the probabilities as they are rather than transposed."""
    scale = q_BxKxRxD.shape[-1] ** -0.5
    dprobs_BxKxRxS = _product("bkrd,bksd->bkrs", g_BxKxRxD, v_BxKxSxD)
    rows_BxKxRx1 = jnp.sum(
        g_BxKxRxD.astype(jnp.float32) * out_BxKxRxD.astype(jnp.float32), -1, keepdims=True
    )
    # The logits' gradient before the softmax scale, which is applied to the (smaller)
    # products instead: a scale inside the elementwise pass costs XLA:CPU a full-size
    # broadcast of the constant.
    unscaled_BxKxRxS = probs_BxKxRxS.astype(jnp.float32) * (dprobs_BxKxRxS - rows_BxKxRx1)
    unscaled_BxKxRxS = unscaled_BxKxRxS.astype(q_BxKxRxD.dtype)
    dq_BxKxRxD = _product("bkrs,bksd->bkrd", unscaled_BxKxRxS, k_BxKxSxD) * scale
    dk_BxKxDxS = _product("bkrd,bkrs->bkds", q_BxKxRxD, unscaled_BxKxRxS) * scale
    dv_BxKxDxS = _product("bkrd,bkrs->bkds", g_BxKxRxD, probs_BxKxRxS)
    return dq_BxKxRxD, dk_BxKxDxS, dv_BxKxDxS


def _product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """An attention product, fp32 out, its operands (slices, transposes) copied first."""
    return copied_operands_einsum(spec, a, b, fp32_out=True)


def count_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8, head: str = "lm"):
    """Parameters for `cfg` (use under jax.jit with out_shardings to create them sharded)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return Decoder(cfg, head).init(rng, tokens)["params"]
