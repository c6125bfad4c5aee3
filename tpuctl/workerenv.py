"""Preparing workers to run the trainer, once per change.

Three ways, chosen by config (`worker.*` keys):
- default: a virtual environment per worker (`.tpuctl/venv` in the worker's home) with the
  trainer package built from this checkout as a wheel, plus `worker.packages` (jax[tpu]
  on TPU workers), installed with `worker.base_python -m venv` and pip (`worker.pip_args`);
- `worker.python`: an interpreter already on the workers that has the trainer installed;
  nothing is installed (local pods default to the interpreter running tpuctl);
- `worker.image`: the trainer runs inside this container image (docker, host network,
  the TPU devices passed through).
`worker.setup`, a shell command, runs first on every worker in any of these modes.
A worker records the content hash of what it was prepared with; unchanged workers are
skipped, so only the first run on a node (or the first after a change) pays for it.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tpuctl.errors import TpuctlError
from tpuctl.fanout import Host, HostResult, put, run
from tpuctl.jobs import job_hosts

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.providers.base import Node

# Relative to the worker's home (SSH) or directory (local pod), which is the job's cwd.
VENV_PYTHON = ".tpuctl/venv/bin/python"
WHEEL_DIR = ".tpuctl/wheels"
PREPARE_TIMEOUT_S = 1800.0
SOURCE_DIRS = ("tpuctl", "trainer")

_STATE = 'state_dir="${TPUCTL_WORKER_DIR:-$HOME/.tpuctl}"\n'
_CHECK = _STATE + 'cat "$state_dir/env-ready" 2>/dev/null; exit 0\n'
_PREPARE = (
    _STATE
    + r"""set -e
mkdir -p "$state_dir"
rm -f "$state_dir/env-ready"
if [ -n "$setup" ]; then bash -c "$setup"; fi
if [ -n "$wheel" ]; then
  rm -rf "$state_dir/venv"
  "$base_python" -m venv "$state_dir/venv"
  "$state_dir/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    $pip_args "$wheel[trainer]" "${packages[@]}"
