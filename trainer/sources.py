"""Training inputs, streamed record by record: files, globs, `save_to_disk` directories, `hf:` names.

An input spec expands to *units*, the pieces a cache build hands out to processes and cores:
one unit per file (`.txt`, `.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.parquet`, `.arrow`) and one
per Arrow file of a `datasets.Dataset.save_to_disk` directory or of a dataset that
`hf:NAME[/CONFIG][:SPLIT]` loads with the `datasets` library. Reading a unit never holds the
whole file: text and JSON lines stream through (de)compression, Parquet goes one record batch
at a time, Arrow files are read as the IPC stream `datasets` writes. Paths may be local or
gs:// (through trainer.io).
"""

from __future__ import annotations

import contextlib
import gzip
import io as pyio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from trainer import io
from trainer.config import RecipeError

HF_PREFIX = "hf:"
COMPRESSIONS = {".gz": "gz", ".zst": "zst"}
KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
BATCH_ROWS = 256  # records per Parquet/Arrow batch: a few MB at most for text


@dataclass(frozen=True)
class Unit:
    """One input file: the smallest piece of work of a cache build."""

    path: str
    kind: str  # txt | jsonl | parquet | arrow
    size: int  # bytes on storage: part of the cache key, and the build's ETA
    compression: str | None = None  # gz | zst
    key_path: str = ""  # the name in the cache key (hf: files live in a per-host cache)

    @property
    def key(self) -> str:
        return f"{self.key_path or self.path}:{self.size}"


def expand(spec: str, where: str) -> list[Unit]:
    """The units of one input spec, in a stable order; `where` names the recipe key for errors."""
    if spec.startswith(HF_PREFIX):
        return _hf_units(spec, where)
    if io.has_glob(spec):
        sizes = io.glob_sizes(spec)
        if not sizes:
            raise RecipeError(f"{where}: no file matches {spec}; fix the pattern")
        return [_file_unit(path, size, where) for path, size in sizes.items()]
    if io.isdir(spec):
        return _dataset_dir_units(spec, where)
    return [_file_unit(spec, io.size(spec), where)]


def expand_all(specs: list[str], where: str) -> list[Unit]:
    """The units of a data entry's specs, each file once: overlapping globs, or one path
    listed twice, name the file once, not twice its rows (an entry's weight upweights it)."""
    units, seen = [], set()
    for unit in (u for spec in specs for u in expand(spec, where)):
        same = unit.path if io.is_gcs(unit.path) else os.path.realpath(unit.path)
        if same not in seen:
            seen.add(same)
            units.append(unit)
    return units


def _file_unit(path: str, size: int, where: str) -> Unit:
    stem, ext = os.path.splitext(path)
    compression = COMPRESSIONS.get(ext)
    if compression:
        stem, ext = os.path.splitext(stem)
    kind = KINDS.get(ext)
    if kind is None or (compression and kind in ("parquet", "arrow")):
        raise RecipeError(
            f"{where}: {path} is not an input this trainer reads; use .txt, .jsonl "
            "(optionally .gz or .zst), .parquet, a save_to_disk directory or hf:NAME"
        )
    return Unit(path, kind, size, compression)


def _dataset_dir_units(path: str, where: str) -> list[Unit]:
    """The Arrow files of a `Dataset.save_to_disk` directory, in the order its state.json gives."""
    state_path = io.join(path, "state.json")
    if not io.exists(state_path):
        hint = (
            "it holds a DatasetDict: name one split's subdirectory"
            if io.exists(io.join(path, "dataset_dict.json"))
            else "give files, a glob or a save_to_disk directory"
        )
        raise RecipeError(f"{where}: {path} is a directory but not a saved dataset; {hint}")
    state = json.loads(io.read_text(state_path))
    files = [f["filename"] for f in state["_data_files"]]
    # Every saved dataset names its files alike (data-00000-of-00001.arrow): the key takes
    # the directory, and the fingerprint `datasets` gives each version of its contents.
    version = f"@{state['_fingerprint']}" if state.get("_fingerprint") else ""
    paths = [io.join(path, name) for name in files]
    return [Unit(file, "arrow", io.size(file), key_path=file + version) for file in paths]


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    """(name, config, split) of `hf:NAME[/CONFIG][:SPLIT]`; NAME may be `org/name` or a local
    directory. Three slash-separated parts are org/name/config; the split defaults to train."""
    body, _, split = spec[len(HF_PREFIX) :].partition(":")
    if os.path.isdir(body):
        return body, None, split or "train"
    parts = body.split("/")
    if len(parts) == 3:
        return "/".join(parts[:2]), parts[2], split or "train"
    return body, None, split or "train"


