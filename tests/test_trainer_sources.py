"""Every input kind streams the same records: text, (compressed) JSON lines, Parquet,
save_to_disk directories and hf: datasets, local and on a GCS emulator, with globs."""

from __future__ import annotations

import gzip

import pytest

from tests.fixtures_data import documents, save_to_disk, write_jsonl, write_parquet
from trainer import io, sources
from trainer.config import RecipeError


def records_of(spec: str) -> list:
    return [r for unit in sources.expand(spec, "data.train[0]") for r in sources.read_records(unit)]


def test_text_files_split_on_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first doc\nsame doc\n\n\nsecond doc\n")
    assert records_of(str(path)) == ["first doc\nsame doc", "second doc"]


def test_a_byte_order_mark_is_not_read_as_text(tmp_path):
    """A .txt saved with a BOM trained on its bytes as the first tokens of the first document,
    and a .jsonl with one was refused as not JSON (datasets' json loader reads it)."""
    bom = "\ufeff".encode()
    (tmp_path / "t.txt").write_bytes(bom + b"first doc\n\nsecond doc\n")
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(bom + b"first doc\n"))
    (tmp_path / "t.jsonl").write_bytes(bom + b'{"text": "first doc"}\n')
    assert records_of(str(tmp_path / "t.txt")) == ["first doc", "second doc"]
    assert records_of(str(tmp_path / "t.txt.gz")) == ["first doc"]
    assert records_of(str(tmp_path / "t.jsonl")) == [{"text": "first doc"}]


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}])
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(RecipeError, match=r"bad\.jsonl line 2 is not JSON"):
        records_of(str(path))


def test_every_format_gives_the_same_records(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records = documents(700)
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst"):
        write_jsonl(tmp_path / name, records)
    write_parquet(tmp_path / "c.parquet", records)
    save_to_disk(tmp_path / "saved", records, shards=3)
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", records)
    specs = ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet", "saved"]
    for spec in [str(tmp_path / s) for s in specs] + [f"hf:{tmp_path / 'hub'}:train"]:
        assert records_of(spec) == records, spec
    assert len(sources.expand(str(tmp_path / "saved"), "x")) == 3  # one unit per Arrow file


def test_two_saved_datasets_with_files_of_one_size_have_different_cache_keys(tmp_path):
    """Saved datasets all name their files data-0000N-of-0000M.arrow: keyed by that name
    and its size, another dataset of the same size reused the first one's token cache."""
    records = documents(50)
    scrambled = [{"text": r["text"][::-1]} for r in records]  # same bytes, other text
    first = sources.expand(str(save_to_disk(tmp_path / "a", records, shards=1)), "x")
    other = sources.expand(str(save_to_disk(tmp_path / "b", scrambled, shards=1)), "x")
    assert first[0].size == other[0].size
    assert first[0].key != other[0].key
    again = sources.expand(str(save_to_disk(tmp_path / "a", scrambled, shards=1)), "x")
    assert again[0].key != first[0].key  # saved again in place: a new version


def test_globs_expand_sorted_and_an_empty_glob_is_an_error(tmp_path):
    for i in (2, 0, 1):
        write_jsonl(tmp_path / f"part-{i}.jsonl.gz", documents(3, start=10 * i))
    units = sources.expand(str(tmp_path / "part-*.jsonl.gz"), "data.train[0]")
    assert [u.path.rsplit("/", 1)[1] for u in units] == [f"part-{i}.jsonl.gz" for i in range(3)]
    assert {u.compression for u in units} == {"gz"}
    with pytest.raises(RecipeError, match=r"data.train\[1\]: no file matches .*nope-\*"):
        sources.expand(str(tmp_path / "nope-*.jsonl"), "data.train[1]")


def test_unreadable_inputs_say_what_to_give(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(RecipeError, match=r"x\.csv is not an input this trainer reads; use \.txt"):
        sources.expand(str(tmp_path / "x.csv"), "data.train[0]")
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(documents(2))})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(RecipeError, match="holds a DatasetDict: name one split's subdirectory"):
        sources.expand(str(tmp_path / "dd"), "data.train[0]")
    assert len(records_of(str(tmp_path / "dd" / "train"))) == 2


def test_a_file_that_is_not_what_its_name_says_is_one_line_naming_it(tmp_path):
    """They were tracebacks: UnicodeDecodeError, BadGzipFile, EOFError, ArrowInvalid."""
    import gzip

    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (tmp_path / "fake.jsonl.gz").write_text('{"text": "not gzip"}\n')
    whole = gzip.compress(b'{"text": "a"}\n' * 100)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "empty.parquet").write_bytes(b"")
    for name, kind in [("latin1.jsonl", "jsonl"), ("fake.jsonl.gz", r"jsonl \(gz\)"),
                       ("cut.jsonl.gz", r"jsonl \(gz\)"), ("empty.parquet", "parquet")]:  # fmt: skip
        with pytest.raises(RecipeError, match=rf"data: .*{name} cannot be read as {kind}: "):
            records_of(str(tmp_path / name))


def test_an_hf_dataset_is_keyed_by_its_version_and_a_sliced_split_is_refused(tmp_path, monkeypatch):
    """`train[:10]` trained on the whole split (the cache reads whole Arrow files), and a
    dataset revised to files of the same size reused the old version's token cache."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records = documents(100)
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", records)
    spec = f"hf:{tmp_path / 'hub'}"
    with pytest.raises(RecipeError, match=r"split slices \(train\[:10\]\) are not supported"):
        sources.expand(f"{spec}:train[:10]", "data.train[0]")
    (first,) = sources.expand(spec, "x")
    scrambled = [{"text": r["text"][::-1]} for r in records]  # same bytes, other text
    write_jsonl(tmp_path / "hub" / "train.jsonl", scrambled)
    (revised,) = sources.expand(spec, "x")
    assert revised.size == first.size and revised.key != first.key


def test_hf_names_parse_into_name_config_and_split():
    assert sources.parse_hf("hf:allenai/c4/en:validation") == ("allenai/c4", "en", "validation")
    assert sources.parse_hf("hf:roneneldan/TinyStories") == (
        "roneneldan/TinyStories",
        None,
        "train",
    )
    assert sources.parse_hf("hf:imdb:test") == ("imdb", None, "test")


def test_gcs_globs_of_compressed_jsonl_and_parquet(gcs, tmp_path):
    records = documents(50)
    write_jsonl(tmp_path / "a.jsonl.gz", records[:20])
    write_parquet(tmp_path / "b.parquet", records[20:], row_group=7)
    for name in ("a.jsonl.gz", "b.parquet"):
        io.write_bytes(f"gs://test-bucket/corpus/{name}", (tmp_path / name).read_bytes())
    assert records_of("gs://test-bucket/corpus/a.jsonl.gz") == records[:20]
    assert records_of("gs://test-bucket/corpus/*.parquet") == records[20:]
    (unit,) = sources.expand("gs://test-bucket/corpus/*.gz", "x")
    assert unit.path == "gs://test-bucket/corpus/a.jsonl.gz"
    assert unit.size == (tmp_path / "a.jsonl.gz").stat().st_size
