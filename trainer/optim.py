"""Optimizers (optax AdamW, Adafactor, Lion), learning-rate schedules and the weight-decay mask."""

from __future__ import annotations

import jax
import optax

from trainer.config import OptimizerConfig
from trainer.sharding import path_name


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine or linear decay to `end_lr` at `total_steps`."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        alpha = cfg.end_lr / cfg.lr if cfg.lr else 0.0
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=alpha)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, cfg.end_lr, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def weight_decay_mask(params):
    """Decay matrices (kernels, embeddings); never norms or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path_name(path).endswith(("kernel", "embedding")), params
    )


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The recipe's optimizer with global-norm clipping; returns it and its schedule."""
    schedule = learning_rate_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=weight_decay_mask)  # fmt: skip
    elif cfg.name == "lion":
        core = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                          mask=weight_decay_mask)  # fmt: skip
    else:
        core = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None,
                               weight_decay_mask=weight_decay_mask)  # fmt: skip
    if cfg.clip_norm:
        core = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), core)
    return core, schedule
