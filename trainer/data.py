"""Tokenise and pack once into a cache of fixed-length rows; global batch i is a pure function of (seed, i).

Cache layout, `{cache_dir}/{fingerprint}/{split}.rows` + `{split}.json` (written last, so a
reader never sees a half-built cache): every row is `row_len = seq_len + 1` int32 tokens,
then as many uint16 segment ids (0 = padding), then as many uint8 loss flags (1 = this token
is a training target). Inputs are row[:-1], targets row[1:].

Plain text is concatenated and chunked (documents may continue into the next row, under a new
segment id); chat and prompt/completion examples are never split (truncated if too long) and
rows are padded instead. Row order is a seeded permutation per epoch, so a process reads only
the rows of its own share of each batch, with one seek per row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from trainer import chat, io, tokenizer
from trainer.config import CHAT_TEMPLATE_NAMES, DataConfig, RecipeError, TokenizerConfig
from trainer.tokenizer import Tokenizer, bos, eos, load_tokenizer

CACHE_VERSION = 2  # 2: tokenizer.json tokenizers and chat templates


def read_records(path: str, cfg: DataConfig) -> Iterator[object]:
    """Stream documents: .txt files are split on blank lines; .jsonl gives one record per line."""
    with io.open_file(path, "r") as f:
        if path.endswith(".jsonl"):
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise RecipeError(
                            f"data: {path} line {number} is not JSON ({e.msg})"
                        ) from e
            return
        paragraph: list[str] = []
        for line in f:
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
        if paragraph:
            yield "\n".join(paragraph)


def tokenize(record: object, tok: Tokenizer, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(tokens, loss flags) of one example; flags are 1 on tokens the model should learn to emit."""
    if cfg.format == "text":
        text = record if isinstance(record, str) else _field(record, cfg.text_field)
        tokens = bos(tok) + tok.encode(text) + eos(tok)
        return tokens, [1] * len(tokens)
    if cfg.format == "prompt_completion":
        prompt, completion = _prompt_completion(record)
        prompt_ids, completion_ids = (
            bos(tok) + tok.encode(prompt),
            tok.encode(completion) + eos(tok),
        )
        return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)
    return chat.tokenize_chat(record, tok, chat.template_source(cfg.chat_template, tok))


def _field(record: object, name: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(name), str):
        raise RecipeError(
            f"data.text_field: a record has no string field {name!r}; set data.text_field"
        )
    return record[name]


def _prompt_completion(record: object) -> tuple[str, str]:
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        return str(record["prompt"]), str(record["completion"])
    if isinstance(record, dict) and "instruction" in record and "output" in record:
        extra = f"\n\n{record['input']}" if record.get("input") else ""
        return f"{record['instruction']}{extra}\n\n", str(record["output"])
    raise RecipeError(
        "data.format prompt_completion: records need prompt+completion or instruction(+input)+output"
    )


@dataclass(frozen=True)
class Packed:
    tokens: np.ndarray  # [rows, row_len] int32
    segments: np.ndarray  # [rows, row_len] uint16, 0 = padding
    flags: np.ndarray  # [rows, row_len] uint8


