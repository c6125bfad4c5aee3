"""`tpuctl up/down/list/status/types` against the fake Cloud TPU API (real client, REST)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.polling import wait_for
from tpuctl.providers.base import NodeSpec
from tpuctl.providers.local import LocalProvider


def retry_delays(stderr: str) -> list[int]:
    """The backoff delays `up` announced, in seconds."""
    return [_seconds(d) for d in re.findall(r"retrying in (\S+) ", stderr)]


def _seconds(text: str) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(\d+)s", text)
    assert match, text
    return int(match[1] or 0) * 60 + int(match[2])


def creates(fake) -> int:
    return sum(1 for method, path in fake.requests if method == "POST" and path.endswith("/nodes"))


# -- up ---------------------------------------------------------------------------------


def test_up_survives_stockouts_with_visible_growing_backoff(run_tpuctl, fake_tpu):
    fake_tpu.inject_stockouts(3)
    result = run_tpuctl("up", "v3-32", "--spot", "--name", "alice-v3-32")
    assert result.code == 0, result.err
    assert result.err.count("stockout in us-central1-a") == 3
    delays = retry_delays(result.err)
    assert len(delays) == 3
    # 5 s doubling, each within +-20 % jitter.
    for delay, base in zip(delays, (5, 10, 20), strict=True):
        assert 0.8 * base - 1 <= delay <= 1.2 * base + 1
    assert delays == sorted(delays)
    assert "READY" in result.err
    for index in range(4):
        assert f"w{index:02d}" in result.out
    assert fake_tpu.node_state("alice-v3-32") == "READY"
    assert fake_tpu.node("alice-v3-32")["schedulingConfig"] == {"spot": True}


def test_up_puts_the_generated_public_key_into_ssh_keys_metadata(run_tpuctl, fake_tpu):
    result = run_tpuctl("up", "v3-8", "--name", "keyed")
    assert result.code == 0, result.err
    key_dir = Path(os.environ["XDG_CONFIG_HOME"]) / "tpuctl" / "ssh"
    public = (key_dir / "id_ed25519.pub").read_text().split()
    ssh_keys = fake_tpu.node("keyed")["metadata"]["ssh-keys"]
    user, _, line = ssh_keys.partition(":")
    assert line.split()[:2] == public[:2]
    assert public[0] == "ssh-ed25519"
    assert (key_dir / "id_ed25519").stat().st_mode & 0o777 == 0o600
    assert user


def test_default_name_is_user_dash_type(run_tpuctl, fake_tpu, monkeypatch):
    monkeypatch.setenv("USER", "Alice_B")
    monkeypatch.setenv("LOGNAME", "Alice_B")
    result = run_tpuctl("up", "v3-8")
    assert result.code == 0, result.err
    assert fake_tpu.node_state("alice-b-v3-8") == "READY"


def test_retries_stop_at_retry_for_and_say_how_to_go_on(run_tpuctl, fake_tpu):
    fake_tpu.inject_stockouts(100)
    result = run_tpuctl("up", "v3-32", "--name", "n", "--retry-for", "40s")
    assert result.code == 1
    assert "Traceback" not in result.err
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("error: no capacity for v3-32 in us-central1-a after")
    assert "--retry-for" in last
    # Budget 40 s: ~5 + ~10 + ~20, then whatever is left, never past the budget.
    delays = retry_delays(result.err)
    assert 3 <= len(delays) <= 5
    assert sum(delays) <= 40 + len(delays)  # rounding to whole seconds in the output
    assert fake_tpu.node_state("n") is None


def test_quota_error_is_not_retried(run_tpuctl, fake_tpu):
    fake_tpu.inject_quota_errors(1)
    result = run_tpuctl("up", "v3-32", "--name", "n")
    assert result.code == 1
    assert "retrying in" not in result.err
    assert result.err.strip().splitlines()[-1].startswith("error: quota exceeded, not retrying")
    assert creates(fake_tpu) == 1


def test_invalid_type_names_the_nearest_valid_ones_before_any_api_call(run_tpuctl, fake_tpu):
    result = run_tpuctl("up", "v3-12")
    assert result.code == 2
    assert (
        result.err.strip() == "error: 'v3-12' is not a v3 slice size; nearest valid: v3-8 or v3-32"
    )
    assert fake_tpu.requests == []


def test_bad_name_and_conflicting_flags_are_one_line_errors(run_tpuctl, fake_tpu):
    result = run_tpuctl("up", "v3-8", "--name", "Bad_Name")
    assert result.code == 2 and "not a valid TPU node id" in result.err
    result = run_tpuctl("up", "v3-8", "--spot", "--preemptible")
    assert result.code == 2 and "choose one of --spot, --preemptible, --reserved" in result.err
    result = run_tpuctl("up", "v3-8", "--retry-for", "soon")
    assert result.code == 2 and "--retry-for 'soon' is not a duration" in result.err
    assert fake_tpu.requests == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("status", "a/b"), "node name 'a/b' is not a valid TPU node id"),
        (("down", "a/b", "--yes"), "node name 'a/b' is not a valid TPU node id"),
        (("list", "--project", "p/q"), "project 'p/q' is not a Cloud project name"),
        (("up", "v3-8", "--name", "n", "--zone", "us-central1-a/nodes"), "zone 'us-central1-a/"),
        (("up", "v3-8", "--name", "n", "--zone", "us central1-a"), "zone 'us central1-a' is not"),
    ],
)
def test_names_that_would_not_be_api_paths_are_one_line_errors(run_tpuctl, fake_tpu, args, message):
    """Each reached the TPU client and ended in its ValueError or NotFound traceback."""
    result = run_tpuctl(*args)
    assert result.code == 2 and message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1
    assert fake_tpu.requests == []


def test_up_no_wait_of_a_preempted_node_says_so_instead_of_requesting_it(run_tpuctl, fake_tpu):
    fake_tpu.add_node(
        "pre", "v3-8", project="test-project", zone="us-central1-a", state="PREEMPTED"
    )
    result = run_tpuctl("up", "v3-8", "--name", "pre", "--no-wait")  # before: "requested"
    assert result.code == 1
    assert "node pre exists but is PREEMPTED; delete it with `tpuctl down pre`" in result.err


def test_up_on_the_cloud_refuses_the_name_of_a_local_pod(run_tpuctl, fake_tpu):
    assert run_tpuctl("up", "v4-8", "--local", "--name", "dup").code == 0
    try:
        result = run_tpuctl("up", "v4-8", "--name", "dup")  # before: a cloud twin
        assert result.code == 2
        assert "a local pod is named dup: pick another --name" in result.err
        assert creates(fake_tpu) == 0
    finally:
        assert run_tpuctl("down", "dup", "--yes").code == 0


def test_up_local_refuses_the_name_of_a_cloud_node(run_tpuctl, fake_tpu):
    assert run_tpuctl("up", "v4-8", "--name", "dup").code == 0
    result = run_tpuctl("up", "v4-8", "--local", "--name", "dup")  # before: a local twin
    assert result.code == 2
    assert (
        "a node in zone us-central1-a of project test-project is named dup: pick another --name"
        in result.err
    )
    assert run_tpuctl("status", "dup").code == 0


def test_up_reuses_a_ready_node_of_the_same_type(run_tpuctl, fake_tpu):
    fake_tpu.add_node("n", "v3-32", project="test-project", zone="us-central1-a")
    result = run_tpuctl("up", "v3-32", "--name", "n", "--json")
    assert result.code == 0, result.err
    assert "reusing it" in result.err
    assert json.loads(result.out)["state"] == "READY"
    assert creates(fake_tpu) == 0


def test_up_refuses_a_node_of_another_type(run_tpuctl, fake_tpu):
    fake_tpu.add_node("n", "v3-8", project="test-project", zone="us-central1-a", labels=mine())
    result = run_tpuctl("up", "v3-32", "--name", "n")
    assert result.code == 2
    assert result.err.strip().splitlines()[-1] == (
        "error: node n already exists in us-central1-a as v3-8, not v3-32; pick another "
        "--name or delete it with `tpuctl down n`"
    )
    assert fake_tpu.node_state("n") == "READY"  # untouched


@pytest.mark.parametrize("accelerator_type", ["v3-8", "v3-32"])
def test_up_never_reuses_or_offers_to_delete_a_colleagues_node(
    run_tpuctl, fake_tpu, accelerator_type
):
    """Before: a colleague's node of the same type was silently reused, and one of another
    type came with `tpuctl down` as the fix."""
    fake_tpu.add_node(
        "n", accelerator_type, project="test-project", zone="us-central1-a",
        labels={"tpuctl-user": "bob"},
    )  # fmt: skip
    result = run_tpuctl("up", "v3-8", "--name", "n")
    assert result.code == 1
    assert result.err.strip().splitlines()[-1] == (
        "error: node n in us-central1-a is not yours (labels tpuctl-user=bob): choose another "
        "--name"
    )
    assert fake_tpu.node_state("n") == "READY"


def test_up_offers_no_deletion_of_an_unlabelled_node_of_another_type(run_tpuctl, fake_tpu):
    fake_tpu.add_node("n", "v3-8", project="test-project", zone="us-central1-a")
    result = run_tpuctl("up", "v3-32", "--name", "n")
    assert result.code == 2
    assert result.err.strip().splitlines()[-1] == (
        "error: node n already exists in us-central1-a as v3-8, not v3-32; pick another --name"
    )


def test_per_accelerator_defaults_and_fallback_zones(run_tpuctl, fake_tpu, monkeypatch):
    monkeypatch.delenv("TPUCTL_ZONE")
    monkeypatch.delenv("TPUCTL_PROJECT")
    user_file = Path(os.environ["XDG_CONFIG_HOME"]) / "tpuctl" / "config.yaml"
    user_file.parent.mkdir(parents=True)
    user_file.write_text(
        yaml.safe_dump(
            {
                "zone": "us-central1-a",
                "accelerators": {
                    "v3-256": {
                        "zone": "us-east1-d",
                        "project": "ai2-tpu",
                        "zones": ["europe-west4-a"],
                    }
                },
            }
        )
    )
    fake_tpu.inject_stockouts(2, zone="us-east1-d")
    result = run_tpuctl("up", "v3-256", "--name", "big")
    assert result.code == 0, result.err
    assert "stockout in us-east1-d" in result.err
    node = fake_tpu.node("big")
    assert node["name"] == "projects/ai2-tpu/locations/europe-west4-a/nodes/big"
    assert len(node["networkEndpoints"]) == 32


def test_up_finds_an_earlier_node_in_a_fallback_zone(run_tpuctl, fake_tpu):
    run_tpuctl("config", "set", "accelerators.v3-32.zones", "europe-west4-a")
    fake_tpu.add_node("n", "v3-32", project="test-project", zone="europe-west4-a")
    result = run_tpuctl("up", "v3-32", "--name", "n", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["zone"] == "europe-west4-a"
    assert creates(fake_tpu) == 0


def test_queued_resource_states_are_shown_until_ready(run_tpuctl, fake_tpu):
    fake_tpu.set_queued_wait(0.5)  # long enough for a poll to see WAITING_FOR_RESOURCES
    result = run_tpuctl("up", "v4-32", "--spot", "--name", "q", "--valid-for", "1h")
    assert result.code == 0, result.err
    states = re.findall(r"queued resource q: (\w+)", result.err)
    assert states == ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]
    assert fake_tpu.queued_resource_state("q") == "ACTIVE"
    assert fake_tpu.node_state("q") == "READY"
    # Deleting the node deletes the queued resource with it.
    assert run_tpuctl("down", "q", "--yes").code == 0
    assert fake_tpu.queued_resource_state("q") is None


def test_a_queued_resource_failed_for_capacity_is_deleted_and_retried_as_a_stockout(
    run_tpuctl, fake_tpu
):
    fake_tpu.fail_queued(1)
    result = run_tpuctl("up", "v4-32", "--name", "q")
    assert result.code == 0, result.err
    assert "stockout in us-central1-a (attempt 1): queued resource q ended FAILED" in result.err
    assert "deleting queued resource q" in result.err  # the failed one holds no quota
    assert fake_tpu.queued_resource_state("q") == "ACTIVE"  # the second one


def test_up_never_takes_over_a_colleagues_queued_resource(run_tpuctl, fake_tpu, monkeypatch):
    fake_tpu.set_queued_wait(60)
    for name in ("LOGNAME", "USER"):
        monkeypatch.setenv(name, "bob")
    assert run_tpuctl("up", "v4-32", "--name", "shared", "--no-wait").code == 0
    for name in ("LOGNAME", "USER"):
        monkeypatch.setenv(name, "alice")
    for kind in ("v4-32", "v4-16"):  # of another type, it offered to delete bob's
        bobs = run_tpuctl("up", kind, "--name", "shared")  # before: waited on it, and took it
        assert bobs.code == 1
        assert bobs.err.strip().splitlines()[-1] == (
            "error: queued resource shared in us-central1-a is not yours (labels "
            "tpuctl-user=bob): choose another --name"
        )
    assert fake_tpu.queued_resource_state("shared") == "WAITING_FOR_RESOURCES"  # still bob's


@pytest.mark.parametrize(
    ("first", "then", "differs"),
    [
        (["v4-32"], ["v4-32", "--spot"], "on-demand capacity, not spot"),
        (["v4-32", "--spot"], ["v4-32"], "spot capacity, not on-demand"),
        (["v4-32"], ["v4-16", "--spot"], "a v4-32, not a v4-16 and on-demand capacity, not spot"),
    ],
)
def test_up_waits_only_on_a_queued_resource_that_asks_for_what_it_asks_for(
    run_tpuctl, fake_tpu, first, then, differs
):
    """`up --spot` waited on an on-demand queued resource of the name (and the reverse),
    and would have returned a node of the other kind."""
    fake_tpu.set_queued_wait(60)
    assert run_tpuctl("up", *first, "--name", "q", "--no-wait").code == 0
    result = run_tpuctl("up", *then, "--name", "q")
    assert result.code == 2
    assert result.err.strip().splitlines()[-1] == (
        f"error: queued resource q in us-central1-a asks for {differs}: choose another "
        "--name, or delete it first (`tpuctl down q`)"
    )
    assert fake_tpu.queued_resource_state("q") == "WAITING_FOR_RESOURCES"  # left as it was


def test_down_deletes_a_queued_resource_that_has_no_node_yet(run_tpuctl, fake_tpu):
    from tpuctl.providers import registry

    fake_tpu.set_queued_wait(60)
    requested = run_tpuctl("up", "v4-32", "--name", "q", "--no-wait")
    assert "follow it with `tpuctl status q`" in requested.out
    followed = run_tpuctl("status", "q")  # before: "no node named 'q'", exit 1
    assert followed.code == 0, followed.err
    assert "queued resource q: WAITING_FOR_RESOURCES, no node yet, in zone" in followed.out
    assert json.loads(run_tpuctl("status", "q", "--json").out)["queued_resource"] == (
        "WAITING_FOR_RESOURCES"
    )
    result = run_tpuctl("down", "q", "--yes")  # before: "does not exist; nothing deleted"
    assert result.code == 0, result.err
    assert "deleted queued resource q" in result.out
    assert fake_tpu.queued_resource_state("q") is None
    assert registry.locations("q") == []  # before: remembered after its deletion


def test_down_never_claims_a_queued_resource_deletion_that_failed(run_tpuctl, fake_tpu):
    """Before: `deleted q` (exit 0) while the node was still READY."""
    from tpuctl.providers import registry

    assert run_tpuctl("up", "v4-32", "--name", "q").code == 0
    fake_tpu.fail_queued_deletes(1)
    result = run_tpuctl("down", "q", "--yes")
    assert result.code == 1
    assert "deleted q" not in result.out
    assert result.err.strip().splitlines()[-1] == (
        "error: deleting queued resource q failed: Queued resource "
        "projects/test-project/locations/us-central1-a/queuedResources/q cannot be deleted now"
    )
    assert fake_tpu.node_state("q") == "READY"
    assert registry.locations("q") != []  # still there, still found where it is


def test_a_queued_resource_given_up_on_is_forgotten_where_it_was(run_tpuctl, fake_tpu):
    """Remembered after a stockout, the zone hid a node of that name made later elsewhere."""
    from tpuctl.providers import registry

    fake_tpu.fail_queued(1)
    result = run_tpuctl("up", "v4-32", "--name", "y", "--zone", "us-east1-d", "--retry-for", "0")
    assert result.code == 1
    assert fake_tpu.queued_resource_state("y") is None
    assert registry.locations("y") == []


def _when_queued_waits(fake, name: str, action) -> threading.Thread:
    """Run `action` in a thread once the queued resource `name` waits for resources."""

    def act() -> None:
        wait_for(lambda: fake.queued_resource_state(name) == "WAITING_FOR_RESOURCES")
        action()

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread


def test_a_429_while_up_waits_on_a_queued_resource_is_waited_out(run_tpuctl, fake_tpu):
    """Before: one rate-limited poll deleted the user's queued resource, with a traceback."""
    fake_tpu.set_queued_wait(2)
    injected = _when_queued_waits(fake_tpu, "q", lambda: fake_tpu.fail_next(1, status=429))
    result = run_tpuctl("up", "v4-32", "--name", "q")
    injected.join()
    assert result.code == 0, result.err
    assert fake_tpu._faults.http_failures == 0  # the 429 was answered, and waited out
    assert fake_tpu.queued_resource_state("q") == "ACTIVE"
    assert fake_tpu.node_state("q") == "READY"


