"""File transfer with one SSH host: SFTP where its sshd offers the subsystem, else tar
streamed over an exec channel (minimal images and hardened hosts turn SFTP off).

Both ways copy the same: a file to exactly `remote`, a directory merged into `remote`,
file modes and modification times kept. Remote trouble comes back as OSError (the worker's one-line reason) or
ConnectionError, never as a paramiko exception.
"""

from __future__ import annotations

import copy
import os
import posixpath
import shlex
import stat
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from tpuctl.fanout import ssh, tree
from tpuctl.fanout.base import Host, StopSignal

paramiko = ssh.paramiko

# What a missing subsystem looks like to paramiko: sshd closes the channel it asked on.
_NO_SFTP = (paramiko.SSHException, EOFError)


# A copy over a connection to one host: `over(host, copy)` calls `copy(transport)` over a
# connection to `host` and returns its count (a new connection, or one the holder keeps).
Copy = Callable[[paramiko.Transport], int]
Over = Callable[[Host, Copy], int]


def over_new_connection(ctx: ssh.SshContext, stop: StopSignal) -> Over:
    """Each copy over a connection of its own, closed after it."""

    def over(host: Host, copy: Copy) -> int:
        transport = ssh.connect(host, ctx, stop)
        try:
            return copy(transport)
        except ssh.SessionRefused as refused:
            raise ConnectionError(refused.reason(host)) from refused
        finally:
            transport.close()

    return over


def put_to_host(host: Host, over: Over, local: Path, remote: str, skipped: list[str]) -> int:
    """Copy a local file or directory to `remote` on `host` (into it if it is a directory);
    returns the files copied. Symlinks and special files inside the tree are not copied:
    they are skipped and listed in `skipped`."""
    return over(
        host,
        lambda transport: _copy(
            transport,
            host,
            lambda sftp: ssh.put_tree(sftp, local, remote, skipped),
            lambda: _put_tar(transport, local, remote, skipped),
        ),
    )


def get_from_host(
    host: Host,
    over: Over,
    remote: str,
    local: Path,
    skipped: list[str] | None = None,
) -> int:
    """Copy `remote` (file or directory) from `host` to `local`; returns the files copied.
    Symlinks inside the tree are not followed: they are skipped and listed in `skipped`."""
    found = [] if skipped is None else skipped
    return over(
        host,
        lambda transport: _copy(
            transport,
            host,
            lambda sftp: ssh.get_tree(sftp, remote, local, skipped=found),
            lambda: _get_tar(transport, remote, local, found),
        ),
    )


def _copy(
    transport: paramiko.Transport,
    host: Host,
    by_sftp: Callable[[paramiko.SFTPClient], int],
    by_tar: Callable[[], int],
) -> int:
    """SFTP where the host offers it, else tar. ssh.SessionRefused when sshd opens no
    further session on this connection (a held one may have none to spare), and
    ssh.ConnectionDead when the connection died before one opened."""
    try:
        try:
            sftp = paramiko.SFTPClient.from_transport(transport)
        except paramiko.ChannelException as refused:  # not even a session: no subsystem asked
            raise ssh.SessionRefused(refused) from refused
        except (*_NO_SFTP, OSError) as err:
            ssh.dead_before_session(transport, err)  # a reset here: the connection is gone
            if isinstance(err, OSError):
                raise
            sftp = None
        if sftp is not None:
            with sftp:
                return by_sftp(sftp)
        return by_tar()
    except (paramiko.SSHException, EOFError) as err:
        raise ConnectionError(f"connection lost: {err or type(err).__name__}") from err


def _split(remote: str) -> tuple[str, str]:
    parent, name = posixpath.split(remote.rstrip("/"))
    return parent or ".", name


def _exec(transport: paramiko.Transport, script: str) -> paramiko.Channel:
    channel = transport.open_session(timeout=10)
    channel.exec_command(f"exec bash -c {shlex.quote(script)}")
    return channel


def _finish(channel: paramiko.Channel, remote: str) -> None:
    """Wait for the remote tar; its failure becomes an OSError with tar's reason."""
    status = channel.recv_exit_status()
    stderr = channel.makefile_stderr("rb").read().decode(errors="replace").strip()
    channel.close()
    if status != 0:
        first = stderr.splitlines()[0] if stderr else f"tar exited with status {status}"
        # GNU tar: "tar: PATH: Cannot stat: No such file or directory": keep the reason.
        raise OSError(None, first.rsplit(": ", 1)[-1], remote)


