"""Worker preparation on local-transport workers: a real venv (made by uv) with the wheel
of this checkout, skipped while nothing changed, redone when the configuration changes;
a worker whose python3 is too old gets a Python uv installs from a mirror."""

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tpuctl import workerenv
from tpuctl.errors import TpuctlError
from tpuctl.fanout import Host


@pytest.fixture(autouse=True)
def private_state(tmp_path, monkeypatch):
    """Built wheels are cached under state_dir: keep them out of the real one."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture
def offline(uv_wheels):
    """This interpreter builds the venv; uv comes from a local wheel, and only the wheel of
    this checkout goes into each worker's venv (--no-deps: the test is about placement)."""
    return workerenv.WorkerEnv(
        base_python=sys.executable,
        pip_args=f"--no-index --find-links {uv_wheels}",
        uv_args="--no-index --no-deps",
    )


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


def in_venv(workdir: str, code: str) -> str:
    # cwd is the worker directory, so the import cannot come from this checkout.
    out = subprocess.run(
        [workerenv.VENV_PYTHON, "-c", code], cwd=workdir, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_first_prepare_installs_the_wheel_then_unchanged_workers_are_skipped(
    hosts, tmp_path, offline
):
    messages = []
    prepared = workerenv.prepare(hosts, offline, messages.append)
    assert [r.host.label for r in prepared] == ["w00", "w01"]
    for host in hosts:
        location = in_venv(host.workdir, "import trainer; print(trainer.__file__)")
        assert location.startswith(str(Path(host.workdir) / ".tpuctl" / "venv"))
    steps = [m.split(" ... ")[0] for m in messages if m.startswith("w01: ")]
    assert steps == [
        "w01: installing uv (pip)",
        f"w01: using {sys.executable} (Python {sys.version.split()[0]})",
        "w01: creating the venv",
        "w01: installing the trainer (uv pip)",
    ]
    assert workerenv.prepare(hosts, offline, messages.append) == []
    assert "unchanged" in messages[-1]
    assert len(list((tmp_path / "state" / "tpuctl" / "wheels").glob("*/*.whl"))) == 1


def test_a_new_worker_or_a_changed_setup_is_prepared_again(hosts, offline):
    workerenv.prepare(hosts[:1], offline, lambda _m: None)
    assert [r.host.label for r in workerenv.prepare(hosts, offline, lambda _m: None)] == ["w01"]
    with_setup = dataclasses.replace(offline, setup="echo ran > setup-ran")
    assert len(workerenv.prepare(hosts, with_setup, lambda _m: None)) == 2
    assert all((Path(h.workdir) / "setup-ran").read_text() == "ran\n" for h in hosts)


@pytest.mark.parametrize("asked", ["too old base_python", "worker.python_version"])
def test_uv_installs_the_python_when_base_python_is_too_old_or_another_is_asked_for(
    hosts, offline, old_python, python_mirror, asked
):
    version = sys.version.split()[0]  # the one interpreter the mirror offers
    if asked == "worker.python_version":  # base_python would do, but 3.11 is asked for
        stock = dataclasses.replace(offline, python_version="3.11", python_mirror=python_mirror)
    else:
        stock = dataclasses.replace(offline, base_python=old_python, python_mirror=python_mirror)
    messages = []
    workerenv.prepare(hosts[:1], stock, messages.append)
    assert any(m.startswith(f"w00: installing Python {version} (uv) ... ") for m in messages)
    reported = in_venv(hosts[0].workdir, "import sys; print(sys.version.split()[0])")
    assert reported == version
    venv_config = (Path(hosts[0].workdir) / ".tpuctl" / "venv" / "pyvenv.cfg").read_text()
    home = next(line for line in venv_config.splitlines() if line.startswith("home"))
    assert f"/.tpuctl/python/cpython-{version.rsplit('.', 1)[0]}" in home


def test_a_failing_step_names_the_worker_and_the_step(hosts, offline, old_python, tmp_path):
    nowhere = dataclasses.replace(
        offline, base_python=old_python, python_mirror=str(tmp_path / "none.json")
    )
    with pytest.raises(TpuctlError) as failure:
        workerenv.prepare(hosts[:1], nowhere, lambda _m: None)
    message = str(failure.value)
    assert message.startswith(
        "preparing the worker environment failed on 1 worker: "
        "w00: installing Python >=3.11,<3.14 (uv): "
    )
    assert "\n" not in message


def test_the_workers_floor_is_the_packages_requires_python():
    project = tomllib.loads((workerenv.project_root() / "pyproject.toml").read_text())
    floor = ".".join(map(str, workerenv.WORKER_MIN_PYTHON))
    assert project["project"]["requires-python"] == f">={floor}"
    assert workerenv.DEFAULT_PYTHON_VERSION.startswith(f">={floor},")


def test_prebuilt_interpreter_needs_no_preparation(hosts):
    messages = []
    env = workerenv.WorkerEnv(python="/opt/py/bin/python")
    assert workerenv.prepare(hosts, env, messages.append) == []
    assert messages == ["nothing to prepare: the workers run the trainer with /opt/py/bin/python"]
    assert env.launcher([]) == ["/opt/py/bin/python"]


def test_container_launcher_passes_environment_by_name_only():
    argv = workerenv.WorkerEnv(image="trainer:1").launcher(["WANDB_API_KEY"])
    assert argv[:2] == ["docker", "run"]
    assert argv[-2:] == ["trainer:1", "python3"]
    assert argv[argv.index("-e") : argv.index("-e") + 2] == ["-e", "WANDB_API_KEY"]


def test_failing_setup_names_the_workers(hosts):
    broken = workerenv.WorkerEnv(python="python3", setup="echo 'no such mirror' >&2; exit 4")
    with pytest.raises(
        TpuctlError, match=r"failed on 2 workers: w00: running worker.setup: no such mirror"
    ):
        workerenv.prepare(hosts, broken, lambda _m: None)


@pytest.mark.pod
def test_workers_over_ssh_get_the_wheel_in_their_own_venv(ssh_pod, pod_key, tmp_path, offline):
    from tests.fixtures_pod import pod_hosts
    from tpuctl.fanout import run

    hosts = pod_hosts(ssh_pod, pod_key, str(tmp_path / "known_hosts"))[:2]
    run(hosts, "rm -rf ~/.tpuctl")  # the shared pod's hosts may have been prepared before
    prepared = workerenv.prepare(hosts, offline, lambda _m: None)
    assert [r.host.label for r in prepared] == ["w00", "w01"]
    check = run(hosts, f"{workerenv.VENV_PYTHON} -c 'import trainer; print(trainer.__file__)'")
    assert all(r.ok and r.stdout.startswith("/root/.tpuctl/venv/") for r in check), check
    assert workerenv.prepare(hosts, offline, lambda _m: None) == []
