"""Precomputed reference log-probabilities (`objective.reference: precompute`): one pass of the
starting weights over every row of a split, before the first step, instead of a frozen copy
of the weights in device memory and a second forward pass per step.

The pass writes `{run_dir}/reference_logps/{split}.npy`, [rows, 2, pairs] float32 (the
chosen and rejected log-probability of each pair slot of each packed row, in the split's
cache order) and a `.json` saying what it was computed from: the starting weights
(`model.init_from` or the seed, and the model config) and the cache shards. Later starts of the
run (resumes, babysit relaunches) read it back and never recompute it, so the reference never
drifts; one that no longer matches is a one-line error rather than a silent recompute.
"""

from __future__ import annotations

import dataclasses
import io as pyio
import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from trainer import data, dpo, io, sharding
from trainer.config import Recipe, TrainerError
from trainer.mixture import Mixture


def identity(recipe: Recipe, dataset: Mixture) -> dict[str, Any]:
    """What a split's reference log-probabilities depend on: the starting weights, and the
    cache shards by their cache key (inputs, tokenizer, template, seq_len) and name."""
    start = {"init_from": recipe.model.init_from} if recipe.model.init_from else {}
    return start | {
        "seed": recipe.train.seed,
        "model": dataclasses.asdict(recipe.model),
        "shards": ["/".join(p.rsplit("/", 2)[-2:]) for p in dataset.reader.paths],
        "rows": dataset.reader.rows,
    }


def prepare(run: Any, dataset: Mixture, split: str) -> np.ndarray:
    """The split's [rows, 2, pairs] reference log-probabilities: read back, or computed from
    `run.state.params` (the starting weights: call before restoring a checkpoint) and saved."""
    recipe = run.recipe
    path = io.join(recipe.run_dir, "reference_logps", f"{split}.npy")
    wanted = identity(recipe, dataset)
    is_main = jax.process_index() == 0
    if not io.exists(path + ".json"):
        values = compute(run, dataset)
        if is_main:
            buffer = pyio.BytesIO()
            np.save(buffer, values)
            io.write_bytes(path, buffer.getvalue())
            io.write_text(path + ".json", json.dumps(wanted, sort_keys=True))  # commits it
            print(f"trainer: reference log-probs of {split} computed into {path}", flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"reference logps {split}")
        return values
    if json.loads(io.read_text(path + ".json")) != wanted:
        raise TrainerError(
            f"{path} holds reference log-probs of other starting weights or data than this "
            "run's; resume with the recipe it was made with, or move it away to recompute"
        )
    if is_main:
        print(f"trainer: reference log-probs of {split} read from {path}", flush=True)
    return np.load(pyio.BytesIO(io.read_bytes(path)))


def compute(run: Any, dataset: Mixture) -> np.ndarray:
    """One forward pass of `run.state.params` over all of `dataset`'s rows, a micro-batch at a
    time over the run's mesh."""
    from trainer.model import Decoder

    recipe, reader = run.recipe, dataset.reader
    rows = recipe.train.batch_size // recipe.train.grad_accum
    batch_sharding = NamedSharding(run.mesh, P(sharding.BATCH_AXES, None))
    replicated = NamedSharding(run.mesh, P())
    apply = Decoder(recipe.model, mesh=run.mesh).apply
    logps = jax.jit(
        lambda params, batch: dpo.pair_logps(params, apply, batch)[:2],
        in_shardings=(run.state_shardings.params, batch_sharding),
        out_shardings=replicated,
    )
    chunks, widest = [], 1
    for start in range(0, reader.rows, rows):
        picked = np.arange(start, start + rows) % reader.rows  # the last chunk wraps round
        arrays = data.batch_arrays(reader.read(picked))
        batch = {
            name: jax.make_array_from_callback(value.shape, batch_sharding, lambda i, v=value: v[i])
            for name, value in arrays.items()
        }
        chosen, rejected = jax.device_get(logps(run.state.params, batch))
        pairs = max(1, int(arrays["segment_ids"].max()) // 2)
        widest = max(widest, pairs)
        keep = min(rows, reader.rows - start)
        chunks.append(np.stack([chosen[:keep, :pairs], rejected[:keep, :pairs]], axis=1))
    padded = [np.pad(c, ((0, 0), (0, 0), (0, widest - c.shape[2]))) for c in chunks]
    return np.concatenate(padded).astype(np.float32)
