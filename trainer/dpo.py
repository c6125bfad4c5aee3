"""Direct preference optimisation on packed preference rows (trainer.preference, trainer.data).

A row holds whole pairs, the k-th pair's chosen sequence on segment 2k - 1 and its rejected
one on segment 2k; a sequence's log-probability is the sum over its response tokens (targets
with loss weight 1) of log p(token | the tokens before it in its segment). The reference is
the starting weights: a frozen copy run beside the policy, or their log-probs precomputed
once (trainer.reference) and carried in the batch. Losses, with delta = (chosen - ref chosen) - (rejected - ref
rejected) in summed log-probabilities:

- sigmoid: -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta) (eps =
  `label_smoothing`, conservative DPO; eps = 0 is the DPO paper's loss);
- hinge: max(0, 1 - beta delta) (SLiC);
- ipo: (delta' - 1 / (2 beta))^2 with delta' from log-ratios averaged over each response's
  tokens, as TRL computes it;
- simpo: reference-free, on log-probs averaged over each response's tokens (logp'):
  -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), z = beta (logp' chosen - logp' rejected) -
  gamma, as TRL's CPOTrainer computes `loss_type="simpo"`.

Metrics carry TRL's names and meanings (rewards = beta x log-ratio; for simpo, as TRL logs
it, beta x logp' and logps/* are logp'), averaged over pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from trainer.config import ObjectiveConfig


def pair_logps(
    params, apply_fn: Callable, batch: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(chosen log-probs, rejected log-probs, chosen tokens, rejected tokens), each [rows,
    pairs] for the row's pairs in segment order; a slot without a pair has zero tokens."""
    tokens_BxL, segments_BxL = batch["tokens"], batch["segment_ids"]
    logits_BxLxV = apply_fn({"params": params}, tokens_BxL, segments_BxL)
    logp_BxL = -optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), batch["targets"]
    )
    weights_BxL = batch["weights"]
    chosen_BxP, rejected_BxP = pair_sums(logp_BxL * weights_BxL, segments_BxL)
    chosen_n_BxP, rejected_n_BxP = pair_sums(weights_BxL, segments_BxL)
    return chosen_BxP, rejected_BxP, chosen_n_BxP, rejected_n_BxP


def pair_sums(values_BxL: jax.Array, segments_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token values summed per sequence: (chosen sums, rejected sums), each [rows, pairs],
    segments 2k - 1 and 2k giving pair k of its row."""
    # Segment ids run to at most seq_len; 2P + 1 slots hold segment 0 (padding) and P pairs.
    pairs = (segments_BxL.shape[1] + 2) // 2
    sums = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=2 * pairs + 1))(
        values_BxL, segments_BxL
    )
    return sums[:, 1::2], sums[:, 2::2]


def dpo_loss(
    params,
    apply_fn: Callable,
    batch: dict[str, jax.Array],
    reference=None,
    *,
    cfg: ObjectiveConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DPO loss summed over the batch's pairs, and sums of the pair count ("count") and of
    metrics.PREFERENCE_METRICS; the reference log-probs come from the `reference` weights or,
    without them, from the batch's precomputed `ref_chosen`/`ref_rejected` (simpo needs
    neither)."""
    chosen, rejected, chosen_n, rejected_n = pair_logps(params, apply_fn, batch)
    valid = ((chosen_n > 0) & (rejected_n > 0)).astype(jnp.float32)
    beta, eps = cfg.beta, cfg.label_smoothing
    if cfg.loss == "simpo":  # reference-free: the rewards are the length-normalised log-probs
        chosen, rejected = chosen / jnp.maximum(chosen_n, 1), rejected / jnp.maximum(rejected_n, 1)
        chosen_ratio, rejected_ratio = chosen, rejected
        losses = _smoothed_sigmoid_loss(beta * (chosen - rejected) - cfg.gamma, eps)
    else:
        ref_chosen, ref_rejected = _reference_logps(reference, apply_fn, batch, chosen.shape[1])
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        delta = chosen_ratio - rejected_ratio
        if cfg.loss == "sigmoid":
            losses = _smoothed_sigmoid_loss(beta * delta, eps)
        elif cfg.loss == "hinge":
            losses = jax.nn.relu(1 - beta * delta)
        elif cfg.loss == "ipo":
            mean_delta = chosen_ratio / jnp.maximum(chosen_n, 1) - rejected_ratio / jnp.maximum(
                rejected_n, 1
            )
            losses = (mean_delta - 1 / (2 * beta)) ** 2
        else:
            raise AssertionError(f"objective.loss {cfg.loss} passed validation")
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_ratio)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_ratio)
    per_pair = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": jax.lax.stop_gradient(chosen),
        "logps/rejected": jax.lax.stop_gradient(rejected),
    }
    sums = {name: jnp.sum(value * valid) for name, value in per_pair.items()}
    return jnp.sum(losses * valid), {"count": jnp.sum(valid), **sums}


def _reference_logps(
    reference, apply_fn: Callable, batch: dict[str, jax.Array], pairs: int
) -> tuple[jax.Array, jax.Array]:
    """The reference's (chosen, rejected) log-probs, [rows, pairs]: from the frozen starting
    weights `reference` or, without them, the batch's precomputed ones (trainer.reference)."""
    if reference is not None:
        ref_chosen, ref_rejected, _, _ = pair_logps(
            jax.lax.stop_gradient(reference), apply_fn, batch
        )
        return ref_chosen, ref_rejected
    slots = ((0, 0), (0, pairs - batch["ref_chosen"].shape[1]))  # for the row's first slots
    return jnp.pad(batch["ref_chosen"], slots), jnp.pad(batch["ref_rejected"], slots)


def _smoothed_sigmoid_loss(logits: jax.Array, eps: float) -> jax.Array:
    """-(1 - eps) log sigmoid(logits) - eps log sigmoid(-logits): eps = 0 is plain DPO/SimPO."""
    return -(1 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)
