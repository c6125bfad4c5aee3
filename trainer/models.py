"""The decoder families the trainer implements, and `python -m trainer.models` to list them.

A family is one Hugging Face `model_type`: what its layers add to the Llama decoder and the
names transformers gives it. `model.init_from` picks the family from config.json; presets name
one. No jax here: recipes are validated with this on the user's machine.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # = the Hugging Face model_type
    architecture: str  # config.json "architectures"
    models: str  # the checkpoints it covers
    qkv_bias: bool = False  # biases on the q/k/v projections
    qk_norm: bool = False  # RMSNorm over the projected queries and keys
    post_norms: bool = (
        False  # norms after attention and MLP (before the residual add) instead of before
    )
    rope_scaling: tuple[str, ...] = ()  # rotary scaling types it accepts besides none
    sliding_window: bool = False  # attention limited to a window of previous tokens


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llama", "LlamaForCausalLM", "Llama 2, 3, 3.1, 3.2", rope_scaling=("llama3",)),
        Family("qwen2", "Qwen2ForCausalLM", "Qwen 2, 2.5", qkv_bias=True),
        Family("mistral", "MistralForCausalLM", "Mistral 7B v0.1-v0.3", sliding_window=True),
        Family("olmo2", "Olmo2ForCausalLM", "OLMo 2", qk_norm=True, post_norms=True),
    ]
}


def describe() -> str:
    """The families and presets, one per line (what `python -m trainer.models` prints)."""
    from trainer.config import PRESETS, ModelConfig

    lines = ["families (model.init_from picks one from config.json model_type):"]
    for f in FAMILIES.values():
        extras = [
            label
            for label, on in [
                ("q/k/v biases", f.qkv_bias),
                ("q/k RMSNorm", f.qk_norm),
                ("post-norms", f.post_norms),
                ("sliding window", f.sliding_window),
                (f"rope scaling {', '.join(f.rope_scaling)}", bool(f.rope_scaling)),
            ]
            if on
        ]
        lines.append(
            f"  {f.name:8} {f.architecture:20} {f.models}"
            + (f" ({'; '.join(extras)})" if extras else "")
        )
    lines.append("presets (model.preset):")
    for name, dims in PRESETS.items():
        cfg = ModelConfig(**dims)
        lines.append(
            f"  {name:14} {cfg.family:8} dim {cfg.dim:5}  layers {cfg.n_layers:3}  heads "
            f"{cfg.n_heads:3}/{cfg.kv_heads:<3} vocab {cfg.vocab_size}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
    sys.exit(0)
