"""Hugging Face checkpoints of each family (trainer/models.py) <-> our parameters and ModelConfig.

HF stores each linear layer as weight[out, in] per layer (`model.layers.{i}.self_attn.q_proj.weight`);
we store kernel[in, out] stacked over layers (`layers/attn/wq/kernel` of shape [L, in, out]).
The family is config.json's `model_type`. Pure numpy, so conversion needs no devices;
`load_hf_dir` reads config.json + *.safetensors (local or gs://) for `model.init_from`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from trainer.config import ModelConfig, RecipeError
from trainer.models import FAMILIES

# (our path inside a layer, HF name inside `model.layers.{i}.`, is a linear weight to transpose)
LINEAR_TENSORS = [
    (("attn", "wq", "kernel"), "self_attn.q_proj.weight", True),
    (("attn", "wk", "kernel"), "self_attn.k_proj.weight", True),
    (("attn", "wv", "kernel"), "self_attn.v_proj.weight", True),
    (("attn", "wo", "kernel"), "self_attn.o_proj.weight", True),
    (("mlp", "gate", "kernel"), "mlp.gate_proj.weight", True),
    (("mlp", "up", "kernel"), "mlp.up_proj.weight", True),
    (("mlp", "down", "kernel"), "mlp.down_proj.weight", True),
]
PRE_NORMS = [
    (("attn_norm", "weight"), "input_layernorm.weight", False),
    (("mlp_norm", "weight"), "post_attention_layernorm.weight", False),
]
POST_NORMS = [  # OLMo 2: the same two norms of ours, applied after each sublayer
    (("attn_norm", "weight"), "post_attention_layernorm.weight", False),
    (("mlp_norm", "weight"), "post_feedforward_layernorm.weight", False),
]
QKV_BIASES = [
    (("attn", "wq", "bias"), "self_attn.q_proj.bias", False),
    (("attn", "wk", "bias"), "self_attn.k_proj.bias", False),
    (("attn", "wv", "bias"), "self_attn.v_proj.bias", False),
]
QK_NORMS = [
    (("attn", "q_norm", "weight"), "self_attn.q_norm.weight", False),
    (("attn", "k_norm", "weight"), "self_attn.k_norm.weight", False),
]


def layer_tensors(model_cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, bool]]:
    """The per-layer tensors of `model_cfg`'s family."""
    tensors = LINEAR_TENSORS + (POST_NORMS if model_cfg.post_norms else PRE_NORMS)
    tensors += QKV_BIASES if model_cfg.qkv_bias else []
    return tensors + (QK_NORMS if model_cfg.qk_norm else [])


def params_from_hf(state_dict: dict[str, Any], model_cfg: ModelConfig) -> dict:
    """Our params pytree (numpy, param_dtype) from HF tensors keyed by HF names."""
    dtype = np.dtype(_numpy_dtype(model_cfg.param_dtype))

    def get(name: str) -> np.ndarray:
        if name not in state_dict:
            raise RecipeError(f"model.init_from: tensor {name} is missing from the checkpoint")
        return np.asarray(state_dict[name], dtype=np.float32).astype(dtype)

    layers: dict = {}
    for path, hf_name, transpose in layer_tensors(model_cfg):
        per_layer = [get(f"model.layers.{i}.{hf_name}") for i in range(model_cfg.n_layers)]
        stacked = np.stack([w.T if transpose else w for w in per_layer])
        _set(layers, path, stacked)
    params = {
        "embed": {"embedding": get("model.embed_tokens.weight")},
        "layers": layers,
        "norm": {"weight": get("model.norm.weight")},
    }
    if "score.weight" in state_dict:  # a reward model (*ForSequenceClassification, 1 label)
        params["score"] = {"kernel": get("score.weight").T}
    elif not model_cfg.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight").T}
    return params


