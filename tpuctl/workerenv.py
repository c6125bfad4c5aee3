"""Preparing workers to run the trainer, once per change.

Three ways, chosen by config (`worker.*` keys):
- default: a virtual environment per worker (`.tpuctl/venv` in the worker's home) with the
  trainer package built from this checkout as a wheel, plus `worker.packages` (jax[tpu]
  on TPU workers), made with uv: uv itself is pip-installed by the worker's own
  `worker.base_python` (`worker.pip_args`); the venv uses that interpreter when it is at
  least WORKER_MIN_PYTHON, else (or when `worker.python_version` is set) a Python uv
  installs, downloaded from `worker.python_mirror` if set; packages go in with `uv pip`
  (`worker.uv_args`);
- `worker.python`: an interpreter already on the workers that has the trainer installed;
  nothing is installed (local pods default to the interpreter running tpuctl);
- `worker.image`: the trainer runs inside this container image (docker, host network,
  the TPU devices passed through).
`worker.setup`, a shell command, runs first on every worker in any of these modes.
A worker records the content hash of what it was prepared with; unchanged workers are
skipped, so only the first run on a node (or the first after a change) pays for it.
Each step a worker finishes is reported as `w03: installing Python 3.12.4 (uv) ... 14 s`;
a failure names the worker and the step in one line.
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
from tpuctl.fanout import STREAMED_TAIL_BYTES, Host, HostResult, put, run
from tpuctl.jobs import job_hosts
from tpuctl.wording import plural

if TYPE_CHECKING:
    from tpuctl.config import Settings
    from tpuctl.providers.base import Node

# Relative to the worker's home (SSH) or directory (local pod), which is the job's cwd.
VENV_PYTHON = ".tpuctl/venv/bin/python"
WHEEL_DIR = ".tpuctl/wheels"
PREPARE_TIMEOUT_S = 1800.0
SOURCE_DIRS = ("tpuctl", "trainer")
# The trainer's floor, as in pyproject's requires-python (current jax needs it too).
WORKER_MIN_PYTHON = (3, 11)
# What uv installs when the worker's Python is older: the newest release of the versions
# jax[tpu] has wheels for.
DEFAULT_PYTHON_VERSION = ">=3.11,<3.14"
STEP_PREFIX = "step "

_STATE = 'state_dir="${TPUCTL_WORKER_DIR:-$HOME/.tpuctl}"\n'
_CHECK = _STATE + 'cat "$state_dir/env-ready" 2>/dev/null; exit 0\n'
_PREPARE = (
    _STATE
    + r"""set -e
mkdir -p "$state_dir"
rm -f "$state_dir/env-ready"
# finished WHAT STARTED: report a step; failed WHAT OUTPUT: its last line, then stop.
finished() { echo "step $1 ... $((SECONDS - $2)) s"; }
failed() { echo "$1: $(printf '%s\n' "$2" | grep -v '^[[:space:]]*$' | tail -n 1)" >&2; exit 1; }
# step WHAT COMMAND...: run COMMAND quietly as one reported step.
step() {
  local what=$1 started=$SECONDS output; shift
  output=$("$@" 2>&1) || failed "$what" "$output"
  finished "$what" "$started"
}
version_of() { "$1" -c 'import platform; print(platform.python_version())'; }
if [ -n "$setup" ]; then step "running worker.setup" bash -c "$setup"; fi
if [ -n "$wheel" ]; then
  uv="$state_dir/uv/bin/uv"
  if ! "$uv" --version >/dev/null 2>&1; then
    rm -rf "$state_dir/uv"
    # --target touches no system package, so an externally managed Python may do it.
    step "installing uv (pip)" env PIP_BREAK_SYSTEM_PACKAGES=1 "$base_python" -m pip install --quiet \
      --disable-pip-version-check --no-warn-script-location --target "$state_dir/uv" $pip_args uv
  fi
  export UV_PYTHON_INSTALL_DIR="$state_dir/python"
  case "$python_mirror" in
    "") ;;
    *.json) export UV_PYTHON_DOWNLOADS_JSON_URL="$python_mirror" ;;
    *) export UV_PYTHON_INSTALL_MIRROR="$python_mirror" ;;
  esac
  if [ -z "$python_version" ] &&
    "$base_python" -c "import sys; sys.exit(sys.version_info < $min_python)" 2>/dev/null; then
    python=$(command -v "$base_python")
    echo "step using $base_python (Python $(version_of "$python"))"
  else
    wanted=${python_version:-$default_python_version} started=$SECONDS
    { output=$("$uv" python install --no-bin "$wanted" 2>&1) &&
      python=$("$uv" python find --managed-python "$wanted" 2>&1); } ||
      failed "installing Python $wanted (uv)" "${python:-$output}"
    finished "installing Python $(version_of "$python") (uv)" "$started"
  fi
  rm -rf "$state_dir/venv"
  step "creating the venv" "$uv" venv --quiet --python "$python" "$state_dir/venv"
  step "installing the trainer (uv pip)" "$uv" pip install --quiet \
    --python "$state_dir/venv/bin/python" $uv_args "$wheel[trainer]" "${packages[@]}"