def test_a_queued_resource_deleted_while_up_waits_is_one_line(run_tpuctl, fake_tpu):
    from tpuctl.providers import registry
    from tpuctl.providers.cloud_tpu import CloudTpuProvider

    fake_tpu.set_queued_wait(60)
    elsewhere = CloudTpuProvider("test-project", "us-central1-a")
    path = elsewhere.queued_path("q")
    deleted = _when_queued_waits(
        fake_tpu, "q", lambda: elsewhere.delete_queued(path, lambda _m: None)
    )
    result = run_tpuctl("up", "v4-32", "--name", "q")
    deleted.join()
    assert result.code == 1
    assert "Traceback" not in result.err
    assert result.err.strip().splitlines()[-1] == (
        "error: queued resource q in us-central1-a was deleted while `up` waited on it (by "
        "`tpuctl down` or someone else); nothing is left to clean up"
    )
    assert registry.locations("q") == []


def test_the_api_failing_while_up_waits_keeps_the_queued_resource(run_tpuctl, fake_tpu):
    """The API failing says nothing about the queued resource: it is not deleted, and the
    error says how to go on."""
    fake_tpu.set_queued_wait(60)
    failing = _when_queued_waits(fake_tpu, "q", lambda: fake_tpu.fail_next(4, status=500))
    result = run_tpuctl("up", "v4-32", "--name", "q")
    failing.join()
    assert result.code == 1
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("error: the TPU API keeps failing (500")
    assert last.endswith(
        "(queued resource q may remain in us-central1-a: `tpuctl up` again waits on it, "
        "`tpuctl down q` deletes it)"
    )
    assert fake_tpu.queued_resource_state("q") == "WAITING_FOR_RESOURCES"


