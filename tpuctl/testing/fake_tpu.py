"""A fake Cloud TPU API server speaking the v2 REST protocol the google-cloud-tpu client uses.

It keeps nodes and queued resources in memory, answers with long-running operations
that the client polls, moves nodes through CREATING -> READY -> DELETING, and injects
the faults TPU users meet: stockouts, quota errors, slow creation, preemption, nodes
that vanish, and HTTP 500s.

    with FakeTpuApi() as api:          # or api.start() / api.stop()
        api.inject_stockouts(3)
        ...  # point TPUCTL_TPU_API_ENDPOINT at api.url

Standalone: `python -m tpuctl.testing.fake_tpu --port 8470 --stockouts 3`.

Time-based transitions are applied lazily, when a request arrives, so the server needs
no background threads beyond the HTTP server's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from tpuctl import catalog
from tpuctl.errors import TpuctlError

NODE_TYPE = "type.googleapis.com/google.cloud.tpu.v2.Node"
QUEUED_RESOURCE_TYPE = "type.googleapis.com/google.cloud.tpu.v2.QueuedResource"
EMPTY_TYPE = "type.googleapis.com/google.protobuf.Empty"
METADATA_TYPE = "type.googleapis.com/google.cloud.tpu.v2.OperationMetadata"

# google.rpc.Code values used in operation errors, and HTTP status -> canonical status name.
CODE_RESOURCE_EXHAUSTED = 8
CODE_FAILED_PRECONDITION = 9
HTTP_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
NODE_ID_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
MAX_LABELS = 64

WorkerIps = Callable[[str, int], list[str]]


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    """An HTTP error answer in Google's JSON error format."""

    def __init__(self, http_status: int, message: str):
        super().__init__(message)
        self.http_status = http_status
        self.message = message

    def body(self) -> dict[str, Any]:
        status = HTTP_STATUS_NAMES.get(self.http_status, "UNKNOWN")
        return {"error": {"code": self.http_status, "message": self.message, "status": status}}


@dataclass
class _Event:
    due: float
    action: Callable[[], None]


@dataclass
class _QueuedResource:
    body: dict[str, Any]
    node_path: str
    node_body: dict[str, Any]
    created: float
    valid_for: float | None
    outcome: str = "ACTIVE"  # ACTIVE or FAILED, decided when it was created


@dataclass
class _Faults:
    stockouts: int = 0
    stockout_zone: str | None = None
    quota_errors: int = 0
    http_failures: int = 0
    http_failure_status: int = 500
    queued_failures: int = 0
    queued_delete_failures: int = 0