fi
if [ -n "$image" ]; then step "pulling $image" docker pull --quiet "$image"; fi
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
    python_version: str | None = None  # None: base_python if new enough, else the default
    python_mirror: str = ""
    packages: tuple[str, ...] = ()
    pip_args: str = ""
    uv_args: str | None = None  # None: the same as pip_args

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
            python_version=settings.get("worker.python_version"),
            python_mirror=settings.get("worker.python_mirror", ""),
            packages=tuple(packages),
            pip_args=settings.get("worker.pip_args", ""),
            uv_args=settings.get("worker.uv_args"),
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

    `progress` gets one line per message and per step a worker finished. Returns the
    results of the workers that were prepared (empty when all were up to date); raises a
    TpuctlError naming the workers, and the step, where preparation failed.
    """
    hosts = job_hosts(hosts)
    if not (env.builds_venv or env.setup or env.image):
        progress(f"nothing to prepare: the workers run the trainer with {env.python}")
        return []
    source_hash = _source_hash() if env.builds_venv else ""
    env_hash = _hash(repr(env), source_hash)
    stale = _stale_hosts(hosts, env_hash)
    if not stale:
        progress(f"worker environment unchanged ({env_hash[:12]}): skipped")
        return []
    progress(f"preparing {plural(len(stale), 'worker')} ({env_hash[:12]})")
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
            "min_python": shlex.quote(repr(WORKER_MIN_PYTHON)),
            "python_version": shlex.quote(env.python_version or ""),
            "default_python_version": shlex.quote(DEFAULT_PYTHON_VERSION),
            "python_mirror": shlex.quote(env.python_mirror),
            "pip_args": shlex.quote(env.pip_args),
            "uv_args": shlex.quote(env.pip_args if env.uv_args is None else env.uv_args),
            "packages": "(" + " ".join(map(shlex.quote, env.packages)) + ")",
            "image": shlex.quote(env.image or ""),
            "env_hash": env_hash,
        }.items()
    )

    def on_line(host: Host, stream: str, line: str) -> None:
        if stream == "stdout" and line.startswith(STEP_PREFIX):
            progress(f"{host.label}: {line.removeprefix(STEP_PREFIX)}")

    results = run(
        stale,
        script + _PREPARE,
        timeout=PREPARE_TIMEOUT_S,
        on_line=on_line,
        keep_tail=STREAMED_TAIL_BYTES,  # pip's chatter: only the last line is read
    )
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
        raise TpuctlError(
            f"{what} failed on {plural(len(failed), 'worker')}: {details}", exit_code=1
        )
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
    from tpuctl.config import private_dir, state_dir

    directory = state_dir() / "wheels" / source_hash[:16]
    found = sorted(directory.glob("*.whl"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(prefix="tpuctl-wheel-") as build_dir:
        built = build_wheel(Path(build_dir))
        private_dir(directory)  # state directories are this user's only (0700)
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