def _put_tar(transport: paramiko.Transport, local: Path, remote: str, skipped: list[str]) -> int:
    target = tree.put_target(local, remote, lambda path: _is_dir(transport, path))
    parent, name = _split(target)
    quoted = shlex.quote(parent)
    # -p and --no-overwrite-dir: modes exactly as sent, and directories already there left
    # as they are, as over SFTP (GNU tar would reset them to the sent ones).
    channel = _exec(
        transport,
        f"mkdir -p {quoted} && tar -x -p --no-same-owner --no-overwrite-dir -f - -C {quoted}",
    )
    with channel.makefile("wb") as stream, tarfile.open(fileobj=stream, mode="w|") as tar:
        files = tree.put_tree(local, _tar_writer(tar), name, skipped)
    channel.shutdown_write()
    _finish(channel, target)
    return files


def _tar_writer(tar: tarfile.TarFile) -> tree.Writer:
    """A walk's directories and files as members of `tar`."""

    def directory(target: str, mode: int) -> None:
        member = tarfile.TarInfo(target)
        member.type, member.mode, member.mtime = tarfile.DIRTYPE, stat.S_IMODE(mode), time.time()
        tar.addfile(member)

    def file(source: str, mode: int, target: str) -> None:
        with open(source, "rb") as data:
            tar.addfile(tar.gettarinfo(arcname=target, fileobj=data), data)

    return tree.Writer(directory, file, posixpath.join)


def _is_dir(transport: paramiko.Transport, path: str) -> bool:
    channel = _exec(transport, f"test -d {shlex.quote(path)}")
    is_dir = channel.recv_exit_status() == 0
    channel.close()
    return is_dir


def _get_tar(transport: paramiko.Transport, remote: str, local: Path, skipped: list[str]) -> int:
    # A directory is archived from inside it (`cd` follows `remote` itself when it is a
    # link, as SFTP's stat does); a file with -h, so a linked file comes as its content.
    quoted = shlex.quote(remote)
    channel = _exec(
        transport,
        f"if [ -d {quoted} ]; then cd -- {quoted} && exec tar -c -f - .; fi; "
        f'exec tar -c -h -f - -C "$(dirname -- {quoted})" -- "$(basename -- {quoted})"',
    )
    local.parent.mkdir(parents=True, exist_ok=True)
    files = 0
    try:
        with channel.makefile("rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                parts = _member_parts(member, remote)
                if member.issym() or member.islnk():
                    skipped.append(posixpath.join(remote, *parts))
                    continue
                member.name = posixpath.join(local.name, *parts)
                _extract(tar, member, local.parent)
                files += member.isfile()
    except _REFUSED as err:
        raise OSError(None, str(err), remote) from None
    except tarfile.ReadError:
        pass  # an empty stream: tar failed before writing, and _finish says why
    _finish(channel, remote)
    return files


class RefusedMember(tarfile.TarError):
    """A tar member the data filter's rules refuse, on a Python without tarfile's filters."""


# tarfile.FilterError is Python 3.11.4's and later; `_as_data` raises RefusedMember before.
_REFUSED = (RefusedMember, getattr(tarfile, "FilterError", RefusedMember))


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, destination: Path) -> None:
    """Extract `member` under `destination` through tarfile's "data" filter, which refuses
    devices and anything leading out of `destination`. Python 3.11.4 added extraction filters;
    on the 3.11 releases before it (Debian 12 ships 3.11.2) `_as_data` applies the data
    filter's rules to the files and directories this stream can hold."""
    if hasattr(tarfile, "data_filter"):
        tar.extract(member, destination, filter="data")
    else:
        tar.extract(_as_data(member), destination)


def _as_data(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """A copy of `member` as tarfile.data_filter would extract it: no set-id or sticky bits
    and no group or other write; a file readable and writable by its owner, and executable by
    others only if by its owner; owned by whoever extracts it. Devices and fifos are refused.
    (Names need no check here: `_member_parts` built them.)"""
    if not (member.isfile() or member.isdir()):
        raise RefusedMember(f"{member.name!r} is a special file")
    safe = copy.copy(member)
    if member.isfile():
        safe.mode = tree.file_mode(member.mode)
    else:  # the filter leaves a directory's mode to the umask; the owner must write into it
        safe.mode = member.mode & 0o755 | 0o700
    safe.uid, safe.gid, safe.uname, safe.gname = os.getuid(), os.getgid(), "", ""
    return safe


def _member_parts(member: tarfile.TarInfo, remote: str) -> list[str]:
    """Where a member of the worker's stream goes, relative to the local target: a
    directory's entries are `./...`, a file is its one member. The names are untrusted."""
    parts = member.name.split("/")
    if parts[0] != ".":
        if len(parts) != 1 or not member.isfile():
            raise OSError(None, f"unexpected entry {member.name!r} in the tar stream", remote)
        return []
    inner = [part for part in parts[1:] if part]
    if ".." in inner:
        raise OSError(None, f"refusing the name {member.name!r} the worker sent", remote)
    return inner
