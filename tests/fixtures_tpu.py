"""The `fake_tpu` fixture: a fake Cloud TPU v2 API server that tpuctl's real client talks to."""

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
