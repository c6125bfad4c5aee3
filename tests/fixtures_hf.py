"""Small random transformers models of every family, the peers of the JAX decoder's tests.

`SHAPES` covers each family in several shapes (grouped-query attention on and off, odd vocab
sizes, tied and untied embeddings, Llama 3 rope scaling, a Mistral window shorter than the
test sequences); `hf_model` builds the transformers model of a ModelConfig with every weight
random (norms and biases too, so a swapped or dropped one shows in the logits).
`train_tokenizer` trains a small tokenizer.json offline with the `tokenizers` library, and
`train_sentencepiece` a tokenizer.model with sentencepiece, laid out as Llama 2 and Mistral ship it
by `sentencepiece_dir`;
`save_family_dir` makes a whole HF model directory of both for `recipes/tiny-sft.yaml`, and
`assert_export_matches` checks a finished run's export in transformers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from trainer.config import ModelConfig
from trainer.hf import hf_config_from_model

TINY_SFT = str(Path(__file__).resolve().parent.parent / "recipes" / "tiny-sft.yaml")
SENTENCEPIECE = str(Path(__file__).resolve().parent.parent / "recipes" / "data" / "tokenizer.model")
OLMO2_TEMPLATE = (  # allenai/OLMo-2-1124-7B-Instruct's
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)

BASE = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_dim=96,
                   max_seq_len=64, dtype="float32", param_dtype="float32", norm_eps=1e-6)  # fmt: skip
LLAMA3_ROPE = dict(rope_scaling="llama3", rope_factor=4.0, rope_low_freq_factor=1.0,
                   rope_high_freq_factor=4.0, rope_original_max_len=16, rope_theta=500000.0)  # fmt: skip


def _shape(family: str, **changes) -> ModelConfig:
    return dataclasses.replace(BASE, family=family, **changes)


SHAPES: dict[str, ModelConfig] = {
    "llama-mha": _shape("llama"),
    "llama3-gqa-rope-scaling-odd-vocab": _shape(
        "llama", n_kv_heads=2, vocab_size=131, **LLAMA3_ROPE
    ),
    "llama3.2-mqa-tied": _shape("llama", n_kv_heads=1, tie_embeddings=True, **LLAMA3_ROPE),
    "qwen2-gqa-tied": _shape("qwen2", n_kv_heads=2, tie_embeddings=True),
    "qwen2-mha-odd-vocab": _shape("qwen2", vocab_size=151),
    "mistral-gqa-window": _shape("mistral", n_kv_heads=2, sliding_window=8),
    "mistral-mha-no-window": _shape("mistral", vocab_size=97),
    "olmo2-mha": _shape("olmo2"),
    "olmo2-gqa-tied-odd-vocab": _shape("olmo2", n_kv_heads=2, vocab_size=133, tie_embeddings=True),
}


def hf_model(cfg: ModelConfig, seed: int = 0, score: bool = False):
    """The transformers model of `cfg` (eager attention, float32) with random weights; with
    `score`, its *ForSequenceClassification with one label (a reward model)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_cfg = hf_config_from_model(cfg)
    config = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    auto = transformers.AutoModelForCausalLM
    if score:
        config.num_labels = 1
        auto = transformers.AutoModelForSequenceClassification
    model = auto.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "norm" in name
            p.copy_(torch.randn_like(p) * (0.5 if norm else 0.2) + norm)
    return model.eval()


def hf_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


TOY_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
# Llama 3's, ChatML's and Mistral's special tokens, so that one tokenizer serves every template.
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"]  # fmt: skip
MIXED = [
    "def add(a, b):\n    return a + b  # sum\n",
    "Ünïcödé — naïve café, 東京 and emoji 🙂🚀!",
    "tabs\tand   runs     of  spaces\n\n\n  trailing   ",
    "special tokens in text: <|eot_id|>hello<|begin_of_text|> and <|tool|>x<|tool|>",
    "numbers 1234567 and 3.14159; SHOUTING and CamelCaseWords",
]


def train_tokenizer(
    directory: Path,
    kind: str,
    eos_token: str = "<|eot_id|>",
    chat_template: str | list[dict] | None = TOY_TEMPLATE,
) -> Path:
    """A small BPE (byte-level, as Llama 3 and Qwen) or Unigram (metaspace, as T5/Mistral-style
    sentencepiece conversions) tokenizer.json, plus a tokenizer_config.json declaring BOS/EOS, a
    chat template (none when None; a list is named templates) and one added token (<|tool|>) that tokenizer.json lacks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = MIXED * 20 + [
        f"line {i}: the quick brown fox jumps over {i} lazy dogs" for i in range(200)
    ]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=300, special_tokens=SPECIALS, unk_token="<|end_of_text|>"
        )
    tok.train_from_iterator(corpus, trainer)
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    extra_id = tok.get_vocab_size()
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": eos_token,
        "added_tokens_decoder": {str(tok.token_to_id(t)): _added(t) for t in SPECIALS}
        | {str(extra_id): _added("<|tool|>")},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


SENTENCEPIECE_KINDS = {  # sentencepiece trainer options of each kind of model
    # Llama 2's: no normalization, whitespace kept, digits split, a dummy prefix
    "bpe": dict(model_type="bpe", normalization_rule_name="identity",
                remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True),
    # sentencepiece's defaults: NFKC, runs of spaces collapsed and stripped
    "unigram": dict(model_type="unigram"),
    "bpe-no-dummy-prefix": dict(model_type="bpe", normalization_rule_name="identity",
                                remove_extra_whitespaces=False, add_dummy_prefix=False),
}  # fmt: skip


def train_sentencepiece(kind: str) -> bytes:
    """A small sentencepiece tokenizer.model of `kind` (SENTENCEPIECE_KINDS), with byte fallback
    and Llama's <unk>, <s>, </s> at ids 0, 1, 2."""
    import io

    import sentencepiece as spm

    corpus = MIXED * 20 + [
        f"line {i}: the quick brown fox jumps over {i} lazy dogs\n\n  indented\tx"
        for i in range(300)
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=500, character_coverage=0.98,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        **SENTENCEPIECE_KINDS[kind],
    )  # fmt: skip
    return model.getvalue()


