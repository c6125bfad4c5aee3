"""Preference records -> (chosen, rejected) sequences: the TRL formats, the chat template rules
of data.format chat, the length rule, counted skips and one-line errors naming the record."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.fixtures_data import TOKENIZER, build, plan, settings, write_jsonl
from tests.fixtures_hf import train_tokenizer
from tests.fixtures_trainer import REPO, trainer_env
from trainer import cache, chat, data
from trainer.config import DataConfig, RecipeError, TokenizerConfig
from trainer.preference import Skipped, tokenize_pair
from trainer.tokenizer import Tokenizer, load_tokenizer

CFG = DataConfig(format="preference")
ROW = 256
PROMPT = [
    {"role": "system", "content": "You count."},
    {"role": "user", "content": "Count from one."},
    {"role": "assistant", "content": "one, two."},
    {"role": "user", "content": "Again, from three."},
]
CHOSEN = {"role": "assistant", "content": "three, four, five."}
REJECTED = {"role": "assistant", "content": "five, three, four."}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(TOKENIZER)


def learned(tok: Tokenizer, sequence: tuple[list[int], list[int]]) -> str:
    tokens, flags = sequence
    return tok.decode([t for t, f in zip(tokens, flags, strict=True) if f])


def test_string_pairs_share_the_prompt_and_learn_only_the_responses(tok):
    record = {"prompt": "Count up from two:", "chosen": " two, three.", "rejected": " three, two."}
    (chosen, rejected), _ = tokenize_pair(record, tok, CFG, ROW)
    prompt = [tok.sp.bos_id(), *tok.encode("Count up from two:")]
    assert chosen[0] == prompt + tok.encode(" two, three.") + [tok.sp.eos_id()]
    assert chosen[1] == [0] * len(prompt) + [1] * (len(chosen[0]) - len(prompt))
    assert rejected[0][: len(prompt)] == prompt and rejected[0][-1] == tok.sp.eos_id()
    assert learned(tok, rejected).startswith("three, two.")


def test_string_pairs_are_tokenised_whole_as_trls_dpo_does(tok, tmp_path):
    """Apart from the prompt, sentencepiece gave each response a word start of its own
    ("▁four" after "Response:\n", where TRL learns "four"), and a response ending in the EOS
    text got a second EOS."""
    import sentencepiece

    record = {"prompt": "### Response:\n", "chosen": "four", "rejected": "five"}
    sides, _ = tokenize_pair(record, tok, CFG, ROW)
    sp = sentencepiece.SentencePieceProcessor(model_file=TOKENIZER.path)  # TRL's tokenizer(text)
    for (tokens, flags), text in zip(sides, ("four", "five"), strict=True):
        assert tokens == [sp.bos_id(), *sp.encode(record["prompt"] + text), sp.eos_id()]
        assert learned(tok, (tokens[:-1], flags[:-1])) == text
    directory = train_tokenizer(tmp_path / "t", "bpe", "<|im_end|>", chat_template=None)
    ended = load_tokenizer(TokenizerConfig(path=str(directory)))
    record = {"prompt": "Q:", "chosen": " yes<|im_end|>", "rejected": " no"}
    for tokens, _ in tokenize_pair(record, ended, CFG, ROW)[0]:
        assert tokens.count(ended.eos_id) == 1 and tokens[-1] == ended.eos_id


@pytest.mark.parametrize("template", [None, "chatml"])
def test_conversations_render_as_chat_data_and_learn_only_the_final_turn(template, tmp_path):
    directory = train_tokenizer(tmp_path / "t", "bpe", "<|im_end|>", chat_template=None)
    tok = load_tokenizer(TokenizerConfig(path=str(directory)))
    cfg = DataConfig(format="preference", chat_template=template)
    whole = {"chosen": [*PROMPT, CHOSEN], "rejected": [*PROMPT, REJECTED]}
    (chosen, rejected), _ = tokenize_pair(whole, tok, cfg, ROW)
    as_chat, _ = data.tokenize({"messages": [*PROMPT, CHOSEN]}, tok, DataConfig(format="chat"))
    if template is None:
        assert chosen[0] == as_chat  # tulu, exactly what data.format chat renders
    source = chat.template_source(template, tok)
    assert chosen[0] == chat.tokenize_messages([*PROMPT, CHOSEN], tok, source)[0]
    end = "<|im_end|>"  # this tokenizer's EOS and ChatML's end of turn
    assert learned(tok, chosen) == CHOSEN["content"] + end  # not the earlier assistant turn
    assert learned(tok, rejected) == REJECTED["content"] + end
    # TRL's explicit-prompt form and UltraFeedback's (string prompt beside whole conversations)
    explicit = {"prompt": PROMPT, "chosen": [CHOSEN], "rejected": [REJECTED]}
    assert tokenize_pair(explicit, tok, cfg, ROW) == ((chosen, rejected), False)
    labelled = {**whole, "prompt": PROMPT[-1]["content"]}
    assert tokenize_pair(labelled, tok, cfg, ROW) == ((chosen, rejected), False)


def test_too_long_pairs_lose_prompt_from_the_start_then_response_from_the_end(tok):
    prompt = " ".join(f"word{i}" for i in range(60))
    record = {"prompt": prompt, "chosen": " one, two, three.", "rejected": " three, one."}
    (full_c, full_r), whole_cut = tokenize_pair(record, tok, CFG, 10_000)
    (chosen, rejected), cut = tokenize_pair(record, tok, CFG, 96)
    assert cut and not whole_cut  # the cache counts the pairs the rule cut
    assert len(chosen[0]) + len(rejected[0]) <= 96
    response_c = full_c[0][full_c[1].index(1) :]
    assert chosen[0][-len(response_c) :] == response_c  # responses whole
    kept = len(chosen[0]) - len(response_c)
    assert (
        kept >= 96 // 4
        and chosen[0][:kept] == full_c[0][full_c[1].index(1) - kept : full_c[1].index(1)]
    )
    assert learned(tok, rejected) == learned(tok, full_r)

    long_response = " " + " ".join(["seven"] * 60)
    record = {"prompt": prompt, "chosen": long_response, "rejected": " one."}
    (chosen, rejected), cut = tokenize_pair(record, tok, CFG, 96)
    assert cut and len(chosen[0]) + len(rejected[0]) == 96
    assert chosen[1].count(0) == 96 // 4 and learned(tok, rejected) == learned(
        tok, tokenize_pair(record, tok, CFG, 10_000)[0][1]
    )  # the short response whole, the long one cut at its end
    full = tokenize_pair(record, tok, CFG, 10_000)[0][0]
    assert chosen[0][96 // 4 :] == full[0][full[1].index(1) :][: len(chosen[0]) - 96 // 4]


def test_unusable_pairs_are_skipped_with_their_reason(tok):
    same = {"prompt": "Count:", "chosen": " one.", "rejected": " one."}
    with pytest.raises(Skipped) as skip:
        tokenize_pair(same, tok, CFG, ROW)
    assert skip.value.reason == "identical"
    long = {"prompt": "Count:", "chosen": " " + "nine " * 80, "rejected": " one."}
    with pytest.raises(Skipped) as skip:
        tokenize_pair(long, tok, CFG, 65)
    assert skip.value.reason == "too_long"
    # An empty response, whether or not EOS is added: with it the pair trained on EOS alone.
    bare = load_tokenizer(TokenizerConfig(path=TOKENIZER.path, add_eos=False))
    empty_chat = {"prompt": PROMPT, "chosen": [CHOSEN], "rejected": [{**REJECTED, "content": ""}]}
    for record, with_tok in [
        ({"prompt": "Count:", "chosen": "", "rejected": " one."}, bare),
        ({"prompt": "Count:", "chosen": "", "rejected": " one."}, tok),
        ({"prompt": "Count:", "chosen": " one.", "rejected": ""}, tok),
        (empty_chat, tok),
    ]:
        with pytest.raises(Skipped) as skip:
            tokenize_pair(record, with_tok, CFG, ROW)
        assert skip.value.reason == "empty", record


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "p", "chosen": "a"}, "the record has no 'rejected'; every record needs"),
        ({"prompt": "p", "chosen": "a", "rejected": [REJECTED]}, "both be strings or both"),
        ({"chosen": "a", "rejected": "b"}, "need a string 'prompt'"),
        (
            {"chosen": [*PROMPT, CHOSEN], "rejected": [*PROMPT[:-1], REJECTED]},
            "'chosen' and 'rejected' have different prompts",
        ),
        ({"chosen": [CHOSEN], "rejected": [REJECTED]}, "need 'prompt' as a list of messages"),
        # chosen was learned after its own first message, rejected after the prompt alone
        (
            {"prompt": PROMPT, "chosen": [REJECTED, CHOSEN], "rejected": [REJECTED]},
            "with 'prompt' messages, 'chosen' and 'rejected' are one assistant message each",
        ),
        ({"chosen": PROMPT, "rejected": [*PROMPT, REJECTED]}, "must end with an assistant"),
        (
            {"prompt": PROMPT[:1], "chosen": [*PROMPT, CHOSEN], "rejected": [*PROMPT, REJECTED]},
            "'prompt' differs from the turns",
        ),
    ],
)
def test_records_that_are_not_pairs_are_errors_that_say_the_fix(tok, record, message):
    with pytest.raises(RecipeError, match=message):
        tokenize_pair(record, tok, CFG, ROW)


def pairs(count: int) -> list[dict]:
    return [
        {
            "prompt": f"Count up from {i}:",
            "chosen": f" {i}, {i + 1}.",
            "rejected": f" {i + 1}, {i}.",
        }
        for i in range(count)
    ]


def test_the_cache_packs_whole_pairs_and_reports_skips_and_cuts_with_where_the_first_is(tmp_path):
    good = pairs(30)
    records = [*good[:5], {**good[5], "rejected": good[5]["chosen"]}, *good[6:]]
    records.insert(9, {"prompt": "x", "chosen": " " + "nine " * 80, "rejected": " one."})
    records.insert(12, {**good[12], "chosen": ""})
    long_prompt = " ".join(f"word{i}" for i in range(40))
    records[20:22] = [{**r, "prompt": long_prompt} for r in records[20:22]]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    reader = build(str(tmp_path / "cache"), [str(path)], seq_len=64, format="preference")
    rows = reader.read(np.arange(reader.rows))
    segments = rows.segments.astype(int)
    assert segments.max(axis=1).min() >= 2 and (segments.max(axis=1) % 2 == 0).all()
    assert int(sum(np.unique(s[s > 0]).size for s in segments)) == 2 * 29  # 29 pairs, none split
    (caches,) = [plan(str(tmp_path / "cache"), [str(path)], seq_len=64, format="preference")]
    line = cache.summary("data.train", caches, [cache.finalize(caches[0])])
    assert line.startswith("data.train: 29 documents")
    assert line.endswith(
        f"; skipped 1 with an empty response (first: {path}:13), "
        f"1 with chosen == rejected (first: {path}:6), "
        f"1 with a response longer than train.seq_len (first: {path}:10)"
        f"; cut to a row's length: 2 of {path} (first: {path}:21)"
    )
    # Every record skipped: the error blamed data.format and hid why.
    same = write_jsonl(tmp_path / "same.jsonl", [{**p, "rejected": p["chosen"]} for p in good])
    with pytest.raises(RecipeError, match=rf"data.train\[0\]: every record of {same} was "
                       rf"skipped: 30 with chosen == rejected \(first: {same}:1\)$"):  # fmt: skip
        build(str(tmp_path / "cache"), [str(same)], seq_len=64, format="preference")


def test_margins_go_with_their_pairs_through_the_cache_into_the_batch(tmp_path):
    """Each pair's `margin` (0 without one) is what the reward loss reads for that pair."""
    from trainer import reward

    records = [{**r, "margin": 0.25 * i - 1} if i % 3 else r for i, r in enumerate(pairs(20))]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    reader = build(str(tmp_path / "cache"), [str(path)], seq_len=64, format="preference")
    rows = reader.read(np.arange(reader.rows))
    assert rows.margins is not None and rows.margins.dtype == np.float32
    batch = data.batch_arrays(rows)
    margins = np.asarray(reward.pair_margins(batch))
    pairs_per_row = rows.segments.max(axis=1) // 2
    read = [m for row, n in zip(margins, pairs_per_row, strict=True) for m in row[:n]]
    assert read == [r.get("margin", 0.0) for r in records]  # float32-exact quarters


