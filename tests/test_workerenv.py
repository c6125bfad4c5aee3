"""Worker preparation on local-transport workers: a real venv with the wheel of this
checkout, skipped while nothing changed, redone when the configuration changes."""

import subprocess
import sys
from pathlib import Path

import pytest

from tpuctl import workerenv
from tpuctl.errors import TpuctlError
from tpuctl.fanout import Host

# The base interpreter builds the venv; --no-index --no-deps keeps pip offline: the test
# checks that the wheel of this checkout lands in each worker's own venv.
OFFLINE = workerenv.WorkerEnv(base_python=sys.executable, pip_args="--no-index --no-deps")


@pytest.fixture(autouse=True)
def private_state(tmp_path, monkeypatch):
    """Built wheels are cached under state_dir: keep them out of the real one."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture
def hosts(tmp_path):
    made = []
    for index in range(2):
        (tmp_path / f"w{index}").mkdir()
        made.append(
            Host(
                f"w{index:02d}", "localhost", workdir=str(tmp_path / f"w{index}"), transport="local"
            )
        )
    return made


def installed_trainer(workdir: str) -> str:
    # cwd is the worker directory, so the import cannot come from this checkout.
    out = subprocess.run(
        [workerenv.VENV_PYTHON, "-c", "import trainer; print(trainer.__file__)"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_first_prepare_installs_the_wheel_then_unchanged_workers_are_skipped(hosts, tmp_path):
    messages = []
    prepared = workerenv.prepare(hosts, OFFLINE, messages.append)
    assert [r.host.label for r in prepared] == ["w00", "w01"]
    for host in hosts:
        location = installed_trainer(host.workdir)
        assert location.startswith(str(Path(host.workdir) / ".tpuctl" / "venv"))
    assert workerenv.prepare(hosts, OFFLINE, messages.append) == []
    assert "unchanged" in messages[-1]
    assert len(list((tmp_path / "state" / "tpuctl" / "wheels").glob("*/*.whl"))) == 1


def test_a_new_worker_or_a_changed_setup_is_prepared_again(hosts):
    workerenv.prepare(hosts[:1], OFFLINE, lambda _m: None)
    assert [r.host.label for r in workerenv.prepare(hosts, OFFLINE, lambda _m: None)] == ["w01"]
    with_setup = workerenv.WorkerEnv(
        base_python=sys.executable, pip_args=OFFLINE.pip_args, setup="echo ran > setup-ran"
    )
    assert len(workerenv.prepare(hosts, with_setup, lambda _m: None)) == 2
    assert all((Path(h.workdir) / "setup-ran").read_text() == "ran\n" for h in hosts)


def test_prebuilt_interpreter_needs_no_preparation(hosts):
    assert workerenv.prepare(hosts, workerenv.WorkerEnv(python="/opt/py/bin/python"), print) == []
    assert workerenv.WorkerEnv(python="/opt/py/bin/python").launcher([]) == ["/opt/py/bin/python"]


def test_container_launcher_passes_environment_by_name_only():
    argv = workerenv.WorkerEnv(image="trainer:1").launcher(["WANDB_API_KEY"])
    assert argv[:2] == ["docker", "run"]
    assert argv[-2:] == ["trainer:1", "python3"]
    assert argv[argv.index("-e") : argv.index("-e") + 2] == ["-e", "WANDB_API_KEY"]


def test_failing_setup_names_the_workers(hosts):
    broken = workerenv.WorkerEnv(python="python3", setup="echo 'no such mirror' >&2; exit 4")
    with pytest.raises(TpuctlError, match=r"failed on 2 worker\(s\): w00: no such mirror"):
        workerenv.prepare(hosts, broken, lambda _m: None)


@pytest.mark.pod
def test_workers_over_ssh_get_the_wheel_in_their_own_venv(ssh_pod, pod_key, tmp_path):
    from tests.fixtures_pod import pod_hosts
    from tpuctl.fanout import run

    hosts = pod_hosts(ssh_pod, pod_key, str(tmp_path / "known_hosts"))[:2]
    run(hosts, "rm -rf ~/.tpuctl")  # the shared pod's hosts may have been prepared before
    prepared = workerenv.prepare(hosts, OFFLINE, lambda _m: None)
    assert [r.host.label for r in prepared] == ["w00", "w01"]
    check = run(hosts, f"{workerenv.VENV_PYTHON} -c 'import trainer; print(trainer.__file__)'")
    assert all(r.ok and r.stdout.startswith("/root/.tpuctl/venv/") for r in check), check
    assert workerenv.prepare(hosts, OFFLINE, lambda _m: None) == []
