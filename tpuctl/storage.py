"""A thin layer over google-cloud-storage for the files tpuctl keeps in GCS (run recipes).

With `STORAGE_EMULATOR_HOST` set, the client talks to that emulator anonymously (buckets
are created on demand there); otherwise it uses the default credential chain and the
bucket must already exist. google.cloud.storage is imported only when a call needs it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tpuctl.errors import TpuctlError

RUNS_PREFIX = "tpuctl/runs"


EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


def emulator_url() -> str | None:
    """The GCS emulator this process talks to, if any."""
    return os.environ.get(EMULATOR_ENV) or None


def split_uri(uri: str) -> tuple[str, str]:
    """`gs://bucket/a/b` -> ("bucket", "a/b"); a TpuctlError for anything else."""
    if not uri.startswith("gs://") or "/" not in uri[5:]:
        raise TpuctlError(f"{uri!r} is not a gs://BUCKET/PATH URI")
    bucket, _, path = uri[5:].partition("/")
    return bucket, path


def bucket_name(value: str) -> str:
    """The bucket setting accepts `NAME` or `gs://NAME`; returns NAME."""
    name = value.removeprefix("gs://").strip("/")
    if not _is_bucket_name(name):
        raise TpuctlError(
            f"bucket {value!r:.80} is not a bucket name (3-222 lowercase letters, digits, '-', "
            "'_' and '.', starting and ending with a letter or digit); set it with "
            "`tpuctl config set bucket NAME`"
        )
    return name


def _is_bucket_name(name: str) -> bool:
    """GCS's naming rules: 3-63 characters, or up to 222 in dot-separated parts of at most
    63; lowercase letters, digits, '-' and '_'; a letter or digit first and last."""
    parts = name.split(".")
    return (
        3 <= len(name) <= (222 if len(parts) > 1 else 63)
        and all(re.fullmatch(r"[a-z0-9_-]{1,63}", part) for part in parts)
        and name[0].isalnum()
        and name[-1].isalnum()
    )


def recipe_uri(bucket: str, run_id: str) -> str:
    """Where a run's recipe lives: gs://BUCKET/tpuctl/runs/RUN_ID/recipe.yaml."""
    return f"gs://{bucket_name(bucket)}/{RUNS_PREFIX}/{run_id}/recipe.yaml"


@contextlib.contextmanager
def emulated(url: str | None) -> Iterator[None]:
    """While inside, this process's gs:// calls go to the emulator at `url` (None: no change),
    e.g. a local pod's run files, which its workers wrote there."""
    if url is None:
        yield
        return
    previous = os.environ.get(EMULATOR_ENV)
    os.environ[EMULATOR_ENV] = url
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(EMULATOR_ENV, None)
        else:
            os.environ[EMULATOR_ENV] = previous


def _client() -> Any:
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    url = emulator_url()
    if url:
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project="tpuctl-emulator",
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=url),
        )
    try:
        return storage.Client()
    except DefaultCredentialsError:
        raise TpuctlError(
            "no Google Cloud credentials for gs:// files: run `gcloud auth application-default "
            f"login` (a GCS emulator's files: set {EMULATOR_ENV})",
            exit_code=1,
        ) from None


def blob(uri: str) -> Any:
    """The google-cloud-storage Blob of a gs:// object (for generation preconditions)."""
    bucket_id, path = split_uri(uri)
    return _client().bucket(bucket_id).blob(path)


