"""Tokenising, packing, the row cache and deterministic per-host batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_trainer import REPO
from trainer import data
from trainer.config import DataConfig, TokenizerConfig
from trainer.tokenizer import Tokenizer, load_tokenizer

TOKENIZER = TokenizerConfig(path=str(REPO / "recipes" / "data" / "tokenizer.model"))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(TOKENIZER)


def test_text_files_split_on_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first doc\nsame doc\n\n\nsecond doc\n")
    assert list(data.read_records(str(path), DataConfig())) == ["first doc\nsame doc", "second doc"]


def test_text_examples_get_bos_and_eos_and_learn_everything(tok):
    tokens, flags = data.tokenize("two plus two is 4.", tok, DataConfig())
    assert tokens[0] == tok.sp.bos_id() and tokens[-1] == tok.sp.eos_id()
    assert tok.decode(tokens[1:-1]) == "two plus two is 4." and set(flags) == {1}
    no_eos = load_tokenizer(TokenizerConfig(path=TOKENIZER.path, add_eos=False))
    assert data.tokenize("x", no_eos, DataConfig())[0][-1] != tok.sp.eos_id()


def test_chat_loss_only_on_assistant_replies(tok):
    record = {
        "messages": [
            {"role": "user", "content": "What is one plus two?"},
            {"role": "assistant", "content": "one plus two is 3."},
        ]
    }
    tokens, flags = data.tokenize(record, tok, DataConfig(format="chat"))
    learned = [t for t, f in zip(tokens, flags, strict=True) if f]
    assert tok.decode(learned[:-1]) == "one plus two is 3." and learned[-1] == tok.sp.eos_id()
    assert "What is one plus two?" in tok.decode(tokens)


def test_prompt_completion_and_alpaca_records(tok):
    cfg = DataConfig(format="prompt_completion")
    for record in ({"prompt": "Q: five plus one?", "completion": " 6."},
                   {"instruction": "Q: five plus one?", "input": "", "output": " 6."}):  # fmt: skip
        tokens, flags = data.tokenize(record, tok, cfg)
        learned = [t for t, f in zip(tokens, flags, strict=True) if f]
        assert tok.decode(learned[:-1]).strip() == "6."


def test_text_packing_fills_rows_and_continues_documents():
    examples = [([1, 2, 3, 4, 5], [1] * 5), ([6, 7, 8], [1] * 3)]
    packed = data.pack(examples, row_len=4, split_documents=True)
    assert packed.tokens.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert packed.segments.tolist() == [[1, 1, 1, 1], [1, 2, 2, 2]]


def test_sft_packing_never_splits_an_example_and_pads():
    examples = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9, 10], [0, 1, 1, 1, 1])]
    packed = data.pack(examples, row_len=4, split_documents=False)
    assert packed.tokens.tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]]
    assert packed.segments.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_loss_weights_stop_at_document_boundaries_and_padding():
    packed = data.Packed(
        tokens=np.array([[1, 2, 3, 4, 5, 0]], np.int32),
        segments=np.array([[1, 1, 2, 2, 2, 0]], np.uint16),
        flags=np.array([[1, 1, 1, 0, 1, 0]], np.uint8),
    )
    batch = data.batch_arrays(packed)
    assert batch["tokens"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["targets"].tolist() == [[2, 3, 4, 5, 0]]
    # 1->2 learn; 2->3 crosses documents; 3->4 target not learned; 4->5 learn; 5->pad never.
    assert batch["weights"].tolist() == [[1, 0, 0, 1, 0]]


def build(tmp_path: Path, seq_len: int = 32) -> data.RowReader:
    cfg = DataConfig(train=[str(REPO / "recipes" / "data" / "tiny_eval.txt")])
    return data.ensure_split(str(tmp_path), "train", cfg.train, TOKENIZER, cfg, seq_len, build=True)


def test_cache_is_built_once_and_rows_read_back(tmp_path):
    reader = build(tmp_path)
    (directory,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    meta = json.loads((directory / "train.json").read_text())
    assert meta["rows"] == reader.rows > 100 and reader.row_len == 33
    rows_file = directory / "train.rows"
    built_at = rows_file.stat().st_mtime_ns
    again = build(tmp_path)  # a restart reuses the committed cache
    assert rows_file.stat().st_mtime_ns == built_at and again.rows == reader.rows
    picked = again.read(np.array([5, 0, 5]))
    assert picked.tokens.shape == (3, 33) and (picked.tokens[0] == picked.tokens[2]).all()
    assert picked.tokens[1, 0] == 1  # the first row starts with BOS


def test_uncommitted_cache_is_not_used(tmp_path):
    cfg = DataConfig(train=[str(REPO / "recipes" / "data" / "tiny_eval.txt")])
    args = (str(tmp_path), "train", cfg.train, TOKENIZER, cfg, 32)
    assert data.ensure_split(*args, build=False) is None


def test_batches_are_a_pure_function_of_seed_and_step_and_cover_each_epoch(tmp_path):
    reader = build(tmp_path)
    a, b = data.Dataset(reader, 8, seed=3), data.Dataset(reader, 8, seed=3)
    assert (a.batch_rows(17) == b.batch_rows(17)).all()
    assert not (a.batch_rows(17) == data.Dataset(reader, 8, seed=4).batch_rows(17)).all()
    steps = reader.rows // 8
    first_epoch = np.concatenate([a.batch_rows(i) for i in range(steps)])
    assert len(set(first_epoch.tolist())) == len(first_epoch)  # no repeats inside an epoch
    assert set(a.batch_rows(steps + 1).tolist()) <= set(range(reader.rows))


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(data.RecipeError, match=r"bad\.jsonl line 2 is not JSON"):
        list(data.read_records(str(path), DataConfig()))


def test_gcs_inputs_and_cache_match_local_ones(gcs, tmp_path):
    from trainer import io

    local = build(tmp_path)
    bucket = "gs://test-bucket"
    source = REPO / "recipes" / "data"
    io.write_bytes(f"{bucket}/tok/tokenizer.model", (source / "tokenizer.model").read_bytes())
    io.write_text(f"{bucket}/data/eval.txt", (source / "tiny_eval.txt").read_text())
    tok_cfg = TokenizerConfig(path=f"{bucket}/tok/tokenizer.model")
    cfg = DataConfig(train=[f"{bucket}/data/eval.txt"])
    remote = data.ensure_split(f"{bucket}/cache", "train", cfg.train, tok_cfg, cfg, 32, build=True)
    rows = np.array([0, 7, 3])
    assert remote.rows == local.rows
    assert (remote.read(rows).tokens == local.read(rows).tokens).all()


def test_packed_chat_rows_train_only_on_assistant_replies(tmp_path, tok):
    cfg = DataConfig(train=[str(REPO / "recipes" / "data" / "tiny_chat.jsonl")], format="chat")
    reader = data.ensure_split(str(tmp_path), "train", cfg.train, TOKENIZER, cfg, 255, build=True)
    batch = data.batch_arrays(reader.read(np.arange(4)))
    assert (batch["segment_ids"].max(axis=1) >= 2).all()  # several conversations per row
    for targets, weights in zip(batch["targets"], batch["weights"], strict=True):
        learned = tok.decode(
            [t for t, w in zip(targets, weights, strict=True) if w and t != tok.sp.eos_id()]
        )
        assert "plus" in learned and "What is" not in learned and "<|user|>" not in learned
