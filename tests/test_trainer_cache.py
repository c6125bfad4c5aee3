"""The sharded cache: built once and reused without reading the inputs, the same bytes from any
split of the work, resumable after a kill, claims that stop two runs building one shard, GCS,
and a build whose peak memory is bounded by data.cache_memory_mb, not by the corpus."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_data import (
    TOKENIZER,
    WORDS,
    build,
    documents,
    plan,
    save_to_disk,
    settings,
    write_jsonl,
    write_parquet,
)
from tests.fixtures_trainer import REPO
from tests.polling import stopped, wait_for
from trainer import cache, data, io
from trainer.config import DataConfig, RecipeError
from trainer.tokenizer import load_tokenizer


def cache_files(root: Path) -> dict[str, bytes]:
    """Every committed file of every cache under `root` (claims and temporaries excluded)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in (".rows", ".json")
    }


def corpus(tmp_path: Path, files: int = 6, docs: int = 150) -> list[str]:
    (tmp_path / "corpus").mkdir(exist_ok=True)
    return [
        str(write_jsonl(tmp_path / "corpus" / f"{i}.jsonl.gz", documents(docs, start=i * docs)))
        for i in range(files)
    ]


def test_cache_is_built_once_and_rows_read_back(tmp_path):
    inputs = [str(REPO / "recipes" / "data" / "tiny_eval.txt")]
    reader = build(str(tmp_path), inputs)
    (directory,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    index = json.loads((directory / "index.json").read_text())
    assert index["rows"] == reader.rows > 100 and reader.row_len == 33
    built_at = (directory / "index.json").stat().st_mtime_ns
    again = build(str(tmp_path), inputs)  # a restart reuses the committed cache
    assert (directory / "index.json").stat().st_mtime_ns == built_at
    picked = again.read(np.array([5, 0, 5]))
    assert picked.tokens.shape == (3, 33) and (picked.tokens[0] == picked.tokens[2]).all()
    assert picked.tokens[1, 0] == 1  # the first row starts with BOS


def test_an_existing_cache_opens_without_reading_the_inputs(tmp_path):
    inputs = corpus(tmp_path, files=2, docs=20)
    reader = build(str(tmp_path / "cache"), inputs)
    for path in inputs:  # same size, so the same cache key, but no longer readable
        Path(path).write_bytes(b"\xff" * os.path.getsize(path))
    again = build(str(tmp_path / "cache"), inputs)
    assert again.rows == reader.rows
    assert (again.read(np.arange(3)).tokens == reader.read(np.arange(3)).tokens).all()


def test_a_file_named_twice_in_one_entry_is_read_once(tmp_path):
    """The same path twice, or two globs matching one file, silently doubled its rows."""
    first, second = corpus(tmp_path, files=2, docs=20)
    spellings = [
        first,
        second,
        first,
        str(tmp_path / "corpus" / "*.jsonl.gz"),
        f"{tmp_path}/corpus/./0.jsonl.gz",
    ]
    (twice,) = plan(str(tmp_path / "cache"), spellings)
    assert [u.path for u in twice.units] == [first, second]
    assert (
        build(str(tmp_path / "cache"), spellings).rows
        == build(str(tmp_path / "once"), [first, second]).rows
    )


def test_parquet_and_save_to_disk_give_the_same_rows_as_jsonl(tmp_path):
    records = documents(400)
    jsonl = build(str(tmp_path / "a"), [str(write_jsonl(tmp_path / "c.jsonl", records))])
    others = [
        build(str(tmp_path / "b"), [str(write_parquet(tmp_path / "c.parquet", records))]),
        build(str(tmp_path / "c"), [str(save_to_disk(tmp_path / "saved", records, shards=1))]),
    ]
    every_row = np.arange(jsonl.rows)
    expected = jsonl.read(every_row)
    for reader in others:
        assert reader.rows == jsonl.rows
        got = reader.read(every_row)
        assert (got.tokens == expected.tokens).all() and (got.flags == expected.flags).all()


def _build_share(root: str, inputs: list[str], index: int, count: int) -> None:
    caches = plan(root, inputs)
    cache.build(caches, settings(DataConfig(), 33), index, count)


def test_four_processes_build_the_same_bytes_as_one(tmp_path):
    inputs = corpus(tmp_path)
    build(str(tmp_path / "one"), inputs)
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(target=_build_share, args=(str(tmp_path / "four"), inputs, i, 4))
        for i in range(4)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0
    # Each process committed only its own shards; the index comes once all are there.
    build(str(tmp_path / "four"), inputs)
    one, four = cache_files(tmp_path / "one"), cache_files(tmp_path / "four")
    assert len(one) == 2 * 6 + 1 and one == four


def test_a_pool_of_workers_builds_the_same_bytes(tmp_path):
    inputs = corpus(tmp_path, files=3)
    build(str(tmp_path / "one"), inputs)
    caches = plan(str(tmp_path / "pool"), inputs)
    lines: list[str] = []
    cache.build(caches, settings(DataConfig(), 33, memory_mb=1), workers=2, log=lines.append)
    assert cache_files(tmp_path / "one") == cache_files(tmp_path / "pool")
    assert lines[0].startswith("data: cache 1/3 files, ") and "tokens/s, ETA " in lines[0]


def test_a_pool_lists_the_cache_now_and_then_not_once_per_shard_built(tmp_path, monkeypatch):
    """Every finished shard made it list the cache directory again: quadratic in the files
    (3000 files: 2940 listings, 73 s against 8 s on one worker), on gs:// one paged listing
    each."""
    inputs = corpus(tmp_path, files=80, docs=2)
    caches = plan(str(tmp_path / "pool"), inputs)
    listed = []
    real = io.listdir
    monkeypatch.setattr(io, "listdir", lambda path: listed.append(path) or real(path))
    cache.build(caches, settings(DataConfig(), 33, memory_mb=1), workers=2)
    assert cache.finalize(caches[0])["documents"] == 160
    assert len(listed) < 40, len(listed)  # one per WAIT_POLL_S: the build takes seconds


BUILD_SCRIPT = """
import sys
from tests.fixtures_data import plan, settings
from trainer import cache
from trainer.config import DataConfig
root, inputs = sys.argv[1], sys.argv[2:]
cache.build(plan(root, inputs), settings(DataConfig(), 33, memory_mb=1))
"""


def test_a_build_killed_half_way_resumes_to_the_same_cache(tmp_path):
    inputs = corpus(tmp_path, files=8, docs=400)
    build(str(tmp_path / "reference"), inputs)
    root = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILD_SCRIPT, str(root), *inputs],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        wait_for(lambda: len(list(root.rglob("shard-*.json"))) >= 2, what="two committed shards")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    committed = len(list(root.rglob("shard-*.json")))
    assert committed < 8 and not list(root.rglob("index.json")), "killed too late"
    (caches,) = [plan(str(root), inputs)]
    with pytest.raises(RecipeError, match="is not complete"):
        cache.open_all(caches, 33, "data.train")  # a partial cache is never served
    lines: list[str] = []
    cache.build(caches, settings(DataConfig(), 33), log=lines.append)
    assert lines[0].startswith(f"data: cache {committed + 1}/8 files")  # committed ones kept
    assert cache_files(root) == cache_files(tmp_path / "reference")


