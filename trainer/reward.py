"""Reward modelling on packed preference rows: a scalar head scores the final token of each
sequence, and the Bradley-Terry loss -log sigmoid(score chosen - score rejected - margin) is
averaged over pairs, as TRL's RewardTrainer computes it (margin: the pair's optional `margin`
field, carried in the batch's `margins`; 0 without one).

Rows come from trainer.preference as for DPO (the k-th pair of a row: chosen on segment
2k - 1, rejected on 2k) and never fill their last slot, so a sequence's final token is always
a model input. Metrics carry the names RewardTrainer logs: `accuracy` (share of pairs scored
the right way round), `margin` (mean chosen - rejected score) and `mean_reward`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from trainer.dpo import pair_sums


def pair_scores(
    params, apply_fn: Callable, batch: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chosen scores, rejected scores, 1 where the slot holds a pair), each [rows, pairs]."""
    segments_BxL = batch["segment_ids"]
    scores_BxL = apply_fn({"params": params}, batch["tokens"], segments_BxL).astype(jnp.float32)
    last_BxL = final_tokens(segments_BxL)
    chosen_BxP, rejected_BxP = pair_sums(scores_BxL * last_BxL, segments_BxL)
    has_chosen_BxP, has_rejected_BxP = pair_sums(last_BxL, segments_BxL)
    return chosen_BxP, rejected_BxP, has_chosen_BxP * has_rejected_BxP


def pair_margins(batch: dict[str, jax.Array]) -> jax.Array | float:
    """Each pair's data margin, [rows, pairs], read at its chosen sequence's final token (rows
    packed without the margins column have none: 0)."""
    if "margins" not in batch:
        return 0.0
    segments_BxL = batch["segment_ids"]
    return pair_sums(batch["margins"] * final_tokens(segments_BxL), segments_BxL)[0]


def final_tokens(segments_BxL: jax.Array) -> jax.Array:
    """1.0 at the final token of each sequence (segment), else 0."""
    following_BxL = jnp.pad(segments_BxL[:, 1:], ((0, 0), (0, 1)))
    return ((segments_BxL != following_BxL) & (segments_BxL > 0)).astype(jnp.float32)


def reward_loss(
    params, apply_fn: Callable, batch: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Bradley-Terry loss summed over the batch's pairs, and sums of the pair count
    ("count") and of metrics.REWARD_METRICS."""
    chosen, rejected, valid = pair_scores(params, apply_fn, batch)
    margin = chosen - rejected
    losses = -jax.nn.log_sigmoid(margin - pair_margins(batch))
    margin = jax.lax.stop_gradient(margin)
    per_pair = {
        "accuracy": (margin > 0).astype(jnp.float32),
        "margin": margin,
        "mean_reward": jax.lax.stop_gradient(chosen + rejected) / 2,
    }
    sums = {name: jnp.sum(value * valid) for name, value in per_pair.items()}
    return jnp.sum(losses * valid), {"count": jnp.sum(valid), **sums}
