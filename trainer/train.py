"""The training loop: one jitted step per optimizer update, sharded over the recipe's mesh.

Gradient accumulation is a `lax.scan` over micro-batches inside the step, so `step` always
counts optimizer updates and the schedule never sees micro-steps. The loss is a sum over the
objective's units (target tokens for `lm`, preference pairs for `dpo`) divided by their count in
the whole (accumulated, packed) batch. An objective is a function of (params, apply_fn, batch,
*frozen) -> (loss_sum, sums) where sums holds "count" and the sums of its metrics; `frozen` is
what it reads but never trains (DPO's reference weights), passed to the jitted step sharded like
the parameters: swap the objective without touching the loop.
Nothing forces a host sync per step: metrics are fetched only on logging steps, and before a
save (which waits for the step anyway). There the step's loss and gradient norm must be
finite: a run that diverged ends with EXIT_DIVERGED before any state of that step is saved.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from trainer import (
    cache,
    data,
    distributed,
    dpo,
    generation,
    io,
    metrics,
    preemption,
    reference,
    resume,
    reward,
    run_lock,
    sharding,
)
from trainer.checkpoint import Checkpointer
from trainer.config import (
    ObjectiveConfig,
    Recipe,
    RecipeError,
    TrainerError,
    check_batch_divisible,
    mesh_shape,
)
from trainer.contract import (
    DONE_PENDING,
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    EXIT_STALLED,
)
from trainer.mixture import Mixture
from trainer.model import Decoder, attention_path, backend_platform, count_params, init_params
from trainer.optim import make_optimizer
from trainer.tokenizer import load_tokenizer
from trainer.tracing import StepTrace
from trainer.watchdog import Watchdog


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs; the data position is `step` itself."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def lm_loss(
    params, apply_fn: Callable, batch: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy summed over weighted targets, and the number of targets."""
    logits = apply_fn({"params": params}, batch["tokens"], batch["segment_ids"])
    per_token = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["targets"]
    )
    return jnp.sum(per_token * batch["weights"]), {"count": jnp.sum(batch["weights"])}


def make_objective(cfg: ObjectiveConfig) -> Callable:
    """The loss function `objective.name` selects, with its settings bound."""
    if cfg.name == "dpo":
        return functools.partial(dpo.dpo_loss, cfg=cfg)
    return reward.reward_loss if cfg.name == "reward" else lm_loss


def accumulate(
    objective: Callable, params, apply_fn: Callable, batch, frozen: tuple = ()
) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
    """(summed gradients, summed loss, summed "count" and metrics) over the leading micro-batch
    axis of `batch`."""
    grad_fn = jax.value_and_grad(lambda p, mb: objective(p, apply_fn, mb, *frozen), has_aux=True)
    micro_batches = next(iter(batch.values())).shape[0]
    if micro_batches == 1:
        (loss, sums), grads = grad_fn(params, jax.tree_util.tree_map(lambda x: x[0], batch))
        return grads, loss, sums

    def body(carry, micro_batch):
        grads_sum, loss_sum, sums_sum = carry
        (loss, sums), grads = grad_fn(params, micro_batch)
        grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, grads)
        return (grads_sum, loss_sum + loss, jax.tree_util.tree_map(jnp.add, sums_sum, sums)), None

    first = jax.tree_util.tree_map(lambda x: x[0], batch)
    sums_shape = jax.eval_shape(lambda: objective(params, apply_fn, first, *frozen)[1])
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    no_sums = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape)
    (grads, loss, sums), _ = jax.lax.scan(body, (zeros, jnp.float32(0), no_sums), batch)
    return grads, loss, sums


