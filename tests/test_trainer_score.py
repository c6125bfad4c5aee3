"""trainer.score: a reward model's scores of a jsonl file, from its run directory or its export,
equal what transformers' AutoModelForSequenceClassification scores on the same examples
(tokenised by transformers' AutoTokenizer as the trainer renders them); bad input is one line
and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_data import TOKENIZER
from tests.fixtures_hf import hf_model, hf_state, save_run, train_tokenizer
from tests.fixtures_preference import CFG, RECORDS
from trainer import score as scoring
from trainer.config import DataConfig, RecipeError
from trainer.hf import params_from_hf
from trainer.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = [
    *RECORDS[:3],  # preference pairs: both sequences scored
    {"prompt": "café, 東京", "completion": " naïve"},
    {"text": "line 7: the quick brown fox"},
    {"prompt": "def add(a, b):", "chosen": "\n    return a + b", "rejected": " pass", "margin": 1},
    *RECORDS[3:],
]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory) -> Path:
    """A reward model's run directory (one checkpoint of "trained" weights) and its export."""
    import jax

    from trainer.export import export

    root = tmp_path_factory.mktemp("score")
    tokenizer = train_tokenizer(root / "tok", "bpe")
    params = params_from_hf(hf_state(hf_model(CFG, seed=3, score=True)), CFG)
    rng = np.random.default_rng(0)  # not the weights transformers initialised
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.05, p.shape).astype(p.dtype), params)
    save_run(str(root / "run"), CFG, params, tokenizer=str(tokenizer / "tokenizer.json"))
    export(str(root / "run"), str(root / "export"))
    return root


def score(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.score", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip


def transformers_scores(export_dir: Path, record: dict) -> dict[str, float]:
    """The example's sequences as the trainer renders them (BOS + prompt, then response + EOS;
    each part tokenised alone), scored one at a time by the exported directory in transformers."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForSequenceClassification.from_pretrained(export_dir).eval()

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    bos, eos = [tok.bos_token_id], [tok.eos_token_id]
    if "chosen" in record:
        prompt = bos + ids(record["prompt"])
        named = {n: prompt + ids(record[n]) + eos for n in ("chosen", "rejected")}
    elif "completion" in record:
        named = {"score": bos + ids(record["prompt"]) + ids(record["completion"]) + eos}
    else:
        named = {"score": bos + ids(record["text"]) + eos}
    with torch.no_grad():
        return {n: model(torch.tensor([t])).logits[0, 0].item() for n, t in named.items()}


def test_scores_from_the_run_and_its_export_equal_transformers(reward_run, tmp_path):
    data = tmp_path / "examples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES))
    out = tmp_path / "scores.jsonl"
    result = score(reward_run / "run", data, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"scored {len(EXAMPLES)} examples into {out}\n"
    from_run = [json.loads(line) for line in out.read_text().splitlines()]
    result = score(reward_run / "export", data)  # to standard output
    assert result.returncode == 0, result.stderr
    from_export = [json.loads(line) for line in result.stdout.splitlines()]

    assert len(from_run) == len(from_export) == len(EXAMPLES)
    for record, ours, exported in zip(EXAMPLES, from_run, from_export, strict=True):
        theirs = transformers_scores(reward_run / "export", record)
        assert set(ours) == set(theirs) == set(exported)
        for name, value in theirs.items():
            assert ours[name] == pytest.approx(value, abs=1e-4), (record, name)
            assert exported[name] == pytest.approx(value, abs=1e-4), (record, name)
    distinct = {round(v, 3) for s in from_run for v in s.values()}
    assert len(distinct) > len(EXAMPLES)  # real scores, not a constant


def test_bad_input_is_one_line_and_exit_2(reward_run, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(RECORDS[0]) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(RECORDS[0]) + "\n" + json.dumps({"chosen": " a", "rejected": " b"}) + "\n"
    )
    long = tmp_path / "long.jsonl"  # each side too long; the pair used to be cut to fit
    long.write_text(json.dumps({"prompt": "def f(): " * 200, "chosen": " a", "rejected": " b"}))
    lm_run = tmp_path / "lm"
    save_run(str(lm_run), CFG, params_from_hf(hf_state(hf_model(CFG, seed=0)), CFG))
    cases = [
        ((reward_run / "run", tmp_path / "missing.jsonl"), "error: DATA: "),
        ((reward_run / "run", bad), f"error: {bad}:2: data.format preference: string "),
        ((tmp_path, good), f"error: {tmp_path}: neither a run directory"),
        ((lm_run, good), f"error: {lm_run} is a language model, not a reward model"),
        ((reward_run / "run", good, "--step", "99"), "error: --step 99: no committed checkpoint"),
        ((reward_run / "run", long), f"error: {long}:1: chosen: "),
        ((reward_run / "run", good, "--out", tmp_path), f"error: --out {tmp_path}: "),
    ]
    for args, message in cases:
        result = score(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(message), result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_tie_and_an_empty_response_are_scored_not_refused(reward_run, tmp_path):
    """Preference sets hold ties (UltraFeedback does); training skips them, scoring does not."""
    data = tmp_path / "ties.jsonl"
    records = [
        {"prompt": "Say hi.", "chosen": " hi", "rejected": " hi"},
        {"prompt": "Say hi.", "chosen": " hi", "rejected": ""},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = score(reward_run / "export", data)
    assert result.returncode == 0, result.stderr
    tie, empty = [json.loads(line) for line in result.stdout.splitlines()]
    assert tie["chosen"] == tie["rejected"]
    theirs = transformers_scores(reward_run / "export", records[1])
    assert empty == pytest.approx(theirs, abs=1e-4)


@pytest.mark.parametrize("missing", ["chosen", "rejected"])
def test_half_a_pair_is_refused_naming_the_missing_side(missing):
    """It was read as a prompt_completion record (it has a prompt) and refused as one."""
    record = {key: value for key, value in RECORDS[0].items() if key != missing}
    message = (f"^data.format preference: the record has no '{missing}'; every record needs "
               "'chosen' and 'rejected'")  # fmt: skip
    with pytest.raises(RecipeError, match=message):
        scoring.sequences(record, load_tokenizer(TOKENIZER), DataConfig(), CFG.max_seq_len)
