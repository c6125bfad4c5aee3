"""Token cache benchmark: our sharded builder against Hugging Face `datasets`, and time to the
first batch on an existing cache.

    python benchmarks/data_cache.py [--corpus-mb 1024] [--workers 2] [--rounds 3] [--out result.json]

One generated corpus (gzipped JSON lines, `--corpus-mb` of text in 32 MB files) and one fast
tokenizer (a `tokenizers` BPE model trained on the first file) for both sides:

- ours: `trainer.cache.build` with `--workers` tokenising processes, rows of 2049 tokens, the
  tokenizer loaded as a recipe's `tokenizer.path` is (`trainer.tokenizer.load_tokenizer`);
- datasets: `load_dataset("json")`, then `.map(tokenize, batched=True, num_proc=N)` and
  `.map(pack into blocks of 2049, batched=True, num_proc=N)`, the usual recipe;
- first batch: a fresh process that plans and opens the existing cache and reads the
  pretraining recipe's global batch (512 rows of 2049 tokens) through `trainer.mixture`.

Each runs in its own process, `--rounds` times interleaved (caches removed between rounds);
the figures are medians of wall time, tokens/s and the peak of the summed RSS of that process
and its children (sampled every 50 ms). The JSON records every round, the CPU count and the
load average before and after, since a shared machine skews every figure.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine_load import after_run, before_run

FILE_MB = 32
ROW_LEN = 2049
VOCAB = 8192
BATCH_ROWS = 512


def generate(directory: Path, megabytes: int) -> list[str]:
    """Files of random documents over a Zipf-like vocabulary of made-up words."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ren", "sa", "to", "vu", "el", "an", "dor", "qui", "zo"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(20000)})
    weights = [1 / (rank + 1) for rank in range(len(words))]
    files, written = [], 0
    while written < megabytes * 2**20:
        path = directory / f"part-{len(files):04d}.jsonl.gz"
        size = 0
        with gzip.open(path, "wt", compresslevel=1) as f:
            while size < FILE_MB * 2**20 and written + size < megabytes * 2**20:
                text = " ".join(rng.choices(words, weights, k=rng.randint(50, 600)))
                f.write(json.dumps({"text": text}) + "\n")
                size += len(text)
        files.append(str(path))
        written += size
    return files


def train_tokenizer(first_file: str, path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"])

    def texts():
        with gzip.open(first_file, "rt") as f:
            for i, line in enumerate(f):
                if i == 5000:
                    return
                yield json.loads(line)["text"]

    tok.train_from_iterator(texts(), trainer)
    tok.save(str(path))
    # as in a Hugging Face model directory: which tokens are BOS and EOS
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (path.parent / "tokenizer_config.json").write_text(json.dumps(specials))


def cache_args(work: Path):
    from trainer import cache, tokenizer
    from trainer.config import DataConfig, DatasetConfig, TokenizerConfig

    tokenizer_cfg = TokenizerConfig(path=str(work / "tokenizer.json"))
    cfg = DataConfig(train=[DatasetConfig(path=[str(work / "corpus" / "*.jsonl.gz")])])
    key = tokenizer.fingerprint(tokenizer_cfg.path).hex()[:64]
    caches = cache.plan(cfg.train, "data.train", str(work / "cache"), key, cfg, ROW_LEN)
    # the trainer's own loading of a tokenizer.json, as a recipe's tokenizer.path gets
    make = functools.partial(tokenizer.load_tokenizer, tokenizer_cfg)
    settings = cache.Settings(make, key, cfg, ROW_LEN, 1024, "benchmark")
    return cfg, caches, settings


def child_ours(work: Path, workers: int) -> dict:
    from trainer import cache

    _, caches, settings = cache_args(work)
    cache.build(caches, settings, workers=workers)
    return {"tokens": cache.finalize(caches[0])["tokens"]}


def child_datasets(work: Path, workers: int) -> dict:
    import datasets
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(work / "tokenizer.json"))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    files = sorted(str(p) for p in (work / "corpus").glob("*.jsonl.gz"))
    ds = datasets.load_dataset(
        "json", data_files=files, split="train", cache_dir=str(work / "hf-cache")
    )

    def tokenize(batch):
        encoded = tok.encode_batch(batch["text"], add_special_tokens=False)
        return {"input_ids": [[bos, *e.ids, eos] for e in encoded]}

    def pack(batch):
        flat = [t for ids in batch["input_ids"] for t in ids]
        rows = [flat[i : i + ROW_LEN] for i in range(0, len(flat), ROW_LEN)]
        return {"input_ids": rows}

    ds = ds.map(tokenize, batched=True, num_proc=workers, remove_columns=["text"])
    tokens = sum(len(ids) for ids in ds.with_format("arrow")["input_ids"].to_pylist())
    ds.map(pack, batched=True, num_proc=workers)
    return {"tokens": tokens}