def test_a_killed_builders_temporary_shard_is_removed_and_a_live_ones_kept(tmp_path):
    """A SIGKILL mid-shard left its .tmp-shard-* file (as large as the shard) in the cache for
    good; the next build removes it, but not the one a live (here: stopped) builder writes."""
    big = write_jsonl(tmp_path / "big.jsonl", documents(8000))
    inputs = [str(big), str(write_jsonl(tmp_path / "small.jsonl", documents(20)))]
    root = tmp_path / "cache"
    caches = plan(str(root), inputs)
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILD_SCRIPT, str(root), *inputs],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        (temp,) = wait_for(lambda: list(root.rglob(".tmp-shard-*")), what="a temporary shard")
        proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: stopped(proc.pid), what="a stop")
        assert temp.exists() and not list(root.rglob("shard-*.json")), "built too fast"
        # Another process of the run builds its share meanwhile: the live temp stays.
        cache.build(caches, settings(DataConfig(), 33), 1, 2, write_index=False)
        assert temp.exists() and list(root.rglob("shard-00001.json"))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    cache.build(caches, settings(DataConfig(), 33))  # the same run, restarted
    assert not list(root.rglob(".tmp-*")) and cache.finalize(caches[0])["documents"] == 8020


def test_a_shard_claimed_by_another_live_run_is_waited_for_not_built_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "WAIT_POLL_S", 0.05)
    inputs = corpus(tmp_path, files=2, docs=50)
    caches = plan(str(tmp_path / "cache"), inputs)
    (other,) = caches
    io.write_text(cache.shard_path(other, 1, "claim"), json.dumps({"owner": "run-b", "time": 1e12}))
    lines: list[str] = []
    waiting = threading.Event()

    def log(line: str) -> None:
        lines.append(line)
        if "waiting for 1 shards another run is building" in line:
            waiting.set()

    builder = threading.Thread(
        target=cache.build,
        args=(caches, settings(DataConfig(), 33, owner="run-a")),
        kwargs={"log": log},
    )
    builder.start()
    assert waiting.wait(timeout=120)
    shard_stats = cache.build_shard(other, 1, settings(DataConfig(), 33, owner="run-b"), 64)
    builder.join(timeout=120)
    assert not builder.is_alive()
    assert (tmp_path / "cache").exists() and cache.finalize(other)["documents"] == 100
    assert shard_stats["documents"] == 50
    assert sum("tokens/s" in line for line in lines) == 2 and lines[-1].startswith("data: built ")
    # A claim that stopped making progress (its builder died) is taken over.
    stale = plan(str(tmp_path / "stale"), inputs)
    io.write_text(cache.shard_path(stale[0], 0, "claim"), json.dumps({"owner": "x", "time": 0}))
    cache.build(stale, settings(DataConfig(), 33, owner="run-a"))
    assert cache.finalize(stale[0]) is not None