@pytest.mark.parametrize("margin", ["high", None, float("nan"), True])
def test_a_margin_that_is_not_a_number_stops_the_build(tmp_path, margin):
    records = [*pairs(2), {**pairs(1)[0], "margin": margin}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    caches = plan(str(tmp_path / "cache"), [str(path)], format="preference")
    with pytest.raises(RecipeError, match=rf"^{path}:3: .*'margin' must be a finite number"):
        cache.build(caches, settings(CFG, 33))


def test_a_bad_record_stops_the_build_with_its_file_and_line(tmp_path):
    records = [*pairs(3), {"prompt": "p", "chosen": " a."}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    caches = plan(str(tmp_path / "cache"), [str(path)], format="preference")
    with pytest.raises(RecipeError, match=rf"^{path}:4: data.format preference: the record has no"):
        cache.build(caches, settings(CFG, 33))


def test_the_trainer_stops_on_a_bad_record_with_one_line_and_exit_2(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [*pairs(2), {"prompt": "p", "rejected": " a."}])
    args = [str(REPO / "recipes" / "tiny-dpo.yaml"), f"run_dir={tmp_path / 'run'}",
            f"data.train=[{path}]", "data.eval=[]"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True,
                            text=True, env=trainer_env(2), timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(
        f"error: {path}:3: data.format preference: the record has no 'chosen'"
    )
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stdout + result.stderr
