"""Checkpoint benchmark: how long a save blocks the train loop, and restore throughput.

    python benchmarks/checkpoint.py [--steps 16] [--every 4] [--out result.json]

The trainer's real jitted step (Flax Llama + AdamW, 8 virtual CPU devices, fsdp) on a model
whose train state (params + two Adam moments) is about 250 MB, saved with the trainer's
Checkpointer exactly as the loop does (`maybe_save` after every step). Figures:

- blocked_s: median time a `maybe_save` that saves keeps the loop waiting (async: the copy
  off the devices and orbax's bookkeeping; the write goes on in the background), against the
  median step time, over every save but the loop's first. Target: under 10% of one step.
- first_blocked_s: the first save of the process, which also sets orbax up (once per run
  and relaunch).
- slowdown_per_save_s: the same loop's wall time with saves minus without, per save: it also
  counts the background write competing with the steps for the CPU.
- the same for synchronous saves, for comparison.
- restore MB/s from local disk and from the GCS emulator (state bytes / restore seconds),
  and save MB/s to the emulator (until committed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine_load import after_run, before_run

from trainer.config import (
    CheckpointConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    Recipe,
    TrainConfig,
)

MODEL = ModelConfig(
    vocab_size=8000, dim=512, n_layers=4, n_heads=8, mlp_dim=1408, max_seq_len=256,
    dtype="float32", param_dtype="float32", attention_chunk=128, scan_unroll=4,
)  # fmt: skip
BATCH, SEQ = 8, 256


class Loop:
    """The trainer's compiled step on a fixed synthetic batch; the state it advances."""

    def __init__(self):
        import jax
        import numpy as np

        from trainer import train

        recipe = Recipe(
            run_dir="unused",
            model=MODEL,
            mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
            optimizer=OptimizerConfig(name="adamw", lr=1e-4, warmup_steps=0, schedule="constant"),
            train=TrainConfig(steps=10_000, batch_size=BATCH, seq_len=SEQ, grad_accum=1),
        )
        self.jax = jax
        self.run = train.setup(recipe, None)
        tokens = np.random.default_rng(0).integers(0, MODEL.vocab_size, (1, BATCH, SEQ + 1))
        host = {
            "tokens": tokens[..., :-1].astype(np.int32),
            "targets": tokens[..., 1:].astype(np.int32),
            "segment_ids": np.ones((1, BATCH, SEQ), np.int32),
            "weights": np.ones((1, BATCH, SEQ), np.float32),
        }
        self.batch = {k: jax.device_put(v, self.run.batch_sharding) for k, v in host.items()}
        self.step_fn = self.run.train_step.lower(self.run.state, self.batch).compile()
        self.step()  # warm up

    def step(self) -> float:
        """One step, waited for; its seconds."""
        start = time.perf_counter()
        self.run.state, stats = self.step_fn(self.run.state, self.batch)
        self.jax.block_until_ready(stats["loss"])
        return time.perf_counter() - start

    def state_bytes(self) -> int:
        return sum(x.nbytes for x in self.jax.tree.leaves(self.run.state))

    def abstract_state(self):
        jax = self.jax
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.run.state
        )


def train_with_saves(loop: Loop, directory: str | None, steps: int, cfg: CheckpointConfig):
    """(wall seconds, step seconds, seconds blocked in saving maybe_save calls) for `steps`
    steps; no checkpointer when `directory` is None."""
    from trainer.checkpoint import Checkpointer

    checkpointer = Checkpointer(directory, cfg) if directory else None
    step_times, blocked = [], []
    start = time.perf_counter()
    for _ in range(steps):
        step_times.append(loop.step())
        if checkpointer is not None:
            save_start = time.perf_counter()
            checkpointer.maybe_save(loop.run.state)
            if int(loop.run.state.step) % cfg.every_steps == 0:  # this call saved
                blocked.append(time.perf_counter() - save_start)
    if checkpointer is not None:
        checkpointer.close()
    return time.perf_counter() - start, step_times, blocked


def save_modes(loop: Loop, steps: int, every: int) -> dict:
    results = {}
    baseline_wall, step_times, _ = train_with_saves(loop, None, steps, CheckpointConfig())
    results["step_s"] = statistics.median(step_times)
    for mode, async_save in (("async", True), ("sync", False)):
        directory = tempfile.mkdtemp(prefix=f"ckpt-bench-{mode}-")
        cfg = CheckpointConfig(every_steps=every, keep=2, async_save=async_save)
        wall, _, blocked = train_with_saves(loop, directory, steps, cfg)
        shutil.rmtree(directory)
        # A run's first save also sets orbax up (once per process): reported on its own.
        later = statistics.median(blocked[1:] or blocked)
        results[mode] = {
            "saves": len(blocked),
            "first_blocked_s": blocked[0],
            "blocked_s": later,
            "blocked_fraction_of_step": later / results["step_s"],
            "slowdown_per_save_s": (wall - baseline_wall) / max(1, len(blocked)),
        }
    return results


def transfer_rates(loop: Loop, directory: str) -> dict:
    """Save (until committed) and restore throughput in MB/s for one directory."""
    from trainer.checkpoint import Checkpointer

    megabytes = loop.state_bytes() / 1e6
    with Checkpointer(directory, CheckpointConfig(async_save=False)) as checkpointer:
        start = time.perf_counter()
        checkpointer.save(loop.run.state)
        save_s = time.perf_counter() - start
    with Checkpointer(directory, CheckpointConfig()) as checkpointer:
        start = time.perf_counter()
        restored = checkpointer.restore(loop.abstract_state())
        loop.jax.block_until_ready(restored)
        restore_s = time.perf_counter() - start
    return {"save_MBps": megabytes / save_s, "restore_MBps": megabytes / restore_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="steps per timed loop")
    parser.add_argument("--every", type=int, default=4, help="save every N steps")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    from tpuctl.gcs_emulator import GcsEmulator, emulator_env

    load_before = before_run()
    loop = Loop()
    result = {
        "state_MB": loop.state_bytes() / 1e6,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        **save_modes(loop, args.steps, args.every),
    }
    local = tempfile.mkdtemp(prefix="ckpt-bench-local-")
    result["local"] = transfer_rates(loop, local)
    shutil.rmtree(local)
    with GcsEmulator() as emulator:
        os.environ.update(emulator_env(emulator.url))
        emulator.create_bucket("bench-bucket")
        result["gcs_emulator"] = transfer_rates(loop, "gs://bench-bucket/ckpt")
    result["load_average_after"] = after_run()
    print(json.dumps(result, indent=2))
    fraction = result["async"]["blocked_fraction_of_step"]
    first = result["async"]["first_blocked_s"]
    print(f"async save blocks the loop {100 * fraction:.1f}% of a step (target < 10%); "
          f"the first save of the run {first:.2f} s")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
