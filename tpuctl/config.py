"""Settings resolution: flags > environment > ./tpuctl.yaml > user config file > defaults.

Every value remembers where it came from, so `tpuctl config show` can explain itself.
Keys are dotted paths (`ssh.user`, `accelerators.v3-256.zone`); YAML files hold the
same keys as nested mappings. A ./tpuctl.yaml that sets a key outside HARMLESS_KEYS
applies only once the user trusts its content (`tpuctl config trust`).
"""

from __future__ import annotations

import contextlib
import difflib
import getpass
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpuctl.errors import TpuctlError

PROJECT_FILE = Path("tpuctl.yaml")

# Environment variables and the keys they set (public contract).
ENV_KEYS: dict[str, str] = {
    "TPUCTL_PROJECT": "project",
    "TPUCTL_ZONE": "zone",
    "TPUCTL_PROVIDER": "provider",
    "TPUCTL_BUCKET": "bucket",
    "TPUCTL_SSH_USER": "ssh.user",
    "TPUCTL_SSH_KEY": "ssh.key",
    "TPUCTL_SSH_INTERNAL_IP": "ssh.internal_ip",
    "TPUCTL_SSH_PROXY_JUMP": "ssh.proxy_jump",
    "TPUCTL_SSH_REUSE": "ssh.reuse",
    "TPUCTL_NODE": "node",
}

PROVIDERS = ("cloud", "local")

# The keys a user may set, with one line each for `config show` and error messages.
# Per-accelerator keys (accelerators.<TYPE>.<field>) are validated separately.
KNOWN_KEYS: dict[str, str] = {
    "project": "Google Cloud project that owns the TPUs",
    "zone": "default zone, e.g. us-central1-a",
    "provider": "where nodes come from: cloud (Cloud TPU API) or local (simulated pod)",
    "bucket": "GCS bucket for run files (gs://NAME or NAME)",
    "node": "default node name for commands that take one",
    "ssh.user": "user name on the TPU VMs",
    "ssh.key": "SSH private key path (default: a key pair tpuctl generates)",
    "ssh.internal_ip": "connect to workers' internal IPs (true when running inside the VPC)",
    "ssh.proxy_jump": "jump host for the workers, [user@]host[:port][,...]; none ignores ssh_config's",
    "ssh.reuse": "keep workers' connections open for later commands this long idle (5m); off: never",
    # How `tpuctl run` prepares workers (tpuctl.workerenv; README "Worker environment").
    "worker.python": "interpreter on the workers that has the trainer; nothing is installed",
    "worker.image": "container image to run the trainer in",
    "worker.setup": "shell command run on every worker before the first run",
    "worker.base_python": "the workers' own interpreter, used for the venv when new enough",
    "worker.python_version": "Python for uv to install (default: base_python if new enough)",
    "worker.python_mirror": "where uv downloads Python from: a mirror URL or a downloads .json",
    "worker.packages": "extra pip requirements for the workers' venv (default jax[tpu] on TPUs)",
    "worker.pip_args": "extra pip arguments for installing uv on the workers (index, find-links)",
    "worker.uv_args": "extra `uv pip install` arguments for the venv (default: worker.pip_args)",
    "worker.platform": "auto, cpu or tpu: whether tpuctl sets up jax.distributed on CPU",
}
WORKER_PLATFORMS = ("auto", "cpu", "tpu")
ACCELERATOR_FIELDS = ("zone", "zones", "project", "runtime_version")
_NAME_KEYS = frozenset({"project", "zone", "node", "bucket"})  # strings, never numbers
# Mappings of keys: `worker:` with every line under it commented out sets nothing.
_SECTIONS = frozenset({"accelerators", *(key.split(".")[0] for key in KNOWN_KEYS if "." in key)})
BOOL_KEYS = frozenset({"ssh.internal_ip"})
LIST_FIELDS = frozenset({"zones"})

