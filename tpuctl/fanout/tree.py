"""The walk `get` makes over one worker's tree, whatever reads it (SFTP, or a local pod's
own files): nothing a worker lists is trusted.

- A name with `/`, `.`, `..` or NUL is refused (UnsafeName): a compromised worker can list
  anything.
- Every target must resolve inside `local`'s parent (LOCAL_DIR/wNN), so nothing is written
  through a link that an earlier copy, or the user, left there.
- Only regular files and directories are copied. Symlinks inside the tree are not followed,
  and FIFOs, devices and sockets are not read (a FIFO would hang the copy, `/dev/zero` would
  fill the disk); each is appended to `skipped`.
- Files get the modes tarfile's "data" filter gives (`file_mode`), whichever way they came,
  and are private (0600) until they are whole: a worker's secret is never readable by
  others here, not even while it is being copied.
"""

from __future__ import annotations

import os
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
    the link's), one file's content written to an open local file, and how its paths join."""

    entries: Callable[[str], Iterable[tuple[str, int]]]
    copy: Callable[[str, BinaryIO], None]
    join: Callable[[str, str], str]


def file_mode(mode: int) -> int:
    """The permissions of a copied file of `mode`, as tarfile's "data" filter sets them: no
    set-id or sticky bits and no group or other write; readable and writable by its owner,
    and executable by others only if by its owner."""
    safe = (mode & 0o755) | 0o600
    return safe if safe & 0o100 else safe & ~0o011


def _write_private(local: Path, mode: int, fill: Callable[[BinaryIO], None]) -> None:
    """Write `local` through `fill` while only its owner can read it (created 0600; one
    that existed is made 0600 first), then give it `file_mode(mode)`."""
    descriptor = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        os.fchmod(descriptor, 0o600)
        fill(out)
        out.flush()
        os.fchmod(descriptor, file_mode(mode))


def get_tree(reader: Reader, source: str, mode: int, local: Path, skipped: list[str]) -> int:
    """Copy the file or directory `source` (of `mode`: the user named it, so a link there is
    followed) to `local`; returns the number of files copied."""
    return _entry(reader, source, mode, local, os.path.realpath(local.parent), skipped)


def _entry(
    reader: Reader, source: str, mode: int, local: Path, root: str, skipped: list[str]
) -> int:
    if os.path.commonpath([os.path.realpath(local), root]) != root:
        raise UnsafeName(f"refusing to write {local}: it resolves outside {root}")
    if stat.S_ISREG(mode):
        local.parent.mkdir(parents=True, exist_ok=True)
        _write_private(local, mode, lambda out: reader.copy(source, out))
        return 1
    if not stat.S_ISDIR(mode):
        skipped.append(source)
        return 0
    local.mkdir(parents=True, exist_ok=True)
    copied = 0
    for name, child_mode in sorted(reader.entries(source)):
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise UnsafeName(
                f"refusing the name {name!r} that the worker listed in {source}: "
                "entries of a directory cannot contain '/' or be '.' or '..'"
            )
        child = reader.join(source, name)
        copied += _entry(reader, child, child_mode, local / name, root, skipped)
    return copied
