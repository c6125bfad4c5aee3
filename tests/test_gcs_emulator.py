"""tpuctl.gcs_emulator: the local pods' GCS behaves as GCS documents it for conditional
(generation-matched) writes and reads, with the real clients that use them — tensorstore
(orbax's array store, whose OCDBT manifests are conditional writes) and google-cloud-storage —
and its fault switch fails exactly the chosen writes."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tpuctl.gcs_emulator import GcsEmulator


@pytest.fixture
def kvstore(gcs):
    import tensorstore as ts

    return ts.KvStore.open({"driver": "gcs", "bucket": "test-bucket", "path": "kv/"}).result()


def test_tensorstore_conditional_writes_race_like_on_gcs(kvstore):
    no_value = kvstore.read("manifest").result().stamp.generation  # "must not exist yet"
    first = kvstore.write("manifest", b"writer 1", if_equal=no_value).result()
    second = kvstore.write("manifest", b"writer 2", if_equal=no_value).result()
    assert first.generation and not second.generation  # the second writer lost (412)
    assert kvstore.read("manifest").result().value == b"writer 1"

    updated = kvstore.write("manifest", b"writer 1, v2", if_equal=first.generation).result()
    stale = kvstore.write("manifest", b"stale", if_equal=first.generation).result()
    assert updated.generation and not stale.generation
    read = kvstore.read("manifest").result()
    assert read.value == b"writer 1, v2" and read.stamp.generation == updated.generation

    unchanged = kvstore.read("manifest", if_not_equal=updated.generation).result()
    assert unchanged.state == "unspecified"  # 304 Not Modified: nothing re-sent


def test_generations_strictly_increase_per_write(gcs):
    bucket = gcs.client().bucket("test-bucket")
    generations = []
    for i in range(20):
        blob = bucket.blob("counter")
        blob.upload_from_string(str(i))
        generations.append(blob.generation)
    assert generations == sorted(set(generations))


def test_google_cloud_storage_preconditions(gcs):
    from google.api_core import exceptions

    blob = gcs.client().bucket("test-bucket").blob("commit_success.txt")
    blob.upload_from_string("a", if_generation_match=0)
    with pytest.raises(exceptions.PreconditionFailed):
        blob.upload_from_string("b", if_generation_match=0)
    with pytest.raises(exceptions.PreconditionFailed):
        blob.upload_from_string("b", if_generation_match=blob.generation + 1)
    with pytest.raises(exceptions.PreconditionFailed):
        blob.delete(if_generation_match=blob.generation + 1)
    assert blob.download_as_bytes(if_generation_match=blob.generation) == b"a"
    blob.delete(if_generation_match=blob.generation)
    with pytest.raises(exceptions.PreconditionFailed):  # NotMatch needs a live object
        blob.upload_from_string("c", if_generation_not_match=0)


def test_fault_switch_fails_only_matching_writes():
    from google.api_core import exceptions

    with GcsEmulator(fail_writes=r"/step-5/") as emulator:
        emulator.create_bucket("test-bucket")
        bucket = emulator.client().bucket("test-bucket")
        bucket.blob("run/step-4/data").upload_from_string("ok")
        with pytest.raises(exceptions.Forbidden, match="injected fault"):
            bucket.blob("run/step-5/data").upload_from_string("lost")
        assert [b.name for b in bucket.list_blobs()] == ["run/step-4/data"]


def test_a_counted_fault_fails_only_the_first_matching_writes():
    from google.api_core import exceptions

    with GcsEmulator(fail_writes=r"/step-5/", fail_times=1) as emulator:
        emulator.create_bucket("test-bucket")
        bucket = emulator.client().bucket("test-bucket")
        with pytest.raises(exceptions.Forbidden, match="injected fault"):
            bucket.blob("run/step-5/data").upload_from_string("lost")
        bucket.blob("run/step-5/data").upload_from_string("kept")  # the retry gets through
        assert bucket.blob("run/step-5/data").download_as_bytes() == b"kept"


def test_a_port_in_use_is_one_line_and_exit_2_not_a_hang():
    """The README's `python -m tpuctl.gcs_emulator --port 9023 &` run twice: the second
    printed a thread's traceback, then waited for good, deaf to SIGTERM."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "tpuctl.gcs_emulator", "--port", str(port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (
        2,
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use); pass another --port\n",
    )
