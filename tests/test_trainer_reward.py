"""Reward models against transformers and TRL: our score head on the last token of each
sequence equals LlamaForSequenceClassification's score, and our Bradley-Terry loss and
accuracy / margin / mean_reward over packed pairs equal TRL's RewardTrainer on the same pairs;
a run starts from a causal LM directory with a fresh score head; tiny-reward learns."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures_hf import hf_model, hf_state, train_tokenizer
from tests.fixtures_preference import CFG, RECORDS
from tests.fixtures_trainer import REPO, launch_trainer, wait_all
from trainer import data, reward, train
from trainer.config import DataConfig, RecipeError, TokenizerConfig, load_recipe
from trainer.hf import params_from_hf, params_to_hf
from trainer.metrics import REWARD_METRICS
from trainer.model import Decoder
from trainer.preference import margin, tokenize_pair
from trainer.tokenizer import load_tokenizer

TINY_REWARD = REPO / "recipes" / "tiny-reward.yaml"
PAD = "<|im_start|>"  # a special token no record uses: transformers scores the last non-pad


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"), "bpe")


@pytest.mark.parametrize("margins", [None, [0.5, 0.0, 2.0, -1.0, 1.25]])
def test_loss_and_metrics_over_packed_pairs_equal_trl_reward_trainer(tokenizer_dir, margins):
    """With `margin` fields too: TRL's loss is then -log sigmoid(chosen - rejected - margin)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = load_tokenizer(TokenizerConfig(path=str(tokenizer_dir)))
    records = (
        [r | {"margin": m} for r, m in zip(RECORDS, margins, strict=True)] if margins else RECORDS
    )
    pairs = [tokenize_pair(r, tok, DataConfig(format="preference"), 64)[0] for r in records]
    packer = data.packer(DataConfig(format="preference"), 65)
    for record, pair in zip(records, pairs, strict=True):
        packer.add_together(list(pair), margin(record))
    packed = packer.take(final=True)
    assert len(packed.tokens) < len(pairs)  # several pairs share a row
    model = hf_model(CFG, seed=0, score=True)
    params = params_from_hf(hf_state(model), CFG)
    assert set(params) == {"embed", "layers", "norm", "score"}
    batch = {k: jnp.asarray(v) for k, v in data.batch_arrays(packed).items()}
    loss, sums = reward.reward_loss(params, Decoder(CFG, "score").apply, batch)
    count = float(sums["count"])
    ours = {"loss": float(loss) / count} | {m: float(sums[m]) / count for m in REWARD_METRICS}

    processing = AutoTokenizer.from_pretrained(tokenizer_dir)
    processing.pad_token = PAD
    args = RewardConfig(output_dir=str(tokenizer_dir / "trl"), report_to="none", use_cpu=True,
                        bf16=False)  # fmt: skip
    unused = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = RewardTrainer(model=model, args=args, train_dataset=unused,
                            processing_class=processing)  # fmt: skip
    trainer.model.train()
    sequences = [c for c, _ in pairs] + [r for _, r in pairs]  # chosen first, as TRL collates
    width = max(len(tokens) for tokens, _ in sequences)
    pad_id = processing.pad_token_id
    inputs = {
        "input_ids": torch.tensor([t + [pad_id] * (width - len(t)) for t, _ in sequences]),
        "attention_mask": torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t, _ in sequences]),
    }  # fmt: skip
    if margins:
        inputs["margin"] = torch.tensor(margins)
    with torch.no_grad():
        theirs = {"loss": float(trainer.compute_loss(trainer.model, inputs))}
    theirs |= {m: trainer._metrics["train"][m][-1] for m in REWARD_METRICS}
    assert 0 < theirs["accuracy"] < 1
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key

    # and the score of each sequence alone is transformers' sequence classification score
    tokens = np.array([sequences[0][0]])
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits[0, 0].item()
    scores = Decoder(CFG, "score").apply({"params": params}, jnp.asarray(tokens))
    assert float(scores[0, -1]) == pytest.approx(expected, abs=1e-4)
    assert sorted(params_to_hf(params, CFG)) == sorted(hf_state(model))  # no lm_head: a score


def test_a_reward_run_from_a_causal_lm_gets_a_fresh_score_head(tokenizer_dir, tmp_path):
    source = tmp_path / "hf"
    hf_model(CFG, seed=0).save_pretrained(source, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((tokenizer_dir / name).read_bytes())
    overrides = [f"run_dir={tmp_path / 'run'}", f"model.init_from={source}", "model.preset=null",
                 "tokenizer.path="]  # fmt: skip
    recipe, hf_params = train.load_initial_params(load_recipe(str(TINY_REWARD), overrides))
    assert "lm_head" in hf_params
    dataset = train.prepare_data(recipe, "train", shuffle=True)
    run = train.setup(recipe, dataset, hf_params)
    params = jax.device_get(run.state.params)
    assert set(params) == {"embed", "layers", "norm", "score"}
    np.testing.assert_array_equal(params["embed"]["embedding"], hf_params["embed"]["embedding"])
    assert params["score"]["kernel"].shape == (CFG.dim, 1)
    _, stats = run.train_step(run.state, train.global_batch(dataset, 0, 1, run.batch_sharding))
    assert float(stats["count"]) >= 8 and 0 < float(stats["loss"]) < 5

    dpo_recipe, _ = train.load_initial_params(
        load_recipe(str(REPO / "recipes" / "tiny-dpo.yaml"), overrides)
    )
    with pytest.raises(RecipeError, match="a reward model's score head cannot generate"):
        train.setup(dpo_recipe, dataset, params)  # a reward model's weights


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective.beta=0.5"], "objective.beta applies to objective dpo only"),
        (["objective.loss=ipo"], "objective.loss applies to objective dpo only"),
        (["data.format=chat"], "dpo and reward train on preference pairs"),
    ],
)
def test_dpo_settings_and_other_formats_are_refused_for_reward(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(TINY_REWARD), overrides)


def test_tiny_reward_recipe_reaches_held_out_accuracy_above_0_9(tmp_path):
    run = tmp_path / "run"
    args = [str(TINY_REWARD), f"run_dir={run}"]
    ((code, output),) = wait_all(launch_trainer(args, 1, 2, tmp_path), timeout=400)
    assert code == 0, output[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[0]["accuracy"] < 0.9 and steps[-1]["loss"] < steps[0]["loss"]
    (evaluation,) = [r for r in records if "eval_loss" in r]
    assert evaluation["eval_accuracy"] > 0.9 and "eval_perplexity" not in evaluation
    assert "eval step 40  loss" in output and "  accuracy " in output
