"""Hugging Face checkpoints of every family <-> our params and config, and `model.init_from`."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures_hf import (
    OLMO2_TEMPLATE,
    SHAPES,
    TINY_SFT,
    assert_export_matches,
    hf_model,
    save_family_dir,
)
from tests.fixtures_trainer import launch_trainer, wait_all
from trainer.config import ModelConfig, RecipeError
from trainer.hf import (
    hf_config_from_model,
    load_hf_dir,
    model_config_from_hf,
    params_from_hf,
    params_to_hf,
)
from trainer.model import Decoder, init_params

CFG = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=96,
                  max_seq_len=128, dtype="float32", norm_eps=1e-6)  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
def test_config_round_trips(shape):
    cfg = SHAPES[shape]
    assert model_config_from_hf(hf_config_from_model(cfg), cfg) == dataclasses.replace(
        cfg, preset=None
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_hf_to_ours_to_hf_reproduces_every_tensor_exactly(shape, tmp_path):
    from safetensors.numpy import load_file

    cfg = SHAPES[shape]
    hf_model(cfg).save_pretrained(tmp_path, safe_serialization=True)
    saved = load_file(tmp_path / "model.safetensors")  # what transformers writes (tied: no lm_head)
    loaded_cfg, params = load_hf_dir(str(tmp_path), cfg)
    assert loaded_cfg == dataclasses.replace(cfg, preset=None)
    back = params_to_hf(params, loaded_cfg)
    assert sorted(back) == sorted(saved)
    for name, tensor in saved.items():
        assert back[name].dtype == tensor.dtype and np.array_equal(back[name], tensor), name


def test_hub_style_rope_config_and_unsupported_types():
    cfg = hf_config_from_model(CFG)
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}  # transformers 5
    assert model_config_from_hf(cfg).rope_theta == 500000.0
    llama31 = {**cfg, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}}  # fmt: skip
    del llama31["rope_parameters"]
    got = model_config_from_hf(llama31)
    assert (got.rope_scaling, got.rope_factor, got.rope_original_max_len) == ("llama3", 8.0, 8192)
    cfg["rope_parameters"]["rope_type"] = "yarn"
    with pytest.raises(RecipeError, match="rotary scaling 'yarn' is not supported"):
        model_config_from_hf(cfg)
    with pytest.raises(RecipeError, match="model_type 'gemma2' is not supported"):
        model_config_from_hf({**hf_config_from_model(CFG), "model_type": "gemma2"})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_act": "gelu"}, "config.json's hidden_act 'gelu' is not supported for llama"),
        ({"mlp_bias": True}, "config.json's mlp_bias True is not supported for llama"),
        ({"head_dim": 32}, r"head_dim 32 is not hidden_size / num_attention_heads \(64 / 4\)"),
        ({"vocab_size": None}, "config.json has no vocab_size; use the model's own"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
         "llama3 rope scaling has no low_freq_factor, high_freq_factor, original_max_position"),
    ],
)  # fmt: skip
def test_a_config_the_trainer_cannot_represent_is_one_line_naming_the_field(changes, message):
    """The refusals named no field or value, and a config short of a key was a KeyError."""
    cfg = {**hf_config_from_model(CFG), **changes}
    cfg = {key: value for key, value in cfg.items() if value is not None}
    with pytest.raises(RecipeError, match=message):
        model_config_from_hf(cfg)
    assert model_config_from_hf({**hf_config_from_model(CFG), "hidden_act": "swish"})  # = silu


def test_params_round_trip_through_hf_names():
    params = jax.device_get(init_params(CFG, jax.random.key(0)))
    hf = params_to_hf(params, CFG)
    assert hf["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)  # [out, in], GQA
    back = params_from_hf(hf, CFG)
    for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def save_hf_model(directory, **save_options):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_from_model(CFG)))
    model.save_pretrained(directory, safe_serialization=True, **save_options)
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
        Decoder(cfg).apply({"params": params}, jnp.asarray(tokens)), expected, atol=1e-4
    )


def test_a_sharded_gs_checkpoint_loads_the_files_its_index_names_and_leaves_no_copy(
    gcs, tmp_path, monkeypatch
):
    """Every start of a run left a whole copy of a gs:// checkpoint in /tmp, and loaded every
    *.safetensors, also a Mistral repository's consolidated.safetensors (the weights again)."""
    import tempfile

    import torch

    from trainer import io

    model = save_hf_model(tmp_path / "hf", max_shard_size="100KB").eval()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    (tmp_path / "hf" / "consolidated.safetensors").write_bytes(b"other names, not loaded")
    io.copy_tree(str(tmp_path / "hf"), "gs://test-bucket/hf")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for source in (str(tmp_path / "hf"), "gs://test-bucket/hf"):
        cfg, params = load_hf_dir(source, CFG)
        tokens = np.arange(20)[None] % 512
        with torch.no_grad():
            expected = model(torch.tensor(tokens)).logits.numpy()
        ours = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens))
        np.testing.assert_allclose(ours, expected, atol=1e-4)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_the_generation_settings_of_a_gs_checkpoint_are_read_as_a_local_ones(gcs, tmp_path):
    """What the trainer records for the export (trainer.generation): the export never reads
    model.init_from, which may be gone by then."""
    from trainer import io
    from trainer.hf import generation_source

    save_hf_model(tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    io.copy_tree(str(tmp_path / "hf"), "gs://test-bucket/hf")
    eos = json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"]
    expected = {"config": {"eos_token_id": [2, 7]}, "eos_token_id": eos}
    assert generation_source(str(tmp_path / "hf")) == expected
    assert generation_source("gs://test-bucket/hf") == expected
    (tmp_path / "hf" / "generation_config.json").write_text("[2, 7")
    with pytest.raises(RecipeError, match=r"generation_config\.json is not a JSON object"):
        generation_source(str(tmp_path / "hf"))
    (tmp_path / "hf" / "generation_config.json").unlink()
    assert generation_source(str(tmp_path / "hf")) == {"eos_token_id": eos}


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
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    first = next(r for r in map(json.loads, lines) if "loss" in r)  # the first step record
    # A random HF model over 512 tokens starts near ln(512) = 6.2; the cache and the model agree.
    assert 5.0 < first["loss"] < 8.0
    assert "0.1M params" in output or "0.2M params" in output


# family -> (shape, the tokenizer's own chat template, a template FILE for data.chat_template):
# every way a template is chosen (the tokenizer's, none so tulu, a FILE) is exercised once.
FAMILY_RUNS = {
    "llama": ("llama3-gqa-rope-scaling-odd-vocab", "llama3", None),
    "qwen2": ("qwen2-gqa-tied", "chatml", None),
    "mistral": ("mistral-gqa-window", None, None),
    "olmo2": ("olmo2-gqa-tied-odd-vocab", None, OLMO2_TEMPLATE),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_RUNS)
def test_fine_tune_each_family_on_chat_data_then_export(family, tmp_path):
    shape, own_template, template_file = FAMILY_RUNS[family]
    source = save_family_dir(tmp_path / "hf", SHAPES[shape], own_template)
    run = tmp_path / "run"
    args = [TINY_SFT, f"run_dir={run}", f"model.init_from={source}"]
    if template_file:
        (tmp_path / "mine.jinja").write_text(template_file)
        args.append(f"data.chat_template={tmp_path / 'mine.jinja'}")
    ((code, output),) = wait_all(launch_trainer(args, 1, 2, tmp_path), timeout=600)
    assert code == 0, output
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    losses = [r["loss"] for r in records if "loss" in r]  # step records only
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    assert_export_matches(run, tmp_path / "out", source)


def test_a_tokenizer_past_the_init_from_models_embeddings_is_one_line_naming_both(tmp_path):
    """model.init_from's config.json sets vocab_size whatever the recipe says, and the trainer
    does not resize embeddings: the error used to say to raise model.vocab_size, which changed
    nothing."""
    from tests.fixtures_hf import train_tokenizer

    source = tmp_path / "hf"
    hf_model(dataclasses.replace(SHAPES["llama-mha"], vocab_size=96)).save_pretrained(source)
    tokenizer = train_tokenizer(tmp_path / "tok", "bpe")
    args = [TINY_SFT, f"run_dir={tmp_path / 'run'}", f"model.init_from={source}",
            f"tokenizer.path={tokenizer}", "model.vocab_size=1024"]  # fmt: skip
    ((code, output),) = wait_all(launch_trainer(args, 1, 1, tmp_path), timeout=300)
    assert code == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    assert errors[0].startswith(f"error: tokenizer.path: {tokenizer} has 401 pieces, more than ")
    assert (
        f"the 96 embeddings of model.init_from {source}; use the model's own tokenizer" in errors[0]
    )
