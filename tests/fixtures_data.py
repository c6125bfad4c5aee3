"""Data-layer test helpers: one set of records written in every input format, and cache builds."""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

from tests.fixtures_trainer import REPO
from trainer import cache, data
from trainer.config import DataConfig, DatasetConfig, TokenizerConfig
from trainer.tokenizer import load_tokenizer

TOKENIZER = TokenizerConfig(path=str(REPO / "recipes" / "data" / "tokenizer.model"))
WORDS = [
    "the",
    "brown",
    "fox",
    "runs",
    "by",
    "the",
    "river",
    "and",
    "a",
    "red",
    "dog",
    "sleeps",
    "near",
    "the",
    "garden",
    "at",
    "night",
]


def documents(count: int, words: int = 40, start: int = 0) -> list[dict]:
    """`count` distinct generated text records, each naming its own number."""
    return [
        {"text": f"doc {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(words))}
        for i in range(start, start + count)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines.encode()))
    elif path.name.endswith(".zst"):
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    else:
        path.write_text(lines)
    return path


def write_parquet(path: Path, records: list[dict], row_group: int = 100) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group)
    return path


def save_to_disk(path: Path, records: list[dict], shards: int = 2) -> Path:
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path), num_shards=shards)
    return path


def settings(
    cfg: DataConfig, row_len: int, memory_mb: int = 64, owner: str = "test"
) -> cache.Settings:
    key = data.tokenizer_key(TOKENIZER, cfg)
    return cache.Settings(
        functools.partial(load_tokenizer, TOKENIZER), key, cfg, row_len, memory_mb, owner
    )


def plan(root: str, paths: list[str], seq_len: int = 32, **cfg_fields) -> list[cache.DatasetCache]:
    cfg = DataConfig(train=[DatasetConfig(path=paths)], **cfg_fields)
    key = data.tokenizer_key(TOKENIZER, cfg)
    return cache.plan(cfg.train, "data.train", root, key, cfg, seq_len + 1)


def build(root: str, paths: list[str], seq_len: int = 32, **cfg_fields) -> cache.ShardedReader:
    """Build (or reuse) the cache of one dataset made of `paths` and open it."""
    caches = plan(root, paths, seq_len, **cfg_fields)
    cache.build(caches, settings(DataConfig(**cfg_fields), seq_len + 1))
    (reader,) = cache.open_all(caches, seq_len + 1, "data.train")
    return reader
