"""The user's OpenSSH client configuration applied to worker addresses, as `ssh` applies it.

`~/.ssh/config`, then `/etc/ssh/ssh_config`, parsed by paramiko's SSHConfig (Host and
Match patterns, first obtained value wins, %h/%p/~ expansion). Per field, highest first:
a tpuctl setting the user set > ssh_config's value for the address > tpuctl's default.
Keys add up rather than override, as with `ssh -i KEY`: tpuctl's key first, then the
IdentityFile entries. A jump host (`ssh.proxy_jump`, else ProxyJump, else ProxyCommand)
gets its own ssh_config entry applied too, with its own user (default: the local user).

The files are parsed once per process (again only if they change); each address then
costs one in-memory lookup. A file that names none of the options tpuctl reads (a stock
/etc/ssh/ssh_config: SendEnv, HashKnownHosts, ...) and that paramiko would parse cannot
change a host, so it is skipped, and a command through a connection holder then never
imports paramiko.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tpuctl.config import local_user
from tpuctl.errors import TpuctlError
from tpuctl.fanout.base import Host

if TYPE_CHECKING:
    import paramiko

SYSTEM_CONFIG = Path("/etc/ssh/ssh_config")
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")  # what ssh offers with no IdentityFile
MAX_HOPS = 8
_HOP = re.compile(r"^(?:(?P<user>[^@:\s]+)@)?(?P<host>[^@:\s]+)(?::(?P<port>[0-9]+))?$")
# The options `apply` reads, and the line syntax paramiko parses (anything else is an error).
_USED = re.compile(r"^\s*(hostname|user|port|identityfile|proxyjump|proxycommand)\b", re.I | re.M)
_LINE = re.compile(r"\s*(#.*)?$|\s*\w+(\s*=\s*|\s+)\S")


def user_config_path() -> Path:
    return Path.home() / ".ssh" / "config"


class SshConfig:
    """Parsed ssh_config files, looked up per address."""

    def __init__(self, files: list[tuple[str, str]]) -> None:
        """`files`: (name for error messages, text), highest precedence first."""
        self._config: paramiko.SSHConfig | None = None
        files = [(name, text) for name, text in files if _matters(text)]
        if not files:
            return
        from tpuctl.fanout import paramiko_loader

        paramiko = paramiko_loader.load()
        self._config = paramiko.SSHConfig()
        for name, text in files:
            try:
                self._config.parse(io.StringIO(text))
            except paramiko.ConfigParseError as err:
                raise TpuctlError(
                    f"{name}: {err}; fix that line (ssh would refuse it too)"
                ) from None

    def options(self, name: str) -> dict[str, Any]:
        """The ssh_config values for `name` (keys lower case, e.g. "user", "identityfile")."""
        if self._config is None:
            return {}
        try:
            return self._config.lookup(name)
        except ImportError:  # a `Match exec` line: paramiko was imported without invoke
            pass
        from tpuctl.fanout import paramiko_loader

        try:
            paramiko_loader.enable_match_exec()
        except ImportError as err:
            raise TpuctlError(f"ssh_config `Match exec` for {name}: {err}") from None
        return self._config.lookup(name)

    def apply(
        self, host: Host, *, default_user: str, proxy_jump: str | None, jump_known_hosts: str
    ) -> Host:
        """`host` (its user None when tpuctl's setting is only a default) with the
        ssh_config entry for its address filled in under what tpuctl already set."""
        options = self.options(host.address)
        jumps = _Jumps(self, host.key_filename, jump_known_hosts)
        return replace(
            host,
            address=options.get("hostname", host.address),
            user=host.user or options.get("user") or default_user,
            port=_port(options.get("port"), host.port, host.address),
            identity_files=_identity_files(options, exclude=host.key_filename),
            **jumps.route(options, proxy_jump, host.address, {host.address}),
        )


@dataclass(frozen=True)
class _Jumps:
    """Resolves jump hosts. Each is offered its IdentityFile entries (else ssh's default
    keys), then tpuctl's key: on Google Cloud one project key often opens both."""

    config: SshConfig
    key: str | None
    known_hosts: str

    def route(
        self, options: dict[str, Any], proxy_jump: str | None, name: str, seen: set[str]
    ) -> dict[str, Any]:
        """{"jump": Host} or {"proxy_command": str} or {}: how to reach host `name`.
        `proxy_jump` (the setting) beats ssh_config; `seen` holds the hosts on the way."""
        where = "ssh.proxy_jump" if proxy_jump is not None else f"ProxyJump of {name} in ssh_config"
        spec = proxy_jump if proxy_jump is not None else options.get("proxyjump")
        if spec is None and options.get("proxycommand"):
            return {"proxy_command": options["proxycommand"]}
        if spec is None or spec.strip().lower() == "none":
            return {}
        jump: Host | None = None
        for hop in spec.split(","):
            jump = self._hop(hop.strip(), where, seen, through=jump)
            if jump is None:  # a wildcard entry naming the host as its own jump host
                return {}
        return {"jump": jump}

    def _hop(self, spec: str, where: str, seen: set[str], through: Host | None) -> Host | None:
        match = _HOP.match(spec)
        if not match:
            raise TpuctlError(
                f"{where} {spec!r} is not [user@]host[:port]; e.g. alice@bastion.example.com:22"
            )
        name = match["host"]
        if name in seen:
            return through
        if len(seen) > MAX_HOPS:
            raise TpuctlError(f"{where}: more than {MAX_HOPS} jump hosts; is there a loop?")
        options = self.config.options(name)
        offered = _identity_files(options, exclude=self.key, defaults=True)
        hop = Host(
            label=f"jump host {name}",
            address=options.get("hostname", name),
            user=match["user"] or options.get("user") or local_user(),
            port=_port(match["port"] or options.get("port"), 22, f"{where} {spec!r}"),
            identity_files=offered + ((self.key,) if self.key else ()),
            known_hosts=self.known_hosts,
        )
        if through is not None:
            return replace(hop, jump=through)
        return replace(hop, **self.route(options, None, name, {*seen, name}))


def _matters(text: str) -> bool:
    """Whether an ssh_config file can change a host, or has a line paramiko would refuse."""
    return bool(_USED.search(text)) or not all(map(_LINE.match, text.splitlines()))


def _port(value: str | None, default: int, name: str) -> int:
    if value is None:
        return default
    if not re.fullmatch(r"[0-9]{1,5}", value) or not 0 < int(value) < 65536:
        raise TpuctlError(
            f"ssh_config: Port {value!r} for {name} is not a port number (1-65535); fix the entry"
        )
    return int(value)


def _identity_files(
    options: dict[str, Any], exclude: str | None, defaults: bool = False
) -> tuple[str, ...]:
    found = list(options.get("identityfile", ()))
    if not found and defaults:
        found = [str(Path.home() / ".ssh" / name) for name in DEFAULT_IDENTITIES]
    return tuple(path for path in dict.fromkeys(found) if path != exclude)


def user_ssh_config() -> SshConfig:
    """The user's and the system's ssh_config, parsed once per process per file version."""
    paths = (user_config_path(), SYSTEM_CONFIG)
    return _parsed(tuple((str(path), _version(path)) for path in paths))


def _version(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


@lru_cache(maxsize=4)
def _parsed(versions: tuple[tuple[str, int | None], ...]) -> SshConfig:
    files = []
    for path, version in versions:
        if version is None:
            continue
        try:
            files.append((path, Path(path).read_text(errors="replace")))
        except OSError:
            continue  # unreadable: ssh would skip it as well
    return SshConfig(files)
