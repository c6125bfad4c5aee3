"""Trainer throughput: tokens/s and MFU of our jitted train step, against HF transformers + torch.

    python benchmarks/trainer_throughput.py [--rounds 5] [--steps 3] [--out result.json]
    python benchmarks/trainer_throughput.py --size llama-1b --seq 2048 [--remat POLICY]  # GPU/TPU

Same model config, batch, optimizer and precision for both: our Flax Llama with optax AdamW,
and transformers' LlamaForCausalLM with torch.optim.AdamW (the peer a user would otherwise
pick), in bf16 compute over fp32 weights by default (the peer under torch.autocast) or fp32
with `--dtype float32`. The peer runs in a child process so the two never compete for
threads at the same time. Rounds alternate peak / ours / peer, so a noisy neighbour hits all
three alike; the JSON reports medians. On a CPU, MFU is against a matmul peak measured in the
same run (in the compute dtype); on a GPU or TPU against the published peak of the device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine_load import after_run, before_run

from trainer.config import (
    ATTENTION,
    PRESETS,
    REMAT_POLICIES,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    Recipe,
    TrainConfig,
)

REFERENCE = ModelConfig(
    vocab_size=8000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_dim=1408, max_seq_len=512,
    norm_eps=1e-6,
)  # fmt: skip
SIZES = {
    "reference-34m": REFERENCE,
    "llama-1b": replace(ModelConfig(), **PRESETS["llama-1b"]),
    "tiny": replace(ModelConfig(), **PRESETS["tiny"]),  # checks the script in seconds
}


def best_settings(platform: str, n_layers: int) -> dict:
    """bf16 compute (fp32 master weights, the trainer's default) everywhere; on accelerators
    the platform's fused attention. On CPU, causal attention chunks that skip the masked half
    and the layer scan unrolled so XLA can fuse across layers."""
    if platform == "cpu":
        return dict(dtype="bfloat16", attention_chunk=128, scan_unroll=n_layers)
    return dict(dtype="bfloat16")


# XLA:CPU hands fp32 matmuls to YNNPACK (XNNPACK's successor) with this flag: about 1.2x the
# default codegen's tokens/s on the reference model in fp32 on a 2-core x86 machine, with the
# same results (the model's HF parity tests pass with it), but its bf16 dots run at half the
# speed of XLA's own, so it helps `--dtype float32` runs only. It is experimental in jax 0.10
# and an unknown XLA flag is fatal, so it is the benchmark's choice, not the trainer's default.
CPU_DOTS_FLAGS = {"ynnpack": "--xla_cpu_experimental_ynn_fusion_type=dot", "xla": ""}


def use_cpu_dots(choice: str) -> str:
    """Add `choice`'s flag to XLA_FLAGS (call before jax starts) and return XLA_FLAGS."""
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), CPU_DOTS_FLAGS[choice]) if f)
    os.environ["XLA_FLAGS"] = flags
    return flags


# XLA:CPU and torch both allocate a step's activations fresh from glibc, which maps and zeroes
# them anew each step (about 680k page faults and 1.2 CPU-s of kernel time per step of ours);
# a caching allocator keeps them (about 0.9x the step time for ours). Preloaded into both
# sides (the peer inherits the environment), so the comparison stays like for like.
ALLOCATORS = {
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",  # libtcmalloc-minimal4
    "system": "",
}


def add_cpu_arguments(parser: argparse.ArgumentParser) -> None:
    """--cpu-dots and --allocator, for `apply_cpu_arguments`."""
    parser.add_argument(
        "--cpu-dots",
        choices=sorted(CPU_DOTS_FLAGS),
        default="xla",
        help="the CPU's matmul kernels: XLA's own (default) or YNNPACK (faster in fp32 only)",
    )
    parser.add_argument(
        "--allocator",
        choices=sorted(ALLOCATORS),
        default="tcmalloc",
        help="malloc for both sides: tcmalloc (default; apt install libtcmalloc-minimal4) or glibc's",
    )


def apply_cpu_arguments(args: argparse.Namespace) -> str:
    """Put --allocator and --cpu-dots in force (before jax starts); returns XLA_FLAGS."""
    use_allocator(args.allocator)
    return use_cpu_dots(args.cpu_dots)


