"""trainer.export: a Hugging Face model imported into a checkpoint exports back to the identical
tensors, and the exported directory of each family loads in transformers with the JAX model's
logits and its tokenizer."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_hf import (
    SENTENCEPIECE_TEXTS,
    SHAPES,
    TINY_SFT,
    hf_model,
    save_family_dir,
    save_run,
    sentencepiece_dir,
    train_sentencepiece,
    train_tokenizer,
)
from tests.fixtures_trainer import launch_trainer, wait_all
from trainer import io
from trainer.config import ModelConfig
from trainer.models import FAMILIES

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "recipes" / "data" / "tokenizer.model"


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory) -> Path:
    """A small random LlamaForCausalLM saved by transformers itself (grouped-query attention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("hf") / "llama"
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def _hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _import(hf_model_dir: Path):
    from trainer.hf import load_hf_dir

    return load_hf_dir(str(hf_model_dir), ModelConfig(dtype="float32", param_dtype="float32"))


def test_hf_import_then_export_gives_identical_tensors(hf_model_dir, tmp_path):
    from trainer.export import export

    model_cfg, params = _import(hf_model_dir)
    save_run(str(tmp_path / "run"), model_cfg, params)
    out = tmp_path / "exported"
    # Small shards: exercises the multi-file layout and its index.
    assert export(str(tmp_path / "run"), str(out), max_shard_bytes=64 * 1024) == 7
    original, exported = _hf_tensors(hf_model_dir), _hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and np.array_equal(exported[name], tensor), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()


def test_a_bare_sentencepiece_model_exports_with_a_config_that_adds_bos_as_training_did(
    hf_model_dir, tmp_path
):
    """transformers read the exported tokenizer.model alone as a tokenizer adding no BOS,
    though every training example began with one; and with LlamaTokenizer named, it prefixed
    "▁" otherwise than the sentencepiece the trainer ran (after <s>, before a leading space)."""
    from transformers import AutoTokenizer

    from trainer.config import TokenizerConfig
    from trainer.export import export
    from trainer.tokenizer import load_tokenizer

    model_cfg, params = _import(hf_model_dir)
    save_run(str(tmp_path / "run"), model_cfg, params)  # the recipe's tokenizer.model
    export(str(tmp_path / "run"), str(tmp_path / "out"))
    ours = load_tokenizer(TokenizerConfig(path=str(TOKENIZER)))
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in SENTENCEPIECE_TEXTS:
        assert theirs(text).input_ids == [ours.bos_id, *ours.encode_with_offsets(text)[0]], text
    assert (theirs.bos_token, theirs.eos_token) == ("<s>", "</s>")


def test_a_llama_2_tokenizer_exports_to_one_that_tokenizes_as_training_did(hf_model_dir, tmp_path):
    """Llama 2's tokenizer files (LlamaTokenizer, legacy false, a tokenizer.json) load in
    transformers from the export as the trainer read them from the source."""
    from transformers import AutoTokenizer

    from trainer.config import TokenizerConfig
    from trainer.export import export
    from trainer.tokenizer import load_tokenizer

    source = sentencepiece_dir(tmp_path / "src", train_sentencepiece("bpe"), "llama tokenizer.json")
    model_cfg, params = _import(hf_model_dir)
    save_run(str(tmp_path / "run"), model_cfg, params, tokenizer=str(source))
    export(str(tmp_path / "run"), str(tmp_path / "out"))
    ours = load_tokenizer(TokenizerConfig(path=str(source)))
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in SENTENCEPIECE_TEXTS:
        assert theirs(text).input_ids == [ours.bos_id, *ours.encode(text)], text


def test_exported_checkpoint_loads_in_transformers_with_matching_logits(hf_model_dir, tmp_path):
    import jax
    import torch
    from transformers import LlamaForCausalLM

    from trainer.model import Decoder

    model_cfg, params = _import(hf_model_dir)
    rng = np.random.default_rng(0)  # "trained" weights: not the ones transformers initialised
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.02, p.shape).astype(p.dtype), params)
    save_run(str(tmp_path / "run"), model_cfg, params)
    out = tmp_path / "exported"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.export", str(tmp_path / "run"), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "exported step 7" in result.stdout
    tokens = rng.integers(0, model_cfg.vocab_size, size=(2, 24))
    ours = np.asarray(Decoder(model_cfg).apply({"params": params}, jax.numpy.asarray(tokens)))
    model = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=2e-4)