def _ctrl_c_while_polling_an_operation(fake, signum: int = signal.SIGINT) -> threading.Thread:
    """Press Ctrl-C (SIGINT to this process: the in-process CLI), or send `signum`, once
    `up` polls the operation of its create request."""

    def polling() -> bool:
        return any(m == "GET" and "/operations/" in p for m, p in list(fake.requests))

    def press() -> None:
        wait_for(polling)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=press, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name
)
def test_ctrl_c_while_the_queued_resource_is_being_created_deletes_it(run_tpuctl, fake_tpu, signum):
    """Before: the queued resource was left behind, with no record of it; and SIGTERM (a
    cancelled CI job) or SIGHUP (a closed terminal) ended `up` without deleting it."""
    from tpuctl.providers import registry

    fake_tpu.queued_create_delay = 60
    fake_tpu.set_queued_wait(120)
    pressed = _ctrl_c_while_polling_an_operation(fake_tpu, signum)
    result = run_tpuctl("up", "v4-32", "--name", "q")
    pressed.join()
    assert result.code == 130  # as after any Ctrl-C
    assert "giving up: deleting queued resource q" in result.err
    wait_for(lambda: fake_tpu.queued_resource_state("q") is None, what="the deletion")
    assert registry.locations("q") == []


def test_ctrl_c_during_a_direct_create_says_the_node_may_still_come(run_tpuctl, fake_tpu):
    from tpuctl.providers import registry

    fake_tpu.set_create_delay(60)
    pressed = _ctrl_c_while_polling_an_operation(fake_tpu)
    result = run_tpuctl("up", "v3-8", "--no-queued", "--name", "d")
    pressed.join()
    assert result.code == 130  # as after any Ctrl-C
    assert (
        "interrupted: d may still be being created in us-central1-a; `tpuctl down d` deletes it"
        in result.err
    )
    assert registry.locations("d") != []  # `down d` finds it


def test_queued_resource_quota_error_is_one_line(run_tpuctl, fake_tpu):
    fake_tpu.inject_quota_errors(1)
    result = run_tpuctl("up", "v4-32", "--name", "q")
    assert result.code == 1
    assert result.err.strip().splitlines()[-1] == (
        "error: quota exceeded, not retrying: "
        "Quota limit exceeded for queued resources in projects/test-project/locations/us-central1-a"
    )


LOGIN_FIX = "run `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS)"