# What a ./tpuctl.yaml may set before its content is trusted: a repository you clone and
# `cd` into picks with these only among your own nodes, zones and connections. Every other
# key would let the file's author choose what runs on your workers (worker.setup, .image,
# .python, .base_python, .python_version (uv takes a path too), .python_mirror, .packages,
# .pip_args, .uv_args), the software your VMs boot (accelerators.TYPE.runtime_version),
# where your run files go (bucket), whose project your TPUs and --env secrets live in
# (project, accelerators.TYPE.project), or how you log in: ssh.key (its public half goes
# into your nodes' metadata, and the file's author may hold the private half), ssh.user,
# ssh.proxy_jump (every connection through their host). As `mise trust` and `direnv allow`.
HARMLESS_KEYS = frozenset(
    {
        "zone",  # a zone of your own project
        "node",  # one of your own nodes; `down` still asks before deleting it
        "provider",  # your cloud project or a simulated pod on this machine
        "ssh.internal_ip",  # which of a worker's addresses, both from the TPU API
        "ssh.reuse",  # how long your own connections stay open while idle
        "worker.platform",  # whether tpuctl sets up jax.distributed on CPU
    }
)
HARMLESS_ACCELERATOR_FIELDS = frozenset({"zone", "zones"})  # of accelerators.TYPE


def config_dir() -> Path:
    """tpuctl's user configuration directory ($XDG_CONFIG_HOME/tpuctl)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tpuctl"


def state_dir() -> Path:
    """Where tpuctl keeps caches, known_hosts, local pods and job records."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tpuctl"


def private_dir(path: Path) -> Path:
    """`path`, created with every missing parent as 0700; tpuctl's own state and config
    directories are made 0700 too if an older version left them open. They hold node
    caches, known_hosts, babysit logs (log tails) and the local GCS emulator's data."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
    for root in (state_dir(), config_dir()):
        if path.is_relative_to(root) and root.stat().st_mode & 0o077:
            root.chmod(0o700)
    return path


def private_opener(path: str, flags: int) -> int:
    """For `open(..., opener=private_opener)`: a file created 0600, never readable by others."""
    return os.open(path, flags, 0o600)


def write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, the file 0600 from its first byte."""
    private_dir(path.parent)
    # One temporary file per writer: processes (or threads) writing the same file at once
    # each replace it whole, the last one wins.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", opener=private_opener) as handle:
        os.fchmod(handle.fileno(), 0o600)  # a stale tmp file may have been created wider
        handle.write(text)
    tmp.replace(path)


def user_config_path() -> Path:
    """The user file that `tpuctl config set` writes."""
    return config_dir() / "config.yaml"


DEFAULT_SSH_REUSE = "5m"  # how long a node's connection holder waits idle (tpuctl.fanout.holder)


def _defaults() -> dict[str, Any]:
    return {
        "provider": "cloud",
        "ssh.user": local_user(),
        "ssh.internal_ip": False,
        "ssh.reuse": DEFAULT_SSH_REUSE,
    }


def local_user() -> str:
    """The name of the user running tpuctl (default ssh.user and node-name prefix)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "tpuctl"


@dataclass
class Settings:
    """Resolved settings: flat dotted keys, each with the layer it came from."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    # Why ./tpuctl.yaml's keys that need trust do not apply; set only by load(review=True).
    untrusted: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a dotted key; a prefix such as `accelerators.v3-8` gives a dict."""
        if key in self.values:
            return self.values[key]
        prefix = key + "."
        nested = {k[len(prefix) :]: v for k, v in self.values.items() if k.startswith(prefix)}
        return _unflatten(nested) if nested else default

    def source(self, key: str) -> str:
        """Where a key's value came from: "flag --zone", "env TPUCTL_ZONE", a file, "default"."""
        return self.sources.get(key, "default")

    def items(self) -> list[tuple[str, Any, str]]:
        """(key, value, source) for every resolved key, sorted by key."""
        return [(k, self.values[k], self.source(k)) for k in sorted(self.values)]


def load(flags: dict[str, object] | None = None, review: bool = False) -> Settings:
    """Resolve settings from flags, environment, project file, user file and defaults.

    `flags` maps dotted keys to command-line values; None values mean "flag not given".
    A project file whose keys need trust (see HARMLESS_KEYS) and whose content is not
    trusted is a TpuctlError, unless `review` (for `config show`): then its values are
    there, their source says "untrusted" and `Settings.untrusted` says why.
    """
    settings = Settings()
    project, gated, refusal = _project_file()
    layers: list[tuple[dict[str, Any], Any]] = [
        (_defaults(), lambda _k: "default"),
        (_read_yaml(user_config_path()), lambda _k: _display_path(user_config_path())),
        (project, lambda _k: f"./{PROJECT_FILE}"),
        (_from_env(), lambda k: f"env {_env_name(k)}"),
        (
            {k: v for k, v in (flags or {}).items() if v is not None},
            lambda k: f"flag --{k.replace('.', '-').replace('_', '-')}",
        ),
    ]
    for layer, describe in layers:  # lowest precedence first; later layers win
        for key, value in layer.items():
            settings.values[key] = _coerce(key, value, describe(key))
            # Files may hold any key: a misspelt one would otherwise be ignored without a word.
            validate_key(key, describe(key))
            settings.sources[key] = describe(key)
    if refusal and not review:
        raise TpuctlError(refusal)
    settings.untrusted = refusal
    for key in gated:  # those the file still decides (no env or flag overrides them)
        if settings.sources[key] == f"./{PROJECT_FILE}":
            settings.sources[key] += " (untrusted)"
    _check_provider(settings)
    _check_ssh_user(settings)
    return settings