def test_gcs_inputs_and_cache_match_local_ones(gcs, tmp_path):
    source = REPO / "recipes" / "data"
    local = build(str(tmp_path), [str(source / "tiny_eval.txt")])
    bucket = "gs://test-bucket"
    io.write_text(f"{bucket}/data/eval.txt", (source / "tiny_eval.txt").read_text())
    remote = build(f"{bucket}/cache", [f"{bucket}/data/eval.txt"])
    rows = np.array([0, 7, 3])
    assert remote.rows == local.rows
    assert (remote.read(rows).tokens == local.read(rows).tokens).all()
    assert any(n.endswith(".rows") for n in io.listdir(remote.paths[0].rsplit("/", 1)[0]))


def test_packed_chat_rows_train_only_on_assistant_replies(tmp_path):
    tok = load_tokenizer(TOKENIZER)
    chat = [str(REPO / "recipes" / "data" / "tiny_chat.jsonl")]
    reader = build(str(tmp_path), chat, seq_len=255, format="chat")
    batch = data.batch_arrays(reader.read(np.arange(4)))
    assert (batch["segment_ids"].max(axis=1) >= 2).all()  # several conversations per row
    for targets, weights in zip(batch["targets"], batch["weights"], strict=True):
        learned = tok.decode(
            [t for t, w in zip(targets, weights, strict=True) if w and t != tok.sp.eos_id()]
        )
        assert "plus" in learned and "What is" not in learned and "<|user|>" not in learned


def test_summary_counts_documents_tokens_rows_and_padding(tmp_path):
    inputs = corpus(tmp_path, files=2, docs=30)
    caches = plan(str(tmp_path / "cache"), inputs)
    cache.build(caches, settings(DataConfig(), 33))
    index = cache.finalize(caches[0])
    line = cache.summary("data.train", caches, [index])
    assert line.startswith(f"data.train: 60 documents, {index['tokens'] / 1e6:.2f}M tokens, ")
    assert f"{index['rows']} rows, padding " in line and "tokens per dataset: " in line
    assert index["tokens"] + index["padding"] == index["rows"] * 33


def test_examples_cut_to_a_row_are_counted_and_a_cache_with_no_target_left_is_refused(tmp_path):
    """A chat set whose replies all fell past train.seq_len trained steps of loss 0, silently."""
    chat = str(tmp_path / "chat.jsonl")
    turns = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    Path(chat).write_text("\n".join(json.dumps({"messages": m}) for m in [turns, short, turns]))
    reader = build(str(tmp_path / "some"), [chat], seq_len=64, format="chat")
    caches = plan(str(tmp_path / "some"), [chat], 64, format="chat")
    line = cache.summary("data.train", caches, [cache.finalize(caches[0])])
    assert line.endswith(f"; cut to a row's length: 2 of {caches[0].name} (first: {chat}:1)")
    assert reader.rows == 3 and cache.finalize(caches[0])["targets"] > 0  # "hello" at least
    Path(chat).write_text(json.dumps({"messages": turns}))
    with pytest.raises(RecipeError, match=rf"data.train\[0\]: no example of .* keeps a training "
                       rf"target within 65 tokens \(1 of 1 cut to that length, first: {chat}:1\);"
                       " raise train.seq_len or shorten the examples"):  # fmt: skip
        build(str(tmp_path / "none"), [chat], seq_len=64, format="chat")


def test_shards_past_99999_are_told_apart(tmp_path):
    """shard-100000.json was read as shard 10000: a corpus of over 100k files never finished."""
    for shard in (3, 10000, 100000, 123456):
        (tmp_path / f"shard-{shard:05d}.json").write_text("{}")
    (tmp_path / "shard-00003.rows").write_text("")
    assert cache._committed(cache.DatasetCache("x", str(tmp_path), ())) == {
        3,
        10000,
        100000,
        123456,
    }


