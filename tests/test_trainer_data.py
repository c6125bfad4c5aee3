"""Rendering records into tokens and loss flags, and packing them into rows."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures_trainer import REPO
from trainer import data
from trainer.config import DataConfig, RecipeError, TokenizerConfig
from trainer.tokenizer import Tokenizer, load_tokenizer

TOKENIZER = TokenizerConfig(path=str(REPO / "recipes" / "data" / "tokenizer.model"))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(TOKENIZER)


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


def test_prompt_completion_is_tokenised_whole_as_trl_does(tok):
    """Apart, sentencepiece gave the completion a word start of its own: "Response:\n"
    "▁four" where TRL, tokenising prompt + completion, learns "four"."""
    import sentencepiece

    record = {"prompt": "### Response:\n", "completion": "four"}
    tokens, flags = data.tokenize(record, tok, DataConfig(format="prompt_completion"))
    sp = sentencepiece.SentencePieceProcessor(model_file=TOKENIZER.path)  # TRL's tokenizer(text)
    whole = sp.encode(record["prompt"] + record["completion"])
    assert tokens == [sp.bos_id(), *whole, sp.eos_id()]
    learned = [t for t, f in zip(tokens, flags, strict=True) if f]
    assert tok.decode(learned[:-1]) == "four" and learned[-1] == tok.eos_id


def test_prompt_completion_fields_must_be_text_or_numbers(tok):
    """str() of a list of messages, or of None, used to be learned as its Python repr."""
    cfg = DataConfig(format="prompt_completion")
    tokens, flags = data.tokenize({"prompt": "2 + 2 =", "completion": 4}, tok, cfg)
    assert tok.decode([t for t, f in zip(tokens, flags, strict=True) if f][:-1]).strip() == "4"
    for record, message in [
        ({"prompt": [{"role": "user", "content": "hi"}], "completion": "x"},
         "'prompt' is a list, not text \\(messages: use data.format chat\\)"),
        ({"prompt": "hi", "completion": None}, "'completion' is a NoneType, not text"),
        ({"instruction": "hi", "input": ["x"], "output": "y"}, "'input' is a list"),
    ]:  # fmt: skip
        with pytest.raises(RecipeError, match=message):
            data.tokenize(record, tok, cfg)


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


def test_packer_hands_over_rows_as_they_fill_and_pads_the_last():
    packer = data.Packer(row_len=4, split_documents=True)
    packer.add([1, 2, 3, 4, 5], [1] * 5)
    assert packer.pending_rows() == 1 and packer.take().tokens.tolist() == [[1, 2, 3, 4]]
    packer.add([6], [1])
    last = packer.take(final=True)
    assert last.tokens.tolist() == [[5, 6, 0, 0]] and last.segments.tolist() == [[1, 2, 0, 0]]
    assert data.Packed.from_bytes(
        np.frombuffer(last.to_bytes(), np.uint8).reshape(1, -1), 4
    ).tokens.tolist() == [[5, 6, 0, 0]]