def accelerator_settings(settings: Settings, accelerator_type: str) -> dict[str, Any]:
    """Per-accelerator defaults (`accelerators.<TYPE>.*`), e.g. {"zone": ..., "zones": [...]},
    of the canonical type name and of any other spelling of it (`v5e-16` is `v5litepod-16`);
    the canonical name's win."""
    from tpuctl import catalog

    merged: dict[str, Any] = {}
    every = settings.get("accelerators", {})
    for name, found in every.items() if isinstance(every, dict) else []:
        if name == accelerator_type or not isinstance(found, dict):
            continue
        if catalog.parse(str(name)).name == accelerator_type:  # `load` checked every name
            merged.update(found)
    own = every.get(accelerator_type) if isinstance(every, dict) else None
    return {**merged, **own} if isinstance(own, dict) else merged


def validate_key(key: str, where: str = "") -> None:
    """Raise a TpuctlError unless `key` is one tpuctl understands: a known key, or a field
    of `accelerators.TYPE` for a TYPE in the catalogue. `where` (a file) starts the message."""
    if key in KNOWN_KEYS:
        return
    prefix = f"{where}: " if where else ""
    parts = key.split(".")
    if (
        len(parts) == 3
        and parts[0] == "accelerators"
        and parts[1]
        and parts[2] in ACCELERATOR_FIELDS
    ):
        from tpuctl import catalog

        try:
            catalog.parse(parts[1])  # as `up` does: a misspelt type would never apply
        except TpuctlError as err:
            raise TpuctlError(f"{prefix}{key}: {err}") from None
        return
    near = _nearest_key(key)
    guess = f" (did you mean {near!r}?)" if near else ""
    known = ", ".join([*KNOWN_KEYS, *(f"accelerators.TYPE.{f}" for f in ACCELERATOR_FIELDS)])
    raise TpuctlError(f"{prefix}unknown config key {key!r}{guess}; known keys: {known}")


def _nearest_key(key: str) -> str | None:
    """The known key that `key` most likely misspells (`accelerators.v3-8.zoen`: its zone)."""
    parts = key.split(".")
    type_name = parts[1] if len(parts) == 3 and parts[0] == "accelerators" else "TYPE"
    known = [*KNOWN_KEYS, *(f"accelerators.{type_name}.{f}" for f in ACCELERATOR_FIELDS)]
    close = difflib.get_close_matches(key, known, n=1)
    return close[0] if close else None


def set_user_value(key: str, raw_value: str) -> tuple[Path, Any]:
    """Write one key into the user config file (creating it); returns the file's path and
    the value written. A config file that is a link (to a dotfiles repo) stays one: the
    file it names is replaced. Comments in the file are not kept."""
    import yaml

    validate_key(key)
    value = _coerce(key, raw_value, f"tpuctl config set {key}")
    checks = {
        "provider": _check_provider,
        "ssh.user": _check_ssh_user,
        "ssh.reuse": lambda s: reuse_idle_seconds(s.values["ssh.reuse"]),
        "bucket": _check_bucket,
        "worker.platform": worker_platform,
    }
    if (check := checks.get(key)) is not None:  # before writing: a bad value in the file
        check(Settings(values={key: value}, sources={key: f"tpuctl config set {key}"}))
    _check_cloud_names(key, value)
    path = user_config_path().resolve()
    with _one_writer(path):
        data = _read_yaml_nested(path)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
        write_private(path, yaml.safe_dump(data, sort_keys=True))
    return path, value


