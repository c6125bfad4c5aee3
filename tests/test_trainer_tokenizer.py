"""trainer.tokenizer against transformers.AutoTokenizer on tokenizer.json files trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures_trainer import REPO
from trainer import io
from trainer.config import RecipeError, TokenizerConfig
from trainer.tokenizer import bos, eos, fingerprint, load_tokenizer, tokenizer_files

SENTENCEPIECE = REPO / "recipes" / "data" / "tokenizer.model"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
MIXED = [
    "def add(a, b):\n    return a + b  # sum\n",
    "Ünïcödé — naïve café, 東京 and emoji 🙂🚀!",
    "tabs\tand   runs     of  spaces\n\n\n  trailing   ",
    "special tokens in text: <|eot_id|>hello<|begin_of_text|> and <|tool|>x<|tool|>",
    "numbers 1234567 and 3.14159; SHOUTING and CamelCaseWords",
]


def train_tokenizer(directory: Path, kind: str) -> Path:
    """A small BPE (byte-level, as Llama 3 and Qwen) or Unigram (metaspace, as T5/Mistral-style
    sentencepiece conversions) tokenizer.json, plus a tokenizer_config.json declaring BOS/EOS, a
    chat template and one added token (<|tool|>) that tokenizer.json lacks."""
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
        "eos_token": "<|eot_id|>",
        "added_tokens_decoder": {str(tok.token_to_id(t)): _added(t) for t in SPECIALS}
        | {str(extra_id): _added("<|tool|>")},
        "chat_template": "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}  # fmt: skip


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_token_ids_equal_autotokenizer_on_a_mixed_corpus(tmp_path, kind):
    from transformers import AutoTokenizer

    directory = train_tokenizer(tmp_path / kind, kind)
    theirs = AutoTokenizer.from_pretrained(directory)
    for path in (directory, directory / "tokenizer.json"):  # a directory or the file itself
        ours = load_tokenizer(TokenizerConfig(path=str(path)))
        for text in MIXED:
            assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
            assert (
                bos(ours) + ours.encode(text) == theirs(text)["input_ids"]
            )  # BOS only, as its post-processor
        assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
        assert ours.vocab_size == len(theirs)  # <|tool|> added from tokenizer_config.json
        assert ours.encode("<|tool|>") == [theirs.convert_tokens_to_ids("<|tool|>")]
        assert ours.decode(ours.encode(MIXED[1])) == theirs.decode(
            theirs.encode(MIXED[1], add_special_tokens=False)
        )
        assert ours.special_tokens == theirs.special_tokens_map
        assert ours.chat_template == theirs.chat_template


def test_offsets_locate_each_token_in_the_text(tmp_path):
    directory = train_tokenizer(tmp_path / "bpe", "bpe")
    sp = load_tokenizer(TokenizerConfig(path=str(SENTENCEPIECE)))
    hf = load_tokenizer(TokenizerConfig(path=str(directory)))
    text = MIXED[1] + " " + MIXED[0]
    for tok in (sp, hf):
        ids, offsets = tok.encode_with_offsets(text)
        assert ids == tok.encode(text) and len(offsets) == len(ids)
        assert all(0 <= a <= b <= len(text) for a, b in offsets)
        assert offsets == sorted(offsets) and offsets[-1][1] in (len(text), len(text.rstrip()))


def test_sentencepiece_and_directory_resolution(tmp_path):
    sp = load_tokenizer(TokenizerConfig(path=str(SENTENCEPIECE), add_eos=False))
    assert sp.bos_id == sp.sp.bos_id() and eos(sp) == [] and sp.chat_template is None
    assert sp.special_tokens["eos_token"] == "</s>"
    both = tmp_path / "both"
    train_tokenizer(both, "bpe")
    (both / "tokenizer.model").write_bytes(SENTENCEPIECE.read_bytes())
    files = [Path(f).name for f in tokenizer_files(str(both))]
    assert files == ["tokenizer.json", "tokenizer_config.json"]  # tokenizer.json preferred
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(SENTENCEPIECE.read_bytes())
    assert tokenizer_files(str(tmp_path / "sp")) == [str(tmp_path / "sp" / "tokenizer.model")]
    assert fingerprint(str(both)) != fingerprint(str(both / "tokenizer.model"))
    with pytest.raises(RecipeError, match=r"holds neither tokenizer\.json nor tokenizer\.model"):
        tokenizer_files(str(tmp_path))


def test_tokenizer_json_from_gcs(tmp_path, gcs):
    directory = train_tokenizer(tmp_path / "bpe", "bpe")
    io.copy_tree(str(directory), "gs://test-bucket/models/tok")
    local = load_tokenizer(TokenizerConfig(path=str(directory)))
    remote = load_tokenizer(TokenizerConfig(path="gs://test-bucket/models/tok"))
    assert remote.encode(MIXED[3]) == local.encode(MIXED[3]) and remote.eos_id == local.eos_id
