"""The SSH test pod: real sshd hosts, each in its own network, mount and PID namespace.

`ssh_pod` (4 hosts) is shared by the whole session: tests that stop a host bring it back.
`ssh_pod32` is a shared 32-host pod for the scale tests; `make_ssh_pod(n, **options)` starts
any other (SshPod's options), stopped at the end of the session. All need root; without it
the tests are skipped.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator

import pytest

from tpuctl.fanout import Host
from tpuctl.testing.sshpod import SshPod, make_keypair

NOT_ROOT = "the SSH test pod needs root (network namespaces and sshd); CI runs as root"


@pytest.fixture(scope="session")
def pod_key(tmp_path_factory) -> tuple[str, str]:
    """The login key every test pod accepts for root: (private key path, public key line)."""
    return make_keypair(tmp_path_factory.mktemp("pod-key"))


@pytest.fixture(scope="session")
def make_ssh_pod(pod_key) -> Iterator[Callable[[int], SshPod]]:
    if os.geteuid() != 0:
        pytest.skip(NOT_ROOT)
    pods: list[SshPod] = []

    def make(n: int, **options) -> SshPod:
        pod = SshPod(n, pod_key, keep_visible=_python_home(), **options)
        pods.append(pod)
        return pod.start()

    yield make
    for pod in pods:
        pod.stop()


def _python_home() -> tuple[str, ...]:
    """The interpreter's installation, this checkout and its venv, where they live under
    /root (pyenv) or /tmp (a CI clone): workers run them, but see their own /root and /tmp."""
    candidates = (sys.executable, sys.prefix, os.path.dirname(os.path.dirname(__file__)))
    tops = {"/" + "/".join(os.path.realpath(p).split(os.sep)[1:3]) for p in candidates}
    return tuple(sorted(top for top in tops if top.startswith(("/root/", "/tmp/"))))


@pytest.fixture(scope="session")
def _shared_pod(make_ssh_pod) -> SshPod:
    return make_ssh_pod(4)


@pytest.fixture(scope="session")
def ssh_pod32(make_ssh_pod) -> SshPod:
    """A 32-host pod (a v3-256's worth of workers), shared by the scale tests."""
    return make_ssh_pod(32)


@pytest.fixture
def ssh_pod(_shared_pod) -> Iterator[SshPod]:
    """The shared 4-host pod, with every host up when the test starts and when it ends."""
    for index in range(_shared_pod.n):
        _shared_pod.start_host(index)
    yield _shared_pod
    for index in range(_shared_pod.n):
        _shared_pod.start_host(index)


@pytest.fixture
def bastion_pod(ssh_pod) -> Iterator[SshPod]:
    """The shared pod with hosts 1-3 reachable only through host 0: workers without an
    external IP behind a bastion (this machine's packets to them go unanswered)."""
    if not ssh_pod.isolated:
        pytest.skip("hiding hosts needs network namespaces")
    for index in (1, 2, 3):
        ssh_pod.hide_host(index)
    yield ssh_pod
    for index in (1, 2, 3):
        ssh_pod.hide_host(index, hidden=False)


def pod_hosts(pod: SshPod, key: tuple[str, str], known_hosts: str) -> list[Host]:
    """Fan-out hosts for a pod, logging in as root with the pod's key."""
    return [
        Host(f"w{i:02d}", address, user="root", key_filename=key[0], known_hosts=known_hosts)
        for i, address in enumerate(pod.hosts)
    ]
