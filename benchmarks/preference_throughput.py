"""Preference throughput: DPO pairs/s of our jitted train step, against TRL's DPOTrainer.

    python benchmarks/preference_throughput.py [--rounds 5] [--steps 2] [--batch 4]
        [--seq-len 128] [--size reference-34m] [--dtype float32] [--json result.json]

One batch of `--batch` synthetic pairs, each a chosen and a rejected sequence of `--seq-len`
tokens (a prompt of half of them, then the response), goes to both sides, and both do the
same work per pair: forward and backward of the policy on chosen and rejected, a forward of a
frozen reference on both, the sigmoid DPO loss (beta 0.1), gradient clipping at 1.0 and an
AdamW update. Ours: the trainer's train step for `objective: dpo` (frozen reference), on rows
the trainer's packer builds (one pair a row, its chosen and rejected on segments 1 and 2).
TRL's: DPOTrainer on transformers' LlamaForCausalLM (torch on the CPU, in the same precision
as ours: with `bf16` on, its autocast, for our default bf16 compute) with its default
optimizer, `training_step` (its loss, the reference forward and the backward) then the
optimizer step, as its train loop does them, on the same pairs right-padded into one batch,
chosen rows first, as its collator lays them out. Data loading is outside both timings.

TRL runs in a child process so the two never compete for threads at the same time; rounds
alternate ours / TRL so a noisy neighbour hits both alike, and the JSON reports medians (and
best rounds, since contention only ever slows a round down), with the machine's load average
before and after. Target: ours >= 1.2x TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine_load import after_run, before_run

from benchmarks.trainer_throughput import (
    SIZES,
    OurStep,
    PeerStep,
    add_cpu_arguments,
    apply_cpu_arguments,
    best_settings,
    make_recipe,
)
from trainer.config import ObjectiveConfig

TARGET = 1.2
OBJECTIVE = ObjectiveConfig(name="dpo", beta=0.1, loss="sigmoid", reference="frozen")

PEER = r"""
import json, shutil, sys, tempfile, time
import numpy as np, torch, transformers
import datasets
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from trl import DPOConfig, DPOTrainer

cfg = json.loads(sys.argv[1])
datasets.disable_progress_bars()
torch.manual_seed(0)
hf_cfg = transformers.LlamaConfig(**cfg["hf"])
policy = transformers.LlamaForCausalLM(hf_cfg)
reference = transformers.LlamaForCausalLM(hf_cfg)
reference.load_state_dict(policy.state_dict())
# DPOTrainer wants a tokenizer and a dataset to start; the timed batch is given to it as ids.
vocab = {str(i): i for i in range(hf_cfg.vocab_size)}
words = Tokenizer(models.WordLevel(vocab, unk_token="0"))
words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
processing = transformers.PreTrainedTokenizerFast(
    tokenizer_object=words, eos_token="1", pad_token="0"
)
out = tempfile.mkdtemp(prefix="trl-bench-")
args = DPOConfig(
    output_dir=out, beta=cfg["beta"], loss_type=["sigmoid"], learning_rate=1e-4,
    weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0,
    per_device_train_batch_size=cfg["batch"], report_to="none", use_cpu=True, bf16=cfg["bf16"],
)
trainer = DPOTrainer(
    model=policy, ref_model=reference, args=args, processing_class=processing,
    train_dataset=Dataset.from_list([{"prompt": "2", "chosen": " 3", "rejected": " 4"}]),
)
# bf16: the accelerator's autocast wraps the policy's and the reference's forwards
assert trainer.accelerator.mixed_precision == ("bf16" if cfg["bf16"] else "no")
trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
trainer.current_gradient_accumulation_steps = 1  # set by its train loop, read by training_step
pairs = np.load(cfg["pairs"])
inputs = {
    "input_ids": torch.from_numpy(pairs["input_ids"]).long(),
    "attention_mask": torch.ones(pairs["input_ids"].shape, dtype=torch.long),
    "completion_mask": torch.from_numpy(pairs["completion_mask"]).long(),
}
model = trainer.model
def step():
    loss = trainer.training_step(model, inputs)
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    trainer.optimizer.step(); trainer.lr_scheduler.step(); model.zero_grad(set_to_none=True)
    return loss.item()
assert all(np.isfinite([step(), step()])), "TRL loss is not finite"  # warm-up
print("ready", flush=True)
for line in sys.stdin:
    n = int(line); start = time.perf_counter()
    for _ in range(n): step()
    print(json.dumps((time.perf_counter() - start) / n), flush=True)