@contextlib.contextmanager
def _one_writer(path: Path) -> Iterator[None]:
    """Hold a lock beside `path` while changing it: two writers at once (two `config set`)
    must not each drop the other's change."""
    import fcntl

    private_dir(path.parent)
    with open(path.with_name(f".{path.name}.lock"), "a", opener=private_opener) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def needs_trust(key: str) -> bool:
    """Whether a ./tpuctl.yaml setting `key` applies only once its content is trusted."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "accelerators":
        return parts[2] not in HARMLESS_ACCELERATOR_FIELDS
    return key not in HARMLESS_KEYS


def trust_store_path() -> Path:
    """Where `tpuctl config trust` records each trusted project file's path and SHA-256."""
    return state_dir() / "trusted_project_files.json"


def trust_project_file() -> tuple[Path, list[str]]:
    """Trust the current content of ./tpuctl.yaml (`tpuctl config trust`); returns its
    absolute path and the keys it sets that needed the trust. A file that does not parse,
    or sets a key tpuctl does not know, is refused, not recorded."""
    import json

    raw = _read_bytes(PROJECT_FILE)
    if raw is None:
        raise TpuctlError(f"no ./{PROJECT_FILE} in {Path.cwd()}: nothing to trust")
    keys = list(_flatten(_parse_yaml(raw, PROJECT_FILE)))
    for key in keys:
        validate_key(key, f"./{PROJECT_FILE}")
    path = PROJECT_FILE.resolve()
    store = trust_store_path()
    with _one_writer(store):
        trusted = _trusted_files()
        trusted[str(path)] = _sha256(raw)
        write_private(store, json.dumps(trusted, indent=1, sort_keys=True) + "\n")
    return path, [key for key in keys if needs_trust(key)]


def _project_file() -> tuple[dict[str, Any], list[str], str | None]:
    """./tpuctl.yaml's settings; those of its keys that need trust which its content has
    not been given; and, when there are any, the one line that says so and what to do."""
    raw = _read_bytes(PROJECT_FILE)
    if raw is None:
        return {}, [], None
    values = _flatten(_parse_yaml(raw, PROJECT_FILE))
    gated = [key for key in values if needs_trust(key)]
    if not gated:
        return values, [], None
    recorded = _trusted_files().get(str(PROJECT_FILE.resolve()))
    if recorded == _sha256(raw):
        return values, [], None
    state = "changed since you trusted it" if recorded else "is not trusted"
    refusal = (
        f"./{PROJECT_FILE} ({PROJECT_FILE.resolve()}) {state} and sets {', '.join(gated)}, "
        "which choose what runs on your workers, where your files and TPUs go or how you "
        f"log in: review ./{PROJECT_FILE}, then run `tpuctl config trust`"
    )
    return values, gated, refusal


def _trusted_files() -> dict[str, str]:
    """Trusted project files, absolute path to SHA-256; none when the record is unreadable
    (every file then needs trusting again, never the other way round)."""
    import json

    try:
        trusted = json.loads(trust_store_path().read_bytes())
    except (OSError, ValueError):
        return {}
    return trusted if isinstance(trusted, dict) else {}