def make_train_step(
    apply_fn: Callable, optimizer: optax.GradientTransformation, schedule, objective: Callable
):
    def train_step(state: TrainState, batch, *frozen):
        grads, loss_sum, sums = accumulate(objective, state.params, apply_fn, batch, frozen)
        denominator = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denominator, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        # optax's moments follow the gradients' dtype, fp32 after the division above: kept in
        # the state's own (bf16 under model.param_dtype bfloat16), the step's outputs stay the
        # types it was compiled for.
        opt_state = jax.tree_util.tree_map(
            lambda new, old: new.astype(old.dtype), opt_state, state.opt_state
        )
        params = optax.apply_updates(state.params, updates)
        stats = {
            "loss": loss_sum / denominator,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "count": sums["count"],
            **{name: value / denominator for name, value in sums.items() if name != "count"},
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), stats

    return train_step


def make_eval_step(apply_fn: Callable, objective: Callable):
    def eval_step(params, batch, *frozen):
        def body(carry, micro_batch):
            loss, sums = objective(params, apply_fn, micro_batch, *frozen)
            return (carry[0] + loss, jax.tree_util.tree_map(jnp.add, carry[1], sums)), None

        first = jax.tree_util.tree_map(lambda x: x[0], batch)
        sums_shape = jax.eval_shape(lambda: objective(params, apply_fn, first, *frozen)[1])
        no_sums = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape)
        (loss, sums), _ = jax.lax.scan(body, (jnp.float32(0), no_sums), batch)
        return loss, sums

    return eval_step


def global_batch(
    dataset: Mixture, step: int, grad_accum: int, batch_sharding, ref_logps=None
) -> dict[str, jax.Array]:
    """Global batch `step` as sharded arrays [grad_accum, micro, seq]; this process reads only the
    rows its devices hold. With `ref_logps` ([rows, 2, pairs], trainer.reference) the batch also
    carries the rows' precomputed `ref_chosen` / `ref_rejected` [grad_accum, micro, pairs]."""
    rows = dataset.batch_rows(step).reshape(grad_accum, -1)
    shape = (*rows.shape, dataset.reader.row_len - 1)
    local: dict[tuple, dict[str, np.ndarray]] = {}
    for index in batch_sharding.addressable_devices_indices_map(shape).values():
        key = _index_key(index)
        if key not in local:
            picked = rows[index[0], index[1]]
            arrays = data.batch_arrays(dataset.reader.read(picked.reshape(-1)))
            if ref_logps is not None:
                arrays["ref_chosen"] = ref_logps[picked.reshape(-1), 0]
                arrays["ref_rejected"] = ref_logps[picked.reshape(-1), 1]
            local[key] = {k: v.reshape(*picked.shape, -1) for k, v in arrays.items()}
    fields = next(iter(local.values()))
    return {
        name: jax.make_array_from_callback(
            (*rows.shape, value.shape[-1]),
            batch_sharding,
            lambda i, n=name: local[_index_key(i)][n],
        )
        for name, value in fields.items()
    }


def _index_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop) for s in index[:2])


@dataclass
class Run:
    """The pieces of a run that the loop, eval and the benchmark share."""

    recipe: Recipe
    mesh: jax.sharding.Mesh
    state: TrainState
    state_shardings: Any
    batch_sharding: Any
    train_step: Callable  # (state, batch, *frozen) -> (state, stats)
    eval_step: Callable  # (params, batch, *frozen) -> (loss sum, sums)
    total_steps: int
    flops_per_step: float
    frozen: tuple = ()  # dpo: (the reference weights,), sharded like the parameters


def check_fits_devices(recipe: Recipe) -> None:
    """The attention path, mesh and batch against this process's devices: one-line recipe
    errors, before a run spends anything on weights or its token cache."""
    attention_path(recipe.model, backend_platform(), recipe.train.seq_len)
    check_batch_divisible(recipe.train, mesh_shape(recipe.mesh, jax.device_count()))