def upload_text(uri: str, text: str, if_generation_match: int | None = None) -> None:
    """Write `text` to a gs:// object, creating the bucket only on an emulator.
    `if_generation_match=0` writes only an object that does not exist yet: otherwise
    google.api_core's PreconditionFailed, for the caller to look at the one that does."""
    from google.api_core import exceptions

    bucket_id, path = split_uri(uri)
    client = _client()
    bucket = client.bucket(bucket_id)
    try:
        bucket.blob(path).upload_from_string(
            text, content_type="text/yaml", if_generation_match=if_generation_match
        )
    except exceptions.PreconditionFailed:
        raise
    except exceptions.NotFound:
        if not emulator_url():
            raise TpuctlError(
                f"bucket gs://{bucket_id} does not exist; create it (`gcloud storage buckets "
                "create`) or set another with `tpuctl config set bucket NAME`",
                exit_code=1,
            ) from None
        client.create_bucket(bucket_id)
        bucket.blob(path).upload_from_string(
            text, content_type="text/yaml", if_generation_match=if_generation_match
        )
    except exceptions.Forbidden as err:
        raise TpuctlError(f"no permission to write {uri}: {err.message}", exit_code=1) from None
    except (exceptions.GoogleAPIError, exceptions.RetryError) as err:  # unreachable, 5xx
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TpuctlError(f"could not write {uri}: {reason}", exit_code=1) from None


# Reads that a poll repeats anyway (babysit's metrics and DONE) retry for seconds, not
# google-cloud-storage's two minutes: an unreachable bucket shows in the next poll's view
# instead of holding up the babysitter's look at the node.
POLL_RETRY_S = 5.0


def _retry(polling: bool) -> Any:
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(POLL_RETRY_S) if polling else DEFAULT_RETRY


def read_text(uri: str, polling: bool = False) -> str | None:
    """The text of a gs:// object, or None when it does not exist (`polling`: give up
    after POLL_RETRY_S of retries)."""
    from google.api_core import exceptions

    bucket_id, path = split_uri(uri)
    try:
        return _client().bucket(bucket_id).blob(path).download_as_text(retry=_retry(polling))
    except exceptions.NotFound:
        return None


def delete(uri: str) -> None:
    """Delete a gs:// object; one that is not there is no error."""
    from google.api_core import exceptions

    bucket_id, path = split_uri(uri)
    with contextlib.suppress(exceptions.NotFound):
        _client().bucket(bucket_id).blob(path).delete()


def read_from(uri: str, start: int) -> tuple[int, bytes] | None:
    """(the object's size, its bytes from `start` on): a ranged read of what a growing
    gs:// object gained since `start`, retried as a poll's read is; b"" when it has not
    grown or is now shorter than `start`. None when it does not exist."""
    from google.api_core import exceptions

    bucket_id, path = split_uri(uri)
    try:
        found = _client().bucket(bucket_id).get_blob(path, retry=_retry(polling=True))
        if found is None:
            return None
        size = found.size or 0
        if size <= start:
            return size, b""
        # found.generation pins the read to the version whose size was just read
        return size, found.download_as_bytes(start=start, retry=_retry(polling=True))
    except exceptions.NotFound:
        return None


def read_tail(uri: str, max_bytes: int) -> bytes | None:
    """The last `max_bytes` of a gs:// object (a ranged read, retried as a poll's read is), or
    None when it does not exist."""
    from google.api_core import exceptions

    bucket_id, path = split_uri(uri)
    try:
        blob = _client().bucket(bucket_id).get_blob(path, retry=_retry(polling=True))
        if blob is None:
            return None
        start = max(0, (blob.size or 0) - max_bytes)
        return blob.download_as_bytes(start=start, retry=_retry(polling=True))
    except exceptions.NotFound:
        return None
    except (exceptions.GoogleAPIError, exceptions.RetryError) as err:  # unreachable, 5xx
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TpuctlError(f"could not read {uri}: {reason}", exit_code=1) from None


def download_prefix(uri: str, destination: Path) -> list[Path]:
    """Download every object under the gs:// prefix `uri` into `destination`, keeping the
    layout below the prefix; returns the local files (none when nothing is there)."""
    bucket_id, path = split_uri(uri.rstrip("/") + "/")
    files = []
    for item in _client().list_blobs(bucket_id, prefix=path):
        if item.name.endswith("/"):
            continue  # a folder placeholder
        target = destination / item.name[len(path) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        item.download_to_filename(str(target))
        files.append(target)
    return files
