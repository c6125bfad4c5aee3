"""trainer.tokenizer against transformers.AutoTokenizer on tokenizer.json files trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures_hf import (
    MIXED,
    SENTENCEPIECE_KINDS,
    SENTENCEPIECE_LAYOUTS,
    SENTENCEPIECE_TEXTS,
    sentencepiece_dir,
    train_sentencepiece,
    train_tokenizer,
)
from tests.fixtures_trainer import REPO
from trainer import io
from trainer.config import RecipeError, TokenizerConfig
from trainer.tokenizer import bos, eos, fingerprint, load_tokenizer, tokenizer_files

SENTENCEPIECE = REPO / "recipes" / "data" / "tokenizer.model"


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


@pytest.fixture(scope="module")
def sentencepiece_pairs(tmp_path_factory) -> dict[str, tuple]:
    """{"KIND in LAYOUT": (ours, AutoTokenizer's)} for every sentencepiece kind and layout."""
    from transformers import AutoTokenizer

    pairs = {}
    for kind in SENTENCEPIECE_KINDS:
        model = train_sentencepiece(kind)
        for layout in SENTENCEPIECE_LAYOUTS:
            directory = sentencepiece_dir(tmp_path_factory.mktemp("spm"), model, layout)
            ours = load_tokenizer(TokenizerConfig(path=str(directory)))
            pairs[f"{kind} in {layout}"] = (ours, AutoTokenizer.from_pretrained(directory))
    return pairs


@pytest.mark.parametrize("text", SENTENCEPIECE_TEXTS)
def test_sentencepiece_token_ids_equal_autotokenizer_in_every_layout(sentencepiece_pairs, text):
    """Llama 2's directories load as transformers' LlamaTokenizer, which prefixes "▁" by its
    `legacy` flag and ignores the normalizer of a tokenizer.json; others run as sentencepiece."""
    differ = {
        name: (ours.encode(text), theirs.convert_ids_to_tokens(theirs.encode(text)))
        for name, (ours, theirs) in sentencepiece_pairs.items()
        if ours.encode_with_offsets(text)[0] != theirs(text, add_special_tokens=False).input_ids
    }
    assert not differ, differ


def test_sentencepiece_layouts_name_and_decode_as_autotokenizer(sentencepiece_pairs):
    for name, (ours, theirs) in sentencepiece_pairs.items():
        ids = ours.encode(MIXED[1] + " <s> x </s>")
        assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id), name
        if theirs.add_bos_token:  # as tokenizer_config.json says; a bare tokenizer.model adds none
            assert bos(ours) + ours.encode("hi") == theirs("hi").input_ids, name
        assert ours.decode(ids) == theirs.decode(ids), name
        assert ours.vocab_size == len(theirs), name


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


def test_sentencepiece_turns_special_pieces_in_rendered_chats_into_their_ids():
    sp = load_tokenizer(TokenizerConfig(path=str(SENTENCEPIECE)))
    text = "<s>[INST] one plus two [/INST] 3.</s>"
    ids, offsets = sp.encode_with_offsets(text)
    assert ids[0] == sp.bos_id and ids[-1] == sp.eos_id
    assert offsets[0] == (0, 3) and offsets[-1] == (len(text) - 4, len(text))
    assert ids[1:-1] == sp.encode("[INST] one plus two [/INST] 3.")


@pytest.mark.parametrize("key", ["additional_special_tokens", "extra_special_tokens"])
def test_extra_special_tokens_missing_from_tokenizer_json_are_added_like_transformers(
    tmp_path, key
):
    from transformers import AutoTokenizer

    directory = train_tokenizer(tmp_path / "t", "bpe")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, key: ["<|extra|>"]}))
    theirs = AutoTokenizer.from_pretrained(directory)
    ours = load_tokenizer(TokenizerConfig(path=str(directory)))
    text = "a<|extra|>b<|tool|>"
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.vocab_size == len(theirs)


def test_a_broken_tokenizer_file_is_a_one_line_recipe_error(tmp_path):
    for name in ("tokenizer.json", "tokenizer.model"):
        (tmp_path / name).write_text("not a tokenizer")
        with pytest.raises(RecipeError, match=rf"tokenizer\.path: .*{name} cannot be loaded") as e:
            load_tokenizer(TokenizerConfig(path=str(tmp_path / name)))
        assert "\n" not in str(e.value)
