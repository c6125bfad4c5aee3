"""The training loop: accumulation inside the step, loss falls, 1 process == 4 processes."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures_trainer import assert_all_exited_0, launch_trainer, wait_all
from trainer import train
from trainer.config import ModelConfig, load_recipe
from trainer.contract import EXIT_PEER_LOST

STEPS = 12
SHORT = [
    f"train.steps={STEPS}",
    "logging.every_steps=3",
    "eval.every_steps=12",
    "eval.batches=1",
    "optimizer.warmup_steps=2",
]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir) if "loss" in r]


def test_grad_accumulation_is_one_update_over_the_whole_batch(tiny_recipe, tmp_path):
    results = {}
    for accum in (1, 2):
        recipe = load_recipe(str(tiny_recipe), [f"run_dir={tmp_path}", f"train.grad_accum={accum}"])
        dataset = train.prepare_data(recipe, "train", shuffle=True)
        run = train.setup(recipe, dataset)
        batch = train.global_batch(dataset, 0, accum, run.batch_sharding)
        assert batch["tokens"].shape == (accum, 16 // accum, 128)
        state, stats = run.train_step(run.state, batch)
        results[accum] = (jax.device_get(stats), jax.device_get(state.params), int(state.step))
    (s1, p1, step1), (s4, p4, step4) = results[1], results[2]
    assert step1 == step4 == 1  # one optimizer update, however many micro-batches
    np.testing.assert_allclose(s1["loss"], s4["loss"], rtol=1e-5)
    np.testing.assert_allclose(s1["grad_norm"], s4["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_epochs_become_optimizer_steps_over_the_packed_cache(tiny_recipe, tmp_path):
    recipe = load_recipe(
        str(tiny_recipe), [f"run_dir={tmp_path}", "train.steps=null", "train.epochs=0.5"]
    )
    dataset = train.prepare_data(recipe, "train", shuffle=True)
    run = train.setup(recipe, dataset)
    assert run.total_steps == -(-dataset.reader.rows // 2 // 16) > 10


def test_one_process_and_four_processes_give_the_same_losses_and_loss_falls(tiny_recipe, tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    single = launch_trainer([str(tiny_recipe), f"run_dir={one}", *SHORT], 1, 8, tmp_path)
    ((code, output),) = wait_all(single, timeout=400)
    assert code == 0, output
    pod = launch_trainer([str(tiny_recipe), f"run_dir={four}", *SHORT], 4, 2, tmp_path)
    results = wait_all(pod, timeout=400)
    assert_all_exited_0(results)

    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in output
    assert (
        "step 12  loss" in results[0][1] and "step 12  loss" not in results[1][1]
    )  # only process 0 logs
    single_losses, pod_losses = losses(one), losses(four)
    assert len(single_losses) == STEPS // 3
    np.testing.assert_allclose(pod_losses, single_losses, rtol=2e-4)
    assert single_losses[-1] < single_losses[0] - 1.0  # it learns

    done = json.loads((four / "DONE").read_text())
    assert done["step"] == STEPS and done["final"]["eval_loss"] < single_losses[0]
    record = next(r for r in records(one) if "loss" in r)  # a step record
    assert {
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "step_time_s",
    } <= record.keys()
    assert 0 < record["mfu"] < 1 and record["step"] == 3


def test_a_pod_started_on_only_some_workers_fails_with_a_message(tiny_recipe, tmp_path):
    procs = launch_trainer(
        [str(tiny_recipe), f"run_dir={tmp_path}"], 2, 1, tmp_path, TPUCTL_INIT_TIMEOUT="3"
    )
    procs[1].kill()  # worker 1 never joins
    code, output = wait_all(procs[:1], timeout=120)[0]
    procs[1].wait()
    assert code == EXIT_PEER_LOST, output  # another process's failure: a relaunch may work
    assert "error: only 1 of 2 workers joined coordinator 127.0.0.1:" in output
    assert "start the run on every worker" in output and "Traceback" not in output
    assert not os.path.exists(tmp_path / "DONE")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=6", "not divisible by the data-parallel size"),
        ("mesh.data=3", "8 devices are not divisible by 3"),
    ],
)
def test_a_pod_the_recipe_does_not_fit_stops_before_the_token_cache_is_built(
    tiny_recipe, tmp_path, override, message
):
    """The README says so; both were found only after tokenising every dataset."""
    args = [str(tiny_recipe), f"run_dir={tmp_path / 'run'}", override]
    ((code, output),) = wait_all(launch_trainer(args, 1, 8, tmp_path), timeout=300)
    assert code == 2 and message in output, output
    assert "Traceback" not in output and not (tmp_path / "run" / "data_cache").exists()


def test_the_train_and_eval_data_summaries_say_which_split_they_are(tiny_recipe, tmp_path, capsys):
    """Both began "data: N documents, ...": which numbers were the eval set's was a guess."""
    recipe = load_recipe(str(tiny_recipe), [f"run_dir={tmp_path}"])
    for split in ("train", "eval"):
        train.prepare_data(recipe, split, shuffle=False)
    summaries = [line for line in capsys.readouterr().out.splitlines() if " documents, " in line]
    assert [line.split(": ")[0] for line in summaries] == ["data.train", "data.eval"]


