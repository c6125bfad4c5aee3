"""The local pod provider: nodes are directories, one working directory per worker."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tpuctl import config
from tpuctl.errors import TpuctlError
from tpuctl.providers import provider_for, resolve_node
from tpuctl.providers.base import NodeSpec
from tpuctl.providers.local import (
    LocalProvider,
    devices_per_host,
    gcs_dir,
    hosts_per_type,
    running_gcs_emulator_url,
)


@pytest.fixture
def provider(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("TPUCTL_PROVIDER", "local")
    return provider_for(config.load())


def spec(name="pod", accelerator_type="v3-32"):
    return NodeSpec(name=name, zone="local", accelerator_type=accelerator_type, runtime_version="")


def test_provider_for_local_setting_gives_a_local_provider(provider):
    assert isinstance(provider, LocalProvider)


def test_up_v3_32_makes_four_ready_workers_each_with_its_own_directory(provider, tmp_path):
    messages = []
    node = provider.create(spec(), messages.append)
    assert node.state == "READY" and node.provider == "local"
    assert [w.index for w in node.workers] == [0, 1, 2, 3]
    workdirs = {w.workdir for w in node.workers}
    assert len(workdirs) == 4
    for workdir in workdirs:
        assert workdir.startswith(str(tmp_path / "state"))
    assert messages and "READY" in messages[0]


def test_pod_survives_a_new_provider_and_resolves_as_the_only_node(provider):
    provider.create(spec("alpha"), lambda _m: None)
    again = resolve_node(config.load(), None)
    assert again.name == "alpha"
    assert again.accelerator_type == "v3-32"
    assert len(again.workers) == 4
    assert again.created is not None


def test_second_pod_with_the_same_name_is_refused(provider):
    provider.create(spec(), lambda _m: None)
    with pytest.raises(TpuctlError, match="already exists"):
        provider.create(spec(), lambda _m: None)


def test_down_removes_the_pod_but_not_data_outside_it(provider, tmp_path):
    node = provider.create(spec(), lambda _m: None)
    run_data = tmp_path / "state" / "tpuctl" / "local" / "gcs" / "bucket" / "ckpt"
    run_data.mkdir(parents=True)
    assert provider.delete("pod", lambda _m: None) is True
    assert provider.get("pod") is None
    assert provider.list() == []
    assert not any(os.path.exists(w.workdir) for w in node.workers)
    assert run_data.is_dir()
    assert provider.delete("pod", lambda _m: None) is False


def test_down_of_the_last_pod_stops_no_process_that_a_stale_emulator_record_names(provider):
    """The record outlives an emulator that crashed or a reboot; its pid may be another
    process's by now."""
    record = gcs_dir() / "emulator.json"
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        for text in (json.dumps({"pid": bystander.pid, "url": "http://127.0.0.1:1"}), '{"pid": '):
            provider.create(spec(), lambda _m: None)
            config.write_private(record, text)
            messages = []
            assert provider.delete("pod", messages.append) is True
            assert bystander.poll() is None, "a process that is not the emulator was stopped"
            assert not record.exists() and "stopped the local GCS emulator" not in str(messages)
        config.write_private(record, "[1, 2]")
        assert running_gcs_emulator_url() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_pod_whose_record_cannot_be_read_is_listed_and_can_be_taken_down(provider):
    """It used to crash list, top, status, up and down, and hide every other pod."""
    provider.create(spec("good"), lambda _m: None)
    broken = provider.create(spec("broken"), lambda _m: None)
    record = Path(broken.workers[0].workdir).parents[1] / "node.json"
    record.write_text(record.read_text()[:50])
    listed = {node.name: node for node in provider.list()}
    assert listed["good"].state == "READY"
    assert listed["broken"].state == "UNKNOWN" and "cannot be read" in listed["broken"].health
    assert [w.workdir for w in listed["broken"].workers] == [w.workdir for w in broken.workers]
    with pytest.raises(TpuctlError, match="already exists"):
        provider.create(spec("broken"), lambda _m: None)
    assert provider.delete("broken", lambda _m: None) is True
    assert [node.name for node in provider.list()] == ["good"]


@pytest.mark.parametrize(
    ("accelerator_type", "expected"),
    [("v3-8", (1, 8)), ("v3-32", (4, 8)), ("v4-32", (4, 4)), ("v5litepod-16", (4, 4))],
)
def test_hosts_and_devices_of_common_types(accelerator_type, expected):
    assert (hosts_per_type(accelerator_type), devices_per_host(accelerator_type)) == expected


def test_bad_accelerator_type_is_a_one_line_error(provider):
    with pytest.raises(TpuctlError, match="v3-8"):
        provider.create(spec(accelerator_type="v3"), lambda _m: None)


def test_down_stops_a_job_still_running_on_the_pod(provider):
    from tpuctl import jobs
    from tpuctl.hosts import hosts_for

    node = provider.create(spec(accelerator_type="v3-8"), lambda _m: None)
    hosts = hosts_for(config.load(), node)
    jobs.launch(hosts, jobs.JobSpec("r1", ["sleep", "600"]))
    assert jobs.status(hosts)[0].state == "running"
    pid_file = Path(node.workers[0].workdir) / ".tpuctl" / "jobs" / "r1" / "pid"
    stat = Path(f"/proc/{pid_file.read_text().strip()}/stat")
    messages = []
    provider.delete("pod", messages.append)
    assert messages[0] == "w00: stopped run r1 (SIGTERM)"
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