shutil.rmtree(out)
"""


def synthetic_pairs(pairs: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    """`pairs` chosen/rejected sequences of `seq` random tokens sharing a prompt of seq // 2:
    input_ids and completion_mask [2 x pairs, seq], chosen rows first (TRL's batch layout)."""
    rng = np.random.default_rng(0)
    prompt_NxS = np.repeat(rng.integers(2, vocab, (pairs, seq // 2)), 2, axis=0)
    response_NxR = rng.integers(2, vocab, (2 * pairs, seq - seq // 2))
    by_pair_NxL = np.concatenate([prompt_NxS, response_NxR], axis=1).astype(np.int32)
    input_ids_NxL = np.concatenate([by_pair_NxL[0::2], by_pair_NxL[1::2]])
    completion_mask_NxL = np.zeros_like(input_ids_NxL)
    completion_mask_NxL[:, seq // 2 :] = 1
    return {"input_ids": input_ids_NxL, "completion_mask": completion_mask_NxL}


def packed_batch(pairs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same pairs as the trainer's packer lays them out, one pair a row of 2 x seq tokens,
    as a [1, pairs, 2 x seq] batch (grad_accum 1)."""
    from trainer import data

    ids, mask = pairs["input_ids"].tolist(), pairs["completion_mask"].tolist()
    n, seq = len(ids) // 2, len(ids[0])
    packer = data.Packer(2 * seq + 1, split_documents=False)
    for k in range(n):
        packer.add_together([(ids[k], mask[k]), (ids[n + k], mask[n + k])])
    arrays = data.batch_arrays(packer.take(final=True))
    assert arrays["tokens"].shape == (n, 2 * seq), "the packer split a pair"
    return {name: value[None] for name, value in arrays.items()}


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="reference-34m")
    parser.add_argument("--batch", type=positive, default=4, help="pairs per step")
    parser.add_argument(
        "--seq-len", type=positive, default=128, help="tokens per sequence (chosen or rejected)"
    )
    parser.add_argument("--rounds", type=positive, default=5)
    parser.add_argument("--steps", type=positive, default=2, help="steps per timed round")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        help="compute dtype of both sides (default: bf16)",
    )
    add_cpu_arguments(parser)
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.seq_len < 2:
        parser.error("--seq-len: at least 2 tokens (a prompt and a response token)")
    xla_flags = apply_cpu_arguments(args)

    load_before = before_run()
    import jax

    devices = jax.devices()
    platform = devices[0].platform
    row = 2 * args.seq_len  # one pair a packed row
    model = SIZES[args.size]
    settings = best_settings(platform, model.n_layers) | (
        {"dtype": args.dtype} if args.dtype else {}
    )
    model = replace(
        model, **settings, param_dtype="float32", max_seq_len=max(model.max_seq_len, row)
    )
    recipe = replace(make_recipe(model, args.batch, row, steps=10_000), objective=OBJECTIVE)
    pairs = synthetic_pairs(args.batch, args.seq_len, model.vocab_size)
    ours = OurStep(recipe, packed_batch(pairs))
    with tempfile.TemporaryDirectory(prefix="preference-bench-") as tmp:
        np.savez(Path(tmp) / "pairs.npz", **pairs)
        extra = {"pairs": str(Path(tmp) / "pairs.npz"), "beta": OBJECTIVE.beta}
        peer = PeerStep(model, args.batch, args.seq_len, script=PEER, extra=extra)
        our_times, peer_times = [], []
        for _ in range(args.rounds):
            our_times.append(ours.time(args.steps))
            peer_times.append(peer.time(args.steps))
        peer.close()

    ours_pps = args.batch / statistics.median(our_times)
    peer_pps = args.batch / statistics.median(peer_times)
    result = {
        "device": f"{platform} ({devices[0].device_kind}) x {len(devices)}",
        "model": args.size,
        "params": sum(x.size for x in jax.tree_util.tree_leaves(ours.run.state.params)),
        "pairs_per_step": args.batch,
        "seq_len": args.seq_len,
        "objective": "dpo sigmoid, beta 0.1, frozen reference",
        "settings": settings,
        "xla_flags": xla_flags,
        "allocator": args.allocator,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": after_run(),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "ours_pairs_per_s": ours_pps,
        "ours_pairs_per_s_best_round": args.batch / min(our_times),
        "ours_step_s_all": our_times,
        "peer": "trl DPOTrainer on transformers LlamaForCausalLM (torch CPU, "
        + ("bf16 autocast, fp32 weights)" if settings["dtype"] == "bfloat16" else "fp32)"),
        "peer_pairs_per_s": peer_pps,
        "peer_pairs_per_s_best_round": args.batch / min(peer_times),
        "peer_step_s_all": peer_times,
        "speedup_over_peer": ours_pps / peer_pps,
        "speedup_over_peer_best_rounds": min(peer_times) / min(our_times),
        "target_speedup": TARGET,
        "target_met": ours_pps / peer_pps >= TARGET,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print(
        f"ours {ours_pps:.2f} pairs/s; TRL {peer_pps:.2f} pairs/s; "
        f"ours/TRL = {result['speedup_over_peer']:.2f}x (target >= {TARGET}x)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