def test_cache_build_progress_is_printed_and_reaches_metrics_once_a_minute(tmp_path, capsys):
    times = iter([0.0, 30.0, 61.0, 90.0, 122.0])  # the build starts at 0
    report = train.cache_progress(str(tmp_path), clock=lambda: next(times))
    for line in ("data: cache 1/9", "data: cache 2/9", "data: cache 3/9", "data: cache 4/9"):
        report(line)
    assert records(tmp_path) == [
        {"data_cache": "data: cache 2/9"},
        {"data_cache": "data: cache 4/9"},
    ]
    assert capsys.readouterr().out.count("data: cache ") == 4


def test_bf16_compute_with_fp32_master_weights_and_optimizer_state_is_the_default(
    tiny_recipe, tmp_path
):
    defaults = ModelConfig()
    assert (defaults.dtype, defaults.param_dtype) == ("bfloat16", "float32")
    recipe = load_recipe(str(tiny_recipe), [f"run_dir={tmp_path}", "train.grad_accum=1"])
    model = dataclasses.replace(
        recipe.model, dtype=defaults.dtype, param_dtype=defaults.param_dtype
    )
    recipe = dataclasses.replace(recipe, model=model)
    dataset = train.prepare_data(recipe, "train", shuffle=True)
    run = train.setup(recipe, dataset)
    state, stats = run.train_step(run.state, train.global_batch(dataset, 0, 1, run.batch_sharding))
    floats = [
        x.dtype
        for x in jax.tree_util.tree_leaves((state.params, state.opt_state))
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert floats and set(floats) == {jnp.dtype("float32")}
    assert np.isfinite(float(stats["loss"]))


def test_bf16_master_weights_keep_bf16_optimizer_state_from_step_to_step(tiny_recipe, tmp_path):
    """model.param_dtype bfloat16: optax follows the updates' dtype, which the fp32 loss
    denominator made fp32, so the first step returned fp32 moments and the second stopped
    with a TypeError (arguments of other types than the step was compiled for)."""
    recipe = load_recipe(
        str(tiny_recipe),
        [f"run_dir={tmp_path}", "train.grad_accum=1", "model.param_dtype=bfloat16"],
    )
    dataset = train.prepare_data(recipe, "train", shuffle=True)
    run = train.setup(recipe, dataset)
    state = run.state
    for step in range(2):
        state, stats = run.train_step(
            state, train.global_batch(dataset, step, 1, run.batch_sharding)
        )
    floats = {
        x.dtype
        for x in jax.tree_util.tree_leaves((state.params, state.opt_state))
        if jnp.issubdtype(x.dtype, jnp.floating)
    }
    assert floats == {jnp.dtype("bfloat16")}
    assert np.isfinite(float(stats["loss"]))


@pytest.mark.slow  # a whole tiny run
def test_a_logged_step_time_includes_the_step_itself_not_only_its_dispatch(tiny_recipe, tmp_path):
    """jax dispatches a step and returns at once: the loop's step time must end when the
    step's results are in, or it reports a fraction of the time a step takes."""
    overrides = [f"run_dir={tmp_path}", "train.steps=6", "logging.every_steps=1",
                 "eval.every_steps=0", "train.grad_accum=1"]  # fmt: skip
    recipe = load_recipe(str(tiny_recipe), overrides)
    assert train.train(recipe) == 0
    step_times = [r["step_time_s"] for r in records(tmp_path) if "step_time_s" in r]
    logged = float(np.median(step_times[1:]))
    dataset = train.prepare_data(recipe, "train", shuffle=True)
    run = train.setup(recipe, dataset)
    batch = train.global_batch(dataset, 0, 1, run.batch_sharding)
    step, state = run.train_step.lower(run.state, batch).compile(), run.state
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        state, _ = jax.block_until_ready(step(state, batch))  # the state is donated
        timings.append(time.perf_counter() - started)
    assert logged > 0.5 * float(np.median(timings)), (logged, timings)


def test_eval_reads_an_unweighted_eval_set_once_and_says_so(tiny_recipe, tmp_path, capsys):
    """eval.batches past the eval set's rows used to read them again, counting them twice."""
    recipe = load_recipe(str(tiny_recipe), [f"run_dir={tmp_path}", "eval.batches=1000"])
    eval_set = train.prepare_data(recipe, "eval", shuffle=False)
    batches = train.eval_batches(recipe, eval_set)
    assert batches == eval_set.epoch_rows() // recipe.train.batch_size < 1000
    rows = np.concatenate([eval_set.batch_rows(i) for i in range(batches)]).tolist()
    assert len(set(rows)) == len(rows)
    train._announce_eval_size(recipe, eval_set)
    assert f"eval reads {batches} batches, not eval.batches=1000" in capsys.readouterr().out


# An lr so large that the second update makes the parameters NaN: step 2's gradient norm is
# NaN (its loss, of step 1's finite parameters, is not yet).
DIVERGING = ["optimizer.lr=1e30", "optimizer.warmup_steps=0", "optimizer.schedule=constant"]


@pytest.mark.parametrize(
    "processes, logging_every",
    [
        (1, 4),  # found by the check before a save: step 2 is no logging step
        (2, 1),  # found where the step's metrics are logged, by every process
    ],
)
def test_a_run_that_diverges_stops_at_once_and_saves_nothing_after_its_last_finite_step(
    tiny_recipe, tmp_path, processes, logging_every
):
    """It trained on with NaN, saving NaN states every interval until `keep` had rotated
    every finite checkpoint away, and exited 0."""
    from trainer.checkpoint import load_params
    from trainer.contract import EXIT_DIVERGED

    run_dir = tmp_path / "run"
    args = [str(tiny_recipe), f"run_dir={run_dir}", "train.steps=8", "train.batch_size=8",
            "train.seq_len=64", "train.grad_accum=1", f"logging.every_steps={logging_every}",
            "eval.every_steps=0", "checkpoint.every_steps=1", "checkpoint.keep=1",
            *DIVERGING]  # fmt: skip
    results = wait_all(launch_trainer(args, processes, 8 // processes, tmp_path), timeout=300)
    line = (
        "error: grad_norm is nan at step 2: the run diverged; its newest checkpoint, step 1, "
        "is from before that, and nothing after it was saved: lower optimizer.lr (now 1e+30) "
        "or raise optimizer.warmup_steps (now 0) and run it again to resume from there"
    )
    for code, output in results:
        assert code == EXIT_DIVERGED, output
        lines = output.splitlines()
        assert lines[-1] == line and sum(x.startswith("error:") for x in lines) == 1, output
        assert "Traceback" not in output and "step 3 " not in output
    committed = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert committed == ["1"]
    _, params = load_params(str(run_dir / "checkpoints"))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(params))
    assert not (run_dir / "DONE").exists()