@dataclass
class FakeTpuApi:
    """An in-memory Cloud TPU v2 API. See the module docstring."""

    worker_ips: WorkerIps | None = None
    create_delay: float = 0.3
    delete_delay: float = 0.1
    queued_wait: float = 0.3
    queued_create_delay: float = 0.0  # how long a queued resource's create operation runs
    host: str = "127.0.0.1"
    port: int = 0
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # full path -> Node JSON
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) log
    _queued: dict[str, _QueuedResource] = field(default_factory=dict)
    _operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    _events: list[_Event] = field(default_factory=list)
    _faults: _Faults = field(default_factory=_Faults)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> str:
        """Serve on a free port (or `port`) and return the endpoint URL."""
        api = self

        class Handler(_Handler):
            fake = api

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeTpuApi:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- test controls ---------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        accelerator_type: str,
        *,
        project: str,
        zone: str,
        state: str = "READY",
        worker_ips: list[str] | None = None,
        scheduling: str = "on-demand",
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Put a node in place directly (no operation), as if it had been created earlier."""
        body: dict[str, Any] = {"acceleratorType": accelerator_type, "labels": labels or {}}
        if scheduling != "on-demand":
            body["schedulingConfig"] = {scheduling: True}
        with self._lock:
            node = self._new_node(_node_path(project, zone, name), body, worker_ips)
            node["state"] = state
            if state == "READY":
                node["health"] = "HEALTHY"
            return node

    def inject_stockouts(self, n: int, zone: str | None = None) -> None:
        """The next `n` node creations (in `zone`, or any zone) fail for lack of capacity."""
        with self._lock:
            self._faults.stockouts = n
            self._faults.stockout_zone = zone

    def inject_quota_errors(self, n: int = 1) -> None:
        """The next `n` creations fail with a quota error: a node's operation ends
        RESOURCE_EXHAUSTED (not capacity); a queued resource request gets HTTP 429."""
        with self._lock:
            self._faults.quota_errors = n

    def set_create_delay(self, seconds: float) -> None:
        """How long a node stays CREATING before it is READY (or its stockout is reported)."""
        with self._lock:
            self.create_delay = seconds

    def set_queued_wait(self, seconds: float) -> None:
        """How long a queued resource stays WAITING_FOR_RESOURCES before provisioning."""
        with self._lock:
            self.queued_wait = seconds

    def fail_queued(self, n: int = 1) -> None:
        """The next `n` queued resources end FAILED instead of ACTIVE."""
        with self._lock:
            self._faults.queued_failures = n

    def fail_queued_deletes(self, n: int = 1) -> None:
        """The next `n` queued resource deletions end with a failed operation (FAILED_PRECONDITION);
        the queued resource and its node stay."""
        with self._lock:
            self._faults.queued_delete_failures = n

    def preempt(self, name: str) -> None:
        """The node becomes PREEMPTED (spot and preemptible nodes do this)."""
        with self._lock:
            self._node_by_name(name)["state"] = "PREEMPTED"

    def vanish(self, name: str) -> None:
        """The node disappears without ever showing PREEMPTED."""
        with self._lock:
            del self.nodes[self._node_by_name(name)["name"]]

    def fail_next(self, n: int, status: int = 500) -> None:
        """The next `n` requests of any kind answer with HTTP `status`."""
        with self._lock:
            self._faults.http_failures = n
            self._faults.http_failure_status = status

    def node_state(self, name: str) -> str | None:
        """The node's state, or None when there is no such node."""
        with self._lock:
            self._advance()
            node = self._find_node(name)
            return node["state"] if node else None

    def node(self, name: str) -> dict[str, Any] | None:
        """The node's JSON as the API stores it (e.g. to check its metadata)."""
        with self._lock:
            self._advance()
            return self._find_node(name)

    def queued_resource_state(self, name: str) -> str | None:
        """A queued resource's state, or None when there is none of that name."""
        with self._lock:
            self._advance()
            for path, queued in self._queued.items():
                if path.rsplit("/", 1)[-1] == name:
                    return queued.body["state"]["state"]
            return None

    # -- request handling ------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: dict[str, Any]):
        """Answer one REST call: returns the JSON body or raises ApiError."""
        with self._lock:
            self.requests.append((method, path))
            self._advance()
            if self._faults.http_failures > 0:
                self._faults.http_failures -= 1
                raise ApiError(self._faults.http_failure_status, "injected server error")
            return self._route(method, path, query, body)

    def _route(self, method: str, path: str, query: dict[str, str], body: dict[str, Any]):
        parts = path.strip("/").split("/")
        if len(parts) < 5 or parts[0] != "v2" or parts[1] != "projects" or parts[3] != "locations":
            raise ApiError(404, f"unknown path {path}")
        location = "/".join(parts[1:5])
        rest = parts[5:]
        match (method, rest):
            case ("GET", ["nodes"]):
                return {"nodes": [self._public(n) for n in self._nodes_in(location)]}
            case ("POST", ["nodes"]):
                return self._create_node(location, query.get("nodeId", ""), body)
            case ("GET", ["nodes", name]):
                return self._public(self._get_node(f"{location}/nodes/{name}"))
            case ("DELETE", ["nodes", name]):
                return self._delete_node(f"{location}/nodes/{name}")
            case ("GET", ["operations", op_id]):
                return self._get_operation(f"{location}/operations/{op_id}")
            case ("GET", ["queuedResources"]):
                queued = [q.body for p, q in self._queued.items() if _in(p, location)]
                return {"queuedResources": queued}
            case ("POST", ["queuedResources"]):
                return self._create_queued(location, query.get("queuedResourceId", ""), body)
            case ("GET", ["queuedResources", name]):
                return self._get_queued(f"{location}/queuedResources/{name}").body
            case ("DELETE", ["queuedResources", name]):
                force = query.get("force", "").lower() == "true"
                return self._delete_queued(f"{location}/queuedResources/{name}", force)
        raise ApiError(404, f"unknown method {method} {path}")

    # -- nodes -----------------------------------------------------------------------------

    def _create_node(self, location: str, node_id: str, body: dict[str, Any]) -> dict[str, Any]:
        path = f"{location}/nodes/{node_id}"
        self._check_new_node(path, node_id, body)
        zone = location.rsplit("/", 1)[-1]
        node = self._new_node(path, body, None)
        op = self._new_operation(location, path, "create")
        failure = self._creation_failure(zone, body["acceleratorType"])
        if failure is None:
            self._schedule(self.create_delay, lambda: self._finish_create(op, node))
        else:
            self._schedule(self.create_delay, lambda: self._fail_create(op, path, failure))
        return op

    def _check_new_node(self, path: str, node_id: str, body: dict[str, Any]) -> None:
        if not NODE_ID_RE.match(node_id) or len(node_id) > 63:
            raise ApiError(400, f'Invalid value for field "nodeId": "{node_id}"')
        if path in self.nodes:
            raise ApiError(409, f"Resource '{path}' already exists")
        try:
            catalog.parse(body.get("acceleratorType", ""))
        except TpuctlError:
            raise ApiError(
                400, f'Invalid value for field "acceleratorType": "{body.get("acceleratorType")}"'
            ) from None
        if not body.get("runtimeVersion"):
            raise ApiError(400, 'Invalid value for field "runtimeVersion": ""')
        if len(body.get("labels", {})) > MAX_LABELS:
            raise ApiError(400, f'Invalid value for field "labels": more than {MAX_LABELS}')
        for key, value in body.get("labels", {}).items():  # GCP's label rules
            if not LABEL_KEY_RE.match(key) or not LABEL_VALUE_RE.match(value):
                raise ApiError(400, f'Invalid value for field "labels": "{key}": "{value}"')

    def _creation_failure(self, zone: str, accelerator_type: str) -> dict[str, Any] | None:
        faults = self._faults
        if faults.quota_errors > 0:
            faults.quota_errors -= 1
            return {
                "code": CODE_RESOURCE_EXHAUSTED,
                "message": f"Quota limit 'TPUPodsPerProjectPerZone' has been exceeded for "
                f"{accelerator_type} in zone {zone}. Request a quota increase.",
            }
        if faults.stockouts > 0 and faults.stockout_zone in (None, zone):
            faults.stockouts -= 1
            return {
                "code": CODE_RESOURCE_EXHAUSTED,
                "message": f'There is no more capacity in the zone "{zone}"; you can try in '
                "another zone where Cloud TPU Nodes are offered (see "
                "https://cloud.google.com/tpu/docs/regions) [EID: 0x1234]",
            }
        return None

    def _new_node(
        self, path: str, body: dict[str, Any], worker_ips: list[str] | None
    ) -> dict[str, Any]:
        accelerator = catalog.parse(body["acceleratorType"])
        name = path.rsplit("/", 1)[-1]
        hosts = accelerator.hosts
        if worker_ips is None and self.worker_ips is not None:
            worker_ips = self.worker_ips(name, hosts)
        serial = next(self._ids)
        endpoints = []
        for index in range(hosts):
            internal = worker_ips[index] if worker_ips else f"10.{serial % 250}.0.{index + 2}"
            external = worker_ips[index] if worker_ips else f"35.{serial % 250}.1.{index + 2}"
            endpoints.append(
                {"ipAddress": internal, "port": 8470, "accessConfig": {"externalIp": external}}
            )
        node = {
            "name": path,
            "acceleratorType": body["acceleratorType"],
            "state": "CREATING",
            "runtimeVersion": body.get("runtimeVersion", accelerator.runtime_version),
            "createTime": _now_rfc3339(),
            "schedulingConfig": body.get("schedulingConfig", {}),
            "networkConfig": body.get("networkConfig", {}),
            "labels": body.get("labels", {}),
            "metadata": body.get("metadata", {}),
            "networkEndpoints": endpoints,
            "apiVersion": "V2",
            "id": str(1000 + serial),
        }
        self.nodes[path] = node
        return node

    def _finish_create(self, op: dict[str, Any], node: dict[str, Any]) -> None:
        if self.nodes.get(node["name"]) is node and node["state"] == "CREATING":
            node["state"] = "READY"
            node["health"] = "HEALTHY"
        op.update(done=True, response={"@type": NODE_TYPE, **self._public(node)})

    def _fail_create(self, op: dict[str, Any], path: str, error: dict[str, Any]) -> None:
        self.nodes.pop(path, None)
        op.update(done=True, error=error)

    def _delete_node(self, path: str) -> dict[str, Any]:
        node = self._get_node(path)
        node["state"] = "DELETING"
        location = path.rsplit("/nodes/", 1)[0]
        op = self._new_operation(location, path, "delete")

        def finish() -> None:
            self.nodes.pop(path, None)
            op.update(done=True, response={"@type": EMPTY_TYPE})

        self._schedule(self.delete_delay, finish)
        return op

    def _get_node(self, path: str) -> dict[str, Any]:
        node = self.nodes.get(path)
        if node is None:
            raise ApiError(404, f"Resource '{path}' was not found")
        return node

    def _nodes_in(self, location: str) -> list[dict[str, Any]]:
        return [n for n in self.nodes.values() if _in(n["name"], location)]

    def _find_node(self, name: str) -> dict[str, Any] | None:
        return next((n for p, n in self.nodes.items() if p.rsplit("/", 1)[-1] == name), None)

    def _node_by_name(self, name: str) -> dict[str, Any]:
        node = self._find_node(name)
        if node is None:
            raise KeyError(f"no node named {name!r} in the fake API")
        return node

    @staticmethod
    def _public(node: dict[str, Any]) -> dict[str, Any]:
        return dict(node)

    # -- queued resources ------------------------------------------------------------------

    def _create_queued(self, location: str, queued_id: str, body: dict[str, Any]):
        path = f"{location}/queuedResources/{queued_id}"
        if path in self._queued:
            raise ApiError(409, f"Resource '{path}' already exists")
        specs = body.get("tpu", {}).get("nodeSpec", [])
        if len(specs) != 1 or not specs[0].get("nodeId"):
            raise ApiError(400, 'Invalid value for field "tpu.nodeSpec": one node spec needed')
        spec = specs[0]
        node_path = f"{spec['parent']}/nodes/{spec['nodeId']}"
        self._check_new_node(node_path, spec["nodeId"], spec.get("node", {}))
        if self._faults.quota_errors > 0:
            self._faults.quota_errors -= 1
            raise ApiError(429, f"Quota limit exceeded for queued resources in {location}")
        valid_until = body.get("queueingPolicy", {}).get("validUntilDuration")
        queued = _QueuedResource(
            body={
                **body,
                "name": path,
                "createTime": _now_rfc3339(),
                "state": {"state": "WAITING_FOR_RESOURCES", "stateInitiator": "USER"},
            },
            node_path=node_path,
            node_body=spec.get("node", {}),
            created=time.monotonic(),
            valid_for=float(valid_until.rstrip("s")) if valid_until else None,
        )
        if self._faults.queued_failures > 0:
            self._faults.queued_failures -= 1
            queued.outcome = "FAILED"
        self._queued[path] = queued
        op = self._new_operation(location, path, "create")
        done = {"done": True, "response": {"@type": QUEUED_RESOURCE_TYPE, **queued.body}}
        if self.queued_create_delay > 0:
            self._schedule(self.queued_create_delay, lambda: op.update(done))
        else:
            op.update(done)
        self._schedule_queued(queued)
        return op

    def _schedule_queued(self, queued: _QueuedResource) -> None:
        wait = self.queued_wait
        if queued.valid_for is not None and queued.valid_for < wait:
            self._schedule(queued.valid_for, lambda: self._fail_queued(queued, "validity expired"))
            return
        if queued.outcome == "FAILED":
            self._schedule(wait, lambda: self._fail_queued(queued, "no capacity could be found"))
            return

        def provision() -> None:
            if queued.body["state"]["state"] != "WAITING_FOR_RESOURCES":
                return
            queued.body["state"] = {"state": "PROVISIONING", "stateInitiator": "SERVICE"}
            node_body = dict(queued.node_body)
            if "spot" in queued.body:  # spot capacity shows on the node it becomes
                node_body["schedulingConfig"] = {"spot": True}
            node = self._new_node(queued.node_path, node_body, None)
            node["queuedResource"] = queued.body["name"]
            self._schedule(self.create_delay, lambda: self._activate_queued(queued, node))

        self._schedule(wait, provision)

    def _activate_queued(self, queued: _QueuedResource, node: dict[str, Any]) -> None:
        if queued.body["state"]["state"] != "PROVISIONING":
            return
        if self.nodes.get(node["name"]) is node:
            node.update(state="READY", health="HEALTHY")
        queued.body["state"] = {"state": "ACTIVE", "stateInitiator": "SERVICE"}

    def _fail_queued(self, queued: _QueuedResource, reason: str) -> None:
        if queued.body["state"]["state"] != "WAITING_FOR_RESOURCES":
            return
        queued.body["state"] = {
            "state": "FAILED",
            "stateInitiator": "SERVICE",
            "failedData": {"error": {"code": CODE_RESOURCE_EXHAUSTED, "message": reason}},
        }

    def _get_queued(self, path: str) -> _QueuedResource:
        queued = self._queued.get(path)
        if queued is None:
            raise ApiError(404, f"Resource '{path}' was not found")
        return queued

    def _delete_queued(self, path: str, force: bool) -> dict[str, Any]:
        queued = self._get_queued(path)
        if queued.node_path in self.nodes and not force:
            raise ApiError(400, f"Queued resource {path} has a node; delete it or use force")
        location = path.rsplit("/queuedResources/", 1)[0]
        op = self._new_operation(location, path, "delete")
        if self._faults.queued_delete_failures > 0:
            self._faults.queued_delete_failures -= 1
            message = f"Queued resource {path} cannot be deleted now"
            op.update(done=True, error={"code": CODE_FAILED_PRECONDITION, "message": message})
            return op
        queued.body["state"] = {"state": "DELETING", "stateInitiator": "USER"}

        def finish() -> None:
            self.nodes.pop(queued.node_path, None)
            self._queued.pop(path, None)
            op.update(done=True, response={"@type": EMPTY_TYPE})

        self._schedule(self.delete_delay, finish)
        return op

    # -- operations and time ---------------------------------------------------------------

    def _new_operation(self, location: str, target: str, verb: str) -> dict[str, Any]:
        name = f"{location}/operations/operation-{next(self._ids)}"
        op = {
            "name": name,
            "metadata": {
                "@type": METADATA_TYPE,
                "createTime": _now_rfc3339(),
                "target": target,
                "verb": verb,
                "apiVersion": "v2",
            },
            "done": False,
        }
        self._operations[name] = op
        return op

    def _get_operation(self, path: str) -> dict[str, Any]:
        op = self._operations.get(path)
        if op is None:
            raise ApiError(404, f"Operation '{path}' was not found")
        return op

    def _schedule(self, delay: float, action: Callable[[], None]) -> None:
        self._events.append(_Event(time.monotonic() + delay, action))

    def _advance(self) -> None:
        """Run every transition whose time has come, oldest first."""
        now = time.monotonic()
        while True:
            due = [e for e in self._events if e.due <= now]
            if not due:
                return
            event = min(due, key=lambda e: e.due)
            self._events.remove(event)
            event.action()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeTpuApi
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        url = urlparse(self.path)
        # Custom methods (`nodes/N:start`) are not served; the colon stays in the last part.
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
            status, payload = 200, self.fake.handle(self.command, url.path, query, body)
        except ApiError as err:
            status, payload = err.http_status, err.body()
        except json.JSONDecodeError:
            status, payload = 400, ApiError(400, "Invalid JSON payload received").body()
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = _answer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests and the demo read tpuctl's output, not the server's access log."""


def _in(path: str, location: str) -> bool:
    """Whether the resource at `path` lives at `location` (`projects/P/locations/Z`; zone
    `-`: any zone of P, as the API's list calls take it)."""
    project, zone = location.split("/")[1], location.split("/")[3]
    return path.split("/")[1] == project and zone in ("-", path.split("/")[3])


def _node_path(project: str, zone: str, name: str) -> str:
    return f"projects/{project}/locations/{zone}/nodes/{name}"


def main(argv: list[str] | None = None) -> None:
    """Run the fake API in the foreground until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8470)
    parser.add_argument("--stockouts", type=int, default=0, help="fail the next N creations")
    parser.add_argument("--create-delay", type=float, default=2.0, help="seconds in CREATING")
    parser.add_argument("--queued-wait", type=float, default=3.0, help="seconds queued")
    args = parser.parse_args(argv)
    api = FakeTpuApi(
        host=args.host, port=args.port, create_delay=args.create_delay, queued_wait=args.queued_wait
    )
    api.inject_stockouts(args.stockouts)
    url = api.start()
    print(f"fake Cloud TPU API listening on {url} (stockouts: {args.stockouts})", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        api.stop()


if __name__ == "__main__":
    main()