def child_first_batch(work: Path) -> dict:
    import psutil

    from trainer import cache, data, mixture

    cfg, caches, settings = cache_args(work)
    cache.build(caches, settings)  # a no-op: the index is there
    readers = cache.open_all(caches, ROW_LEN, "data.train")
    mix = mixture.Mixture(readers, cfg.train, BATCH_ROWS, seed=0)
    batch = data.batch_arrays(mix.reader.read(mix.batch_rows(0)))
    since_start = time.time() - psutil.Process().create_time()
    return {"first_batch_s": since_start, "rows": int(batch["tokens"].shape[0])}


def measure(args: list[str]) -> dict:
    """Run this script as a child with `args`; wall time, peak RSS of its tree, its result."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"child {args} failed with {proc.returncode}")
    return {
        **json.loads(proc.stdout.read().splitlines()[-1]),
        "wall_s": wall,
        "peak_rss_mb": peak / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    parser.add_argument("--child", choices=["ours", "datasets", "first-batch"])
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.child:
        work = Path(args.work)
        run = {
            "ours": lambda: child_ours(work, args.workers),
            "datasets": lambda: child_datasets(work, args.workers),
            "first-batch": lambda: child_first_batch(work),
        }[args.child]
        print(json.dumps(run()))
        return
    load_before = before_run()
    rounds: dict[str, list[dict]] = {"ours": [], "datasets": [], "first_batch": []}
    with tempfile.TemporaryDirectory(prefix="data-cache-bench-") as tmp:
        work = Path(tmp)
        (work / "corpus").mkdir()
        files = generate(work / "corpus", args.corpus_mb)
        train_tokenizer(files[0], work / "tokenizer.json")
        common = ["--work", str(work), "--workers", str(args.workers)]
        for _ in range(args.rounds):
            for scratch in ("cache", "hf-cache"):
                shutil.rmtree(work / scratch, ignore_errors=True)
            for side in ("ours", "datasets"):
                rounds[side].append(measure(["--child", side, *common]))
                rounds[side][-1]["tokens_per_s"] = (
                    rounds[side][-1]["tokens"] / rounds[side][-1]["wall_s"]
                )
            rounds["first_batch"].append(measure(["--child", "first-batch", *common]))
    medians = {
        side: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for side, runs in rounds.items()
    }
    ours, theirs = medians["ours"], medians["datasets"]
    result = {
        "corpus_mb": args.corpus_mb,
        "files": len(files),
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": after_run(),
        "medians": medians,
        "rounds": rounds,
        "throughput_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "memory_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
    }
    print(
        f"medians of {args.rounds} rounds, {args.corpus_mb} MB of text in {len(files)} files, "
        f"{args.workers} workers\n"
        f"ours: {ours['tokens_per_s'] / 1e6:.2f}M tokens/s, peak RSS {ours['peak_rss_mb']:.0f} MB\n"
        f"datasets: {theirs['tokens_per_s'] / 1e6:.2f}M tokens/s, peak RSS {theirs['peak_rss_mb']:.0f} MB\n"
        f"throughput {result['throughput_ratio']:.2f}x (target >= 1.0), "
        f"memory {result['memory_ratio']:.2f}x (target < 0.5)\n"
        f"first batch on the existing cache: {medians['first_batch']['first_batch_s']:.2f} s "
        f"from process start (target < 10 s)\n"
        f"load average {load_before[0]:.1f} before, {result['load_after'][0]:.1f} after, "
        f"{result['cpus']} CPUs"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
