"""The sharded token cache: one shard of packed rows per input unit, an index once all are in.

Layout of one dataset's cache, `{cache_dir}/{key}/` (the key hashes the inputs' names and
sizes, the tokenizer and every packing setting, so any run with the same inputs reuses it):

    shard-00000.rows   packed rows of input unit 0 (trainer.data's row layout)
    shard-00000.json   its commit record: documents, rows, tokens, padding, targets, source
    shard-00000.claim  while a build runs: which run builds it and when it last made progress
    index.json         written once every shard is committed: the shards and their counts

A shard's rows are written to a temporary file and moved into place whole before its .json is
written, so a shard with a .json is complete, and a build stopped half way resumes from the
committed shards. A builder holds a lock on its temporary file until the file is moved, so
the next build removes those of builders that were killed, and no live builder's. A shard's
bytes depend only on its unit, so any split of the work over processes and cores gives the
same cache. Peak memory is bounded by `memory_mb` (rows buffered before they are written)
plus one record batch per worker, whatever the corpus size.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np

from trainer import data, io, preference, sources
from trainer.config import DataConfig, DatasetConfig, RecipeError

# 3: preference rows carry a margins column; 4: prompt_completion tokenised whole, chat
# messages without their None-valued keys
CACHE_VERSION = 4
# A format's own version, in its caches' keys only (the others' caches stay valid):
# preference 1: string pairs tokenised with their prompt as one text; 2: a pair with an empty
# response skipped whatever tokenizer.add_eos (an earlier cache holds it, training on EOS alone)
FORMAT_VERSIONS = {"preference": 2}
INDEX = "index.json"
LEASE_S = 300.0  # a claim without progress for this long belongs to a builder that died
REFRESH_S = 30.0  # how often a builder renews its claim
WAIT_POLL_S = 5.0  # how often a run waiting for another run's shards looks again


@dataclass(frozen=True)
class DatasetCache:
    """Where one data.train/data.eval entry's cache lives and what goes into it."""

    name: str
    directory: str
    units: tuple[sources.Unit, ...]


@dataclass(frozen=True)
class Settings:
    """What every builder process needs; picklable, so it travels to pool workers."""

    tokenizer: Callable[[], Any]  # makes an object with encode/bos/eos (trainer.data.tokenize)
    tokenizer_key: str
    data: DataConfig
    row_len: int
    memory_mb: int
    owner: str  # who claims shards: the run directory (a restarted run takes its own back)


def plan(
    entries: list[DatasetConfig],
    where: str,
    cache_root: str,
    tokenizer_key: str,
    cfg: DataConfig,
    row_len: int,
) -> list[DatasetCache]:
    """The cache of each entry, from a listing of its inputs (no input is read)."""
    caches = []
    for i, entry in enumerate(entries):
        units = sources.expand_all(entry.path, f"{where}[{i}]")
        h = hashlib.sha256()
        settings = (CACHE_VERSION, tokenizer_key, cfg.format, cfg.text_field, row_len)
        settings += (FORMAT_VERSIONS[cfg.format],) if cfg.format in FORMAT_VERSIONS else ()
        h.update(repr(settings).encode())
        for unit in units:
            h.update(unit.key.encode() + b"\n")
        name = entry.name or entry.path[0]
        caches.append(DatasetCache(name, io.join(cache_root, h.hexdigest()[:16]), tuple(units)))
    return caches


def shard_path(cache: DatasetCache, shard: int, suffix: str) -> str:
    return io.join(cache.directory, f"shard-{shard:05d}.{suffix}")


# -- building ---------------------------------------------------------------------------------


def build(
    caches: list[DatasetCache],
    settings: Settings,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.time,
    write_index: bool = True,
) -> None:
    """Build this process's share (every `process_count`-th shard) of the shards not yet
    committed, with `workers` tokenising processes (1: in this process), then (`write_index`)
    write the index of each cache whose shards are all committed. Shards another live run has
    claimed are waited for, not built twice."""
    for c in caches:
        _remove_dead_temps(c)
    pending = [c for c in caches if not io.exists(io.join(c.directory, INDEX))]
    jobs = [(c, k) for c in pending for k in range(len(c.units))][process_index::process_count]
    committed = {c.directory: _committed(c) for c in pending}
    todo = [(c, k) for c, k in jobs if k not in committed[c.directory]]
    if todo:
        progress = Progress(todo, len(jobs) - len(todo), log, clock)
        _run(todo, settings, max(1, min(workers, len(todo))), progress, clock)
        progress.finish()
    for cache in pending if write_index else ():
        finalize(cache)


