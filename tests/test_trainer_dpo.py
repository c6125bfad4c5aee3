"""DPO against TRL: on the same weights and token ids, our loss and rewards/* / logps/* metrics
over packed rows equal what TRL's DPOTrainer computes (its own forward pass through
transformers, unpacked) for sigmoid, ipo, hinge and label smoothing, and TRL's CPOTrainer for
the reference-free SimPO; the first train step of a run from an HF directory matches too; gradient accumulation and 4 processes change nothing;
tiny-dpo learns. (Kill and resume: tests/test_trainer_resume.py.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures_hf import hf_model, hf_state, train_tokenizer
from tests.fixtures_preference import CFG, RECORDS
from tests.fixtures_trainer import REPO, assert_all_exited_0, launch_trainer, wait_all
from trainer import data, dpo, train
from trainer.config import DataConfig, ObjectiveConfig, TokenizerConfig, load_recipe
from trainer.hf import params_from_hf
from trainer.metrics import PREFERENCE_METRICS
from trainer.model import Decoder
from trainer.preference import tokenize_pair
from trainer.tokenizer import load_tokenizer

TINY_DPO = REPO / "recipes" / "tiny-dpo.yaml"
# (our objective, TRL's loss_type): TRL 1.x's sigmoid has no label smoothing; its `aot` loss
# on a batch of one pair (the sort over the batch is then the identity) is exactly the
# label-smoothed sigmoid, so smoothing is compared one pair at a time.
CASES = {
    "sigmoid": (ObjectiveConfig(name="dpo", beta=0.1), "sigmoid"),
    "ipo": (ObjectiveConfig(name="dpo", beta=0.5, loss="ipo"), "ipo"),
    "hinge": (ObjectiveConfig(name="dpo", beta=0.2, loss="hinge"), "hinge"),
    "label-smoothing": (ObjectiveConfig(name="dpo", beta=0.1, label_smoothing=0.2), "aot"),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok"), "bpe")


def trl_metrics(pairs, policy, reference, loss_type: str, cfg: ObjectiveConfig, tokenizer_dir):
    """Loss and metrics of TRL's DPOTrainer on `pairs` [(chosen, rejected) (tokens, flags)],
    as one unpacked, right-padded batch (chosen rows first, as TRL's collator lays them out)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    processing = AutoTokenizer.from_pretrained(tokenizer_dir)
    processing.pad_token = processing.eos_token
    args = DPOConfig(
        output_dir=str(tokenizer_dir / "trl"),
        beta=cfg.beta,
        loss_type=[loss_type],
        label_smoothing=cfg.label_smoothing,
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    unused = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=unused,
        processing_class=processing,
    )  # fmt: skip
    trainer.model.train()
    sequences = [c for c, _ in pairs] + [r for _, r in pairs]
    width = max(len(tokens) for tokens, _ in sequences)

    def padded(rows):
        return torch.tensor([row + [0] * (width - len(row)) for row in rows])

    inputs = {
        "input_ids": padded([tokens for tokens, _ in sequences]),
        "attention_mask": padded([[1] * len(tokens) for tokens, _ in sequences]),
        "completion_mask": padded([flags for _, flags in sequences]),
    }
    with torch.no_grad():
        loss = float(trainer._compute_loss(trainer.model, inputs, False))
    return {"loss": loss} | {m: trainer._metrics["train"][m][-1] for m in PREFERENCE_METRICS}


def trl_reference(pairs, policy, reference, loss_type, cfg, tokenizer_dir) -> dict[str, float]:
    if loss_type != "aot":
        return trl_metrics(pairs, policy, reference, loss_type, cfg, tokenizer_dir)
    each = [trl_metrics([p], policy, reference, loss_type, cfg, tokenizer_dir) for p in pairs]
    return {key: float(np.mean([m[key] for m in each])) for key in each[0]}


def our_metrics(params, reference, batch, cfg: ObjectiveConfig) -> dict[str, float]:
    apply = Decoder(CFG).apply
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, sums = dpo.dpo_loss(params, apply, arrays, reference, cfg=cfg)
    count = float(sums["count"])
    return {"loss": float(loss) / count} | {m: float(sums[m]) / count for m in PREFERENCE_METRICS}


@pytest.mark.parametrize("case", CASES)
def test_loss_and_metrics_over_packed_pairs_equal_trl(case, tokenizer_dir):
    cfg, loss_type = CASES[case]
    tok = load_tokenizer(TokenizerConfig(path=str(tokenizer_dir)))
    pairs = [tokenize_pair(r, tok, DataConfig(format="preference"), 65)[0] for r in RECORDS]
    packed = _pack_pairs(pairs, 65)
    assert len(packed.tokens) < len(pairs)  # several pairs share a row
    policy, reference = hf_model(CFG, seed=0), hf_model(CFG, seed=1)
    params = params_from_hf(hf_state(policy), CFG)
    ref_params = params_from_hf(hf_state(reference), CFG)
    ours = our_metrics(params, ref_params, data.batch_arrays(packed), cfg)
    theirs = trl_reference(pairs, policy, reference, loss_type, cfg, tokenizer_dir)
    assert 0 < theirs["rewards/accuracies"] < 1 and abs(theirs["rewards/margins"]) > 1e-3
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key


def trl_simpo_metrics(pairs, policy, cfg: ObjectiveConfig, tokenizer_dir) -> dict[str, float]:
    """Loss and metrics of TRL's SimPO: in TRL 1.x it is CPOTrainer's `loss_type="simpo"` with
    `cpo_alpha=0` (trl.experimental.cpo; DPOTrainer has no simpo), given `pairs` as its
    collator lays them out: chosen and rejected right-padded, labels -100 off the response."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    processing = AutoTokenizer.from_pretrained(tokenizer_dir)
    processing.pad_token = processing.eos_token
    args = CPOConfig(
        output_dir=str(tokenizer_dir / "trl-cpo"),
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=cfg.beta,
        simpo_gamma=cfg.gamma,
        label_smoothing=cfg.label_smoothing,
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    unused = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = CPOTrainer(model=policy, args=args, train_dataset=unused,
                         processing_class=processing)  # fmt: skip
    trainer.model.train()
    width = max(len(tokens) for pair in pairs for tokens, _ in pair)
    batch = {}
    for side, index in (("chosen", 0), ("rejected", 1)):
        sequences = [pair[index] for pair in pairs]
        batch[f"{side}_input_ids"] = torch.tensor(
            [t + [0] * (width - len(t)) for t, _ in sequences]
        )
        batch[f"{side}_attention_mask"] = torch.tensor(
            [[1] * len(t) + [0] * (width - len(t)) for t, _ in sequences]
        )
        batch[f"{side}_labels"] = torch.tensor(
            [[t if f else -100 for t, f in zip(tokens, flags, strict=True)]
             + [-100] * (width - len(tokens)) for tokens, flags in sequences]
        )  # fmt: skip
    with torch.no_grad():
        loss, theirs = trainer.get_batch_loss_metrics(trainer.model, batch)
    return {"loss": float(loss)} | {m: theirs[m] for m in PREFERENCE_METRICS}


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_simpo_over_packed_pairs_equals_trl_and_needs_no_reference(smoothing, tokenizer_dir):
    cfg = ObjectiveConfig(name="dpo", loss="simpo", beta=2.0, gamma=0.3, label_smoothing=smoothing)
    tok = load_tokenizer(TokenizerConfig(path=str(tokenizer_dir)))
    pairs = [tokenize_pair(r, tok, DataConfig(format="preference"), 65)[0] for r in RECORDS]
    packed = _pack_pairs(pairs, 65)
    assert len(packed.tokens) < len(pairs)  # several pairs share a row
    policy = hf_model(CFG, seed=0)
    params = params_from_hf(hf_state(policy), CFG)
    batch = data.batch_arrays(packed)
    assert "ref_chosen" not in batch
    ours = our_metrics(params, None, batch, cfg)  # neither reference weights nor log-probs
    theirs = trl_simpo_metrics(pairs, policy, cfg, tokenizer_dir)
    assert 0 < theirs["rewards/accuracies"] < 1 and abs(theirs["rewards/margins"]) > 1e-3
    assert theirs["logps/chosen"] > -10  # per-token means, as TRL logs them for simpo
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key


def test_a_simpo_run_builds_no_reference(tmp_path):
    """No frozen copy of the weights and no precompute pass: the step runs on the policy alone."""
    overrides = [f"run_dir={tmp_path}", "objective.loss=simpo", "objective.beta=2.0",
                 "train.steps=2"]  # fmt: skip
    recipe = load_recipe(str(TINY_DPO), overrides)
    assert not recipe.objective.uses_reference
    dataset = train.prepare_data(recipe, "train", shuffle=True)
    run = train.setup(recipe, dataset)
    assert run.frozen == ()
    batch = train.global_batch(dataset, 0, 1, run.batch_sharding)
    _, stats = run.train_step(run.state, batch, *run.frozen)
    stats = jax.device_get(stats)
    assert float(stats["count"]) >= 8 and np.isfinite(float(stats["loss"]))
    assert not (tmp_path / "reference_logps").exists()


def _pack_pairs(pairs, row_len: int) -> data.Packed:
    packer = data.Packer(row_len, split_documents=False)
    for pair in pairs:
        packer.add_together(list(pair))
    return packer.take(final=True)


def test_the_first_train_step_from_an_hf_directory_equals_trl(tokenizer_dir, tmp_path):
    """Policy and frozen reference both start from the directory's weights: the step's loss
    and metrics over the batch's pairs equal TRL's, and the reference stays the start."""
    source = tmp_path / "hf"
    policy = hf_model(CFG, seed=0)
    policy.save_pretrained(source, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((tokenizer_dir / name).read_bytes())
    overrides = [f"run_dir={tmp_path / 'run'}", f"model.init_from={source}", "model.preset=null",
                 "tokenizer.path=", "optimizer.warmup_steps=0"]  # fmt: skip
    recipe, hf_params = train.load_initial_params(load_recipe(str(TINY_DPO), overrides))
    dataset = train.prepare_data(recipe, "train", shuffle=True)
    run = train.setup(recipe, dataset, hf_params)
    batch = train.global_batch(dataset, 0, 1, run.batch_sharding)
    state, stats = run.train_step(run.state, batch, *run.frozen)
    stats = jax.device_get(stats)

    packed = dataset.reader.read(dataset.batch_rows(0))
    pairs = []
    for tokens, segments, flags in zip(packed.tokens, packed.segments, packed.flags, strict=True):
        for chosen in range(1, int(segments.max()), 2):
            pairs.append(tuple(
                (tokens[segments == s].tolist(), flags[segments == s].tolist())
                for s in (chosen, chosen + 1)
            ))  # fmt: skip
    assert int(stats["count"]) == len(pairs) >= 8
    theirs = trl_metrics(pairs, policy, hf_model(CFG, seed=0), "sigmoid", recipe.objective,
                         tokenizer_dir)  # fmt: skip
    assert theirs["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference
    # With policy == reference every reward is 0 up to float rounding between the two forward
    # passes (fused differently by XLA), so the strict chosen > rejected of rewards/accuracies
    # is a coin flip on that noise here; the test above compares it on distinct weights.
    assert abs(float(stats["rewards/margins"])) < 1e-5
    for key, value in theirs.items():
        if key != "rewards/accuracies":
            assert float(stats[key]) == pytest.approx(value, abs=1e-4), key

    start = jax.tree_util.tree_leaves(hf_params)
    for frozen, initial in zip(jax.tree_util.tree_leaves(run.frozen), start, strict=True):
        np.testing.assert_array_equal(np.asarray(frozen), initial)  # not donated, not trained
    _, second = run.train_step(state, train.global_batch(dataset, 1, 1, run.batch_sharding),
                               *run.frozen)  # fmt: skip
    assert abs(float(second["rewards/margins"])) > 0  # the policy has moved off the reference


@pytest.mark.slow
def test_tiny_dpo_recipe_raises_reward_accuracy_above_0_9(tmp_path):
    run = tmp_path / "run"
    ((code, output),) = wait_all(launch_trainer([str(TINY_DPO), f"run_dir={run}"], 1, 2, tmp_path),
                                 timeout=400)  # fmt: skip
    assert code == 0, output[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 8 and all(r["pairs"] >= 8 for r in steps)
    assert steps[0]["rewards/accuracies"] < 0.9 <= min(r["rewards/accuracies"] for r in steps[-3:])
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]
    (evaluation,) = [r for r in records if "eval_loss" in r]
    assert evaluation["eval_rewards/accuracies"] > 0.9 and "eval_perplexity" not in evaluation
    assert "rewards/accuracies 1.0000" in output and "eval step 40  loss" in output


@pytest.mark.slow
def test_grad_accumulation_averages_over_the_pairs_of_the_whole_batch(tmp_path):
    results = {}
    for accum in (1, 2):
        overrides = [f"run_dir={tmp_path}", "train.batch_size=16", f"train.grad_accum={accum}"]
        recipe = load_recipe(str(TINY_DPO), overrides)
        dataset = train.prepare_data(recipe, "train", shuffle=True)
        run = train.setup(recipe, dataset)
        batch = train.global_batch(dataset, 0, accum, run.batch_sharding)
        state, _ = run.train_step(run.state, batch, *run.frozen)  # moves off the reference
        batch = train.global_batch(dataset, 1, accum, run.batch_sharding)
        state, stats = run.train_step(state, batch, *run.frozen)
        results[accum] = jax.device_get((stats, state.params))
    (one, params_one), (two, params_two) = results[1], results[2]
    assert one["count"] == two["count"] >= 8
    for key in ("loss", "grad_norm", *PREFERENCE_METRICS):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-6, err_msg=key)
    leaves = zip(jax.tree_util.tree_leaves(params_one), jax.tree_util.tree_leaves(params_two),
                 strict=True)  # fmt: skip
    for a, b in leaves:
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_four_processes_equal_one_on_dpo_loss_and_rewards(tmp_path):
    short = ["train.steps=10", "logging.every_steps=5", "eval.every_steps=0"]
    one, four = tmp_path / "one", tmp_path / "four"
    ((code, output),) = wait_all(
        launch_trainer([str(TINY_DPO), f"run_dir={one}", *short], 1, 8, tmp_path), timeout=400
    )
    assert code == 0, output[-3000:]
    pod = launch_trainer([str(TINY_DPO), f"run_dir={four}", *short], 4, 2, tmp_path)
    results = wait_all(pod, timeout=400)
    assert_all_exited_0(results)
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in output

    def steps(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "loss" in r]

    single, pod_steps = steps(one), steps(four)
    assert [r["pairs"] for r in pod_steps] == [r["pairs"] for r in single]
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose([r[key] for r in pod_steps], [r[key] for r in single],
                                   rtol=2e-4, atol=1e-5, err_msg=key)  # fmt: skip


@pytest.mark.slow
def test_precomputed_reference_logps_train_as_the_frozen_copy_and_never_drift(tmp_path):
    from trainer import reference
    from trainer.config import TrainerError

    results = {}
    for kind in ("frozen", "precompute"):
        overrides = [f"run_dir={tmp_path / kind}", f"data.cache_dir={tmp_path / 'cache'}",
                     f"objective.reference={kind}"]  # fmt: skip
        recipe = load_recipe(str(TINY_DPO), overrides)
        dataset = train.prepare_data(recipe, "train", shuffle=True)
        run = train.setup(recipe, dataset)
        ref_logps = reference.prepare(run, dataset, "train") if kind == "precompute" else None
        state = run.state
        for step in range(3):  # past the first step, where policy and reference coincide
            batch = train.global_batch(dataset, step, 1, run.batch_sharding, ref_logps)
            state, stats = run.train_step(state, batch, *run.frozen)
        results[kind] = jax.device_get(stats)
    assert run.frozen == ()  # precompute holds no copy of the weights
    assert ref_logps.shape[:2] == (dataset.reader.rows, 2)
    frozen, precomputed = results["frozen"], results["precompute"]
    assert abs(frozen["rewards/margins"]) > 1e-3
    for key in ("loss", "grad_norm", *PREFERENCE_METRICS):
        np.testing.assert_allclose(precomputed[key], frozen[key], rtol=1e-4, atol=1e-5, err_msg=key)

    # A later start reads them back (even with trained weights in the state), never recomputes.
    stored = tmp_path / "precompute" / "reference_logps" / "train.npy"
    written = stored.stat().st_mtime_ns
    run.state = state
    np.testing.assert_array_equal(reference.prepare(run, dataset, "train"), ref_logps)
    assert stored.stat().st_mtime_ns == written
    other = dataclasses.replace(
        run, recipe=load_recipe(str(TINY_DPO), [*overrides, "train.seed=1"])
    )
    with pytest.raises(TrainerError, match="holds reference log-probs of other starting weights"):
        reference.prepare(other, dataset, "train")
    # Other data with as many rows (chosen and rejected swapped): read back before, silently.
    pairs = [
        json.loads(line) for line in Path(recipe.data.train[0].path[0]).read_text().splitlines()
    ]
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("".join(json.dumps(p | {"chosen": p["rejected"], "rejected": p["chosen"]})
                               + "\n" for p in pairs))  # fmt: skip
    moved = load_recipe(str(TINY_DPO), [*overrides, f"data.train=[{swapped}]"])
    other_data = train.prepare_data(moved, "train", shuffle=True)
    assert other_data.reader.rows == dataset.reader.rows
    with pytest.raises(TrainerError, match="holds reference log-probs of other starting weights"):
        reference.prepare(dataclasses.replace(run, recipe=moved), other_data, "train")


@pytest.mark.slow
def test_tpuctl_run_of_tiny_dpo_on_a_local_pod_finishes(tmp_path):
    """The recipe as shipped (its batch of 8 rows fits a v4-16's 2 workers x 4 devices), one
    jax.distributed job over both workers, through to `run ... finished` and an eval."""
    from local_cli import LocalCli

    cli = LocalCli(tmp_path, timeout=600)
    cli.ok("up", "v4-16", "--local", "--name", "dpo")
    try:
        run_dir = tmp_path / "run"
        out = cli.ok("run", str(TINY_DPO), "--name", "dpo", "--all-workers", "--follow",
                     "--run-id", "tiny-dpo", "--", f"run_dir={run_dir}", "train.steps=10",
                     "eval.every_steps=10")  # fmt: skip
    finally:
        cli("down", "dpo", "--yes")
    assert "x 1 machine(s) of 2 process(es)" in out and "rewards/accuracies" in out
    assert "run tiny-dpo finished: step 10, final loss " in out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [r for r in records if "eval_loss" in r]
    assert evaluation["step"] == 10 and "eval_rewards/accuracies" in evaluation
