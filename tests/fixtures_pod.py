"""The SSH test pod: real sshd hosts, each in its own network, mount and PID namespace.

`ssh_pod` (4 hosts) is shared by the whole session: tests that stop a host bring it back.
`make_ssh_pod(n)` starts a bigger pod (the 32-host scale test, the benchmark's peers) and
stops it at the end of the session. Both need root; without it the tests are skipped.
"""

from __future__ import annotations

import os
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

    def make(n: int) -> SshPod:
        pod = SshPod(n, pod_key)
        pods.append(pod)
        return pod.start()

    yield make
    for pod in pods:
        pod.stop()


@pytest.fixture(scope="session")
def _shared_pod(make_ssh_pod) -> SshPod:
    return make_ssh_pod(4)


@pytest.fixture
def ssh_pod(_shared_pod) -> Iterator[SshPod]:
    """The shared 4-host pod, with every host up when the test starts and when it ends."""
    for index in range(_shared_pod.n):
        _shared_pod.start_host(index)
    yield _shared_pod
    for index in range(_shared_pod.n):
        _shared_pod.start_host(index)


def pod_hosts(pod: SshPod, key: tuple[str, str], known_hosts: str) -> list[Host]:
    """Fan-out hosts for a pod, logging in as root with the pod's key."""
    return [
        Host(f"w{i:02d}", address, user="root", key_filename=key[0], known_hosts=known_hosts)
        for i, address in enumerate(pod.hosts)
    ]
