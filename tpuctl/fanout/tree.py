"""The walk `get` makes over one worker's tree, whatever reads it (SFTP, or a local pod's
own files), and `put` over a local tree, whatever writes it (SFTP, a tar stream, a local
pod's directory): nothing a worker lists is trusted.

- A name with `/`, `.`, `..` or NUL is refused (UnsafeName): a compromised worker can list
  anything.
- Every target must resolve inside `local`'s parent (LOCAL_DIR/wNN), so nothing is written
  through a link that an earlier copy, or the user, left there.
- Only regular files and directories are copied. Symlinks inside the tree are not followed,
  and FIFOs, devices and sockets are not read (a FIFO would hang the copy, `/dev/zero` would
  fill the disk); each is appended to `skipped`. `put` copies the same kinds and skips the
  same others, so SFTP and tar give the same tree.
- Files get the modes tarfile's "data" filter gives (`file_mode`), whichever way they came,
  and are private (0600) until they are whole: a worker's secret is never readable by
  others here, not even while it is being copied. They keep their modification times, as
  tar keeps them.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


class UnsafeName(OSError):
    """A worker's listing named something that would land outside the local target."""


@dataclass(frozen=True)
class Reader:
    """How to read one worker's tree: a directory's entries as (name, own mode: a link's is
    the link's), one file's content written to an open local file (returning the file's
    modification time, None where unknown), and how its paths join."""

    entries: Callable[[str], Iterable[tuple[str, int]]]
    copy: Callable[[str, BinaryIO], float | None]
    join: Callable[[str, str], str]


def file_mode(mode: int) -> int:
    """The permissions of a copied file of `mode`, as tarfile's "data" filter sets them: no
    set-id or sticky bits and no group or other write; readable and writable by its owner,
    and executable by others only if by its owner."""
    safe = (mode & 0o755) | 0o600
    return safe if safe & 0o100 else safe & ~0o011


def _write_private(local: Path, mode: int, fill: Callable[[BinaryIO], float | None]) -> None:
    """Write `local` through `fill` while only its owner can read it (created 0600; one
    that existed is made 0600 first), then give it `file_mode(mode)` and the modification
    time `fill` returns (access time the same, as tar sets them)."""
    descriptor = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        os.fchmod(descriptor, 0o600)
        mtime = fill(out)
        out.flush()
        os.fchmod(descriptor, file_mode(mode))
        if mtime is not None:
            os.utime(descriptor, (mtime, mtime))


@dataclass(frozen=True)
class Writer:
    """Where a walk copies to: make a directory (given its source's mode), copy one file
    (its source path and mode) to a target, and how target paths join."""

    directory: Callable[[str, int], None]
    file: Callable[[str, int, str], None]
    join: Callable[[str, str], str]


def _local_entries(directory: str) -> list[tuple[str, int]]:
    return [(e.name, e.stat(follow_symlinks=False).st_mode) for e in os.scandir(directory)]


def _local_copy(path: str, out: BinaryIO) -> float:
    with open(path, "rb") as source:
        shutil.copyfileobj(source, out)
        return os.fstat(source.fileno()).st_mtime


# This machine's own files (`put`'s source, a local pod worker's tree).
LOCAL = Reader(_local_entries, _local_copy, os.path.join)


def local_writer(reader: Reader, final_mode: Callable[[int], int], root: str | None) -> Writer:
    """Writes files of this machine from `reader`, each private until whole and then given
    `final_mode` of its source's mode; with a `root`, nothing that resolves outside it."""

    def inside(target: str) -> Path:
        if root is not None and os.path.commonpath([os.path.realpath(target), root]) != root:
            raise UnsafeName(f"refusing to write {target}: it resolves outside {root}")
        return Path(target)

    def directory(target: str, mode: int) -> None:
        inside(target).mkdir(parents=True, exist_ok=True)

    def file(source: str, mode: int, target: str) -> None:
        path = inside(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, final_mode(mode), lambda out: reader.copy(source, out))

    return Writer(directory, file, os.path.join)


def get_tree(reader: Reader, source: str, mode: int, local: Path, skipped: list[str]) -> int:
    """Copy the file or directory `source` (of `mode`: the user named it, so a link there is
    followed) to `local`; returns the number of files copied."""
    writer = local_writer(reader, file_mode, os.path.realpath(local.parent))
    return walk(reader, writer, source, mode, str(local), skipped)


def put_tree(source: Path, writer: Writer, target: str, skipped: list[str]) -> int:
    """Copy this machine's file or directory `source` (a link there is followed: the user
    named it) through `writer` to `target`, links and special files inside skipped as `get`
    skips them; returns the number of files copied."""
    return walk(LOCAL, writer, str(source), source.stat().st_mode, target, skipped)


def put_target(source: Path, remote: str, is_dir: Callable[[str], bool]) -> str:
    """Where `put` copies `source`: a directory to `remote` itself (merged into one that
    exists); a file into `remote` when that is a directory (one that `is_dir`, or a path
    ending in `/`), as cp does, else to `remote`."""
    if source.is_dir() or not (remote.endswith("/") or is_dir(remote)):
        return remote.rstrip("/") or "/"
    return posixpath.join(remote, source.name)


def walk(
    reader: Reader, writer: Writer, source: str, mode: int, target: str, skipped: list[str]
) -> int:
    """Copy `source` (of `mode`) to `target`: regular files and directories only, the
    others appended to `skipped`; returns the number of files copied."""
    if stat.S_ISREG(mode):
        writer.file(source, mode, target)
        return 1
    if not stat.S_ISDIR(mode):
        skipped.append(source)
        return 0
    writer.directory(target, mode)
    copied = 0
    for name, child_mode in sorted(reader.entries(source)):
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise UnsafeName(
                f"refusing the name {name!r} that the worker listed in {source}: "
                "entries of a directory cannot contain '/' or be '.' or '..'"
            )
        child, child_target = reader.join(source, name), writer.join(target, name)
        copied += walk(reader, writer, child, child_mode, child_target, skipped)
    return copied