def params_to_hf(params: dict, model_cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF-named float32 numpy tensors from our params (gathered to the host)."""
    out = {
        "model.embed_tokens.weight": _np(params["embed"]["embedding"]),
        "model.norm.weight": _np(params["norm"]["weight"]),
    }
    for path, hf_name, transpose in layer_tensors(model_cfg):
        stacked = _np(_get(params["layers"], path))
        for i in range(model_cfg.n_layers):
            out[f"model.layers.{i}.{hf_name}"] = np.ascontiguousarray(
                stacked[i].T if transpose else stacked[i]
            )
    if "score" in params:
        out["score.weight"] = np.ascontiguousarray(_np(params["score"]["kernel"]).T)
    elif not model_cfg.tie_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(_np(params["lm_head"]["kernel"]).T)
    return out


def model_config_from_hf(cfg: dict[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """Our ModelConfig from an HF config.json dict of a supported family; dtypes etc. come from
    `base`."""
    family = cfg.get("model_type", "llama")
    if family not in FAMILIES:
        raise RecipeError(
            f"model.init_from: model_type {family!r} is not supported; "
            f"the trainer implements {', '.join(FAMILIES)} (python -m trainer.models)"
        )
    unsupported = {
        "hidden_act": cfg.get("hidden_act", "silu") not in ("silu", "swish"),  # one activation
        "attention_bias": bool(cfg.get("attention_bias")),
        "mlp_bias": bool(cfg.get("mlp_bias")),
        "use_sliding_window": bool(cfg.get("use_sliding_window")),  # Qwen2's
    }
    if refused := [key for key, bad in unsupported.items() if bad]:
        key = refused[0]
        raise RecipeError(
            f"model.init_from: config.json's {key} {cfg[key]!r} is not supported for {family}: "
            "the trainer implements the checkpoints `python -m trainer.models` lists"
        )
    dims = dict(
        family=family,
        vocab_size=_required(cfg, "vocab_size"),
        dim=_required(cfg, "hidden_size"),
        n_layers=_required(cfg, "num_hidden_layers"),
        n_heads=_required(cfg, "num_attention_heads"),
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        mlp_dim=_required(cfg, "intermediate_size"),
        max_seq_len=cfg.get("max_position_embeddings", 4096),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=cfg.get("sliding_window") if FAMILIES[family].sliding_window else None,
        **_rope_from_hf(cfg),
    )
    head_dim = cfg.get("head_dim")
    if head_dim and head_dim != dims["dim"] // dims["n_heads"]:
        raise RecipeError(
            f"model.init_from: config.json's head_dim {head_dim} is not hidden_size / "
            f"num_attention_heads ({dims['dim']} / {dims['n_heads']}), which the trainer needs"
        )
    return dataclasses.replace(base or ModelConfig(), preset=None, **dims)


def _required(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg:
        raise RecipeError(f"model.init_from: config.json has no {key}; use the model's own")
    return cfg[key]


def _rope_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    """Rotary settings from transformers 5's `rope_parameters` or the older `rope_theta` +
    `rope_scaling` that checkpoints on the Hub carry."""
    rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    out: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", cfg.get("rope_theta", 1e4)))}
    if kind == "default":
        return out
    if kind != "llama3" or cfg.get("model_type", "llama") != "llama":
        raise RecipeError(
            f"model.init_from: rotary scaling {kind!r} is not supported; "
            "the trainer implements Llama 3's 'llama3' scaling"
        )
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if missing := [name for name in fields if name not in rope]:
        raise RecipeError(
            f"model.init_from: config.json's llama3 rope scaling has no {', '.join(missing)}; "
            "use the model's own config.json"
        )
    return out | dict(
        rope_scaling="llama3",
        rope_factor=float(rope["factor"]),
        rope_low_freq_factor=float(rope["low_freq_factor"]),
        rope_high_freq_factor=float(rope["high_freq_factor"]),
        rope_original_max_len=int(rope["original_max_position_embeddings"]),
    )


def hf_config_from_model(model_cfg: ModelConfig, score_head: bool = False) -> dict[str, Any]:
    """An HF config.json dict of `model_cfg`'s family describing `model_cfg` (the older
    rope_theta/rope_scaling keys, which transformers 4 and 5 both read); with `score_head`, a
    reward model: the family's *ForSequenceClassification with one label."""
    family = FAMILIES[model_cfg.family]
    architecture = family.architecture
    if score_head:
        architecture = architecture.replace("ForCausalLM", "ForSequenceClassification")
    cfg: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": family.name,
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.dim,
        "num_hidden_layers": model_cfg.n_layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.kv_heads,
        "head_dim": model_cfg.head_dim,
        "intermediate_size": model_cfg.mlp_dim,
        "max_position_embeddings": model_cfg.max_seq_len,
        "rope_theta": model_cfg.rope_theta,
        "rms_norm_eps": model_cfg.norm_eps,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        # None, not the config class's default: OLMo 2's is 1, and a *ForSequenceClassification
        # scores the last token that is not the pad id
        "pad_token_id": None,
        "torch_dtype": "float32",
    }
    if model_cfg.family == "llama":
        cfg["mlp_bias"] = False
    if model_cfg.family == "qwen2":
        del cfg["attention_bias"]  # Qwen2's q/k/v biases are not optional
        cfg["use_sliding_window"] = False
    if model_cfg.family == "mistral":
        cfg["sliding_window"] = model_cfg.sliding_window
    if score_head:
        cfg["id2label"], cfg["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    if model_cfg.rope_scaling == "llama3":
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": model_cfg.rope_factor,
            "low_freq_factor": model_cfg.rope_low_freq_factor,
            "high_freq_factor": model_cfg.rope_high_freq_factor,
            "original_max_position_embeddings": model_cfg.rope_original_max_len,
        }
    return cfg


WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint's tensor -> file map


def load_hf_dir(path: str, base: ModelConfig | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a directory with config.json and *.safetensors (local or gs://)."""
    from safetensors.numpy import load_file

    from trainer import io

    config_file = io.join(path, "config.json")
    if not io.exists(config_file):
        raise RecipeError(
            f"model.init_from: {path} has no config.json; point it at a Hugging Face model directory"
        )
    model_cfg = model_config_from_hf(json.loads(io.read_text(config_file)), base)
    files = _weight_files(path)
    if not files:
        raise RecipeError(f"model.init_from: {path} has no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        with _local_copy(io.join(path, name)) as local:
            tensors.update(load_file(local))
    return model_cfg, params_from_hf(tensors, model_cfg)


GENERATION_CONFIG = "generation_config.json"  # what transformers' generate() starts from


def generation_source(path: str) -> dict[str, Any]:
    """What the HF model directory `path` says about generation: its generation_config.json
    under "config" and config.json's eos_token_id (an id or a list), each where it has one."""
    from trainer import io

    found: dict[str, Any] = {}
    for name in ("config.json", GENERATION_CONFIG):
        file = io.join(path, name)
        if not io.exists(file):
            continue
        try:
            config = json.loads(io.read_text(file))
        except ValueError:
            config = None
        if not isinstance(config, dict):
            raise RecipeError(
                f"model.init_from: {file} is not a JSON object; replace it with the model "
                "repository's"
            )
        if name == GENERATION_CONFIG:
            found["config"] = config
        elif config.get("eos_token_id") is not None:
            found["eos_token_id"] = config["eos_token_id"]
    return found


def _weight_files(path: str) -> list[str]:
    """The safetensors files transformers loads from `path`: those its index names, else
    model.safetensors, else every one (a Mistral repository's consolidated.safetensors holds
    the same weights again, under other names)."""
    from trainer import io

    names = io.listdir(path)
    if WEIGHTS_INDEX in names:
        try:
            weight_map = json.loads(io.read_text(io.join(path, WEIGHTS_INDEX)))["weight_map"]
            return sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RecipeError(
                f"model.init_from: {path}/{WEIGHTS_INDEX} has no readable weight_map; "
                "replace it with the model repository's"
            ) from None
    if "model.safetensors" in names:
        return ["model.safetensors"]
    return sorted(name for name in names if name.endswith(".safetensors"))


@contextlib.contextmanager
def _local_copy(path: str) -> Iterator[str]:
    """`path` itself, or a copy of a gs:// file that is removed once read (a checkpoint's
    shards are gigabytes, and every start of a run loads them)."""
    if "://" not in path:
        yield path
        return
    import shutil

    from trainer import io

    with tempfile.TemporaryDirectory(prefix="init_from_") as staging:
        local = os.path.join(staging, path.rsplit("/", 1)[-1])
        with io.open_file(path, "rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, length=64 << 20)
        yield local


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return name


def _np(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
