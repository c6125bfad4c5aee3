"""One small I/O layer for local paths and gs:// URIs.

Every file the trainer reads or writes (recipe, tokenizer, data, metrics, DONE marker,
checkpoints) goes through here, so a run directory can live on local disk or in a bucket
without the caller caring. On a TPU VM gs:// uses the worker's service account (gcsfs's
default credential chain); with `STORAGE_EMULATOR_HOST` set it talks to that emulator
anonymously, and points tensorstore (orbax's array writer) at it too.
"""

from __future__ import annotations

import glob as globbing
import itertools
import os
import posixpath
import shutil
import tempfile
from typing import IO, Any

GCS_PREFIX = "gs://"


def is_gcs(path: str) -> bool:
    """True for gs:// URIs."""
    return str(path).startswith(GCS_PREFIX)


def configure_gcs_emulator() -> None:
    """Route gcsfs and tensorstore to `STORAGE_EMULATOR_HOST`, if it is set, anonymously.

    Idempotent; called on import and before each gs:// operation, since tests may set the
    variable after this module was imported.
    """
    url = os.environ.get("STORAGE_EMULATOR_HOST")
    if not url:
        return
    if not url.startswith(("http://", "https://")):
        url = f"http://{url}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    # A fixed token: tensorstore would look for gcloud credentials and log an error line.
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "anonymous-emulator")
    # The emulator has no gRPC storage-control API; gcsfs would wait 60 s per bucket for it.
    # Only read when gcsfs is first imported, hence set here before any gs:// access.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import fsspec.config

    fsspec.config.conf.setdefault("gs", {})["token"] = "anon"


def _gcs():
    import fsspec

    configure_gcs_emulator()
    # No listing cache: other hosts write to the same prefixes (checkpoints, markers).
    return fsspec.filesystem("gs", use_listings_cache=False)