@pytest.mark.parametrize("command", [("status", "n"), ("up", "v3-8", "--name", "n")])
def test_credentials_the_api_refuses_are_one_line_naming_the_login(run_tpuctl, fake_tpu, command):
    """A 401 printed google-auth's traceback ("Anonymous credentials cannot be refreshed"),
    and a 403 only "the TPU API failed: 403"."""
    fake_tpu.add_node("n", "v3-8", project="test-project", zone="us-central1-a")
    fake_tpu.fail_next(1, status=401)
    result = run_tpuctl(*command)
    assert result.code == 1 and "Traceback" not in result.err, result.err
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("error: your Google credentials were refused (") and last.endswith(
        LOGIN_FIX
    ), last
    fake_tpu.fail_next(1, status=403)
    result = run_tpuctl(*command)
    assert result.code == 1 and "Traceback" not in result.err, result.err
    assert result.err.strip().splitlines()[-1] == (
        "error: permission denied in project test-project (403: injected server error): check "
        "that the account of `gcloud auth application-default login` (or set "
        "GOOGLE_APPLICATION_CREDENTIALS) may use the project's TPU API"
    )


@pytest.fixture
def token_endpoint_refusing_the_grant():
    """The URL of an OAuth token endpoint that refuses every grant, as Google's does for
    expired or revoked credentials."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class TokenEndpoint(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b'{"error": "invalid_grant", "error_description": "The token has expired."}'
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), TokenEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token"
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_refused_when_refreshed_are_one_line(
    run_tpuctl, fake_tpu, monkeypatch, tmp_path, token_endpoint_refusing_the_grant
):
    """google-auth's error refreshing application default credentials (here workload
    identity federation's token exchange, refused as for an expired token) came out as a
    traceback."""
    subject_token = tmp_path / "oidc-token"
    subject_token.write_text("expired")
    adc = tmp_path / "adc.json"
    adc.write_text(
        json.dumps(
            {
                "type": "external_account",
                "audience": "//iam.googleapis.com/projects/1/locations/global/"
                "workloadIdentityPools/ci/providers/github",
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": token_endpoint_refusing_the_grant,
                "credential_source": {"file": str(subject_token)},
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    # https: the client uses the application default credentials, refreshed before any call.
    monkeypatch.setenv("TPUCTL_TPU_API_ENDPOINT", fake_tpu.url.replace("http:", "https:"))
    result = run_tpuctl("status", "n")
    assert result.code == 1 and "Traceback" not in result.err, result.err
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("error: your Google credentials were refused (")
    assert "invalid_grant" in last and last.endswith(LOGIN_FIX), last
    assert fake_tpu.requests == []  # refused before any call reached the API


def test_valid_for_bounds_the_queue_wait(run_tpuctl, fake_tpu):
    fake_tpu.set_queued_wait(60)
    start = time.monotonic()
    result = run_tpuctl("up", "v5e-16", "--name", "q", "--valid-for", "1s")
    assert result.code == 1
    assert time.monotonic() - start < 30
    assert fake_tpu.queued_resource_state("q") is None


@pytest.mark.parametrize(
    ("flags", "why", "fix"),
    [
        (["v3-8"], "a v3-8 is created directly", "add --queued, or drop --valid-for"),
        (["v4-32", "--no-queued"], "--no-queued creates it directly", "add --queued, or drop "
         "--valid-for"),
        (["v3-8", "--local"], "local pods are not queued", "drop --valid-for"),
    ],
)  # fmt: skip
def test_valid_for_of_a_direct_create_is_refused(run_tpuctl, fake_tpu, flags, why, fix):
    """It was silently ignored: the node was created and waited on without any bound."""
    result = run_tpuctl("up", *flags, "--name", "d", "--valid-for", "1h")
    assert (result.code, result.err.strip()) == (
        2,
        f"error: --valid-for bounds a queued resource's wait, and {why}: {fix}",
    )
    assert fake_tpu.requests == [] and fake_tpu.node_state("d") is None
    assert run_tpuctl("up", "v3-8", "--queued", "--name", "q", "--valid-for", "1h").code == 0


def test_no_queued_creates_the_node_directly(run_tpuctl, fake_tpu):
    result = run_tpuctl("up", "v4-32", "--no-queued", "--name", "d")
    assert result.code == 0, result.err
    assert creates(fake_tpu) == 1
    assert fake_tpu.queued_resource_state("d") is None


GAVE_UP = "error: gave up waiting after {} (--timeout): node {} {}; nothing was deleted: run "
LONGER = "`tpuctl up` again to wait longer (or pass a longer --timeout)"


@pytest.mark.parametrize("yours", [True, False])
def test_up_stops_waiting_on_a_node_stuck_repairing(run_tpuctl, fake_tpu, yours):
    """It waited forever; after --timeout it says so and leaves the node alone, suggesting
    `down` only for a node labelled as the user's."""
    labels = mine() if yours else {}
    fake_tpu.add_node("n", "v3-8", project="test-project", zone="us-central1-a",
                      state="REPAIRING", labels=labels)  # fmt: skip
    result = run_tpuctl("up", "v3-8", "--name", "n", "--timeout", "2m")
    assert result.code == 1, result.err
    delete = ", or delete it with `tpuctl down n`" if yours else ""
    assert result.err.strip().splitlines()[-1] == (
        GAVE_UP.format("2m00s", "n", "is REPAIRING in us-central1-a") + LONGER + delete
    )
    assert fake_tpu.node_state("n") == "REPAIRING"


def test_up_stops_waiting_on_a_create_operation_that_never_ends(run_tpuctl, fake_tpu):
    """The node is left to come (and `down` finds it); by default after an hour."""
    from tpuctl.providers import registry

    fake_tpu.set_create_delay(10**9)
    result = run_tpuctl("up", "v3-8", "--name", "c", "--timeout", "2m")
    assert result.code == 1, result.err
    assert result.err.strip().splitlines()[-1] == (
        GAVE_UP.format("2m00s", "c", "is CREATING in us-central1-a")
        + LONGER
        + ", or delete it with `tpuctl down c`"
    )
    assert fake_tpu.node_state("c") == "CREATING"
    assert registry.locations("c") != []  # `down c` finds it
    assert re.search(r"--timeout\s.*\[default: 1h\]", run_tpuctl("up", "--help").out, re.S)


def test_up_bounds_a_queued_resource_from_when_it_leaves_the_queue(run_tpuctl, fake_tpu):
    """Its time WAITING_FOR_RESOURCES (500 s at this time scale, past --timeout) is
    --valid-for's to bound; stuck PROVISIONING past --timeout, it is kept, not deleted."""
    fake_tpu.set_queued_wait(0.5)
    fake_tpu.set_create_delay(10**9)
    result = run_tpuctl("up", "v4-32", "--name", "q", "--timeout", "2m")
    assert result.code == 1, result.err
    assert "queued resource q: PROVISIONING" in result.err
    assert result.err.strip().splitlines()[-1] == (
        GAVE_UP.format("2m00s", "q", "is not there yet (queued resource PROVISIONING) in "
                       "us-central1-a") + LONGER
        + ", or delete it with `tpuctl down q` (and its queued resource)"
    )  # fmt: skip
    assert fake_tpu.queued_resource_state("q") == "PROVISIONING"


def _delete_request(fake, name: str) -> None:
    """A deletion someone else asked the API for (an earlier `down` that was interrupted)."""
    fake.handle("DELETE", f"/v2/projects/test-project/locations/us-central1-a/nodes/{name}", {}, {})