def use_allocator(choice: str) -> None:
    """Start this benchmark again under `choice`'s malloc (LD_PRELOAD is read at process
    start); returns at once when it already runs under it, or `choice` is glibc's own."""
    library = ALLOCATORS[choice]
    if not library or library in os.environ.get("LD_PRELOAD", ""):
        return
    if not Path(library).is_file():
        sys.exit(f"error: --allocator {choice}: {library} is missing (apt install "
                 "libtcmalloc-minimal4), or pass --allocator system")  # fmt: skip
    preload = " ".join(p for p in (os.environ.get("LD_PRELOAD", ""), library) if p)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "LD_PRELOAD": preload})


def make_recipe(model: ModelConfig, batch: int, seq: int, steps: int) -> Recipe:
    return Recipe(
        run_dir="unused",
        model=model,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optimizer=OptimizerConfig(
            name="adamw",
            lr=1e-4,
            warmup_steps=0,
            schedule="constant",
            weight_decay=0.1,
            clip_norm=1.0,
        ),
        train=TrainConfig(steps=steps, batch_size=batch, seq_len=seq, grad_accum=1),
    )


class OurStep:
    """Our train step (with the run's frozen inputs, e.g. DPO's reference) on a fixed batch,
    compiled once: `host` ([1, batch, seq] arrays), or synthetic tokens of one document a row."""

    def __init__(self, recipe: Recipe, host: dict | None = None):
        import jax
        import numpy as np

        from trainer import train

        self.jax = jax
        self.run = train.setup(recipe, None)
        if host is None:
            rng = np.random.default_rng(0)
            batch, seq = recipe.train.batch_size, recipe.train.seq_len
            shape = (1, batch, seq + 1)
            tokens = rng.integers(0, recipe.model.vocab_size, shape).astype(np.int32)
            host = {
                "tokens": tokens[..., :-1],
                "targets": tokens[..., 1:],
                "segment_ids": np.ones((1, batch, seq), np.int32),
                "weights": np.ones((1, batch, seq), np.float32),
            }
        self.batch = {k: jax.device_put(v, self.run.batch_sharding) for k, v in host.items()}
        lowered = self.run.train_step.lower(self.run.state, self.batch, *self.run.frozen)
        self.step = lowered.compile()
        self.time(2)  # warm up

    def time(self, steps: int) -> float:
        """Seconds per step over `steps` steps; one device sync at the end, as in the trainer."""
        start = time.perf_counter()
        state, stats = self.run.state, None
        for _ in range(steps):
            state, stats = self.step(state, self.batch, *self.run.frozen)
        loss = float(self.jax.device_get(stats["loss"]))
        self.run.state = state
        assert loss == loss, "loss is NaN"
        return (time.perf_counter() - start) / steps


PEER = r"""
import json, sys, time, torch, transformers
cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
hf_cfg = transformers.LlamaConfig(**cfg["hf"])
model = transformers.LlamaForCausalLM(hf_cfg).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
tokens = torch.randint(0, hf_cfg.vocab_size, (cfg["batch"], cfg["seq"]))
def step():
    # bf16 runs: torch's mixed precision (autocast: bf16 products, fp32 weights), as ours
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["bf16"]):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    return loss.item()
step(); step()
print("ready", flush=True)
for line in sys.stdin:
    n = int(line); start = time.perf_counter()
    for _ in range(n): step()
    print(json.dumps((time.perf_counter() - start) / n), flush=True)
"""