def pack(
    examples: Iterable[tuple[list[int], list[int]]], row_len: int, split_documents: bool
) -> Packed:
    """Pack examples into rows of `row_len`, with per-row segment ids starting at 1."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    tokens: list[int] = []
    segments: list[int] = []
    flags: list[int] = []

    def close_row() -> None:
        pad = row_len - len(tokens)
        rows.append((tokens + [0] * pad, segments + [0] * pad, flags + [0] * pad))
        for column in (tokens, segments, flags):
            column.clear()

    for ex_tokens, ex_flags in examples:
        if split_documents:
            start = 0
            while start < len(ex_tokens):
                take = min(row_len - len(tokens), len(ex_tokens) - start)
                segment = (segments[-1] + 1) if segments else 1
                tokens.extend(ex_tokens[start : start + take])
                flags.extend(ex_flags[start : start + take])
                segments.extend([segment] * take)
                start += take
                if len(tokens) == row_len:
                    close_row()
            continue
        ex_tokens, ex_flags = ex_tokens[:row_len], ex_flags[:row_len]
        if len(tokens) + len(ex_tokens) > row_len:
            close_row()
        segment = (segments[-1] + 1) if segments else 1
        tokens.extend(ex_tokens)
        flags.extend(ex_flags)
        segments.extend([segment] * len(ex_tokens))
    if tokens:
        close_row()
    if not rows:
        return Packed(*(np.zeros((0, row_len), d) for d in (np.int32, np.uint16, np.uint8)))
    t, s, f = zip(*rows, strict=True)
    return Packed(np.array(t, np.int32), np.array(s, np.uint16), np.array(f, np.uint8))


def fingerprint(files: list[str], tok_cfg: TokenizerConfig, cfg: DataConfig, row_len: int) -> str:
    """Cache key: the inputs, their sizes, the tokenizer bytes and every packing choice."""
    h = hashlib.sha256()
    h.update(tokenizer.fingerprint(tok_cfg.path))
    if cfg.chat_template not in (None, *CHAT_TEMPLATE_NAMES):
        h.update(io.read_bytes(cfg.chat_template))  # a template FILE
    for path in files:
        with io.open_file(path, "rb") as f:
            size = f.seek(0, 2)
        h.update(f"{path}:{size}".encode())
    settings = (
        CACHE_VERSION,
        cfg.format,
        cfg.text_field,
        cfg.chat_template,
        tok_cfg.add_bos,
        tok_cfg.add_eos,
        row_len,
    )
    h.update(repr(settings).encode())
    return h.hexdigest()[:16]


ROW_DTYPES = (np.int32, np.uint16, np.uint8)


def row_bytes(row_len: int) -> int:
    return sum(np.dtype(d).itemsize for d in ROW_DTYPES) * row_len


def build_cache(
    directory: str, split: str, files: list[str], tok: Tokenizer, cfg: DataConfig, row_len: int
) -> None:
    """Tokenise and pack `files` into `{directory}/{split}.rows`, then commit with `{split}.json`."""
    examples = (tokenize(r, tok, cfg) for path in files for r in read_records(path, cfg))
    packed = pack(examples, row_len, split_documents=cfg.format == "text")
    if not len(packed.tokens):
        raise RecipeError(
            f"data.{split}: the files hold no examples; check data.format and the files"
        )
    io.makedirs(directory)
    interleaved = np.concatenate(
        [packed.tokens.view(np.uint8), packed.segments.view(np.uint8), packed.flags], axis=1
    )
    io.write_bytes(io.join(directory, f"{split}.rows"), interleaved.tobytes())
    meta = {
        "rows": len(packed.tokens),
        "row_len": row_len,
        "version": CACHE_VERSION,
        "files": files,
    }
    io.write_text(io.join(directory, f"{split}.json"), json.dumps(meta))


class RowReader:
    """Random access to packed rows of a committed cache split, one seek per row."""

    def __init__(self, directory: str, split: str):
        meta_path = io.join(directory, f"{split}.json")
        if not io.exists(meta_path):
            raise FileNotFoundError(meta_path)
        meta = json.loads(io.read_text(meta_path))
        self.rows, self.row_len = int(meta["rows"]), int(meta["row_len"])
        self.path = io.join(directory, f"{split}.rows")

    def read(self, indices: np.ndarray) -> Packed:
        size, n = row_bytes(self.row_len), self.row_len
        buf = np.empty((len(indices), size), np.uint8)
        with io.open_file(self.path, "rb") as f:
            for i, row in enumerate(indices):
                f.seek(int(row) * size)
                buf[i] = np.frombuffer(f.read(size), np.uint8)
        return Packed(
            buf[:, : 4 * n].copy().view(np.int32),
            buf[:, 4 * n : 6 * n].copy().view(np.uint16),
            buf[:, 6 * n :].copy(),
        )


class Dataset:
    """Global batch `i` of `batch_size` rows, a pure function of (seed, i)."""

    def __init__(self, reader: RowReader, batch_size: int, seed: int, shuffle: bool = True):
        self.reader, self.batch_size, self.seed, self.shuffle = reader, batch_size, seed, shuffle

    def batch_rows(self, step: int) -> np.ndarray:
        """Row indices of global batch `step`; epochs continue with a fresh permutation."""
        flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(flat, self.reader.rows)
        if not self.shuffle:
            return offsets
        return np.array(
            [
                _permutation(self.seed, int(e), self.reader.rows)[o]
                for e, o in zip(epochs, offsets, strict=True)
            ]
        )

    def steps_per_epoch(self) -> float:
        return self.reader.rows / self.batch_size


@lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, rows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(rows)


def batch_arrays(packed: Packed) -> dict[str, np.ndarray]:
    """Model inputs from packed rows: tokens/targets/segment_ids and per-target loss weights."""
    seg = packed.segments.astype(np.int32)
    weights = (packed.flags[:, 1:] == 1) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return {
        "tokens": packed.tokens[:, :-1],
        "targets": packed.tokens[:, 1:],
        "segment_ids": seg[:, :-1],
        "weights": weights.astype(np.float32),
    }


def ensure_split(
    cache_root: str,
    split: str,
    files: list[str],
    tok_cfg: TokenizerConfig,
    cfg: DataConfig,
    seq_len: int,
    build: bool,
) -> RowReader | None:
    """The reader for a split's cache, building it first if `build` and it is missing."""
    row_len = seq_len + 1
    directory = io.join(cache_root, fingerprint(files, tok_cfg, cfg, row_len))
    try:
        return RowReader(directory, split)
    except FileNotFoundError:
        if not build:
            return None
    build_cache(directory, split, files, load_tokenizer(tok_cfg), cfg, row_len)
    return RowReader(directory, split)