def test_up_of_a_node_being_deleted_waits_until_it_is_gone_then_creates_it(run_tpuctl, fake_tpu):
    """It said to delete the node that was being deleted, and ran `tpuctl up` again."""
    fake_tpu.add_node("d", "v3-32", project="test-project", zone="us-central1-a", labels=mine())
    fake_tpu.delete_delay = 0.3
    _delete_request(fake_tpu, "d")
    assert fake_tpu.node_state("d") == "DELETING"
    result = run_tpuctl("up", "v3-8", "--name", "d", "--json")  # another type: it is going
    assert result.code == 0, result.err
    assert "d is being deleted in us-central1-a; waiting until it is gone" in result.err
    node = json.loads(result.out)
    assert (node["state"], node["accelerator_type"]) == ("READY", "v3-8")
    assert creates(fake_tpu) == 1


def test_up_of_a_node_being_deleted_for_too_long_creates_nothing(run_tpuctl, fake_tpu):
    fake_tpu.add_node("d", "v3-8", project="test-project", zone="us-central1-a",
                      state="DELETING", labels=mine())  # fmt: skip
    result = run_tpuctl("up", "v3-8", "--name", "d", "--timeout", "2m")
    assert (result.code, result.err.strip().splitlines()[-1]) == (
        1,
        "error: gave up waiting after 2m00s (--timeout): node d is still DELETING in "
        "us-central1-a; nothing was created: run `tpuctl up` again once it is gone",
    )
    assert creates(fake_tpu) == 0


def test_up_never_waits_to_take_the_name_of_a_colleagues_node_being_deleted(run_tpuctl, fake_tpu):
    fake_tpu.add_node("d", "v3-8", project="test-project", zone="us-central1-a",
                      state="DELETING", labels={"tpuctl-user": "bob"})  # fmt: skip
    result = run_tpuctl("up", "v3-8", "--name", "d")
    assert (result.code, result.err.strip().splitlines()[-1]) == (
        1,
        "error: node d in us-central1-a is not yours (labels tpuctl-user=bob): choose another "
        "--name",
    )
    assert creates(fake_tpu) == 0


def test_no_wait_returns_while_creating(run_tpuctl, fake_tpu):
    fake_tpu.set_create_delay(30)
    result = run_tpuctl("up", "v3-8", "--name", "n", "--no-wait", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out) == {"name": "n", "zone": "us-central1-a", "requested": True}
    assert fake_tpu.node_state("n") == "CREATING"


def test_up_local_needs_no_zone_or_project(run_tpuctl, fake_tpu, monkeypatch):
    monkeypatch.delenv("TPUCTL_ZONE")
    monkeypatch.delenv("TPUCTL_PROJECT")
    result = run_tpuctl("up", "v3-32", "--local", "--name", "loc", "--json")
    assert result.code == 0, result.err
    node = json.loads(result.out)
    assert (node["provider"], node["zone"], len(node["workers"])) == ("local", "local", 4)
    assert fake_tpu.requests == []
    monkeypatch.setenv("TPUCTL_PROVIDER", "local")
    assert [n["name"] for n in json.loads(run_tpuctl("list", "--json").out)["nodes"]] == ["loc"]
    assert run_tpuctl("down", "loc", "--yes").code == 0
    assert json.loads(run_tpuctl("list", "--json").out) == {"nodes": [], "queued_resources": []}


def test_down_without_name_deletes_your_only_local_pod_without_provider_or_project(
    run_tpuctl, fake_tpu, monkeypatch
):
    monkeypatch.delenv("TPUCTL_ZONE")
    monkeypatch.delenv("TPUCTL_PROJECT")
    assert run_tpuctl("up", "v3-8", "--local", "--name", "mine").code == 0
    result = run_tpuctl("down", "--yes")  # `list` shows it: `down` finds it too
    assert result.code == 0, result.err
    assert "deleted mine" in result.out
    monkeypatch.setenv("TPUCTL_PROVIDER", "local")
    assert json.loads(run_tpuctl("list", "--json").out) == {"nodes": [], "queued_resources": []}


SET_PROJECT = (
    "to look for Cloud TPU nodes too, set a project: pass --project, set TPUCTL_PROJECT or "
    "run `tpuctl config set project PROJECT`"
)


@pytest.fixture
def no_project(fake_tpu, monkeypatch):
    """A user of local pods alone: no project, zone or provider set."""
    monkeypatch.delenv("TPUCTL_ZONE")
    monkeypatch.delenv("TPUCTL_PROJECT")
    yield
    assert fake_tpu.requests == []  # nothing asked the cloud


def test_without_a_project_commands_without_a_name_use_the_only_local_pod(run_tpuctl, no_project):
    """They failed with "no Google Cloud project" while `down` picked the pod."""
    assert run_tpuctl("up", "v3-8", "--local", "--name", "mine").code == 0
    status = run_tpuctl("status", "--json")
    assert status.code == 0, status.err
    assert json.loads(status.out)["name"] == "mine"
    for args in (["ps"], ["exec", "--", "true"]):
        result = run_tpuctl(*args)
        assert result.code == 0, result.err
    assert run_tpuctl("down", "--yes").code == 0


def test_without_a_project_an_unknown_name_lists_the_local_pods_and_the_closest(
    run_tpuctl, no_project
):
    """It said only that no project was set, and to pass --project."""
    assert run_tpuctl("up", "v3-8", "--local", "--name", "mine").code == 0
    missing = (
        "no node named 'mien' in the local pods; did you mean 'mine'? (local pods: mine); "
        + SET_PROJECT
    )
    for args in (["status", "mien"], ["ps", "mien"], ["exec", "mien", "--", "true"]):
        result = run_tpuctl(*args)
        assert (result.code, result.err.strip()) == (1, f"error: {missing}"), args
    down = run_tpuctl("down", "mien", "--yes")  # a node that does not exist is no error
    assert (down.code, down.err.strip()) == (
        0,
        "node mien does not exist in the local pods; nothing deleted; did you mean 'mine'? "
        f"(local pods: mine); {SET_PROJECT}",
    )
    assert run_tpuctl("up", "v3-8", "--local", "--name", "other").code == 0
    result = run_tpuctl("status", "xyz")
    assert result.err.strip() == (
        f"error: no node named 'xyz' in the local pods; the local pods are mine, other; {SET_PROJECT}"
    )
    result = run_tpuctl("down", "--yes")
    assert (result.code, result.err.strip()) == (
        2,
        "error: 2 nodes in the local pods and several are yours: mine (yours), other (yours); "
        "name the one to delete: `tpuctl down NAME`",
    )
    assert (
        run_tpuctl("down", "mine", "--yes").code == run_tpuctl("down", "other", "--yes").code == 0
    )


def test_without_a_project_or_local_pods_list_is_empty_and_says_how_to_get_nodes(
    run_tpuctl, no_project
):
    """As the README says: without a cloud project, `list` shows the local pods alone."""
    result = run_tpuctl("list", "--json")
    assert (result.code, json.loads(result.out)) == (0, {"nodes": [], "queued_resources": []})
    result = run_tpuctl("list")
    assert (result.code, result.err.strip()) == (0, f"no nodes in the local pods; {SET_PROJECT}")
    result = run_tpuctl("status")
    assert (result.code, result.err.strip()) == (
        1,
        "error: no nodes in the local pods; create one with `tpuctl up TYPE --local`; "
        + SET_PROJECT,
    )


# -- down -------------------------------------------------------------------------------


def test_down_asks_first_and_keeps_the_node_on_no(run_tpuctl, fake_tpu):
    fake_tpu.add_node("n", "v3-8", project="test-project", zone="us-central1-a")
    result = run_tpuctl("down", "n", stdin="n\n")
    assert result.code == 1
    assert "Delete n (v3-8, 1 worker, READY)" in result.out
    assert fake_tpu.node_state("n") == "READY"
    result = run_tpuctl("down", "n", stdin="y\n")
    assert result.code == 0, result.err
    assert fake_tpu.node_state("n") is None


