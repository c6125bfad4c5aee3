"""CloudTpuProvider: the real google-cloud-tpu client against the fake v2 REST API."""

import random
import re
import threading

import pytest

from tpuctl import config
from tpuctl.durations import Clock
from tpuctl.errors import TpuctlError
from tpuctl.providers import provider_for, resolve_node
from tpuctl.providers.base import NodeSpec
from tpuctl.providers.cloud_tpu import Backoff, CloudTpuProvider, WaitTimedOut

ZONE = "us-central1-a"


@pytest.fixture
def provider(fake_tpu):
    return CloudTpuProvider("test-project", ZONE, clock=Clock(scale=0.001))


def spec(name="n", accelerator_type="v3-32", **kwargs):
    return NodeSpec(name, ZONE, accelerator_type, "tpu-ubuntu2204-base", **kwargs)


class Progress(list):
    def __call__(self, message):
        self.append(message)


def test_get_converts_the_api_node(provider, fake_tpu):
    fake_tpu.add_node(
        "n", "v3-32", project="test-project", zone=ZONE, scheduling="preemptible",
        worker_ips=["10.1.1.1", "10.1.1.2", "10.1.1.3", "10.1.1.4"], labels={"team": "nlp"},
    )  # fmt: skip
    node = provider.get("n")
    assert (node.name, node.zone, node.project, node.accelerator_type) == (
        "n", ZONE, "test-project", "v3-32",
    )  # fmt: skip
    assert (node.state, node.health, node.scheduling) == ("READY", "HEALTHY", "preemptible")
    assert [w.internal_ip for w in node.workers] == ["10.1.1.1", "10.1.1.2", "10.1.1.3", "10.1.1.4"]
    assert [w.index for w in node.workers] == [0, 1, 2, 3]
    assert node.labels == {"team": "nlp"}
    assert node.created is not None and node.provider == "cloud"
    assert provider.get("other") is None


def test_create_reports_state_transitions(provider, fake_tpu):
    fake_tpu.set_create_delay(0.6)  # several polls see CREATING, even on a loaded machine
    progress = Progress()
    node = provider.create(spec(labels={"a": "b"}, metadata={"ssh-keys": "u:k"}), progress)
    assert node.ready and len(node.workers) == 4
    assert "n: CREATING" in progress and progress[-1] == "n: READY"
    stored = fake_tpu.node("n")
    assert stored["labels"] == {"a": "b"} and stored["metadata"] == {"ssh-keys": "u:k"}


def test_stockouts_in_one_zone_fall_back_to_the_next(provider, fake_tpu):
    fake_tpu.inject_stockouts(10, zone=ZONE)
    progress = Progress()
    node = provider.create_with_retries(spec(), progress, fallback_zones=["europe-west4-a"])
    assert node.zone == "europe-west4-a"
    assert (
        progress.count(
            f'stockout in {ZONE} (attempt 1): There is no more capacity in the zone "{ZONE}"'
        )
        == 1
    )
    assert not any("retrying in" in line for line in progress)  # no wait: another zone had room


def test_backoff_is_exponential_with_bounded_jitter():
    backoff = Backoff(initial=5, factor=2, maximum=60, jitter=0.2)
    rng = random.Random(1)
    delays = [backoff.delay(k, rng) for k in range(8)]
    for k, delay in enumerate(delays):
        base = min(60, 5 * 2**k)
        assert 0.8 * base <= delay <= 1.2 * base
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered, not a fixed schedule


def test_retry_budget_counts_the_full_schedule(fake_tpu):
    provider = CloudTpuProvider("test-project", ZONE, clock=Clock(scale=0.00005))
    fake_tpu.inject_stockouts(1000)
    fake_tpu.set_create_delay(0)
    progress = Progress()
    with pytest.raises(
        TpuctlError, match=r"no capacity for v3-32 in us-central1-a after \d+ attempts"
    ):
        provider.create_with_retries(spec(), progress, retry_for=3600)
    delays = [m for m in progress if "retrying in" in m]
    # 5, 10, 20, ... capped at 300 s: about a dozen rounds fill an hour of backoff.
    assert 10 <= len(delays) <= 20
    assert provider.clock.elapsed() >= 3600
    assert re.search(
        r"retrying in 4m\d\ds|retrying in 5m\d\ds|retrying in 3m\d\ds", "\n".join(delays)
    )


def test_each_create_gets_its_own_retry_budget(fake_tpu):
    """A long-lived provider (babysit recreates through one) must not spend a later
    creation's budget on an earlier one's stockouts."""
    provider = CloudTpuProvider("test-project", ZONE, clock=Clock(scale=0.00005))
    fake_tpu.set_create_delay(0)
    fake_tpu.inject_stockouts(1000)
    with pytest.raises(TpuctlError, match="no capacity"):
        provider.create_with_retries(spec("first"), Progress(), retry_for=600)
    fake_tpu.inject_stockouts(2)
    progress = Progress()
    node = provider.create_with_retries(spec("second"), progress, retry_for=600)
    assert node is not None and node.state == "READY"
    assert sum("retrying in" in m for m in progress) == 2


def test_transient_500s_are_retried_then_reported(provider, fake_tpu):
    fake_tpu.add_node("n", "v3-8", project="test-project", zone=ZONE)
    fake_tpu.fail_next(2, status=503)
    assert [n.name for n in provider.list()] == ["n"]
    fake_tpu.fail_next(100, status=500)
    with pytest.raises(TpuctlError, match=r"the TPU API keeps failing \(500"):
        provider.list()