class PeerStep:
    """A peer in a child process (`script`, by default HF LlamaForCausalLM + torch AdamW), driven
    step batch by step batch: it reads its settings as JSON from argv[1] (the HF config, batch,
    seq and `extra`), prints "ready", then answers each line N with the seconds per step of N
    steps."""

    def __init__(
        self,
        model: ModelConfig,
        batch: int,
        seq: int,
        script: str = PEER,
        extra: dict | None = None,
    ):
        from trainer.hf import hf_config_from_model

        cfg = {
            "hf": hf_config_from_model(model),
            "batch": batch,
            "seq": seq,
            "bf16": model.dtype == "bfloat16",
            **(extra or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "ready", "peer failed to start"

    def time(self, steps: int) -> float:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="reference-34m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument(
        "--dtype", default=None, help="compute dtype (default: best for the device)"
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION,
        default=None,
        help="model.attention (default: auto, the device's kernel)",
    )
    parser.add_argument(
        "--remat", choices=REMAT_POLICIES, default=None, help="model.remat (default: none)"
    )
    add_cpu_arguments(parser)
    parser.add_argument("--no-peer", action="store_true", help="skip the HF/torch peer")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    xla_flags = apply_cpu_arguments(args)
    load_before = before_run()

    import jax

    from trainer import metrics
    from trainer.model import attention_path, backend_platform

    devices = jax.devices()
    platform = devices[0].platform
    model = SIZES[args.size]
    settings = best_settings(platform, model.n_layers)
    for name in ("dtype", "attention", "remat"):
        if getattr(args, name):
            settings[name] = getattr(args, name)
    dtype = settings["dtype"]
    model = replace(
        model, **settings, param_dtype="float32", max_seq_len=max(model.max_seq_len, args.seq)
    )
    recipe = make_recipe(model, args.batch, args.seq, steps=10_000)
    ours = OurStep(recipe)
    peer = None if args.no_peer or platform != "cpu" else PeerStep(model, args.batch, args.seq)

    tokens = args.batch * args.seq
    flops_per_step = metrics.flops_per_token(model, args.seq) * tokens
    published = metrics.published_peak(devices[0].device_kind)
    peaks, our_times, peer_times = [], [], []
    for _ in range(args.rounds):
        if platform == "cpu":
            peaks.append(metrics.measure_matmul_peak(dtype, size=2048, seconds=1.0))
        our_times.append(ours.time(args.steps))
        if peer:
            peer_times.append(peer.time(args.steps))
    if peer:
        peer.close()

    peak = statistics.median(peaks) if peaks else (published or 0.0) * len(devices)
    ours_tps = tokens / statistics.median(our_times)
    result = {
        "device": f"{platform} ({devices[0].device_kind}) x {len(devices)}",
        "model": args.size,
        "params": sum(x.size for x in jax.tree_util.tree_leaves(ours.run.state.params)),
        "batch": args.batch,
        "seq_len": args.seq,
        "settings": settings,
        "xla_flags": xla_flags,
        "allocator": args.allocator,
        "attention_path": attention_path(model, backend_platform(), args.seq),
        "load_average_before": load_before,
        "load_average_after": after_run(),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "flops_per_token": metrics.flops_per_token(model, args.seq),
        "peak_flops": peak,
        "peak_source": "measured matmul (median)" if peaks else "published",
        "ours_tokens_per_s": ours_tps,
        "ours_mfu": flops_per_step * ours_tps / tokens / peak if peak else None,
        "ours_tokens_per_s_best_round": tokens / min(our_times),
        "ours_step_s_all": our_times,
    }
    if peer_times:
        peer_tps = tokens / statistics.median(peer_times)
        result |= {
            "peer": "transformers LlamaForCausalLM + torch.optim.AdamW ("
            + ("torch.autocast bf16, fp32 weights)" if dtype == "bfloat16" else "fp32)"),
            "peer_tokens_per_s": peer_tps,
            "peer_mfu": flops_per_step * peer_tps / tokens / peak if peak else None,
            "peer_tokens_per_s_best_round": tokens / min(peer_times),
            "peer_step_s_all": peer_times,
            "speedup_over_peer": ours_tps / peer_tps,
            # Contention only ever slows a round down, so best rounds are a second estimate.
            "speedup_over_peer_best_rounds": min(peer_times) / min(our_times),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    summary = f"ours {ours_tps:.0f} tokens/s, MFU {100 * (result['ours_mfu'] or 0):.1f}% of {peak / 1e9:.0f} GFLOP/s"
    if peer_times:
        summary += f"; peer {result['peer_tokens_per_s']:.0f} tokens/s; ours/peer = {result['speedup_over_peer']:.2f}x"
    print(summary, file=sys.stderr)


if __name__ == "__main__":
    main()