MEMORY_MB = 4
SLACK_MB = 8  # Python's and Arrow's allocators; one-off costs are paid before the baseline
LIMIT_MB = MEMORY_MB + SLACK_MB
CORPUS_MB = 28  # of text; the packed rows are ~1.7x that
DOCS_PER_FILE = 4000

BUILDER = """
import json, sys
from tests.fixtures_data import plan, settings
from trainer import cache
from trainer.config import DataConfig

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

warm, corpus, root = sys.argv[1:4]
config = settings(DataConfig(), 2049, memory_mb=int(sys.argv[4]))
# Warm up on a copy of one file of each kind: libraries' code, reader buffers and allocator
# arenas are one-off costs, paid before the baseline.
cache.build(plan(warm, [corpus + "/part-000.jsonl.gz", corpus + "/part-001.parquet"], 2048), config)
baseline = rss("VmRSS")
caches = plan(root, [corpus + "/*"], 2048)
cache.build(caches, config)
print(json.dumps({"growth_mb": rss("VmHWM") - baseline, "index": cache.finalize(caches[0])}))
"""


def generate(directory: Path, megabytes: int) -> int:
    """Alternate .jsonl.gz and .parquet files of random text until `megabytes` of text."""
    rng, written, number = random.Random(0), 0, 0
    directory.mkdir()
    while written < megabytes * 2**20:
        docs = [
            {"text": f"doc {number + i} " + " ".join(rng.choices(WORDS, k=200))}
            for i in range(DOCS_PER_FILE)
        ]
        name = f"part-{number // DOCS_PER_FILE:03d}"
        if number // DOCS_PER_FILE % 2:
            write_parquet(directory / f"{name}.parquet", docs, row_group=500)
        else:
            with gzip.open(directory / f"{name}.jsonl.gz", "wt") as f:
                f.writelines(json.dumps(d) + "\n" for d in docs)
        written += sum(len(d["text"]) for d in docs)
        number += DOCS_PER_FILE
    return number


@pytest.mark.slow
def test_cache_build_memory_is_bounded_by_the_setting_not_the_corpus(tmp_path):
    documents = generate(tmp_path / "corpus", CORPUS_MB)
    warm = tmp_path / "warm"
    result = subprocess.run(
        [sys.executable, "-c", BUILDER, str(warm), str(tmp_path / "corpus"), str(tmp_path / "cache"), str(MEMORY_MB)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=True,
    )  # fmt: skip
    report = json.loads(result.stdout.splitlines()[-1])
    index = report["index"]
    rows_mb = index["rows"] * data.row_bytes(2049) / 2**20
    assert rows_mb > 3 * LIMIT_MB and CORPUS_MB > 2 * LIMIT_MB  # an in-memory build cannot fit
    assert report["growth_mb"] < LIMIT_MB, report
    # Every document once: one BOS and one EOS each, and the counts agree with the rows.
    assert index["documents"] == documents
    bos = eos = real = 0
    for shard in index["shards"]:
        rows = np.fromfile(next((tmp_path / "cache").glob(f"*/{shard['file']}")), np.uint8)
        packed = data.Packed.from_bytes(rows.reshape(shard["rows"], -1), 2049)
        bos += int((packed.tokens[packed.segments > 0] == 1).sum())
        eos += int((packed.tokens[packed.segments > 0] == 2).sum())
        real += int((packed.segments > 0).sum())
    assert bos == eos == documents and real == index["tokens"]


@pytest.mark.parametrize("shared", [True, False])
def test_a_pod_builds_each_shard_once_on_shared_storage_and_all_of_them_on_its_own(
    tmp_path, shared
):
    inputs = corpus(tmp_path, files=3, docs=40)
    build(str(tmp_path / "one"), inputs)
    barrier = threading.Barrier(2, timeout=120)
    roots = [tmp_path / "pod"] * 2 if shared else [tmp_path / "host0", tmp_path / "host1"]
    logs: list[list[str]] = [[], []]

    def process(index: int) -> None:
        caches = plan(str(roots[index]), inputs)
        cache.build_on_pod(
            caches, settings(DataConfig(), 33), (index, 2), lambda _: barrier.wait(),
            log=logs[index].append,
        )  # fmt: skip

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for root in set(roots):
        assert cache_files(root) == cache_files(tmp_path / "one")
    built = [sum("tokens/s" in line for line in log) for log in logs]
    assert built == ([2, 1] if shared else [3, 3])  # shards 0, 2 / 1, then the rest alone