# Where sentencepiece and transformers' LlamaTokenizer part: the "▁" before the text (none
# before text starting with a space, none after a special token unless legacy), whitespace.
SENTENCEPIECE_TEXTS = [
    "", " ", "hello", " hello", "  hello", "hello world", "hello  world", "hello ", "trailing   ",
    "a\nb", "a\n\nb", "\n\nx", "\n", "tab\there", "\tx", "Ünïcödé café 東京", "emoji 🙂🚀!",
    "<s>hello", "<s> hello", "hi</s>", "hi</s>there", "a</s> b", "x <s>y", "<unk>z",
    "<s>[INST] what is 1+1? [/INST] 2</s>", "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST]",
    *MIXED,
]  # fmt: skip


# How Hugging Face model directories ship a sentencepiece tokenizer: {layout: (model_type,
# tokenizer_config.json's `legacy`, or no tokenizer_config.json when absent, with tokenizer.json)}.
SENTENCEPIECE_LAYOUTS = {
    "tokenizer.model alone": ("llama", "absent", False),
    "llama legacy": ("llama", True, False),
    "llama": ("llama", False, False),
    "llama legacy tokenizer.json": ("llama", True, True),
    "llama tokenizer.json": ("llama", False, True),  # as meta-llama/Llama-2-7b-hf
    "mistral tokenizer.json": ("mistral", True, True),  # as mistralai/Mistral-7B-v0.1
}


def sentencepiece_dir(directory: Path, model: bytes, layout: str) -> Path:
    """A model directory of `layout` (SENTENCEPIECE_LAYOUTS) holding the sentencepiece `model`:
    config.json, tokenizer.model, tokenizer_config.json (LlamaTokenizer, as Llama 2's and
    Mistral's) and tokenizer.json as transformers 4 converted theirs (a normalizer putting "▁"
    before the text and for spaces, no pre-tokenizer)."""
    model_type, legacy, with_json = SENTENCEPIECE_LAYOUTS[layout]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    (directory / "tokenizer.model").write_bytes(model)
    if legacy == "absent":
        return directory
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": legacy}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if with_json:
        from transformers import AutoTokenizer

        converted = json.loads(AutoTokenizer.from_pretrained(directory).backend_tokenizer.to_str())
        converted["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ]}  # fmt: skip
        converted["pre_tokenizer"] = None
        (directory / "tokenizer.json").write_text(json.dumps(converted))
    return directory


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}  # fmt: skip


def save_family_dir(
    directory: Path, cfg: ModelConfig, template: str | None, eos_token: str = "<|eot_id|>"
) -> Path:
    """A Hugging Face model directory as the Hub has them: a random model of `cfg`'s family
    (vocab 512, for the test tokenizer) and a tokenizer.json whose config carries the built-in
    chat template named `template` (none when None) and `eos_token`."""
    from trainer import chat

    cfg = dataclasses.replace(cfg, vocab_size=512, max_seq_len=128)
    hf_model(cfg).save_pretrained(directory, safe_serialization=True)
    template_source = chat.JINJA_TEMPLATES.get(template or "")
    train_tokenizer(directory, "bpe", eos_token=eos_token, chat_template=template_source)
    return directory


def assert_export_matches(run_dir: Path, out: Path, source: Path) -> None:
    """Export `run_dir`'s last checkpoint to `out`: transformers loads it with our logits within
    1e-4, and the tokenizer of `source` comes along."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.checkpoint import load_params, read_model_info
    from trainer.export import export
    from trainer.model import Decoder

    export(str(run_dir), str(out))
    model_cfg, _ = read_model_info(str(run_dir / "checkpoints"))
    _, params = load_params(str(run_dir / "checkpoints"))
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (1, 20))
    ours = np.asarray(Decoder(model_cfg).apply({"params": params}, jnp.asarray(tokens)))
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    with torch.no_grad():
        theirs = model.eval()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def save_run(
    run_dir: str,
    model_cfg: ModelConfig,
    params,
    step: int = 7,
    tokenizer: str = SENTENCEPIECE,
    generation: dict | None = None,
) -> None:
    """Write params in a train state checkpoint, as the trainer does, from this process
    (`generation`: what trainer.generation.record would record)."""
    import flax
    import jax
    import jax.numpy as jnp

    from trainer import io
    from trainer.checkpoint import Checkpointer
    from trainer.config import CheckpointConfig

    @flax.struct.dataclass
    class TrainState:
        step: jax.Array
        params: dict
        opt_state: dict
        rng: jax.Array

    params = jax.tree.map(jnp.asarray, params)
    state = TrainState(
        jnp.int32(step), params, {"mu": jax.tree.map(jnp.zeros_like, params)}, jax.random.key(0)
    )
    checkpointer = Checkpointer(
        io.join(run_dir, "checkpoints"),
        CheckpointConfig(every_steps=1, async_save=False),
        model=model_cfg,
        tokenizer_path=tokenizer,
        generation=generation,
    )
    checkpointer.save(state)
    checkpointer.close()