def mine() -> dict[str, str]:
    """The labels `tpuctl up` puts on this user's nodes."""
    from tpuctl.config import local_user
    from tpuctl.ownership import ownership_labels

    return ownership_labels(local_user())


KEY_RULE = (
    "breaks GCP's label rules: a key is lowercase letters, digits, _ and -, starts with a "
    "lowercase letter and has at most 63 characters"
)
VALUE_RULE = (
    "breaks GCP's label rules: a value is lowercase letters, digits, _ and - (or nothing), at "
    "most 63 characters"
)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("Bad Key=x", f"--label 'Bad Key=x': key 'Bad Key' {KEY_RULE}"),
        ("1team=x", f"--label '1team=x': key '1team' {KEY_RULE}"),
        (f"{'k' * 64}=x", f"--label '{'k' * 64}=x': key '{'k' * 64}' {KEY_RULE}"),
        ("team=NLP", f"--label 'team=NLP': value 'NLP' {VALUE_RULE}"),
        (f"k={'v' * 64}", f"--label 'k={'v' * 64}': value '{'v' * 64}' {VALUE_RULE}"),
    ],
)
def test_a_label_gcp_would_refuse_is_refused_before_any_api_call(
    run_tpuctl, fake_tpu, label, message
):
    """The API refused it, in a message naming its field "labels", not the flag."""
    result = run_tpuctl("up", "v3-8", "--name", "n", "--label", label)
    assert (result.code, result.err.strip()) == (2, f"error: {message}")
    assert fake_tpu.requests == []


def test_up_takes_at_most_the_labels_gcp_allows_besides_its_own(run_tpuctl, fake_tpu):
    labels = [arg for i in range(64) for arg in ("--label", f"k{i}=")]
    result = run_tpuctl("up", "v3-8", "--name", "n", *labels)
    assert (result.code, result.err.strip()) == (
        2,
        "error: --label: 64 labels, and GCP allows 64 on a node, one of them tpuctl's own "
        "tpuctl-user: give at most 63",
    )
    assert fake_tpu.requests == []
    result = run_tpuctl("up", "v3-8", "--name", "n", *labels[4:], "--label", f"{'k' * 63}=")
    assert result.code == 0, result.err
    assert len(fake_tpu.node("n")["labels"]) == 64


@pytest.mark.parametrize(
    ("key", "meaning"),
    [
        ("tpuctl-user", "who created the node (ownership: tpuctl deletes only nodes it "
         "created for that user)"),
        ("tpuctl-run", "the run a babysitter created the node for (ownership: a babysitter "
         "replaces only nodes it created for its run)"),
    ],
)  # fmt: skip
def test_a_label_tpuctl_sets_itself_is_refused_before_any_api_call(
    run_tpuctl, fake_tpu, key, meaning
):
    """`--label tpuctl-user=bob` was silently replaced by the ownership label (exit 0)."""
    result = run_tpuctl("up", "v3-8", "--name", "n", "--label", f"{key}=bob")
    assert result.code == 2
    assert result.err.strip() == (
        f"error: --label '{key}=bob': {key} is tpuctl's own label, tpuctl sets it to "
        f"{meaning}; use another key"
    )
    assert fake_tpu.requests == []


def test_down_yes_deletes_and_waits(run_tpuctl, fake_tpu):
    fake_tpu.add_node("n", "v3-8", project="test-project", zone="us-central1-a", labels=mine())
    fake_tpu.delete_delay = 0.2
    result = run_tpuctl("down", "--yes")  # the only node of this user in the zone
    assert result.code == 0, result.err
    assert "DELETING" in result.err
    assert fake_tpu.node_state("n") is None  # gone by the time down returns


def test_down_of_a_missing_node_is_not_an_error(run_tpuctl, fake_tpu):
    result = run_tpuctl("down", "ghost", "--yes")
    assert result.code == 0
    assert "does not exist" in result.err


def test_down_without_name_never_picks_a_colleagues_node(run_tpuctl, fake_tpu):
    zone = {"project": "test-project", "zone": "us-central1-a"}
    fake_tpu.add_node("bob-v3-8", "v3-8", **zone, labels={"tpuctl-user": "bob"})
    result = run_tpuctl("down", "--yes")  # the only node in the zone, but bob's
    assert result.code == 2
    assert result.err.strip() == (
        "error: 1 node in zone us-central1-a of project test-project and none of them was "
        "created by you: bob-v3-8 (labels tpuctl-user=bob); name the one to delete: "
        "`tpuctl down NAME`"
    )
    fake_tpu.add_node("gcloud-made", "v3-8", **zone)
    fake_tpu.add_node("a", "v3-8", **zone, labels=mine())
    result = run_tpuctl("down", "--yes")  # the one node that is this user's
    assert result.code == 0, result.err
    states = [fake_tpu.node_state(n) for n in ("a", "bob-v3-8", "gcloud-made")]
    assert states == [None, "READY", "READY"]


def test_down_without_name_among_several_of_yours_names_them(run_tpuctl, fake_tpu):
    for name in ("a", "b"):
        fake_tpu.add_node(name, "v3-8", project="test-project", zone="us-central1-a", labels=mine())
    result = run_tpuctl("down", "--yes")
    assert result.code == 2
    assert "several are yours: a (yours), b (yours); name the one to delete" in result.err
    assert fake_tpu.node_state("a") == fake_tpu.node_state("b") == "READY"


def test_up_labels_the_node_with_its_creator(run_tpuctl, fake_tpu):
    result = run_tpuctl("up", "v3-8", "--name", "n", "--label", "team=nlp")
    assert result.code == 0, result.err
    assert fake_tpu.node("n")["labels"] == {"team": "nlp", **mine()}


# -- list / status ----------------------------------------------------------------------

NODE_KEYS = {
    "name", "project", "zone", "accelerator_type", "state", "health", "scheduling", "spot",
    "runtime_version", "created", "age_s", "labels", "provider", "workers",
}  # fmt: skip


def test_list_json_shape(run_tpuctl, fake_tpu):
    fake_tpu.add_node("a", "v3-32", project="test-project", zone="us-central1-a", scheduling="spot")
    fake_tpu.add_node("b", "v3-8", project="test-project", zone="us-central1-a", state="PREEMPTED")
    fake_tpu.add_node("c", "v3-8", project="test-project", zone="europe-west4-a")
    result = run_tpuctl("list", "--json")
    assert result.code == 0, result.err
    nodes = json.loads(result.out)["nodes"]
    assert [n["name"] for n in nodes] == ["a", "b"]
    assert set(nodes[0]) == NODE_KEYS
    assert nodes[0]["spot"] is True and nodes[1]["spot"] is False
    assert nodes[1]["state"] == "PREEMPTED"
    assert [w["index"] for w in nodes[0]["workers"]] == [0, 1, 2, 3]
    assert set(nodes[0]["workers"][0]) == {"index", "internal_ip", "external_ip"}
    assert isinstance(nodes[0]["age_s"], int)
    every = json.loads(run_tpuctl("list", "--all-zones", "--json").out)["nodes"]
    assert [n["name"] for n in every] == ["c", "a", "b"]  # by zone, then name