fi
if [ -n "$image" ]; then docker pull --quiet "$image"; fi
echo "$env_hash" > "$state_dir/env-ready"
"""
)


@dataclass(frozen=True)
class WorkerEnv:
    """How workers get an interpreter that can run `python -m trainer`."""

    python: str | None = None
    setup: str | None = None
    image: str | None = None
    base_python: str = "python3"
    packages: tuple[str, ...] = ()
    pip_args: str = ""

    @classmethod
    def from_settings(cls, settings: Settings, node: Node, accelerator: bool) -> WorkerEnv:
        """The `worker.*` settings for this node; TPU workers get jax[tpu] by default."""
        python = settings.get("worker.python")
        if python is None and node.provider == "local" and not settings.get("worker.image"):
            python = sys.executable  # local workers share this machine and its interpreter
        packages = settings.get("worker.packages", ["jax[tpu]"] if accelerator else [])
        if isinstance(packages, str):
            packages = [p.strip() for p in packages.split(",") if p.strip()]
        return cls(
            python=python,
            setup=settings.get("worker.setup"),
            image=settings.get("worker.image"),
            base_python=settings.get("worker.base_python", "python3"),
            packages=tuple(packages),
            pip_args=settings.get("worker.pip_args", ""),
        )

    @property
    def builds_venv(self) -> bool:
        return self.python is None and self.image is None

    def launcher(self, env_names: Iterable[str]) -> list[str]:
        """The argv prefix that runs the trainer's Python (append `-m trainer ...`).

        `env_names` are passed into a container by name only (`-e NAME`), never by value.
        """
        if self.image:
            names = [arg for name in sorted(env_names) for arg in ("-e", name)]
            return [
                "docker", "run", "--rm", "--net=host", "--privileged", "--ipc=host",
                "-v", "/dev:/dev", *names, self.image, self.python or "python3",
            ]  # fmt: skip
        return [self.python or VENV_PYTHON]


def prepare(
    hosts: Iterable[Host], env: WorkerEnv, progress: Callable[[str], None]
) -> list[HostResult]:
    """Prepare every worker that was not yet prepared with exactly this environment.

    Returns the results of the workers that were prepared (empty when all were up to
    date); raises a TpuctlError naming the workers where preparation failed.
    """
    hosts = job_hosts(hosts)
    if not (env.builds_venv or env.setup or env.image):
        return []
    source_hash = _source_hash() if env.builds_venv else ""
    env_hash = _hash(repr(env), source_hash)
    stale = _stale_hosts(hosts, env_hash)
    if not stale:
        progress(f"worker environment unchanged ({env_hash[:12]}): skipped")
        return []
    progress(f"preparing {len(stale)} worker(s) ({env_hash[:12]})")
    wheel = ""
    if env.builds_venv:
        built = cached_wheel(source_hash)
        wheel = f"{WHEEL_DIR}/{built.name}"
        _check(run(stale, f"mkdir -p {WHEEL_DIR}", timeout=60), "making the wheel directory")
        _check(put(stale, built, wheel), "copying the trainer wheel")
    script = "".join(
        f"{name}={value}\n"
        for name, value in {
            "setup": shlex.quote(env.setup or ""),
            "wheel": shlex.quote(wheel),
            "base_python": shlex.quote(env.base_python),
            "pip_args": shlex.quote(env.pip_args),
            "packages": "(" + " ".join(map(shlex.quote, env.packages)) + ")",
            "image": shlex.quote(env.image or ""),
            "env_hash": env_hash,
        }.items()
    )
    results = run(stale, script + _PREPARE, timeout=PREPARE_TIMEOUT_S)
    return _check(results, "preparing the worker environment")


def _stale_hosts(hosts: list[Host], env_hash: str) -> list[Host]:
    results = run(hosts, _CHECK, timeout=60)
    unreachable = [r for r in results if not r.ok]
    if unreachable:
        _check(unreachable, "checking the worker environment")
    return [r.host for r in results if r.stdout.strip() != env_hash]


def _check(results: list[HostResult], what: str) -> list[HostResult]:
    failed = [r for r in results if not r.ok]
    if failed:
        details = "; ".join(
            f"{r.host.label}: {(r.error or r.stderr.strip() or f'exit {r.exit_code}').splitlines()[-1]}"
            for r in failed
        )
        raise TpuctlError(f"{what} failed on {len(failed)} worker(s): {details}", exit_code=1)
    return results


def project_root() -> Path:
    """The checkout tpuctl runs from; the wheel is built from it."""
    import tpuctl

    root = Path(tpuctl.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise TpuctlError(
            f"tpuctl is not running from a source checkout ({root}), so it cannot build the "
            "trainer wheel; set worker.python (an interpreter with the trainer installed) "
            "or worker.image in tpuctl.yaml"
        )
    return root


def _source_hash() -> str:
    root = project_root()
    files = [root / "pyproject.toml"]
    for name in SOURCE_DIRS:
        files += sorted(p for p in (root / name).rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cached_wheel(source_hash: str) -> Path:
    """The wheel of this checkout's current source, built once per source hash and kept in
    state_dir()/wheels (many nodes, and every later run, reuse it)."""
    from tpuctl.config import state_dir

    directory = state_dir() / "wheels" / source_hash[:16]
    found = sorted(directory.glob("*.whl"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(prefix="tpuctl-wheel-") as build_dir:
        built = build_wheel(Path(build_dir))
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / (built.name + ".partial")
        shutil.copy2(built, partial)
        return partial.rename(directory / built.name)


def build_wheel(out_dir: Path) -> Path:
    """Build the tpuctl + trainer wheel from this checkout into `out_dir`."""
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    command += ["--quiet", "--disable-pip-version-check", "-w", str(out_dir), str(project_root())]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(out_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
        raise TpuctlError(f"building the trainer wheel failed: {' '.join(last)}", exit_code=1)
    return wheels[0]
