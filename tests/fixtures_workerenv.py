"""What an offline worker preparation needs, made from this machine's own packages and
kept under /var/tmp (pod hosts see it; their /tmp and /root are private), keyed by content:

- `uv_wheels`: a directory with the uv wheel, which workers pip-install (`worker.pip_args`);
- `trainer_wheelhouse`: the same plus every dependency of the trainer for this interpreter
  (`worker.uv_args` points `uv pip install` at it);
- `python_mirror`: a uv downloads list (`worker.python_mirror`) offering one interpreter,
  this machine's Python packed as an install-only archive like python-build-standalone's;
- `old_python`: a Python older than the trainer's floor (3.10), as on a stock TPU VM.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from tpuctl.workerenv import WORKER_MIN_PYTHON, project_root

CACHE = Path("/var/tmp/tpuctl-test-cache")
# Not in the archive: what uv venv and the trainer never read.
SKIPPED_PARTS = frozenset({"test", "site-packages", "__pycache__", "idlelib", "tkinter"})


def _cached_dir(name: str, key: str, make) -> Path:
    """CACHE/name-key, made once by make(partial_dir, final_dir) and renamed into place."""
    final = CACHE / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(final.with_suffix(".lock"), "w") as lock:  # pytest-xdist's workers take turns
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.is_dir():
            partial = final.with_suffix(".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            make(partial, final)
            partial.rename(final)
    return final


def _pip_download(directory: Path, requirements: list[str]) -> None:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "-d", str(directory)]
    subprocess.run([*command, *requirements], check=True, capture_output=True)


@pytest.fixture(scope="session")
def uv_wheels() -> Path:
    return _cached_dir("uv", "uv", lambda d, _: _pip_download(d, ["--no-deps", "uv"]))


@pytest.fixture(scope="session")
def trainer_wheelhouse(uv_wheels) -> Path:
    project = tomllib.loads((project_root() / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["trainer"]]
    key = f"{sys.version}\n" + "\n".join(requirements)

    def make(directory: Path, _final: Path) -> None:
        _pip_download(directory, requirements)
        for wheel in uv_wheels.glob("*.whl"):
            shutil.copy2(wheel, directory)

    return _cached_dir("wheelhouse", key, make)


@pytest.fixture(scope="session")
def python_mirror() -> str:
    """A downloads .json for uv offering this machine's Python (file:// URLs)."""
    version = platform.python_version()
    base = Path(sys.base_prefix)

    def make(directory: Path, final: Path) -> None:
        name = f"cpython-{version}-install_only.tar.gz"
        archive = directory / name
        with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
            tar.add(base, arcname="python", filter=_archived)
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        major, minor, patch = (int(part) for part in version.split("."))
        entry = {
            "name": "cpython", "arch": {"family": platform.machine(), "variant": None},
            "os": "linux", "libc": "gnu", "major": major, "minor": minor, "patch": patch,
            "prerelease": "", "url": (final / name).as_uri(), "sha256": digest, "variant": None,
        }  # fmt: skip
        downloads = {f"cpython-{version}-linux-{platform.machine()}-gnu": entry}
        (directory / "downloads.json").write_text(json.dumps(downloads))

    return str(_cached_dir("python-mirror", f"{base}\n{sys.version}", make) / "downloads.json")


def _archived(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = member.name.split("/")
    if SKIPPED_PARTS.intersection(parts[:-1]) or member.name.endswith(".a"):
        return None
    return member


@pytest.fixture(scope="session")
def old_python() -> str:
    """A python3.10 (pyenv's on this machine), or the test is skipped."""
    candidates = [*sorted(glob.glob("/root/.pyenv/versions/3.10*/bin/python3.10"))]
    candidates += [found] if (found := shutil.which("python3.10")) else []
    for candidate in candidates:
        probe = [candidate, "-c", "import sys; print(*sys.version_info[:2])"]
        out = subprocess.run(probe, capture_output=True, text=True)
        if out.returncode == 0 and tuple(map(int, out.stdout.split())) < WORKER_MIN_PYTHON:
            return candidate
    pytest.skip("no Python 3.10 on this machine to play a stock TPU VM's python3")