def test_list_shows_a_queued_resource_that_has_no_node_yet(run_tpuctl, fake_tpu):
    """After `up --no-wait` of a type that is queued, `list` showed nothing (only `status
    NAME` knew of it): the user thought nothing had happened."""
    fake_tpu.set_queued_wait(60)
    assert run_tpuctl("up", "v4-32", "--spot", "--name", "q", "--no-wait").code == 0
    assert run_tpuctl("up", "v4-8", "--name", "far", "--zone", "europe-west4-a", "--no-wait",
                      "--queued").code == 0  # fmt: skip
    table = run_tpuctl("list")
    assert (table.code, table.err) == (0, "")
    row = next(line for line in table.out.splitlines() if line.split()[:1] == ["q"]).split()
    assert row[:7] + row[8:] == [
        "q", "cloud", "v4-32", "us-central1-a", "WAITING_FOR_RESOURCES", "-", "yes", "-",
        "queued", "resource,", "no", "node", "yet",
    ]  # fmt: skip
    assert "far" not in table.out  # another zone
    listed = json.loads(run_tpuctl("list", "--json").out)
    assert listed["nodes"] == []
    [queued] = listed["queued_resources"]
    assert isinstance(queued.pop("age_s"), int) and queued.pop("created")
    assert queued == {
        "name": "q", "project": "test-project", "zone": "us-central1-a",
        "accelerator_type": "v4-32", "state": "WAITING_FOR_RESOURCES", "scheduling": "spot",
        "spot": True, "labels": mine(),
    }  # fmt: skip
    every = json.loads(run_tpuctl("list", "--all-zones", "--json").out)["queued_resources"]
    assert [(q["name"], q["zone"]) for q in every] == [
        ("far", "europe-west4-a"),
        ("q", "us-central1-a"),
    ]
    # Once it has its node, the queued resource is listed as that node, once.
    fake_tpu.set_queued_wait(0.05)  # for the next one: q waits on
    assert run_tpuctl("up", "v4-32", "--name", "made").code == 0
    listed = json.loads(run_tpuctl("list", "--json").out)
    assert [n["name"] for n in listed["nodes"]] == ["made"]
    assert [q["name"] for q in listed["queued_resources"]] == ["q"]


def test_list_all_zones_needs_no_zone_setting(run_tpuctl, fake_tpu, monkeypatch):
    """It failed with "zone '-' is not a Cloud zone name" where zones are set per type."""
    fake_tpu.add_node("c", "v3-8", project="test-project", zone="europe-west4-a")
    monkeypatch.delenv("TPUCTL_ZONE")
    result = run_tpuctl("list", "--all-zones", "--json")
    assert result.code == 0, result.err
    assert [n["name"] for n in json.loads(result.out)["nodes"]] == ["c"]
    no_zone = run_tpuctl("list")
    assert (no_zone.code, no_zone.err.strip()) == (2, "error: no zone: pass --zone, set "
                                                   "TPUCTL_ZONE or run `tpuctl config set zone "
                                                   "ZONE`")  # fmt: skip


def test_list_table(run_tpuctl, fake_tpu):
    fake_tpu.add_node("alpha", "v3-32", project="test-project", zone="us-central1-a")
    result = run_tpuctl("list")
    assert result.code == 0, result.err
    row = next(line for line in result.out.splitlines() if line.split()[:1] == ["alpha"])
    assert row.split()[:6] == ["alpha", "cloud", "v3-32", "us-central1-a", "READY", "HEALTHY"]


def test_status_shows_every_worker(run_tpuctl, fake_tpu):
    fake_tpu.add_node(
        "n", "v3-32", project="test-project", zone="us-central1-a",
        worker_ips=["10.9.0.1", "10.9.0.2", "10.9.0.3", "10.9.0.4"],
    )  # fmt: skip
    result = run_tpuctl("status", "n", "--json")
    data = json.loads(result.out)
    assert set(data) == NODE_KEYS
    assert [w["internal_ip"] for w in data["workers"]] == [
        "10.9.0.1",
        "10.9.0.2",
        "10.9.0.3",
        "10.9.0.4",
    ]
    text = run_tpuctl("status").out
    assert "w03" in text and "10.9.0.4" in text


def test_status_among_several_nodes_asks_for_a_name_the_way_status_takes_it(run_tpuctl, fake_tpu):
    """The error tells every command to `pick one with --name NAME`: an option `status`,
    `exec`, `ssh`, `logs`, ... once lacked, so following it was a usage error."""
    for name in ("a", "b"):
        fake_tpu.add_node(name, "v3-8", project="test-project", zone="us-central1-a")
    result = run_tpuctl("status")
    assert result.code == 2
    assert result.err.strip() == (
        "error: 2 nodes in zone us-central1-a of project test-project (a, b); pick one with "
        "--name NAME, or `tpuctl config set node NAME`"
    )
    assert run_tpuctl("status", "--name", "a").code == 0
    assert run_tpuctl("status", "a").code == 0


def test_status_of_a_missing_node_names_it_and_the_zone(run_tpuctl, fake_tpu):
    """Having looked in every zone, it said the node was in none and still sent the user
    to `tpuctl list --all-zones` to look there."""
    result = run_tpuctl("status", "ghost")
    assert result.code == 1
    assert result.err.strip() == (
        "error: no node named 'ghost' in zone us-central1-a of project test-project; "
        "no other zone of the project has one either"
    )
    fake_tpu.add_node("ghost-1", "v3-8", project="test-project", zone="us-east1-d")
    result = run_tpuctl("down", "ghost", "--yes")
    assert result.code == 0
    assert result.err.strip().endswith(
        "nothing deleted; no other zone of the project has one either; did you mean "
        "'ghost-1' (zone us-east1-d)?"
    )
    fake_tpu.add_node("far", "v3-8", project="test-project", zone="europe-west4-a")
    # An explicit --zone is where the user wants to look: elsewhere is only a hint.
    result = run_tpuctl("status", "far", "--zone", "us-central1-a")
    assert result.err.strip().endswith("it is in zone europe-west4-a: pass --zone europe-west4-a")
    result = run_tpuctl("down", "far", "--yes", "--zone", "us-central1-a")
    assert result.code == 0 and "nothing deleted; it is in zone europe-west4-a" in result.err
    assert fake_tpu.node_state("far") == "READY"