def _hf_units(spec: str, where: str) -> list[Unit]:
    import datasets

    name, config, split = parse_hf(spec)
    if "[" in split:  # datasets narrows the view of whole Arrow files, which the cache reads
        raise RecipeError(
            f"{where}: {spec}: split slices ({split}) are not supported; name the whole split "
            "and give the entry a size or fraction"
        )
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the library raises many kinds: missing, offline, bad split...
        raise RecipeError(
            f"{where}: datasets.load_dataset({name!r}, {config!r}, split={split!r}) failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the name, "
            "config and split, and HF_HUB_OFFLINE on machines without internet"
        ) from e
    files = [f["filename"] for f in dataset.cache_files]
    if not files:
        raise RecipeError(f"{where}: {spec} loaded into memory only; it has no Arrow files")
    # The fingerprint datasets gives this version: a dataset revised to files of the same
    # names and sizes must not reuse the old version's token cache.
    version = f"{spec}@{dataset._fingerprint}"
    return [
        Unit(f, "arrow", os.path.getsize(f), key_path=f"{version}/{os.path.basename(f)}")
        for f in files
    ]


def read_records(unit: Unit) -> Iterator[object]:
    """Stream the records of a unit: .txt files give one string per blank-line-separated
    document; every other kind gives one dict per row or JSON line."""
    for _, record in read_located(unit):
        yield record


def read_located(unit: Unit) -> Iterator[tuple[str, object]]:
    """The records of a unit with where each one is, for error messages: `PATH:LINE` for JSON
    lines, `PATH record N` (from 1) for the other kinds. A file that is not what its name
    says (not UTF-8, a broken gzip, zstd or Parquet file) is a RecipeError naming it."""
    try:
        yield from _read_located(unit)
    except Exception as e:
        if isinstance(e, RecipeError) or not _unreadable(e):
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecipeError(
            f"data: {unit.path} cannot be read as {unit.kind}"
            f"{f' ({unit.compression})' if unit.compression else ''}: {reason}"
        ) from None


def _unreadable(error: Exception) -> bool:
    """A file's content at fault, not the reading (a network error on gs:// is no bad input)."""
    library = type(error).__module__.split(".")[0]
    return isinstance(error, UnicodeDecodeError | EOFError | gzip.BadGzipFile) or library in (
        "pyarrow",
        "zstandard",
    )


def _read_located(unit: Unit) -> Iterator[tuple[str, object]]:
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(io.open_file(unit.path, "rb"))
        if unit.kind in ("parquet", "arrow"):
            rows = _parquet_records(raw) if unit.kind == "parquet" else _arrow_records(raw)
            for number, record in enumerate(rows, 1):
                yield f"{unit.path} record {number}", record
            return
        # utf-8-sig: a byte order mark (Notepad writes one) is no text to train on
        text = stack.enter_context(pyio.TextIOWrapper(_decompressed(raw, unit), "utf-8-sig"))
        if unit.kind == "jsonl":
            for number, record in _jsonl_records(text, unit.path):
                yield f"{unit.path}:{number}", record
            return
        for number, record in enumerate(_paragraphs(text), 1):
            yield f"{unit.path} record {number}", record


def _decompressed(raw: IO[bytes], unit: Unit) -> IO[bytes]:
    if unit.compression == "gz":
        return gzip.GzipFile(fileobj=raw)
    if unit.compression == "zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw)
    return raw


def _jsonl_records(lines: IO[str], path: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise RecipeError(f"data: {path} line {number} is not JSON ({e.msg})") from e


def _paragraphs(lines: IO[str]) -> Iterator[str]:
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line.rstrip("\n"))
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _parquet_records(raw: IO[bytes]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(raw).iter_batches(batch_size=BATCH_ROWS, use_threads=False):
        yield from batch.to_pylist()


def _arrow_records(raw: IO[bytes]) -> Iterator[dict]:
    import pyarrow as pa

    for batch in pa.ipc.open_stream(raw):
        for start in range(0, batch.num_rows, BATCH_ROWS):
            yield from batch.slice(start, BATCH_ROWS).to_pylist()
