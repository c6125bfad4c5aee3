"""The `fake_tpu` fixture (a fake Cloud TPU v2 API that tpuctl's real client talks to) and
`run_tpuctl` (the CLI run in-process, as users run it)."""

import io
import sys
from dataclasses import dataclass

import pytest

from tpuctl.testing.fake_tpu import FakeTpuApi


@pytest.fixture
def fake_tpu(tmp_path, monkeypatch):
    """A running FakeTpuApi with tpuctl pointed at it (project test-project, zone
    us-central1-a), private config/state dirs and fast (scaled) waits."""
    api = FakeTpuApi(create_delay=0.05, delete_delay=0.02, queued_wait=0.05)
    url = api.start()
    for var in ("TPUCTL_PROVIDER", "TPUCTL_NODE", "TPUCTL_SSH_KEY", "TPUCTL_BUCKET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TPUCTL_TPU_API_ENDPOINT", url)
    monkeypatch.setenv("TPUCTL_PROJECT", "test-project")
    monkeypatch.setenv("TPUCTL_ZONE", "us-central1-a")
    monkeypatch.setenv("TPUCTL_TIME_SCALE", "0.001")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    try:
        yield api
    finally:
        api.stop()


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_tpuctl(capsys, monkeypatch):
    """Run the CLI in-process as `tpuctl ARGS` (through `main`, so errors print as they do
    for users), with `stdin` as input; returns the exit code, stdout and stderr."""

    from tpuctl.cli import main  # here, not at plugin load: collection must not need the CLI

    def run(*args: str, stdin: str = "") -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["tpuctl", *args])
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
