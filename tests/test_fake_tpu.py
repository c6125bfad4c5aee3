"""The fake Cloud TPU API, driven by the real google-cloud-tpu client over REST."""

import time

import pytest
from google.api_core import exceptions
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import tpu_v2

from tpuctl.testing.fake_tpu import FakeTpuApi

PARENT = "projects/test-project/locations/us-central1-a"


@pytest.fixture
def client(fake_tpu):
    return tpu_v2.TpuClient(
        transport="rest",
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=fake_tpu.url),
    )


def finish(operation, timeout=10.0):
    """The operation's result, polled quickly (the client's own polling starts at 1 s)."""
    deadline = time.monotonic() + timeout
    while not operation.done():
        assert time.monotonic() < deadline, "operation never finished"
        time.sleep(0.01)
    return operation.result()


def new_node(accelerator_type="v3-32", **kwargs):
    return tpu_v2.Node(
        accelerator_type=accelerator_type, runtime_version="tpu-ubuntu2204-base", **kwargs
    )


def test_create_is_a_polled_operation_creating_then_ready(client, fake_tpu):
    fake_tpu.set_create_delay(0.8)  # ample time to observe CREATING on a loaded machine
    operation = client.create_node(parent=PARENT, node_id="n1", node=new_node())
    assert client.get_node(name=f"{PARENT}/nodes/n1").state.name == "CREATING"
    assert not operation.done()
    node = finish(operation)
    assert node.state.name == "READY"
    assert [e.ip_address for e in node.network_endpoints] == [
        e.ip_address for e in client.get_node(name=f"{PARENT}/nodes/n1").network_endpoints
    ]
    assert len(node.network_endpoints) == 4  # v3-32 has 4 hosts
    assert all(e.access_config.external_ip for e in node.network_endpoints)


def test_errors_use_real_status_codes(client, fake_tpu):
    fake_tpu.add_node("n1", "v3-8", project="test-project", zone="us-central1-a")
    with pytest.raises(exceptions.Conflict):
        client.create_node(parent=PARENT, node_id="n1", node=new_node())
    with pytest.raises(exceptions.NotFound):
        client.get_node(name=f"{PARENT}/nodes/missing")
    with pytest.raises(exceptions.BadRequest):
        client.create_node(parent=PARENT, node_id="n2", node=new_node("v3-12"))
    fake_tpu.fail_next(1, status=500)
    with pytest.raises(exceptions.InternalServerError):
        client.list_nodes(parent=PARENT)
    assert [n.name for n in client.list_nodes(parent=PARENT)] == [f"{PARENT}/nodes/n1"]


def test_stockout_fails_the_operation_with_resource_exhausted(client, fake_tpu):
    fake_tpu.inject_stockouts(1)
    operation = client.create_node(parent=PARENT, node_id="n1", node=new_node())
    with pytest.raises(exceptions.ResourceExhausted, match="no more capacity"):
        finish(operation)
    assert fake_tpu.node_state("n1") is None
    # The stockout was used up: the next creation succeeds.
    node = finish(client.create_node(parent=PARENT, node_id="n1", node=new_node()))
    assert node.state.name == "READY"


def test_stockouts_can_be_limited_to_one_zone(client, fake_tpu):
    fake_tpu.inject_stockouts(5, zone="us-central1-a")
    other = "projects/test-project/locations/us-east1-d"
    node = finish(client.create_node(parent=other, node_id="n1", node=new_node()))
    assert node.state.name == "READY"


def test_delete_goes_through_deleting(client, fake_tpu):
    fake_tpu.add_node("n1", "v3-8", project="test-project", zone="us-central1-a")
    fake_tpu.delete_delay = 0.8
    operation = client.delete_node(name=f"{PARENT}/nodes/n1")
    assert fake_tpu.node_state("n1") == "DELETING"
    finish(operation)
    assert fake_tpu.node_state("n1") is None