def test_export_over_an_earlier_one_replaces_it_and_keeps_the_tokenizer_it_reads(
    hf_model_dir, tmp_path
):
    """A run fine-tuned from an export, exported back into it: the tokenizer there is read
    before anything is written (it used to be emptied), and no weight file of the earlier
    export stays behind for transformers to load instead of the new shards."""
    import jax

    from trainer.export import export

    model_cfg, params = _import(hf_model_dir)
    out = tmp_path / "exported"
    save_run(str(tmp_path / "first"), model_cfg, params)
    export(str(tmp_path / "first"), str(out))
    (out / "notes.md").write_text("mine")
    shifted = jax.tree.map(lambda p: p + 1, params)
    save_run(str(tmp_path / "second"), model_cfg, shifted, tokenizer=str(out / "tokenizer.model"))
    export(str(tmp_path / "second"), str(out), max_shard_bytes=64 * 1024)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files, files
    assert not [name for name in files if name.startswith(".export-")]
    assert (out / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    assert (out / "notes.md").read_text() == "mine"
    exported = _hf_tensors(out)
    np.testing.assert_array_equal(exported["model.norm.weight"], shifted["norm"]["weight"])


def test_the_tokenizer_goes_under_transformers_name_and_its_ids_into_the_config(
    hf_model_dir, tmp_path
):
    import sentencepiece

    from trainer.export import export

    model_cfg, params = _import(hf_model_dir)
    renamed = tmp_path / "my-spm.model"
    renamed.write_bytes(TOKENIZER.read_bytes())
    save_run(str(tmp_path / "run"), model_cfg, params, tokenizer=str(renamed))
    export(str(tmp_path / "run"), str(tmp_path / "out"))
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    assert not (tmp_path / "out" / "my-spm.model").exists()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    assert (config["bos_token_id"], config["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    # a run that recorded no generation settings: the generation config transformers writes
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation == {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}


def test_the_source_generation_config_is_carried_over_as_it_was(hf_model_dir, tmp_path):
    """A Llama 3 Instruct's: its list of stop ids has the tokenizer's EOS already, and
    config.json's single id stays single."""
    from transformers import GenerationConfig

    from trainer.export import export

    model_cfg, params = _import(hf_model_dir)
    source = {"bos_token_id": 1, "eos_token_id": [3, 2], "temperature": 0.6, "top_p": 0.9}
    generation = {"config": source, "eos_token_id": 2, "end_of_turn_id": 2}
    save_run(str(tmp_path / "run"), model_cfg, params, generation=generation)
    export(str(tmp_path / "run"), str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == source
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == 2
    assert GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [3, 2]


def test_export_to_gcs(hf_model_dir, tmp_path, gcs):
    from trainer.export import export

    model_cfg, params = _import(hf_model_dir)
    run_dir = "gs://test-bucket/runs/export"
    save_run(run_dir, model_cfg, params, step=3)
    export(run_dir, "gs://test-bucket/models/llama")
    files = io.listdir("gs://test-bucket/models/llama")
    assert files == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    config = json.loads(io.read_text("gs://test-bucket/models/llama/config.json"))
    assert config["num_key_value_heads"] == 2 and config["model_type"] == "llama"


def test_bad_step_and_missing_run_are_one_line_errors(hf_model_dir, tmp_path):
    model_cfg, params = _import(hf_model_dir)
    save_run(str(tmp_path / "run"), model_cfg, params)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    tiny = str(REPO / "recipes" / "tiny.yaml")  # another model: it used to drop layers or crash
    for args, expected in [
        ([str(tmp_path / "run"), str(tmp_path / "o"), "--step", "99"], "--step 99"),
        ([str(tmp_path / "nope"), str(tmp_path / "o")], "no committed checkpoint"),
        ([str(tmp_path / "run"), str(tmp_path / "o"), "--recipe", tiny], "does not match"),
        ([str(tmp_path / "run"), str(a_file)], f"cannot export {a_file}: "),
        ([str(tmp_path / "run"), str(a_file / "sub")], f"cannot export {a_file / 'sub'}: "),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "trainer.export", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert result.returncode == 2
        assert result.stderr.startswith("error: ") and expected in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
    for size in ("nan", "inf", "0", "-1"):
        args = [str(tmp_path / "run"), str(tmp_path / "o"), "--max-shard-gb", size]
        result = subprocess.run(
            [sys.executable, "-m", "trainer.export", *args], capture_output=True, text=True
        )
        assert result.returncode == 2 and "--max-shard-gb" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "shape",
    ["llama3-gqa-rope-scaling-odd-vocab", "qwen2-gqa-tied", "mistral-gqa-window", "olmo2-mha"],
)
def test_each_family_exports_in_its_own_format_with_its_tokenizer(shape, tmp_path):
    import jax
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.export import export
    from trainer.hf import load_hf_dir
    from trainer.model import Decoder

    source = tmp_path / "hf"
    hf_model(SHAPES[shape]).save_pretrained(source, safe_serialization=True)
    train_tokenizer(source, "bpe")
    model_cfg, params = load_hf_dir(str(source), SHAPES[shape])
    rng = np.random.default_rng(1)  # "trained" weights
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.02, p.shape).astype(p.dtype), params)
    save_run(str(tmp_path / "run"), model_cfg, params, tokenizer=str(source))
    out = tmp_path / "exported"
    export(str(tmp_path / "run"), str(out))
    config = json.loads((out / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (
        original["model_type"],
        original["architectures"],
    )
    assert sorted(_hf_tensors(out)) == sorted(_hf_tensors(source))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert AutoTokenizer.from_pretrained(out).encode("hi") == AutoTokenizer.from_pretrained(
        source
    ).encode("hi")
    tokens = rng.integers(0, model_cfg.vocab_size, size=(2, 24))  # longer than the Mistral window
    ours = np.asarray(Decoder(model_cfg).apply({"params": params}, jax.numpy.asarray(tokens)))
    model = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        theirs = model.eval()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_reward_model_exports_as_sequence_classification_with_equal_scores(tmp_path, family):
    """Every family, on sequences ending in id 1: OLMo 2's config class defaults pad_token_id
    to 1, and transformers scored the last token that was not it."""
    import jax
    import torch
    from transformers import AutoModelForSequenceClassification

    from tests.fixtures_hf import BASE, hf_state
    from trainer.export import export
    from trainer.hf import params_from_hf
    from trainer.model import Decoder

    cfg = dataclasses.replace(BASE, family=family)
    original = hf_model(cfg, seed=0, score=True)
    params = params_from_hf(hf_state(original), cfg)
    rng = np.random.default_rng(0)  # "trained" weights: not the ones transformers initialised
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.02, p.shape).astype(p.dtype), params)
    save_run(str(tmp_path / "run"), cfg, params)
    export(str(tmp_path / "run"), str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    causal = FAMILIES[family].architecture
    assert config["architectures"] == [causal.replace("ForCausalLM", "ForSequenceClassification")]
    assert sorted(_hf_tensors(tmp_path / "out")) == sorted(hf_state(original))  # score, no lm_head
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert model.config.num_labels == 1
    assert not (tmp_path / "out" / "generation_config.json").exists()  # it cannot generate
    for length in (5, 17):
        tokens = rng.integers(2, BASE.vocab_size, size=(1, length))
        tokens[0, -1] = 1
        ours = Decoder(cfg, "score").apply({"params": params}, jax.numpy.asarray(tokens))
        with torch.no_grad():
            theirs = model(torch.tensor(tokens)).logits[0, 0].item()
        assert float(ours[0, -1]) == pytest.approx(theirs, abs=1e-4)  # the last token's score


def test_a_chat_fine_tune_of_a_llama3_base_exports_its_stop_tokens_and_generation_config(
    tmp_path,
):
    """A Llama 3 base (EOS <|end_of_text|>) fine-tuned on chat under the Llama 3 template,
    whose replies end with <|eot_id|>: the export used to drop generation_config.json and
    carry only the tokenizer's EOS, so transformers' generate ran on past <|eot_id|>."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from trainer.export import export

    source = save_family_dir(
        tmp_path / "hf", SHAPES["llama3-gqa-rope-scaling-odd-vocab"], "llama3", "<|end_of_text|>"
    )
    vocab = json.loads((source / "tokenizer.json").read_text())["added_tokens"]
    ids = {token["content"]: token["id"] for token in vocab}
    end_of_text, eot = ids["<|end_of_text|>"], ids["<|eot_id|>"]
    stops = [end_of_text, ids["<|im_end|>"]]  # a list, as Llama 3.1's (<|eom_id|> too)
    sampling = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    generation = {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": stops, **sampling}
    (source / "generation_config.json").write_text(json.dumps(generation))
    config = json.loads((source / "config.json").read_text())
    config["eos_token_id"] = end_of_text
    (source / "config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    args = [TINY_SFT, f"run_dir={run}", f"model.init_from={source}", "train.steps=1"]
    ((code, output),) = wait_all(launch_trainer(args, 1, 1, tmp_path), timeout=300)
    assert code == 0, output
    out = tmp_path / "out"
    export(str(run), str(out))

    exported = GenerationConfig.from_pretrained(out)
    assert exported.eos_token_id == [*stops, eot]
    assert {key: getattr(exported, key) for key in sampling} == sampling
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [end_of_text, eot]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.tensor([[ids["<|begin_of_text|>"], 40, 41, 42]])
    with torch.no_grad():  # the random model made to answer <|eot_id|>: generation ends there
        generated = model.generate(
            prompt, max_new_tokens=8, do_sample=False, sequence_bias={(eot,): 100.0}
        )
    assert generated[0, prompt.shape[1] :].tolist() == [eot]


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 2 + 3?"},
    {"role": "assistant", "content": "5"},
]


@pytest.mark.parametrize(
    "own, chosen",
    [(None, None), ("llama3", "chatml"), ("llama3", "tulu"), ("chatml", None)],
    ids=["no-template-so-tulu", "another-named", "tulu-named", "its-own"],
)
def test_a_chat_run_exports_the_chat_template_it_trained_on(hf_model_dir, tmp_path, own, chosen):
    """The export's apply_chat_template renders what the run trained on: a conversation as
    its tokens, and the prompt before the last reply as the tokens before it. The export used
    to carry the source tokenizer's template only: a base model's (none, so the run trained
    tulu) failed to render, and one other than data.chat_template's rendered another format."""
    from transformers import AutoTokenizer

    from trainer import chat, generation
    from trainer.config import load_recipe
    from trainer.export import export
    from trainer.tokenizer import load_tokenizer

    template = chat.JINJA_TEMPLATES[own] if own else None
    source = train_tokenizer(tmp_path / "tok", "bpe", chat_template=template)
    overrides = [f"run_dir={tmp_path / 'run'}", f"tokenizer.path={source}"]
    recipe = load_recipe(TINY_SFT, overrides + [f"data.chat_template={chosen}"] * bool(chosen))
    model_cfg, params = _import(hf_model_dir)
    recorded = generation.record(recipe)
    save_run(str(tmp_path / "run"), model_cfg, params, tokenizer=str(source), generation=recorded)
    export(str(tmp_path / "run"), str(tmp_path / "out"))

    tok = load_tokenizer(recipe.tokenizer)
    ids, flags = chat.tokenize_chat(
        {"messages": CONVERSATION}, tok, chat.template_source(recipe.data.chat_template, tok)
    )
    reply_end = len(flags) - flags[::-1].index(1)
    last_reply = reply_end - flags[:reply_end][::-1].index(0)  # the final reply's first token
    served = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert served.apply_chat_template(CONVERSATION, tokenize=False) == tok.decode(ids)
    prompt = served.apply_chat_template(
        CONVERSATION[:-1], tokenize=False, add_generation_prompt=True
    )
    assert prompt == tok.decode(ids[:last_reply])