def absolute(path: str) -> str:
    """A local path made absolute (orbax refuses relative ones: `run_dir: runs/tiny`);
    gs:// URIs as they are."""
    return path if is_gcs(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' for URIs and os.path.join for local paths."""
    if is_gcs(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def open_file(path: str, mode: str = "r") -> IO[Any]:
    """Open a local file or a gs:// object; writing creates missing parent directories.

    Writing to gs:// uploads on close, and GCS objects cannot be appended to: to grow a
    file on gs:// (metrics.jsonl), rewrite it whole.
    """
    if is_gcs(path):
        return _gcs().open(path, mode)
    if any(flag in mode for flag in "wax"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, mode)


def exists(path: str) -> bool:
    """True if a file or directory (or, on GCS, any object under the prefix) exists."""
    if is_gcs(path):
        return _gcs().exists(path)
    return os.path.exists(path)


def isdir(path: str) -> bool:
    """True for a local directory or a gs:// prefix holding objects."""
    if is_gcs(path):
        return _gcs().isdir(path)
    return os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """Sorted names (not paths) of the entries directly under `path`."""
    if not is_gcs(path):
        return sorted(os.listdir(path))
    prefix = path.rstrip("/")[len(GCS_PREFIX) :]
    entries = _gcs().ls(path, detail=False)
    return sorted({posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != prefix})


def has_glob(path: str) -> bool:
    """True when `path` holds glob wildcards (`*`, `?`, `[`)."""
    return any(c in path for c in "*?[")


def glob(pattern: str) -> list[str]:
    """Sorted paths (gs:// URIs for gs://) of the files matching a glob pattern."""
    return list(glob_sizes(pattern))


def glob_sizes(pattern: str) -> dict[str, int]:
    """{path: size in bytes} of the files matching a glob pattern, sorted by path; on gs://
    from one listing (no request per object)."""
    if not is_gcs(pattern):
        # `**` at every depth, as gcsfs matches it on gs://
        paths = sorted(p for p in globbing.glob(pattern, recursive=True) if os.path.isfile(p))
        return {p: os.path.getsize(p) for p in paths}
    found = _gcs().glob(pattern, detail=True)
    files = {
        GCS_PREFIX + p: int(info["size"]) for p, info in found.items() if info["type"] == "file"
    }
    return dict(sorted(files.items()))


def size(path: str) -> int:
    """Size in bytes of a file or object."""
    if is_gcs(path):
        return int(_gcs().size(path))
    return os.path.getsize(path)


def read_ranges(paths: list[str], starts: list[int], length: int) -> list[bytes]:
    """`length` bytes at each (path, start): many small reads, concurrent on gs:// (one range
    request each, no read-ahead), one open file per path locally."""
    if paths and is_gcs(paths[0]):
        ends = [start + length for start in starts]
        return _gcs().cat_ranges(list(paths), list(starts), ends)
    out: list[bytes] = [b""] * len(paths)
    order = sorted(range(len(paths)), key=lambda i: (paths[i], starts[i]))
    for path, group in itertools.groupby(order, key=lambda i: paths[i]):
        with open(path, "rb") as f:
            for i in group:
                f.seek(starts[i])
                out[i] = f.read(length)
    return out


def makedirs(path: str) -> None:
    """Create a local directory and its parents; a no-op on GCS (prefixes need no creation)."""
    if not is_gcs(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
    """The whole content of a file or object."""
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    """The whole content of a file or object as UTF-8 text."""
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file atomically: readers see the old content or the new, never a part.

    GCS objects are atomic by nature; local files are written beside and renamed.
    """
    if is_gcs(path):
        _gcs().pipe_file(path, data)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def publish(local_path: str, path: str) -> None:
    """Move a finished local file to `path` (local or gs://) in one step: readers see nothing
    or the whole file. For a local `path`, `local_path` must be on the same filesystem."""
    if is_gcs(path):
        _gcs().put_file(local_path, path)
        os.remove(local_path)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    os.replace(local_path, path)


def write_text(path: str, text: str) -> None:
    """Write UTF-8 text atomically (see `write_bytes`)."""
    write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
    """Delete one file or object (not a directory)."""
    if is_gcs(path):
        _gcs().rm_file(path)
    else:
        os.remove(path)


class GenerationMismatch(Exception):
    """A generation-matched gs:// write or delete found the object at another generation, or
    gone: someone else wrote or removed it since."""


def read_with_generation(path: str) -> tuple[bytes, int] | None:
    """A gs:// object's content and its generation, from one read; None when there is none."""
    fs = _gcs()
    bucket, key, _ = fs.split_path(path)
    try:
        headers, data = fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
    except FileNotFoundError:
        return None
    return data, int(headers["x-goog-generation"])


def write_if_generation(path: str, data: bytes, generation: int) -> int:
    """Write a gs:// object only while its generation is `generation` (0: only while there
    is none); its new generation. GenerationMismatch when another is live."""
    fs = _gcs()
    bucket, key, _ = fs.split_path(path)
    # gcsfs's own writes take no generation but 0 (mode="create"): its upload URL, as it builds it
    upload = f"{fs._location}/upload/storage/v1/b/{{}}/o"
    try:
        written = fs.call(
            "POST", upload, bucket, uploadType="media", name=key,
            ifGenerationMatch=str(generation), data=data, json_out=True,
        )  # fmt: skip
    except FileExistsError:  # gcsfs's reading of 412 Precondition Failed
        raise GenerationMismatch(path) from None
    return int(written["generation"])


def remove_if_generation(path: str, generation: int) -> None:
    """Delete a gs:// object only while its generation is `generation`; GenerationMismatch
    when another is live, or none."""
    fs = _gcs()
    bucket, key, _ = fs.split_path(path)
    try:
        fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(generation))
    except (FileExistsError, FileNotFoundError):
        raise GenerationMismatch(path) from None


def copy_tree(source: str, destination: str) -> None:
    """Copy a local directory to a local path or a gs:// prefix."""
    if is_gcs(destination):
        _gcs().put(source.rstrip("/") + "/", destination.rstrip("/"), recursive=True)
    else:
        shutil.copytree(source, destination, dirs_exist_ok=True)


configure_gcs_emulator()