def test_preempt_and_vanish(client, fake_tpu):
    fake_tpu.add_node("spot", "v3-8", project="test-project", zone="us-central1-a")
    fake_tpu.add_node("gone", "v3-8", project="test-project", zone="us-central1-a")
    fake_tpu.preempt("spot")
    fake_tpu.vanish("gone")
    assert client.get_node(name=f"{PARENT}/nodes/spot").state.name == "PREEMPTED"
    with pytest.raises(exceptions.NotFound):
        client.get_node(name=f"{PARENT}/nodes/gone")


def test_list_all_zones_with_dash(client, fake_tpu):
    fake_tpu.add_node("a", "v3-8", project="test-project", zone="us-central1-a")
    fake_tpu.add_node("b", "v3-8", project="test-project", zone="europe-west4-a")
    fake_tpu.add_node("c", "v3-8", project="other-project", zone="europe-west4-a")
    names = sorted(
        n.name.rsplit("/", 1)[-1]
        for n in client.list_nodes(parent="projects/test-project/locations/-")
    )
    assert names == ["a", "b"]


def test_queued_resource_moves_to_active_and_its_node_to_ready(client, fake_tpu):
    fake_tpu.set_queued_wait(0.2)
    queued = tpu_v2.QueuedResource(
        tpu=tpu_v2.QueuedResource.Tpu(
            node_spec=[
                tpu_v2.QueuedResource.Tpu.NodeSpec(
                    parent=PARENT, node_id="q1", node=new_node("v4-32")
                )
            ]
        ),
        spot=tpu_v2.QueuedResource.Spot(),
    )
    finish(
        client.create_queued_resource(
            parent=PARENT, queued_resource_id="q1", queued_resource=queued
        )
    )
    path = f"{PARENT}/queuedResources/q1"
    assert client.get_queued_resource(name=path).state.state.name == "WAITING_FOR_RESOURCES"
    deadline = time.monotonic() + 10
    while client.get_queued_resource(name=path).state.state.name != "ACTIVE":
        assert time.monotonic() < deadline, "queued resource never became ACTIVE"
        time.sleep(0.02)
    node = client.get_node(name=f"{PARENT}/nodes/q1")
    assert (node.state.name, node.scheduling_config.spot) == ("READY", True)
    finish(client.delete_queued_resource(request={"name": path, "force": True}))
    assert fake_tpu.queued_resource_state("q1") is None
    assert fake_tpu.node_state("q1") is None


def test_worker_ips_callback_hands_out_addresses():
    calls = []

    def worker_ips(name, n):
        calls.append((name, n))
        return [f"192.168.77.{i + 10}" for i in range(n)]

    with FakeTpuApi(worker_ips=worker_ips, create_delay=0.01) as api:
        client = tpu_v2.TpuClient(
            transport="rest",
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=api.url),
        )
        node = finish(client.create_node(parent=PARENT, node_id="n1", node=new_node()))
    assert calls == [("n1", 4)]
    assert [e.ip_address for e in node.network_endpoints] == [
        "192.168.77.10",
        "192.168.77.11",
        "192.168.77.12",
        "192.168.77.13",
    ]


def test_a_queued_resource_deletion_can_be_made_to_fail(client, fake_tpu):
    fake_tpu.set_queued_wait(60)
    fake_tpu.fail_queued_deletes(1)
    spec = tpu_v2.QueuedResource.Tpu.NodeSpec(parent=PARENT, node_id="q", node=new_node("v4-32"))
    queued = tpu_v2.QueuedResource(tpu=tpu_v2.QueuedResource.Tpu(node_spec=[spec]))
    finish(
        client.create_queued_resource(parent=PARENT, queued_resource_id="q", queued_resource=queued)
    )
    path = f"{PARENT}/queuedResources/q"
    with pytest.raises(exceptions.FailedPrecondition, match="cannot be deleted now"):
        finish(client.delete_queued_resource(request={"name": path, "force": True}))
    assert fake_tpu.queued_resource_state("q") == "WAITING_FOR_RESOURCES"