def build_on_pod(
    caches: list[DatasetCache],
    settings: Settings,
    process: tuple[int, int],
    barrier: Callable[[str], None],
    workers: int = 1,
    log: Callable[[str], None] | None = None,
) -> None:
    """Build with every process of a pod: process (index, count) takes its share, all meet at
    `barrier`, process 0 writes the indexes, all meet again. A process that then still misses
    shards (a local cache_dir on a pod: storage not shared) builds them itself."""
    index, count = process
    build(caches, settings, index, count, workers, log, write_index=False)
    barrier("built")
    if index == 0:
        build(caches, settings, workers=workers, log=log)
    barrier("indexed")
    if index != 0:  # a no-op where the storage is shared: the indexes are there
        build(caches, settings, workers=workers, log=log)


def _committed(cache: DatasetCache) -> set[int]:
    if not io.exists(cache.directory):
        return set()
    names = io.listdir(cache.directory)
    # shard-00000.json: five digits at least, more past 99999 files
    return {int(n[6:-5]) for n in names if n.startswith("shard-") and n.endswith(".json")}


def _run(
    todo: list[tuple[DatasetCache, int]],
    settings: Settings,
    workers: int,
    progress: Progress,
    clock: Callable[[], float],
) -> None:
    """Build `todo`, deferring shards that another run holds a live claim on until they are
    committed or their claim goes stale."""
    memory_mb = max(1, settings.memory_mb // workers)
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else None
    running: dict[Future, tuple[DatasetCache, int]] = {}
    waiting = list(todo)
    try:
        listed_at, committed = -math.inf, {}
        while waiting or running:
            deferred = []
            if time.monotonic() - listed_at >= WAIT_POLL_S:  # what others committed meanwhile:
                by_directory = {c.directory: c for c, _ in waiting}  # one listing per cache, not
                committed = {d: _committed(c) for d, c in by_directory.items()}  # per shard done
                listed_at = time.monotonic()
            for cache, k in waiting:
                if k in committed.get(cache.directory, ()):
                    progress.done(cache, k, None)
                elif len(running) >= workers or not _claim(cache, k, settings.owner, clock):
                    deferred.append((cache, k))
                elif pool is None:
                    progress.done(cache, k, build_shard(cache, k, settings, memory_mb))
                else:
                    job = (_one_shard(cache, k), k, cache.units[k], settings, memory_mb)
                    running[pool.submit(_build, *job)] = (cache, k)
            waiting = deferred
            if running:
                finished, _ = wait(running, timeout=WAIT_POLL_S, return_when=FIRST_COMPLETED)
                for future in finished:
                    progress.done(*running.pop(future), future.result())
            elif waiting:  # all claimed by another run: look again in a while
                progress.waiting(len(waiting))
                time.sleep(WAIT_POLL_S)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _claim(cache: DatasetCache, shard: int, owner: str, clock: Callable[[], float]) -> bool:
    """Take shard `shard` for `owner` unless another owner renewed its claim within LEASE_S.
    Claims only avoid building a shard twice: two builders of one shard write the same bytes."""
    path = shard_path(cache, shard, "claim")
    try:
        claim = json.loads(io.read_text(path))
    except (FileNotFoundError, json.JSONDecodeError):
        claim = None
    if claim and claim["owner"] != owner and clock() - claim["time"] < LEASE_S:
        return False
    io.write_text(path, json.dumps({"owner": owner, "time": clock()}))
    return True


_TOKENIZERS: dict[str, Any] = {}  # one per worker process and tokenizer


def build_shard(cache: DatasetCache, shard: int, settings: Settings, memory_mb: int) -> dict:
    """Tokenise and pack input unit `shard` into its shard, buffering at most `memory_mb` of
    rows; commit it (rows moved into place, then the .json) and return its counts."""
    return _build(_one_shard(cache, shard), shard, cache.units[shard], settings, memory_mb)


def _one_shard(cache: DatasetCache, shard: int) -> DatasetCache:
    """`cache` for the build of one shard, without its other units: what goes to a pool
    worker (all of them, for every shard, made sending work quadratic in the files)."""
    return DatasetCache(cache.name, cache.directory, ())


def _build(
    cache: DatasetCache, shard: int, unit: sources.Unit, settings: Settings, memory_mb: int
) -> dict:
    if settings.tokenizer_key not in _TOKENIZERS:
        _TOKENIZERS[settings.tokenizer_key] = settings.tokenizer()
    tok = _TOKENIZERS[settings.tokenizer_key]
    cfg, row_len = settings.data, settings.row_len
    packer = data.packer(cfg, row_len)
    flush_rows = max(1, memory_mb * 2**20 // (2 * data.row_bytes(row_len, margins=True)))
    rows_path = shard_path(cache, shard, "rows")
    io.makedirs(cache.directory)
    fd, tmp_path = _locked_temp(cache)
    counts = {"documents": 0, "rows": 0, "tokens": 0, "padding": 0, "targets": 0}
    skipped: dict[str, list] = {}  # reason: [count, where the first one is]
    cut: list = [0, None]  # examples or pairs cut to fit a row: [count, where the first is]
    renewed = time.time()
    try:
        with os.fdopen(fd, "wb") as out:
            for where, record in sources.read_located(unit):
                try:
                    sequences, was_cut = data.sequences(record, tok, cfg, row_len)
                    if was_cut:
                        cut = [cut[0] + 1, cut[1] or where]
                    margin = preference.margin(record) if cfg.format == "preference" else 0.0
                    packer.add_together(sequences, margin)
                except preference.Skipped as skip:
                    skipped.setdefault(skip.reason, [0, where])[0] += 1
                    continue
                except RecipeError as e:
                    raise RecipeError(f"{where}: {e}") from None
                counts["documents"] += 1
                if packer.pending_rows() >= flush_rows:
                    _write_rows(out, packer.take(), counts)
                if time.time() - renewed > REFRESH_S:
                    _claim(cache, shard, settings.owner, time.time)
                    renewed = time.time()
            _write_rows(out, packer.take(final=True), counts)
            out.flush()
            io.publish(tmp_path, rows_path)  # while open: locked, so never taken for a dead one
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    record = {**counts, "file": os.path.basename(rows_path), "source": unit.key}
    if cfg.format == "preference":
        record["margins"] = True  # the rows' layout (data.row_bytes)
    if skipped:
        record["skipped"] = skipped
    if cut[0]:
        record["truncated"] = cut
    io.write_text(shard_path(cache, shard, "json"), json.dumps(record, sort_keys=True))
    _release(cache, shard)
    return {**record, "bytes": unit.size}


def _temp_place(cache: DatasetCache) -> tuple[str, str]:
    """(directory, name prefix) of the cache's temporary shards: local ones beside the shards
    (moved into place in one rename), gs:// ones in this host's temporary directory."""
    directory = tempfile.gettempdir() if io.is_gcs(cache.directory) else cache.directory
    return directory, f".tmp-shard-{os.path.basename(cache.directory.rstrip('/'))}-"


def _locked_temp(cache: DatasetCache) -> tuple[int, str]:
    """A new temporary shard file (fd, path), locked for as long as the fd is open: the lock,
    released by the kernel however its builder ends, tells a live builder's file from a dead
    one's (_remove_dead_temps)."""
    directory, prefix = _temp_place(cache)
    while True:
        fd, path = tempfile.mkstemp(dir=directory, prefix=prefix)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                return fd, path
        os.close(fd)  # removed as a dead builder's in the instant before the lock: again


def _remove_dead_temps(cache: DatasetCache) -> None:
    """Remove the cache's temporary shards that no live builder holds (a SIGKILL or the OOM
    killer left them): they are never data, only space. A live builder's stay (flock)."""
    directory, prefix = _temp_place(cache)
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except FileNotFoundError:  # nothing built here yet
        return
    for name in names:
        path = os.path.join(directory, name)
        # Gone meanwhile, another user's (in a shared /tmp) or locked by its live builder: kept.
        # Writable: over NFS, flock is a write lock.
        with (
            contextlib.suppress(FileNotFoundError, PermissionError, BlockingIOError),
            open(path, "r+b") as file,
        ):
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.remove(path)


def _write_rows(out, packed: data.Packed, counts: dict[str, int]) -> None:
    out.write(packed.to_bytes())
    real = int(np.count_nonzero(packed.segments))
    counts["rows"] += len(packed.tokens)
    counts["tokens"] += real
    counts["padding"] += packed.segments.size - real
    counts["targets"] += int(np.count_nonzero(packed.flags[:, 1:]))  # row[0] is never a label


def _release(cache: DatasetCache, shard: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        io.remove(shard_path(cache, shard, "claim"))


def finalize(cache: DatasetCache) -> dict | None:
    """The cache's index, written first if every shard is committed; None while some are not."""
    index_path = io.join(cache.directory, INDEX)
    if io.exists(index_path):
        return json.loads(io.read_text(index_path))
    if len(_committed(cache)) < len(cache.units):
        return None
    shards = [
        json.loads(io.read_text(shard_path(cache, k, "json"))) for k in range(len(cache.units))
    ]
    index = {
        "version": CACHE_VERSION,
        "margins": all(s.get("margins", False) for s in shards),
        "shards": shards,
        **{key: sum(s[key] for s in shards) for key in ("documents", "rows", "tokens", "padding")},
    }
    skipped: dict[str, list] = {}
    for shard in shards:
        for reason, (count, where) in shard.get("skipped", {}).items():
            skipped.setdefault(reason, [0, where])[0] += count
    if skipped:
        index["skipped"] = skipped
    if all("targets" in s for s in shards):  # shards of an earlier build do not count them
        index["targets"] = sum(s["targets"] for s in shards)
    cuts = [s["truncated"] for s in shards if "truncated" in s]
    if cuts:
        index["truncated"] = [sum(count for count, _ in cuts), cuts[0][1]]
    io.write_text(index_path, json.dumps(index, sort_keys=True))
    return index


class Progress:
    """Progress lines of one process's build: files, tokens/s and an ETA from bytes read."""

    def __init__(
        self,
        todo: list[tuple[DatasetCache, int]],
        already: int,
        log: Callable[[str], None] | None,
        clock: Callable[[], float],
    ):
        self.log, self.clock, self.started = log, clock, clock()
        self.total_files, self.files = len(todo) + already, already
        self.total_bytes = sum(c.units[k].size for c, k in todo)
        self.bytes = self.tokens = 0

    def done(self, cache: DatasetCache, shard: int, counts: dict | None) -> None:
        self.files += 1
        self.bytes += cache.units[shard].size
        self.tokens += counts["tokens"] if counts else 0
        elapsed = max(self.clock() - self.started, 1e-9)
        eta = (self.total_bytes - self.bytes) / max(self.bytes / elapsed, 1e-9)
        self._say(
            f"data: cache {self.files}/{self.total_files} files, "
            f"{self.tokens / elapsed / 1e6:.2f}M tokens/s, ETA {_duration(eta)}"
        )

    def waiting(self, shards: int) -> None:
        self._say(f"data: waiting for {shards} shards another run is building")

    def finish(self) -> None:
        elapsed = self.clock() - self.started
        self._say(f"data: built {self.tokens / 1e6:.1f}M tokens in {_duration(elapsed)}")

    def _say(self, line: str) -> None:
        if self.log:
            self.log(line)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _skips(index: dict) -> str:
    """The records a cache's build skipped, by reason: "5 with chosen == rejected (first:
    pairs.jsonl:3), ..."; "" when none was."""
    return ", ".join(
        f"{count} with {preference.SKIP_REASONS[reason]} (first: {where})"
        for reason, (count, where) in sorted(index.get("skipped", {}).items())
    )


def summary(where: str, caches: Iterable[DatasetCache], indexes: Iterable[dict]) -> str:
    """One line, headed by the split (`where`: data.train, data.eval), so the two tell apart:
    documents, tokens, rows and padding over all caches, and tokens per dataset."""
    pairs = list(zip(caches, indexes, strict=True))
    totals = {k: sum(i[k] for _, i in pairs) for k in ("documents", "tokens", "rows", "padding")}
    padding = totals["padding"] / max(totals["tokens"] + totals["padding"], 1)
    per_dataset = ", ".join(f"{c.name} {i['tokens'] / 1e6:.2f}M" for c, i in pairs)
    skips = [_skips(i) for _, i in pairs if i.get("skipped")]
    cuts = [(c.name, *i["truncated"]) for c, i in pairs if "truncated" in i]
    truncated = [f"{count} of {name} (first: {where})" for name, count, where in cuts]
    return (
        f"{where}: {totals['documents']} documents, {totals['tokens'] / 1e6:.2f}M tokens, "
        f"{totals['rows']} rows, padding {padding:.1%}; tokens per dataset: {per_dataset}"
        + (f"; skipped {', '.join(skips)}" if skips else "")
        + (f"; cut to a row's length: {', '.join(truncated)}" if truncated else "")
    )


# -- reading ----------------------------------------------------------------------------------


class ShardedReader:
    """Random access to rows of committed shards (of one or several caches), one seek per row."""

    def __init__(self, shards: list[tuple[str, int]], row_len: int, margins: bool = False):
        """`margins`: the rows carry the margins column (preference caches)."""
        self.paths = [path for path, _ in shards]
        self.ends = np.cumsum([rows for _, rows in shards], dtype=np.int64)
        self.rows, self.row_len = int(self.ends[-1]) if shards else 0, row_len
        self.margins = margins

    @staticmethod
    def open(cache: DatasetCache, index: dict, row_len: int) -> ShardedReader:
        shards = [(io.join(cache.directory, s["file"]), s["rows"]) for s in index["shards"]]
        return ShardedReader(shards, row_len, index["margins"])

    @staticmethod
    def concat(readers: list[ShardedReader]) -> ShardedReader:
        shards = [
            (path, int(end - start))
            for r in readers
            for path, start, end in zip(
                r.paths, np.concatenate([[0], r.ends[:-1]]), r.ends, strict=True
            )
        ]
        return ShardedReader(shards, readers[0].row_len, readers[0].margins)

    def read(self, indices: np.ndarray) -> data.Packed:
        size = data.row_bytes(self.row_len, self.margins)
        shard_of = np.searchsorted(self.ends, indices, side="right")
        firsts = np.concatenate([[0], self.ends[:-1]])[shard_of]
        chunks = io.read_ranges(
            [self.paths[s] for s in shard_of], ((indices - firsts) * size).tolist(), size
        )
        buf = np.frombuffer(b"".join(chunks), np.uint8).reshape(len(indices), size)
        return data.Packed.from_bytes(buf, self.row_len)


def open_all(caches: list[DatasetCache], row_len: int, where: str) -> list[ShardedReader]:
    """Readers of built caches; an entry whose inputs hold no example is a recipe error."""
    readers = []
    for i, cache in enumerate(caches):
        index = finalize(cache)
        if index is None:
            raise RecipeError(f"{where}[{i}]: the cache at {cache.directory} is not complete")
        if not index["rows"] and (skips := _skips(index)):
            raise RecipeError(f"{where}[{i}]: every record of {cache.name} was skipped: {skips}")
        if not index["rows"]:
            raise RecipeError(
                f"{where}[{i}]: {cache.name} holds no examples; check data.format and the files"
            )
        if index.get("targets") == 0:  # every reply cut off: steps of loss 0 that learn nothing
            count, first = index.get("truncated", [0, None])
            raise RecipeError(
                f"{where}[{i}]: no example of {cache.name} keeps a training target within "
                f"{row_len} tokens ({count} of {index['documents']} cut to that length, first: "
                f"{first}); raise train.seq_len or shorten the examples"
            )
        readers.append(ShardedReader.open(cache, index, row_len))
    return readers