def setup(recipe: Recipe, train_set: Mixture | None, init_params_from: Any = None) -> Run:
    """Mesh, sharded initial state (fresh or from `init_params_from`) and compiled-on-demand steps."""
    check_fits_devices(recipe)  # before tracing; model.init_from may have changed the model
    mesh = sharding.make_mesh(recipe.mesh)
    total_steps = recipe.train.steps or train_set.steps_for(recipe.train.epochs)
    optimizer, schedule = make_optimizer(recipe.optimizer, total_steps)
    head = "score" if recipe.objective.name == "reward" else "lm"
    model = Decoder(recipe.model, head, mesh)

    def fresh_state(rng):
        init_rng, state_rng = jax.random.split(rng)
        params = init_params(recipe.model, init_rng, head=head)
        return TrainState(jnp.int32(0), params, optimizer.init(params), state_rng)

    rng = jax.random.key(recipe.train.seed)
    abstract = jax.eval_shape(fresh_state, rng)
    if init_params_from is not None:
        _check_head(set(init_params_from), set(abstract.params), head)
    specs = sharding.state_specs(abstract, mesh)
    state_shardings = sharding.named(mesh, specs)
    state = jax.jit(fresh_state, out_shardings=state_shardings)(rng)
    if init_params_from is not None:
        init_params_from = _with_head(init_params_from, state.params, head)
        params = jax.tree_util.tree_map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i, x=x: x[i]),
            init_params_from,
            state_shardings.params,
        )
        state = jax.jit(lambda st, p: st.replace(params=p, opt_state=optimizer.init(p)),
                        out_shardings=state_shardings, donate_argnums=0)(state, params)  # fmt: skip
    batch_sharding = sharding.batch_sharding(mesh)
    objective = make_objective(recipe.objective)
    # DPO's reference policy: the starting weights (fresh or model.init_from, rebuilt the same
    # at every start, so a resumed run compares against the same reference), copied before the
    # state is donated to the first step.
    frozen, frozen_shardings = (), ()
    if recipe.objective.uses_reference and recipe.objective.reference == "frozen":
        copy = jax.jit(
            lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=state_shardings.params
        )
        frozen, frozen_shardings = (copy(state.params),), (state_shardings.params,)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    train_step = jax.jit(
        make_train_step(model.apply, optimizer, schedule, objective),
        in_shardings=(state_shardings, batch_sharding, *frozen_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(model.apply, objective),
        in_shardings=(state_shardings.params, batch_sharding, *frozen_shardings),
        out_shardings=replicated,
    )
    tokens_per_step = recipe.train.batch_size * recipe.train.seq_len
    flops = metrics.flops_per_token(recipe.model, recipe.train.seq_len) * tokens_per_step
    return Run(
        recipe,
        mesh,
        state,
        state_shardings,
        batch_sharding,
        train_step,
        eval_step,
        total_steps,
        flops,
        frozen,
    )


def _check_head(loaded: set[str], wanted: set[str], head: str) -> None:
    """Refuse model.init_from weights that `_with_head` cannot turn into `wanted`."""
    if head == "score" and "score" not in loaded:
        loaded = (loaded - {"lm_head"}) | {"score"}
    if loaded != wanted:
        raise RecipeError(
            f"model.init_from: its weights have {', '.join(sorted(loaded))} where this "
            f"objective needs {', '.join(sorted(wanted))}; start an lm or dpo run from a causal "
            "LM directory (a reward model's score head cannot generate)"
        )


def _with_head(loaded: dict, fresh: dict, head: str) -> dict:
    """`loaded` (numpy, from model.init_from) with the head `head` needs: a reward model
    trained from a causal LM gets a fresh score head in place of its LM head."""
    if head == "score" and "score" not in loaded:
        loaded = {k: v for k, v in loaded.items() if k != "lm_head"}
        loaded["score"] = jax.device_get(fresh["score"])
    return loaded


def prepare_data(
    recipe: Recipe, split: str, shuffle: bool, progress: Callable[[str], None] | None = None
) -> Mixture:
    """The split's batches, from caches that every process helps build (see
    cache.build_on_pod); process 0 reports the build's progress (default: prints it) and
    prints its summary."""
    entries = getattr(recipe.data, split)
    where = f"data.{split}"
    row_len = recipe.train.seq_len + 1
    key = data.tokenizer_key(recipe.tokenizer, recipe.data)
    caches = cache.plan(entries, where, recipe.data_cache_dir, key, recipe.data, row_len)
    settings = cache.Settings(
        tokenizer=functools.partial(load_tokenizer, recipe.tokenizer),
        tokenizer_key=key,
        data=recipe.data,
        row_len=row_len,
        memory_mb=recipe.data.cache_memory_mb,
        owner=recipe.run_dir,
    )
    is_main = jax.process_index() == 0
    cache.build_on_pod(
        caches,
        settings,
        (jax.process_index(), jax.process_count()),
        lambda name: multihost_utils.sync_global_devices(f"data cache {split} {name}"),
        workers=recipe.data.cache_workers or os.cpu_count() or 1,
        log=(progress or functools.partial(print, flush=True)) if is_main else None,
    )
    readers = cache.open_all(caches, row_len, where)
    if is_main:
        print(cache.summary(where, caches, [cache.finalize(c) for c in caches]), flush=True)
    batch_size, seed = recipe.train.batch_size, recipe.train.seed
    return Mixture(readers, entries, batch_size, seed, shuffle=shuffle)


def eval_batches(recipe: Recipe, eval_set: Mixture) -> int:
    """`eval.batches`, but at most one pass over an unweighted eval set: more batches would
    read its rows again and count them twice (a weighted mixture repeats rows by design)."""
    if eval_set.weighted:
        return recipe.eval.batches
    return max(1, min(recipe.eval.batches, eval_set.epoch_rows() // recipe.train.batch_size))


def evaluate(run: Run, eval_set: Mixture, ref_logps=None) -> dict[str, float]:
    """Held-out loss over `eval_batches` batches: with perplexity for lm, with TRL's
    eval_rewards/* and eval_logps/* for dpo (`ref_logps`: the split's precomputed ones)."""
    loss_sum, totals = 0.0, {}
    for i in range(eval_batches(run.recipe, eval_set)):
        batch = global_batch(
            eval_set, i, run.recipe.train.grad_accum, run.batch_sharding, ref_logps
        )
        loss, sums = jax.device_get(run.eval_step(run.state.params, batch, *run.frozen))
        loss_sum += float(loss)
        totals = {name: totals.get(name, 0.0) + float(value) for name, value in sums.items()}
    count = max(totals.pop("count"), 1.0)
    result = {"eval_loss": loss_sum / count}
    if run.recipe.objective.name == "lm":
        result["eval_perplexity"] = math.exp(min(result["eval_loss"], 50.0))
    return result | {f"eval_{name}": value / count for name, value in totals.items()}


def load_initial_params(recipe: Recipe) -> tuple[Recipe, Any]:
    """With `model.init_from`, the model config and numpy params of that HF checkpoint."""
    if not recipe.model.init_from:
        return recipe, None
    from dataclasses import replace

    from trainer.hf import load_hf_dir

    model_cfg, params = load_hf_dir(recipe.model.init_from, recipe.model)
    return replace(recipe, model=replace(model_cfg, init_from=recipe.model.init_from)), params


def check_tokenizer(recipe: Recipe) -> None:
    """Refuse a tokenizer with ids past the model's embeddings."""
    vocab = load_tokenizer(recipe.tokenizer).vocab_size
    if vocab <= recipe.model.vocab_size:
        return
    if recipe.model.init_from:  # its config.json sets vocab_size, whatever the recipe says
        raise RecipeError(
            f"tokenizer.path: {recipe.tokenizer.path} has {vocab} pieces, more than the "
            f"{recipe.model.vocab_size} embeddings of model.init_from {recipe.model.init_from}; "
            "use the model's own tokenizer (the trainer does not resize a checkpoint's embeddings)"
        )
    raise RecipeError(
        f"model.vocab_size ({recipe.model.vocab_size}) is smaller than the tokenizer's {vocab} pieces; raise it"
    )


CACHE_PROGRESS_RECORD_S = 60.0


def cache_progress(
    run_dir: str, clock: Callable[[], float] = time.monotonic
) -> Callable[[str], None]:
    """Print the cache build's progress lines and record one in metrics.jsonl at most once a
    minute (`{"data_cache": line}`, no step), so babysit sees a long build making progress
    rather than a hang. A build shorter than a minute records nothing: metrics.jsonl then
    holds step records only, as readers of a short run expect."""
    sink = metrics.MetricsLog(run_dir)
    last_record = clock()

    def report(line: str) -> None:
        nonlocal last_record
        print(line, flush=True)
        now = clock()
        if now - last_record >= CACHE_PROGRESS_RECORD_S:
            sink.write({"data_cache": line})
            last_record = now

    return report


@dataclass
class Feed:
    """What the loop feeds the steps: each split's mixture and, with a precomputed DPO
    reference, each split's reference log-probs (trainer.reference)."""

    train: Mixture
    eval: Mixture | None
    references: dict[str, Any]

    def batch(self, run: Run, step: int) -> dict[str, jax.Array]:
        """The training batch of `step`."""
        grad_accum = run.recipe.train.grad_accum
        return global_batch(
            self.train, step, grad_accum, run.batch_sharding, self.references["train"]
        )


def train(recipe: Recipe) -> int:
    """Run the recipe to completion, resuming from its newest checkpoint; returns the exit status
    (0, or EXIT_PREEMPTED when SIGTERM stopped it after a committed save); raises Diverged
    (EXIT_DIVERGED) at a step whose loss or gradient norm is not finite. Process 0 holds the
    run directory throughout (trainer.run_lock): a second trainer on it, or one that cannot
    write it (read-only), ends every process of its own pod with one line and status 2,
    before it writes anything there; so does a run_dir that some process of a multi-process
    run does not see (`distributed.check_shared_run_dir`); and one whose gs:// lease another
    trainer took over, at once, mid-run."""
    held = (
        run_lock.hold(recipe.run_dir, recipe.run_id, _end_taken_over)
        if jax.process_index() == 0
        else contextlib.nullcontext()
    )
    try:
        with held:
            distributed.check_shared_run_dir(recipe.run_dir)  # before anything is written there
            return _train(recipe)
    except run_lock.RunDirUnusable as e:
        distributed.fail_everywhere(str(e), 2)


def _end_taken_over(message: str) -> None:
    """What process 0 does when another trainer took its gs:// run directory's lease over:
    end every process of the run now, before they save over that trainer's checkpoints, with
    the status of a run directory found in use (no relaunch can have it back)."""
    distributed.fail_everywhere(message, EXIT_BAD_INPUT)


def _train(recipe: Recipe) -> int:
    started = time.time()
    is_main = jax.process_index() == 0
    check_fits_devices(recipe)
    recipe, hf_params = load_initial_params(recipe)
    check_tokenizer(recipe)
    generation_info = generation.record(recipe)  # its errors before the token cache's build
    progress = cache_progress(recipe.run_dir) if is_main else None
    train_set = prepare_data(recipe, "train", shuffle=True, progress=progress)
    eval_set = (
        prepare_data(recipe, "eval", shuffle=False, progress=progress) if recipe.data.eval else None
    )
    if is_main and eval_set is not None:
        _announce_eval_size(recipe, eval_set)
    run = setup(recipe, train_set, hf_params)
    feed = Feed(train_set, eval_set, reference_logps(run, train_set, eval_set))
    checkpointer = open_checkpointer(run, generation_info)
    peak = announce(run)
    step = int(jax.device_get(run.state.step))
    if step >= run.total_steps:  # the same on every process: all stop here together
        checkpointer.close()
        if is_main:
            print(f"trainer: run already finished at step {step} in {recipe.run_dir}: nothing "
                  "to train (raise train.steps to go on)", flush=True)  # fmt: skip
            _confirm_done(recipe, step, started)
        return 0
    if is_main and io.exists(_done_path(recipe)):  # a finished run that goes on (more steps)
        io.remove(_done_path(recipe))  # until it ends again, it has not finished
        print(f"trainer: going on from step {step} to {run.total_steps}: the run's DONE "
              "record is removed until it finishes", flush=True)  # fmt: skip
    log = (
        metrics.MetricsLog(
            recipe.run_dir, recipe.logging.wandb_project, recipe.logging.tensorboard, recipe.run_id
        )
        if is_main
        else None
    )
    # Past the loop too: the final save, its commit and DONE can hang as an iteration can
    # (a commit waiting for files another process wrote where this one does not see them).
    watchdog = Watchdog(recipe.train.stall_timeout_s, _end_stalled(recipe.train.stall_timeout_s))
    try:  # however the run ends (a crash included), the watchdog goes with it
        step, last, preempted = train_loop(run, feed, step, checkpointer, log, peak, watchdog)
        return _end(run, checkpointer, step, last, preempted, started)
    finally:
        watchdog.stop()


def _end(
    run: Run,
    checkpointer: Checkpointer,
    step: int,
    last: dict[str, Any],
    preempted: bool,
    started: float,
) -> int:
    """End a run whose loop stopped at `step`: save the final state (unless a SIGTERM's stop
    saved it), wait until it commits, and write DONE (process 0); the exit status."""
    if preempted and step < run.total_steps:
        checkpointer.close()
        print(f"trainer: stopped on SIGTERM at step {step}, checkpoint committed", flush=True)
        return EXIT_PREEMPTED
    if not preempted:  # a stop at the last step has saved it already: the run is done
        checkpointer.save(run.state)  # the final state, whatever the save interval
    checkpointer.close()
    if jax.process_index() == 0:
        _write_done(run.recipe, step, last, started)
    else:
        print(f"trainer: {_process()} finished at step {step}", flush=True)
    return 0


def reference_logps(run: Run, train_set: Mixture, eval_set: Mixture | None) -> dict[str, Any]:
    """Each split's precomputed reference log-probs, for `objective.reference: precompute`;
    None otherwise. Computed from the starting weights, so before a checkpoint replaces
    them, and read back on resume."""
    objective = run.recipe.objective
    if not (objective.uses_reference and objective.reference == "precompute"):
        return {"train": None, "eval": None}
    return {
        "train": reference.prepare(run, train_set, "train"),
        "eval": reference.prepare(run, eval_set, "eval") if eval_set else None,
    }


def open_checkpointer(run: Run, generation_info: dict) -> Checkpointer:
    """The run's Checkpointer, with `run.state` restored from its newest checkpoint if any;
    `generation_info` (trainer.generation.record) is recorded with the model for export."""
    recipe = run.recipe
    checkpointer = Checkpointer(
        io.join(recipe.run_dir, resume.CHECKPOINTS_DIR),
        recipe.checkpoint,
        model=recipe.model,  # recorded for `python -m trainer.export`
        tokenizer_path=recipe.tokenizer.path,
        objective=recipe.objective.name,
        generation=generation_info,
        settings=resume.resume_settings(recipe),  # what a resume is told it changed
    )
    restored = checkpointer.restore(jax.tree_util.tree_map(_abstract, run.state))
    if restored is not None:
        run.state = restored
    return checkpointer


def announce(run: Run) -> float:
    """Print what this process runs; returns the peak FLOP/s MFU is measured against (0 on
    processes other than 0: MFU is process 0's to log, and a CPU's peak is measured)."""
    if jax.process_index() != 0:  # one line: each worker's log (and `tpuctl ps`) says where it is
        print(f"trainer: {_process()}, {jax.local_device_count()} devices; process 0 logs the run",
              flush=True)  # fmt: skip
        return 0.0
    machines = distributed.machine_count()
    peak, peak_source = metrics.hardware_peak(jax.devices(), run.recipe.model.dtype, machines)
    n_params = count_params(run.state.params)
    print(f"trainer: {n_params / 1e6:.1f}M params, mesh {dict(run.mesh.shape)}, {run.total_steps} steps, "
          f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source})", flush=True)  # fmt: skip
    print(f"trainer: Python {sys.version.split()[0]} ({sys.executable}), jax {jax.__version__}",
          flush=True)  # fmt: skip
    return peak


def train_loop(
    run: Run,
    feed: Feed,
    step: int,
    checkpointer: Checkpointer,
    log: metrics.MetricsLog | None,
    peak: float,
    watchdog: Watchdog,
) -> tuple[int, dict[str, Any], bool]:
    """Train from `step` to the run's last step, logging, evaluating and saving as the
    recipe says: (the step it stopped at, that step's record, whether SIGTERM stopped it
    after a committed save). The profile trace covers this loop; `watchdog` (the stall
    watchdog, which the caller stops) starts once the step is compiled.
    Raises Diverged, saving nothing more, at the first checked step (logged, or due to be
    saved) whose loss or gradient norm is not finite."""
    recipe = run.recipe
    last: dict[str, Any] = {}
    batch = feed.batch(run, step)
    # compiled before the loop: keep compile time out of step times
    compiled = run.train_step.lower(run.state, batch, *run.frozen).compile()
    is_main = jax.process_index() == 0
    trace = StepTrace(recipe.run_dir, recipe.train.profile_steps if is_main else [])
    watchdog.start()
    preemption.started()  # a SIGTERM from now on saves the step it stops at
    interval_start, interval_steps = time.perf_counter(), 0
    while step < run.total_steps:
        trace.at_step(step, run.state)
        run.state, stats = compiled(run.state, batch, *run.frozen)
        step += 1
        interval_steps += 1
        if step < run.total_steps:  # read the next batch while the devices work on this one
            batch = feed.batch(run, step)
        if step % recipe.logging.every_steps == 0 or step == run.total_steps:
            stats = jax.device_get(stats)  # first: a step's time ends when its results are in
            elapsed = time.perf_counter() - interval_start
            last = _step_record(step, stats, elapsed / interval_steps, run, peak)
            if log is not None:
                log.write(last)
                print(metrics.progress_line(last), flush=True)
            interval_start, interval_steps = time.perf_counter(), 0
            stop_if_diverged(run, stats, step, checkpointer)
        if _evaluates_at(run, feed, step):
            result = {"step": step, **evaluate(run, feed.eval, feed.references["eval"])}
            last.update(result)
            if log is not None:
                log.write(result)
                print(metrics.eval_line(result), flush=True)
            interval_start = time.perf_counter()
        # Host step: no wait on the devices, unless a save (which waits for the step
        # anyway) is due; then first the step's loss must be finite.
        finite = functools.partial(stop_if_diverged, run, stats, step, checkpointer)
        if checkpointer.maybe_save(run.state, step, before_save=finite):
            return step, last, True
        watchdog.progress(f"step {step}")
    trace.at_step(step, run.state, done=True)
    return step, last, False


class Diverged(TrainerError):
    """A step's loss or gradient norm is not finite: the run stops before saving its state."""

    status = EXIT_DIVERGED


def stop_if_diverged(run: Run, stats: dict, step: int, checkpointer: Checkpointer) -> None:
    """Raise Diverged when the loss or gradient norm of `step` (its `stats`, fetched from
    the devices here unless they are already) is not finite, once the pending save of an
    earlier step has committed and the checkpointer is closed: no state of this step or
    after it is saved, so the run's newest checkpoint stays one a finite step made. The
    stats are the same on every process, so every process raises at the same step."""
    values = jax.device_get({name: stats[name] for name in ("loss", "grad_norm")})
    bad = [(name, float(value)) for name, value in values.items() if not math.isfinite(value)]
    if not bad:
        return
    name, value = bad[0]
    checkpointer.wait_until_committed()
    newest = checkpointer.latest_step
    checkpointer.close()
    optimizer = run.recipe.optimizer
    advice = (
        f"lower optimizer.lr (now {optimizer.lr:g}) or raise optimizer.warmup_steps (now "
        f"{optimizer.warmup_steps})"
    )
    if newest is None:
        raise Diverged(f"{name} is {value} at step {step}: the run diverged, and no checkpoint "
                       f"was saved before it; {advice} and start it again")  # fmt: skip
    raise Diverged(
        f"{name} is {value} at step {step}: the run diverged; its newest checkpoint, step "
        f"{newest}, is from before that, and nothing after it was saved: {advice} and run it "
        "again to resume from there"
    )


def _evaluates_at(run: Run, feed: Feed, step: int) -> bool:
    every = run.recipe.eval.every_steps
    return bool(feed.eval and every and (step % every == 0 or step == run.total_steps))


def _end_stalled(timeout_s: float) -> Callable[[str, float], None]:
    """What the watchdog does when this process's loop stalls: show where every thread
    waits, then end every process of the run with one line."""

    def end(last: str, idle_s: float) -> None:
        distributed.show_stacks(f"{_process()}: no progress for {idle_s:.0f} s since {last}")
        distributed.fail_everywhere(
            f"training stalled on process {jax.process_index()}: no progress for "
            f"{idle_s:.0f} s since {last} (train.stall_timeout_s={timeout_s:g}; raise it if an "
            "iteration can take that long)",
            EXIT_STALLED,
            stacks=True,
        )

    return end


def _announce_eval_size(recipe: Recipe, eval_set: Mixture) -> None:
    """Say when eval reads fewer batches than eval.batches (or rows twice), and why."""
    rows, batch = eval_set.epoch_rows(), recipe.train.batch_size
    batches = eval_batches(recipe, eval_set)
    if rows < batch and not eval_set.weighted:
        print(f"trainer: data.eval has {rows} rows, fewer than one batch of {batch}: eval "
              "counts some of them twice", flush=True)  # fmt: skip
    elif batches < recipe.eval.batches:
        print(f"trainer: eval reads {batches} batches, not eval.batches={recipe.eval.batches}: "
              f"data.eval has {rows} rows, one pass", flush=True)  # fmt: skip


def _process() -> str:
    return f"process {jax.process_index()} of {jax.process_count()}"


def _done_path(recipe: Recipe) -> str:
    return io.join(recipe.run_dir, "DONE")


def _confirm_done(recipe: Recipe, step: int, started: float) -> None:
    """A finished run started again keeps its DONE record: written if it stopped between its
    last save and DONE, and without the mark of a launch pending (DONE_PENDING, which `tpuctl
    run` adds when it cannot tell whether the launch goes on)."""
    path = _done_path(recipe)
    if not io.exists(path):
        _write_done(recipe, step, {}, started)
        return
    try:
        done = json.loads(io.read_text(path))
    except ValueError:  # not the trainer's record (cut short, edited): left as it is
        return
    if isinstance(done, dict) and DONE_PENDING in done:
        del done[DONE_PENDING]
        io.write_text(path, json.dumps(done) + "\n")


def _write_done(recipe: Recipe, step: int, last: dict[str, Any], started: float) -> None:
    """The run's DONE record: its final step and metrics, written once, when it finishes."""
    done = {"step": step, "final": last, "wall_time_s": time.time() - started}
    io.write_text(_done_path(recipe), json.dumps(done) + "\n")


def _abstract(x: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _step_record(step: int, stats: dict, step_time: float, run: Run, peak: float) -> dict[str, Any]:
    recipe, flops_per_step = run.recipe, run.flops_per_step
    tokens_per_s = recipe.train.batch_size * recipe.train.seq_len / step_time
    record = {
        "step": step,
        "loss": float(stats["loss"]),
        "lr": float(stats["lr"]),
        "grad_norm": float(stats["grad_norm"]),
        "tokens_per_s": tokens_per_s,
        "mfu": flops_per_step / step_time / peak if peak else 0.0,
        "step_time_s": step_time,
    }
    pair_metrics = metrics.PAIR_METRICS.get(recipe.objective.name, ())
    if pair_metrics:  # the step's pairs and TRL's metrics, averaged over them
        record["pairs"] = int(stats["count"])
        record |= {name: float(stats[name]) for name in pair_metrics}
    return record
