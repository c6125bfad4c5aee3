"""Hugging Face Llama <-> our params and config, and `model.init_from` a safetensors directory."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures_trainer import launch_trainer, wait_all
from trainer.config import ModelConfig, RecipeError
from trainer.hf import (
    hf_config_from_model,
    load_hf_dir,
    model_config_from_hf,
    params_from_hf,
    params_to_hf,
)
from trainer.model import Llama, init_params

CFG = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=96,
                  max_seq_len=128, dtype="float32", norm_eps=1e-6)  # fmt: skip


def test_config_round_trips():
    assert model_config_from_hf(hf_config_from_model(CFG), CFG) == CFG
    tied = dataclasses.replace(CFG, tie_embeddings=True, n_kv_heads=None)
    assert model_config_from_hf(hf_config_from_model(tied), tied).kv_heads == 4


def test_transformers_5_rope_parameters_and_unsupported_scaling():
    cfg = hf_config_from_model(CFG)
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    assert model_config_from_hf(cfg).rope_theta == 500000.0
    cfg["rope_parameters"]["rope_type"] = "llama3"
    with pytest.raises(RecipeError, match="rotary scaling"):
        model_config_from_hf(cfg)


def test_params_round_trip_through_hf_names():
    params = jax.device_get(init_params(CFG, jax.random.key(0)))
    hf = params_to_hf(params, CFG)
    assert hf["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)  # [out, in], GQA
    back = params_from_hf(hf, CFG)
    for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def save_hf_model(directory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_from_model(CFG)))
    model.save_pretrained(directory, safe_serialization=True)
    return model


def test_load_hf_dir_gives_the_same_logits_as_transformers(tmp_path):
    import torch

    model = save_hf_model(tmp_path / "hf").eval()
    cfg, params = load_hf_dir(str(tmp_path / "hf"), dataclasses.replace(CFG, n_layers=9))
    assert (
        cfg.n_layers == 2 and cfg.dtype == "float32"
    )  # dims from config.json, dtypes from the recipe
    tokens = np.arange(20)[None] % 512
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(
        Llama(cfg).apply({"params": params}, jnp.asarray(tokens)), expected, atol=1e-4
    )


def test_missing_tensors_and_files_are_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"has no config\.json"):
        load_hf_dir(str(tmp_path))
    with pytest.raises(
        RecipeError, match=r"tensor model\.layers\.0\.self_attn\.q_proj\.weight is missing"
    ):
        params_from_hf({}, CFG)


def test_training_starts_from_an_hf_checkpoint(tiny_recipe, tmp_path):
    save_hf_model(tmp_path / "hf")
    args = [str(tiny_recipe), f"run_dir={tmp_path / 'run'}", f"model.init_from={tmp_path / 'hf'}",
            "model.preset=null", "train.steps=2", "logging.every_steps=1", "eval.every_steps=0"]  # fmt: skip
    ((code, output),) = wait_all(launch_trainer(args, 1, 8, tmp_path), timeout=400)
    assert code == 0, output
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # A random HF model over 512 tokens starts near ln(512) = 6.2; the cache and the model agree.
    assert 5.0 < first["loss"] < 8.0
    assert "0.1M params" in output or "0.2M params" in output