def test_status_and_down_find_a_node_in_another_zone_of_the_project(run_tpuctl, fake_tpu):
    fake_tpu.add_node("far", "v3-8", project="test-project", zone="europe-west4-a")
    result = run_tpuctl("status", "far", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["zone"] == "europe-west4-a"
    result = run_tpuctl("down", "far", "--yes")
    assert result.code == 0, result.err
    assert "deleted far" in result.out
    assert fake_tpu.node_state("far") is None


def test_without_a_zone_a_name_tpuctl_did_not_create_is_looked_up_in_every_zone(
    run_tpuctl, fake_tpu, monkeypatch
):
    """It failed with "no zone: pass --zone ..." though the README promises every zone."""
    monkeypatch.delenv("TPUCTL_ZONE")
    fake_tpu.add_node("far", "v3-8", project="test-project", zone="europe-west4-a")
    result = run_tpuctl("status", "far", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["zone"] == "europe-west4-a"
    missing = run_tpuctl("status", "ghost")
    assert (missing.code, missing.err.strip()) == (
        1, "error: no node named 'ghost' in any zone of project test-project",
    )  # fmt: skip
    missing = run_tpuctl("down", "ghost", "--yes")
    assert (missing.code, missing.err.strip()) == (
        0, "node ghost does not exist in any zone of project test-project; nothing deleted",
    )  # fmt: skip
    # Without a name `down` still picks only among the zone's nodes: there is no zone.
    assert run_tpuctl("down", "--yes").err.startswith("error: no zone: pass --zone")
    result = run_tpuctl("down", "far", "--yes")
    assert result.code == 0, result.err
    assert "deleted far" in result.out and fake_tpu.node_state("far") is None


@pytest.mark.parametrize("zone_set", [True, False])
def test_a_name_in_several_zones_is_refused_until_zone_says_which(
    run_tpuctl, fake_tpu, monkeypatch, zone_set
):
    """One of them was picked (the first zone by name): `down --yes` deleted it."""
    if not zone_set:
        monkeypatch.delenv("TPUCTL_ZONE")
    for zone in ("us-east1-d", "europe-west4-a"):
        fake_tpu.add_node("twin", "v3-8", project="test-project", zone=zone)
    for command in (("status", "twin"), ("down", "twin", "--yes")):
        result = run_tpuctl(*command)
        assert (result.code, result.err.strip()) == (
            2,
            "error: zones europe-west4-a, us-east1-d of project test-project each have a node "
            "named 'twin': say which with --zone",
        )
    assert fake_tpu.node_state("twin") == "READY"
    result = run_tpuctl("down", "twin", "--zone", "us-east1-d", "--yes")
    assert result.code == 0, result.err
    assert [n["name"].split("/")[3] for n in fake_tpu.nodes.values()] == ["europe-west4-a"]


def test_a_node_up_made_in_a_fallback_zone_is_looked_up_there_directly(run_tpuctl, fake_tpu):
    run_tpuctl("config", "set", "accelerators.v3-8.zones", "europe-west4-a")
    fake_tpu.inject_stockouts(1, zone="us-central1-a")
    assert run_tpuctl("up", "v3-8", "--name", "moved").code == 0
    fake_tpu.requests.clear()
    result = run_tpuctl("status", "moved", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["zone"] == "europe-west4-a"
    # Remembered: one GET in the node's own zone, no search of the default zone or the project.
    assert fake_tpu.requests == [
        ("GET", "/v2/projects/test-project/locations/europe-west4-a/nodes/moved")
    ]
    assert run_tpuctl("down", "moved", "--yes").code == 0
    assert fake_tpu.node_state("moved") is None
    assert run_tpuctl("status", "moved").code == 1  # forgotten with the node


def test_list_shows_local_pods_beside_cloud_nodes(run_tpuctl, fake_tpu):
    fake_tpu.add_node("alpha", "v3-32", project="test-project", zone="us-central1-a")
    assert run_tpuctl("up", "v3-8", "--local", "--name", "mine").code == 0
    result = run_tpuctl("list")
    assert result.code == 0, result.err
    rows = {
        cells[0]: cells[1:4]
        for cells in map(str.split, result.out.splitlines())
        if cells[:1] in (["alpha"], ["mine"])
    }
    assert rows == {
        "alpha": ["cloud", "v3-32", "us-central1-a"],
        "mine": ["local", "v3-8", "local"],
    }
    nodes = json.loads(run_tpuctl("list", "--json").out)["nodes"]
    assert [(n["name"], n["provider"]) for n in nodes] == [("alpha", "cloud"), ("mine", "local")]
    assert run_tpuctl("down", "mine", "--yes").code == 0


def test_a_name_that_is_both_a_local_pod_and_a_cloud_node_is_refused(run_tpuctl, fake_tpu):
    assert run_tpuctl("up", "v3-8", "--name", "twin").code == 0
    # `up` refuses to make a twin now; an older tpuctl, or two `up`s at once, could.
    LocalProvider().create(NodeSpec("twin", "local", "v3-8", ""), lambda _m: None)
    result = run_tpuctl("status", "twin")
    assert result.code == 2
    assert "a local pod and a cloud node in zone us-central1-a of project test-project" in (
        result.err
    )
    assert run_tpuctl("down", "twin", "--yes").code == 2
    assert fake_tpu.node_state("twin") == "READY"  # nothing deleted while ambiguous


def test_missing_project_is_a_one_line_error(run_tpuctl, fake_tpu, monkeypatch):
    """Where the user asks for the cloud: every zone, a zone, or `provider: cloud`."""
    monkeypatch.delenv("TPUCTL_PROJECT")
    for args in (["list", "--all-zones"], ["list", "--zone", "us-central1-a"]):
        result = run_tpuctl(*args)
        assert result.code == 2
        assert result.err.startswith("error: no Google Cloud project: pass --project")
    monkeypatch.setenv("TPUCTL_PROVIDER", "cloud")
    result = run_tpuctl("status")
    assert result.code == 2
    assert result.err.startswith("error: no Google Cloud project: pass --project")


# -- types ------------------------------------------------------------------------------


def test_types_json_and_table(run_tpuctl):
    rows = {r["type"]: r for r in json.loads(run_tpuctl("types", "--json").out)["types"]}
    assert rows["v3-32"]["hosts"] == 4 and rows["v3-32"]["cores_per_host"] == 8
    assert rows["v5litepod-16"]["queued"] is True
    assert rows["v3-8"]["queued"] is False
    text = run_tpuctl("types", "v5e").out
    assert "v5litepod-256" in text and "v3-8" not in text


# -- the README's demo, from a shell ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readme_demo_from_a_shell(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tpuctl.testing.fake_tpu", "--port", str(port), "--stockouts", "3",
         "--create-delay", "0.1"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert "listening" in server.stdout.readline()
        env = {
            **os.environ,
            "TPUCTL_TPU_API_ENDPOINT": f"http://127.0.0.1:{port}",
            "TPUCTL_PROJECT": "p",
            "TPUCTL_ZONE": "us-central1-a",
            "TPUCTL_TIME_SCALE": "0.001",
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "XDG_STATE_HOME": str(tmp_path / "state"),
        }
        env.pop("TPUCTL_NODE", None)

        def shell(*args):
            return subprocess.run(
                [sys.executable, "-m", "tpuctl", *args], env=env, capture_output=True, text=True,
                timeout=120,
            )  # fmt: skip

        up = shell("up", "v3-32", "--spot")
        assert up.returncode == 0, up.stderr
        assert up.stderr.count("stockout in us-central1-a") == 3
        assert len(re.findall(r"^ w0[0-3] ", up.stdout, re.MULTILINE)) == 4
        listed = json.loads(shell("list", "--json").stdout)["nodes"]
        assert [(n["accelerator_type"], n["state"], len(n["workers"])) for n in listed] == [
            ("v3-32", "READY", 4)
        ]
        down = shell("down", "--yes")
        assert down.returncode == 0, down.stderr
        assert json.loads(shell("list", "--json").stdout) == {"nodes": [], "queued_resources": []}
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_list_piped_prints_whole_rows(run_tpuctl, fake_tpu):
    """Not rich's 80 columns: a grep for a long name must find its row."""
    name = "a-long-name-for-the-lab-llama-3-8b-sft-run-42"
    fake_tpu.add_node(name, "v3-32", project="test-project", zone="us-central1-a")
    listed = run_tpuctl("list")
    assert listed.code == 0, listed.err
    row = next(line for line in listed.out.splitlines() if line.split()[0] == name)
    assert "v3-32" in row and "us-central1-a" in row and "READY" in row