def test_invalid_arguments_are_not_retried(provider, fake_tpu):
    with pytest.raises(TpuctlError, match='refused the request: Invalid value for field "nodeId"'):
        provider.create_with_retries(spec(name="UPPER"), Progress())
    assert [m for m, _ in fake_tpu.requests if m == "POST"] == ["POST"]


def test_node_preempted_while_starting_is_reported(provider, fake_tpu):
    fake_tpu.add_node("n", "v3-8", project="test-project", zone=ZONE, state="CREATING")
    threading.Timer(0.05, fake_tpu.preempt, args=("n",)).start()
    with pytest.raises(TpuctlError, match="node n is PREEMPTED instead of READY"):
        provider.wait_until_ready("n", Progress())


def test_waiting_for_ready_ends_at_the_timeout_on_the_providers_clock(fake_tpu):
    """Counted on the injected clock (here one that never sleeps): two minutes of polling
    in no time, ended within one poll interval of the bound; the node is left alone."""
    provider = CloudTpuProvider("test-project", ZONE, clock=Clock(scale=0))
    fake_tpu.add_node("n", "v3-8", project="test-project", zone=ZONE, state="REPAIRING")
    with pytest.raises(WaitTimedOut, match=r"after 2m00s \(--timeout\): node n is REPAIRING"):
        provider.wait_until_ready("n", Progress(), timeout=120)
    assert 120 <= provider.clock.elapsed() < 131
    assert fake_tpu.node_state("n") == "REPAIRING"


def test_node_that_vanishes_while_starting_is_reported(provider, fake_tpu):
    fake_tpu.add_node("n", "v3-8", project="test-project", zone=ZONE, state="CREATING")
    threading.Timer(0.05, fake_tpu.vanish, args=("n",)).start()
    with pytest.raises(TpuctlError, match="node n disappeared"):
        provider.wait_until_ready("n", Progress())


def test_delete_missing_node_returns_false(provider, fake_tpu):
    assert provider.delete("ghost", Progress()) is False


def test_provider_for_and_resolve_node_use_settings(fake_tpu):
    fake_tpu.add_node("only", "v3-8", project="test-project", zone=ZONE)
    settings = config.load()
    assert isinstance(provider_for(settings), CloudTpuProvider)
    assert resolve_node(settings, None).name == "only"
    fake_tpu.add_node("second", "v3-8", project="test-project", zone=ZONE)
    with pytest.raises(TpuctlError, match=r"2 nodes in zone us-central1-a .*\(only, second\)"):
        resolve_node(settings, None)
    assert resolve_node(config.load({"node": "second"}), None).name == "second"
    with pytest.raises(TpuctlError, match="no node named 'x' in zone us-central1-a"):
        resolve_node(settings, "x")


def test_unreachable_endpoint_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("TPUCTL_TPU_API_ENDPOINT", "http://127.0.0.1:9")  # discard port: closed
    provider = CloudTpuProvider("p", ZONE, clock=Clock(scale=0.001))
    with pytest.raises(TpuctlError, match=r"cannot reach the TPU API at http://127\.0\.0\.1:9;"):
        provider.list()


def test_a_429_on_a_read_is_waited_out_like_a_500(provider, fake_tpu):
    """Reads and polls over the API's rate limit are retried; only a create's 429 means
    quota or capacity."""
    fake_tpu.add_node("n", "v3-8", project="test-project", zone=ZONE)
    fake_tpu.fail_next(2, status=429)
    assert [n.name for n in provider.list()] == ["n"]
    fake_tpu.fail_next(2, status=429)
    assert provider.get("n").name == "n"
    fake_tpu.fail_next(100, status=429)
    with pytest.raises(TpuctlError, match=r"the TPU API keeps failing \(429"):
        provider.get("n")


def test_an_unexpected_404_or_409_is_a_one_line_error(provider, fake_tpu):
    fake_tpu.fail_next(1, status=404)
    with pytest.raises(TpuctlError, match=r"the TPU API failed: 404 injected server error"):
        provider.list()
    fake_tpu.fail_next(1, status=409)
    with pytest.raises(TpuctlError, match=r"the TPU API failed: 409 injected server error"):
        provider.list()


def test_a_node_created_by_someone_between_look_and_create_is_one_line_naming_them(
    provider, fake_tpu
):
    fake_tpu.add_node(
        "n", "v3-32", project="test-project", zone=ZONE, labels={"tpuctl-user": "bob"}
    )
    with pytest.raises(TpuctlError) as error:
        provider.create(spec(), Progress())
    assert str(error.value) == (
        "node n was created in us-central1-a by another request meanwhile (labels "
        "tpuctl-user=bob): choose another --name, or run `tpuctl up` again to reuse it if it "
        "is yours"
    )
    assert fake_tpu.node("n")["labels"] == {"tpuctl-user": "bob"}  # left alone


def test_delete_queued_says_whether_it_deleted_one(provider, fake_tpu):
    """`down` claims a deletion only when the provider says it made one."""
    fake_tpu.set_queued_wait(60)
    provider.create_queued(spec("q", "v4-32"), Progress(), wait=False)
    path = provider.queued_path("q")
    assert provider.delete_queued(path, Progress()) is True
    assert provider.delete_queued(path, Progress()) is False
