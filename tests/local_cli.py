"""`tpuctl` as a user runs it against a local pod: a subprocess with its own config and
state directories, so tests never see the developer's nodes or settings."""

import os
import subprocess
import sys
from pathlib import Path


class LocalCli:
    """Runs `python -m tpuctl ARGS` in `root` with `provider: local` and private XDG dirs."""

    def __init__(self, root: Path, timeout: float = 240):
        self.root = root
        self.timeout = timeout
        self.env = {
            **os.environ,
            "XDG_CONFIG_HOME": str(root / "config"),
            "XDG_STATE_HOME": str(root / "state"),
            "TPUCTL_PROVIDER": "local",
        }
        for name in ("STORAGE_EMULATOR_HOST", "TPUCTL_NODE", "TPUCTL_BUCKET"):
            self.env.pop(name, None)

    def __call__(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "tpuctl", *args],
            capture_output=True,
            text=True,
            timeout=timeout or self.timeout,
            env=self.env,
            cwd=self.root,
        )

    def ok(self, *args: str, timeout: float | None = None) -> str:
        """Run, assert exit 0 (showing what it printed otherwise), return stdout."""
        result = self(*args, timeout=timeout)
        assert result.returncode == 0, result.stderr + result.stdout
        return result.stdout
