"""The registry of where tpuctl created each node."""

from tpuctl.providers import registry
from tpuctl.providers.registry import Location


def test_locations_are_recorded_once_and_forgotten_one_by_one(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    cloud = Location("cloud", "europe-west4-a", "p")
    local = Location("local", "local")
    assert registry.locations("n") == []
    registry.record("n", cloud)
    registry.record("n", cloud)
    registry.record("n", local)
    assert registry.locations("n") == [cloud, local]
    registry.forget("n", cloud)
    assert registry.locations("n") == [local]
    registry.forget("n", local)
    assert registry.locations("n") == []
    assert not (tmp_path / "tpuctl" / "registry" / "n.json").exists()
    assert cloud.describe() == "zone europe-west4-a of project p"