def _sha256(raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()


def _check_cloud_names(key: str, value: Any) -> None:
    """Refuse, before `config set` writes it, a zone, project or node name that every later
    command would refuse (`zone 'us central1'`); an empty value clears the key."""
    leaf = key.rsplit(".", 1)[-1]
    if key == "node" and value:
        from tpuctl.naming import validate_node_name

        validate_node_name(value)
    elif leaf in ("zone", "zones", "project"):
        from tpuctl.providers.cloud_tpu import checked_name

        what = "project" if leaf == "project" else "zone"
        for name in filter(None, value if isinstance(value, list) else [value]):
            checked_name(what, name, f"nothing written to {key}")


def env_override(key: str) -> str | None:
    """The environment variable that sets `key` in this shell, if one does."""
    return next((var for var, k in ENV_KEYS.items() if k == key and os.environ.get(var)), None)


def _from_env() -> dict[str, Any]:
    return {key: os.environ[var] for var, key in ENV_KEYS.items() if os.environ.get(var)}


def _env_name(key: str) -> str:
    return next(var for var, k in ENV_KEYS.items() if k == key)


def _coerce(key: str, value: Any, where: str) -> Any:
    """Turn strings from env, flags and `config set` into the key's type."""
    leaf = key.rsplit(".", 1)[-1]
    if key in BOOL_KEYS:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise TpuctlError(f"{key} from {where} must be true or false, not {value!r}")
    per_type = key.startswith("accelerators.")  # accelerators.TYPE.FIELD
    listed = per_type and leaf in LIST_FIELDS
    if listed and isinstance(value, str):
        return [z.strip() for z in value.split(",") if z.strip()]
    if key == "accelerators" or (per_type and key.count(".") == 1):
        raise TpuctlError(
            f"{key} from {where} must map each type to its settings, e.g. accelerators: "
            "{v3-8: {zone: us-central1-a}}"
        )
    if listed and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise TpuctlError(f"{key} from {where} must be a list of zone names, not {value!r}")
    named = key in _NAME_KEYS or per_type
    if named and not listed and not isinstance(value, str):  # YAML reads `node: 123` as a number
        raise TpuctlError(f"{key} from {where} must be a string, not {value!r}")
    return value


# A login name, never an option: a `./tpuctl.yaml` in an untrusted checkout could otherwise
# hand ssh `-oProxyCommand=...`, or put a second line into the nodes' ssh-keys metadata.
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


def _check_ssh_user(settings: Settings) -> None:
    user = settings.values.get("ssh.user")
    if settings.source("ssh.user") == "default" or _USER_NAME.match(str(user)):
        return  # the default is this machine's own account name
    raise TpuctlError(
        f"ssh.user {str(user)!r} (from {settings.source('ssh.user')}) is not a user name: "
        "use letters, digits, '_', '.' and '-', not first '-'; fix it or pass --ssh-user NAME"
    )


def _check_bucket(settings: Settings) -> None:
    from tpuctl.storage import bucket_name

    bucket_name(str(settings.values["bucket"]))


def reuse_idle_seconds(value: Any) -> float | None:
    """An `ssh.reuse` value as the seconds a connection holder waits idle; None when off."""
    text = str(value).strip().lower()
    if text in ("0", "no", "off", "false", "none"):
        return None
    from tpuctl.durations import parse_duration

    return parse_duration(text, "ssh.reuse")


def worker_platform(settings: Settings) -> str:
    """The `worker.platform` setting: auto (the default), cpu or tpu. `config set` and
    `run` both check it here; a TpuctlError names where any other value came from."""
    platform = settings.get("worker.platform", "auto")
    if platform not in WORKER_PLATFORMS:
        raise TpuctlError(
            f"worker.platform {platform!r} (from {settings.source('worker.platform')}) must be "
            f"one of {', '.join(WORKER_PLATFORMS)}; fix it with "
            "`tpuctl config set worker.platform auto`"
        )
    return str(platform)


def _check_provider(settings: Settings) -> None:
    provider = settings.values.get("provider")
    if provider not in PROVIDERS:
        raise TpuctlError(
            f"provider {provider!r} (from {settings.source('provider')}) is not one of "
            f"{', '.join(PROVIDERS)}; fix it with `tpuctl config set provider cloud`"
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    return _flatten(_read_yaml_nested(path))


def _read_yaml_nested(path: Path) -> dict[str, Any]:
    raw = _read_bytes(path)
    return {} if raw is None else _parse_yaml(raw, path)


def _read_bytes(path: Path) -> bytes | None:
    """A config file's bytes (read once: what is trusted is what is parsed); None if none."""
    if not path.is_file():
        return None
    from trainer.yaml_input import YamlInputError, read_capped

    try:
        with open(path, "rb") as handle:
            return read_capped(handle, str(path))
    except YamlInputError as err:
        raise TpuctlError(str(err)) from None


def _parse_yaml(raw: bytes, path: Path) -> dict[str, Any]:
    """A config file's mapping of settings; a one-line TpuctlError naming `path` if it is
    no such thing."""
    import yaml

    from trainer.yaml_input import YamlInputError, load_yaml

    try:
        data = load_yaml(raw, str(path)) or {}
    except YamlInputError as err:
        raise TpuctlError(str(err)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise TpuctlError(f"{path}{line}: not valid YAML; fix or remove the file") from None
    if not isinstance(data, dict):
        raise TpuctlError(f"{path}: expected a mapping of settings (key: value), got {data!r}")
    return data


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        elif value is not None or dotted not in _SECTIONS:
            flat[dotted] = value
    return flat


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _display_path(path: Path) -> str:
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home) :] if text.startswith(home + os.sep) else text
