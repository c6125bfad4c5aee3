"""trainer.io against local disk and a real GCS emulator (read back with google-cloud-storage)."""

from __future__ import annotations

import pytest

from trainer import io


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    request.getfixturevalue("gcs")
    return "gs://test-bucket/root"


def test_write_read_list_remove(root):
    io.makedirs(root)
    io.write_text(io.join(root, "a.txt"), "hello\n")
    io.write_bytes(io.join(root, "sub", "b.bin"), b"\x00\x01")
    assert io.read_text(io.join(root, "a.txt")) == "hello\n"
    assert io.read_bytes(io.join(root, "sub", "b.bin")) == b"\x00\x01"
    assert io.listdir(root) == ["a.txt", "sub"]
    assert io.isdir(io.join(root, "sub")) and not io.isdir(io.join(root, "a.txt"))
    assert io.exists(io.join(root, "a.txt")) and not io.exists(io.join(root, "nope"))
    io.remove(io.join(root, "a.txt"))
    assert not io.exists(io.join(root, "a.txt"))
    assert io.listdir(root) == ["sub"]


def test_open_file_streams_lines(root):
    path = io.join(root, "metrics.jsonl")
    with io.open_file(path, "w") as f:
        f.write('{"step": 1}\n{"step": 2}\n')
    with io.open_file(path) as f:
        assert [line.strip() for line in f] == ['{"step": 1}', '{"step": 2}']


def test_copy_tree_uploads_a_directory(root, tmp_path):
    source = tmp_path / "export"
    (source / "nested").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "nested" / "x").write_text("y")
    io.copy_tree(str(source), io.join(root, "out"))
    assert io.listdir(io.join(root, "out")) == ["config.json", "nested"]
    assert io.read_text(io.join(root, "out", "nested", "x")) == "y"


def test_objects_are_real_gcs_objects(gcs):
    io.write_text("gs://test-bucket/run/DONE", '{"step": 3}')
    blob = gcs.client().bucket("test-bucket").blob("run/DONE")
    assert blob.download_as_text() == '{"step": 3}'
    gcs.client().bucket("test-bucket").blob("run/from-client").upload_from_string(b"x")
    assert io.listdir("gs://test-bucket/run") == ["DONE", "from-client"]


def test_missing_gcs_object_raises_file_not_found(gcs):
    with pytest.raises(FileNotFoundError):
        io.read_text("gs://test-bucket/does/not/exist")


def test_glob_with_sizes_and_ranged_reads(root):
    for name, body in (("b.jsonl", b"0123456789"), ("a.jsonl", b"abcdef"), ("c.txt", b"x")):
        io.write_bytes(io.join(root, "d", name), body)
    pattern = io.join(root, "d", "*.jsonl")
    assert io.glob_sizes(pattern) == {
        io.join(root, "d", "a.jsonl"): 6,
        io.join(root, "d", "b.jsonl"): 10,
    }
    assert io.glob(io.join(root, "d", "*.parquet")) == []
    assert io.size(io.join(root, "d", "c.txt")) == 1
    paths = [io.join(root, "d", n) for n in ("b.jsonl", "a.jsonl", "b.jsonl")]
    assert io.read_ranges(paths, [7, 1, 2], 3) == [b"789", b"bcd", b"234"]


def test_a_double_star_glob_matches_at_every_depth_locally_as_on_gcs(root):
    """Locally `**` matched one directory level only; gs:// matched every depth."""
    for parts in (("top.txt",), ("x", "mid.txt"), ("x", "y", "deep.txt")):
        io.write_text(io.join(root, "rg", *parts), "t")
    assert io.glob(io.join(root, "rg", "**", "*.txt")) == [
        io.join(root, "rg", *parts)
        for parts in (("top.txt",), ("x", "mid.txt"), ("x", "y", "deep.txt"))
    ]


def test_publish_moves_a_finished_local_file_into_place(root, tmp_path):
    finished = tmp_path / "shard.tmp"
    finished.write_bytes(b"rows")
    io.publish(str(finished), io.join(root, "cache", "shard.rows"))
    assert io.read_bytes(io.join(root, "cache", "shard.rows")) == b"rows"
    assert not finished.exists()
