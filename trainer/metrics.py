"""Honest model FLOPs, hardware peaks (published for TPU/GPU, measured on CPU) and metric sinks.

Model FLOPs per token = 6 x (parameters used in matmuls: everything but the input embedding
lookup) + the causal half of attention's score and value products, 6 x layers x seq x dim
(forward 2 x 2 x seq x dim per layer for q.k and p.v, halved by the causal mask, x3 with the
backward pass). Rematerialisation is not counted: MFU, not hardware utilisation.
"""

from __future__ import annotations

import json
import time
from typing import Any

from trainer import io
from trainer.config import ModelConfig

# Dense (not 2:4 sparse) bf16 peak FLOP/s per JAX device, from the vendors' data sheets (a TPU
# v2/v3 device is one core; v4+ one chip; v5 lite is v5e, v6 lite v6e, plain v5 v5p).
PEAK_FLOPS = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H200": 989e12,  # SXM, as the H100 SXM
    "H200 NVL": 835e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,  # SXM and PCIe alike
    "L4": 121e12,
    "A10G": 70e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls (the input embedding is a lookup, not a matmul)."""
    attn = cfg.dim * cfg.n_heads * cfg.head_dim * 2 + cfg.dim * cfg.kv_heads * cfg.head_dim * 2
    mlp = 3 * cfg.dim * cfg.mlp_dim
    return cfg.n_layers * (attn + mlp) + cfg.dim * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token."""
    return 6.0 * matmul_params(cfg) + 6.0 * cfg.n_layers * seq_len * cfg.dim


def published_peak(device_kind: str) -> float | None:
    """Peak FLOP/s of one device from the table, matched on the device kind; None if unknown."""
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return PEAK_FLOPS[name]
    return None


def measure_matmul_peak(dtype: str = "float32", size: int = 1024, seconds: float = 0.25) -> float:
    """Best FLOP/s of a jitted square matmul on the default device (the CPU peak we can reach).
    The product is accumulated and written in fp32, as the model's are (`trainer.matmul`):
    XLA:CPU's fast bf16 kernels need that. On 2 cores, 1024 for a quarter second reads the
    same best as 2048 for two seconds (within 3%); every trainer start pays for it."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    step = jax.jit(
        lambda x: (jnp.dot(x, a, preferred_element_type=jnp.float32) / size).astype(dtype)
    )
    x = step(a).block_until_ready()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        x = step(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def hardware_peak(devices, dtype: str, machines: int) -> tuple[float, str]:
    """(Peak FLOP/s of `devices` together, where it came from). On CPU, this process's
    measured matmul peak once per machine of the run (`machines`): the processes of a local
    pod share one machine's cores."""
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        processes = len({d.process_index for d in devices})
        measured = measure_matmul_peak(dtype)
        source = (
            f"measured {dtype} matmul on cpu x {machines} machine(s) of {processes} process(es)"
        )
        return measured * machines, source
    peak = published_peak(kind)
    if peak is None:
        return 0.0, f"unknown device kind {kind!r} (MFU not reported)"
    return peak * len(devices), f"published bf16 peak of {kind} x {len(devices)}"


class MetricsLog:
    """Appends one JSON object per record to {run_dir}/metrics.jsonl, plus optional wandb/TensorBoard."""

    def __init__(self, run_dir: str, wandb_project: str | None = None, tensorboard: bool = False,
                 run_id: str = "", config: dict[str, Any] | None = None):  # fmt: skip
        self.path = io.join(run_dir, "metrics.jsonl")
        io.makedirs(run_dir)
        # gs:// objects cannot be appended to: keep what is there and rewrite it whole.
        self.remote_lines: list[str] | None = None
        if io.is_gcs(self.path):
            exists = io.exists(self.path)
            self.remote_lines = io.read_text(self.path).splitlines(keepends=True) if exists else []
        self.sinks = []
        if wandb_project:
            self.sinks.append(_wandb_sink(wandb_project, run_id, config))
        if tensorboard:
            self.sinks.append(_tensorboard_sink(io.join(run_dir, "tensorboard")))

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self.remote_lines is None:
            with open(self.path, "a") as f:
                f.write(line)
        else:
            self.remote_lines.append(line)
            io.write_text(self.path, "".join(self.remote_lines))
        for sink in self.sinks:
            sink(record)


def _wandb_sink(project: str, run_id: str, config: dict[str, Any] | None):
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            "logging.wandb_project is set but wandb is not installed: pip install wandb"
        ) from e
    run = wandb.init(project=project, id=run_id or None, resume="allow", config=config)
    return lambda record: run.log(
        {k: v for k, v in record.items() if k != "step"}, step=record["step"]
    )


def _tensorboard_sink(log_dir: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "logging.tensorboard is true but tensorboardX is not installed: pip install tensorboardX"
        ) from e
    writer = SummaryWriter(log_dir)

    def log(record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                writer.add_scalar(key, value, record["step"])
        writer.flush()

    return log


# DPO's and the reward model's metrics under TRL's names (DPOTrainer's, RewardTrainer's),
# printed after the loss where a record has them.
PREFERENCE_METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen",
                      "rewards/rejected", "logps/chosen", "logps/rejected")  # fmt: skip
REWARD_METRICS = ("accuracy", "margin", "mean_reward")
PAIR_METRICS = {"dpo": PREFERENCE_METRICS, "reward": REWARD_METRICS}  # by objective.name


def progress_line(record: dict[str, Any]) -> str:
    preference = "".join(
        f"  {name} {record[name]:.4f}"
        for name in PREFERENCE_METRICS + REWARD_METRICS
        if name in record
    )
    return (
        f"step {record['step']}  loss {record['loss']:.4f}{preference}  lr {record['lr']:.3g}  "
        f"grad_norm {record['grad_norm']:.3f}  tokens/s {record['tokens_per_s']:.0f}  "
        f"mfu {100 * record['mfu']:.1f}%  step_time {record['step_time_s']:.3f}s"
    )


def eval_line(record: dict[str, Any]) -> str:
    """`eval step N  loss L  ppl P` (lm) or `eval step N  loss L  rewards/accuracies A ...`
    (dpo, reward)."""
    line = f"eval step {record['step']}  loss {record['eval_loss']:.4f}"
    if "eval_perplexity" in record:
        line += f"  ppl {record['eval_perplexity']:.2f}"
    return line + "".join(
        f"  {name} {record['eval_' + name]:.4f}"
        for name in PREFERENCE_METRICS + REWARD_METRICS
        if "eval_" + name in record
    )
