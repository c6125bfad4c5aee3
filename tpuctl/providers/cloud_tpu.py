"""Cloud TPU nodes through the v2 API (google-cloud-tpu), including queued resources.

The google-cloud-tpu library is imported inside methods: it costs ~0.4 s and the CLI must
start fast. `TPUCTL_TPU_API_ENDPOINT` points the client elsewhere (an `http://` endpoint
uses the REST transport with anonymous credentials: a local or fake server).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from tpuctl.durations import Clock, format_duration
from tpuctl.errors import TpuctlError
from tpuctl.providers import SET_PROJECT, registry
from tpuctl.providers.base import Capabilities, Node, NodeSpec, ProgressFn, Worker

if TYPE_CHECKING:
    from tpuctl.config import Settings

ENDPOINT_ENV = "TPUCTL_TPU_API_ENDPOINT"
# A node creation that the API answers with this (RESOURCE_EXHAUSTED) lacks capacity; quota
# errors share the code but not the wording, and retrying them cannot help.
_CAPACITY_MARKERS = ("no more capacity", "stockout", "insufficient capacity", "out of capacity")
_TRANSIENT_ATTEMPTS = 4
_LOGIN = "`gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS)"
_RESOURCE_EXHAUSTED = 8  # google.rpc.Code, in a queued resource's failed_data
# A queued resource waiting its turn: its wait is bounded by --valid-for, not --timeout.
_QUEUE_STATES = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES")
T = TypeVar("T")


class Stockout(TpuctlError):
    """The zone has no capacity for this accelerator right now; trying again may work."""

    def __init__(self, zone: str, api_message: str):
        super().__init__(f"no capacity for this TPU in {zone}: {api_message}", exit_code=1)
        self.zone = zone
        # The API's first clause ("There is no more capacity in the zone ...") is the news.
        self.reason = api_message.split(";")[0].strip()


@dataclass(frozen=True)
class QueuedNode:
    """A queued resource as `list` shows it: a node asked for (`up --no-wait`) that may not
    exist yet. Named like its node, as tpuctl names both."""

    name: str
    project: str
    zone: str
    accelerator_type: str
    state: str  # WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, FAILED, ...
    scheduling: str
    created: datetime | None
    labels: dict[str, str]


class QueuedResourceEnded(TpuctlError):
    """A queued resource ended FAILED or SUSPENDED: `up` gives up on it and deletes it."""


class QueuedResourceGone(TpuctlError):
    """The queued resource `up` waited on was deleted (by `tpuctl down` or someone else)."""


class WaitTimedOut(TpuctlError):
    """`up` stopped waiting for a node after its --timeout; nothing was deleted."""


class Deadline:
    """How long `up` waits for a node (None: no bound), counted on the provider's clock."""

    def __init__(self, clock: Clock, seconds: float | None):
        self.clock = clock
        self.seconds = seconds
        self.restart()

    def restart(self) -> None:
        """Count from now: time spent in a queue is --valid-for's to bound, not this one's."""
        self.started = self.clock.elapsed()

    def expired(self) -> bool:
        """Whether the bound has passed."""
        return self.seconds is not None and self.clock.elapsed() - self.started >= self.seconds

    def timed_out(self, situation: str, fix: str) -> WaitTimedOut:
        """`up`'s one line once the bound has passed: where things stand, what to do."""
        waited = format_duration(float(self.seconds or 0))
        return WaitTimedOut(
            f"gave up waiting after {waited} (--timeout): {situation}; {fix}", exit_code=1
        )

    def not_ready(self, name: str, now: str, labels: dict[str, str]) -> WaitTimedOut:
        """The error for node `name` not READY in time (`now`: "is CREATING in Z"): nothing
        was deleted, and deleting is suggested only for a node labelled as the user's."""
        from tpuctl import ownership
        from tpuctl.config import local_user

        fix = (
            "nothing was deleted: run `tpuctl up` again to wait longer (or pass a longer --timeout)"
        )
        if ownership.created_by(labels, local_user()):
            fix += f", or delete it with `tpuctl down {name}`"
        return self.timed_out(f"node {name} {now}", fix)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter for stockout retries: initial * factor**k, capped."""

    initial: float = 5.0
    factor: float = 2.0
    maximum: float = 300.0
    jitter: float = 0.2  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]

    def delay(self, retry_index: int, rng: random.Random | None = None) -> float:
        base = min(self.maximum, self.initial * self.factor**retry_index)
        return base * (rng or random).uniform(1 - self.jitter, 1 + self.jitter)


# What the API's resource paths can hold: a value with a '/' or a space would name another
# resource or fail inside the client with a traceback.
_NO_ZONE = "no zone: pass --zone, set TPUCTL_ZONE or run `tpuctl config set zone ZONE`"
_NAME_RULES = {  # what: (pattern, example)
    "zone": (re.compile(r"[a-z][a-z0-9-]*[a-z0-9]\Z"), "us-central1-a"),
    "project": (re.compile(r"[a-z0-9][a-z0-9.:-]*\Z"), "my-project"),
}


def checked_name(what: str, value: str, fix: str | None = None) -> str:
    """`value` if it can be a Cloud `what` ("zone" or "project") name; else a TpuctlError
    that ends with `fix` (default: where a command's value can come from)."""
    pattern, example = _NAME_RULES[what]
    if not isinstance(value, str) or not pattern.match(value):
        fix = fix or f"fix --{what}, TPUCTL_{what.upper()} or the {what} setting"
        raise TpuctlError(f"{what} {value!r} is not a Cloud {what} name (e.g. {example}); {fix}")
    return value


class CloudTpuProvider:
    """Nodes in one project; `zone` is where get/list/delete look, `spec.zone` where create goes."""

    name = "cloud"
    capabilities = Capabilities(zones=True, queued_resources=True)

    def __init__(self, project: str, zone: str | None, clock: Clock | None = None):
        """`zone` None: a provider that lists every zone of the project and nothing else."""
        self.project = checked_name("project", project)
        self.zone = checked_name("zone", zone) if zone else None
        self.clock = clock or Clock()

    def at(self, zone: str, project: str | None = None) -> CloudTpuProvider:
        """The same API, looking in `zone` (of `project`): where a node actually lives."""
        return CloudTpuProvider(project or self.project, zone, self.clock)

    def queued_path(self, name: str, zone: str | None = None) -> str:
        """The queued resource that creates node `name` in this zone (or `zone`)."""
        return f"{self._parent(zone)}/queuedResources/{name}"

    @classmethod
    def from_settings(cls, settings: Settings) -> CloudTpuProvider:
        """Build from resolved settings; project and zone are required."""
        project, zone = settings.get("project"), settings.get("zone")
        if not project:
            raise TpuctlError(f"no Google Cloud project: {SET_PROJECT}")
        if not zone:
            raise TpuctlError(_NO_ZONE)
        return cls(project, zone)

    @cached_property
    def client(self) -> Any:
        """A google.cloud.tpu_v2.TpuClient for the configured endpoint."""
        from google.auth import exceptions as auth_exceptions
        from google.cloud import tpu_v2

        endpoint = os.environ.get(ENDPOINT_ENV)
        try:
            if not endpoint:
                return tpu_v2.TpuClient()
            from google.api_core.client_options import ClientOptions

            credentials = None
            if endpoint.startswith("http://"):
                from google.auth.credentials import AnonymousCredentials

                credentials = AnonymousCredentials()
            return tpu_v2.TpuClient(
                transport="rest",
                credentials=credentials,
                client_options=ClientOptions(api_endpoint=endpoint),
            )
        except auth_exceptions.DefaultCredentialsError:
            raise TpuctlError(f"no Google credentials: run {_LOGIN}", exit_code=1) from None
        except auth_exceptions.GoogleAuthError as error:  # some are refreshed to find a project
            raise credentials_refused(error) from None

    def location(self, zone: str | None = None) -> registry.Location:
        """Where this provider's nodes (in `zone`, default its own) live, for the registry."""
        return registry.Location("cloud", zone or self.zone, self.project)

    # -- paths -----------------------------------------------------------------------------

    def _parent(self, zone: str | None = None) -> str:
        if not (zone or self.zone):  # a provider made only to list every zone
            raise TpuctlError(_NO_ZONE)
        return f"projects/{self.project}/locations/{zone or self.zone}"

    def _node_path(self, name: str, zone: str | None = None) -> str:
        return f"{self._parent(zone)}/nodes/{name}"

    def queued_state(self, name: str) -> str | None:
        """The state of the queued resource of node `name` here (WAITING_FOR_RESOURCES,
        ...), None when there is none."""
        from google.api_core import exceptions

        try:
            queued = self._call(
                self.client.get_queued_resource,
                name=self.queued_path(name),
                handles=(exceptions.NotFound,),
            )
        except exceptions.NotFound:
            return None
        return queued.state.state.name

    # -- describe --------------------------------------------------------------------------

    def get(self, name: str, zone: str | None = None) -> Node | None:
        """The node called `name` in the zone, or None."""
        from google.api_core import exceptions

        try:
            raw = self._call(
                self.client.get_node,
                name=self._node_path(name, zone),
                handles=(exceptions.NotFound,),
            )
        except exceptions.NotFound:
            return None
        return node_from_api(raw)

    def list(self, all_zones: bool = False) -> list[Node]:
        """Nodes in the zone (or every zone of the project), sorted by name."""
        parent = self._parent("-" if all_zones else None)
        pages = self._call(self.client.list_nodes, parent=parent)
        return sorted((node_from_api(n) for n in pages), key=lambda n: (n.zone, n.name))

    def list_queued(self, all_zones: bool = False) -> list[QueuedNode]:
        """Queued resources in the zone (or every zone of the project), by zone and name."""
        parent = self._parent("-" if all_zones else None)
        pages = self._call(self.client.list_queued_resources, parent=parent)
        return sorted((_queued_from_api(q) for q in pages), key=lambda q: (q.zone, q.name))

    def locate(self, name: str) -> list[Node]:
        """The nodes called `name` in every zone of the project (one list call), by zone."""
        return [node for node in self.list(all_zones=True) if node.name == name]

    # -- create ----------------------------------------------------------------------------

    def create(
        self, spec: NodeSpec, progress: ProgressFn, wait: bool = True, timeout: float | None = None
    ) -> Node | None:
        """Create a node in `spec.zone` and wait until it is READY (one attempt, no retries),
        for at most `timeout` seconds after the API accepted the request.

        Raises Stockout when the zone has no capacity, TpuctlError for errors that retrying
        cannot fix (quota, invalid arguments, permissions), WaitTimedOut (the node is left
        as it is) after `timeout`. Returns None when not waiting.
        """
        from google.api_core import exceptions
        from google.cloud import tpu_v2

        node = tpu_v2.Node(
            accelerator_type=spec.accelerator_type,
            runtime_version=spec.runtime_version,
            labels=spec.labels,
            metadata=spec.metadata,
            scheduling_config=_scheduling_config(spec.scheduling),
            network_config=_network_config(spec),
        )
        try:
            operation = self._call(
                self.client.create_node,
                parent=self._parent(spec.zone),
                node_id=spec.name,
                node=node,
                handles=(exceptions.TooManyRequests, exceptions.Conflict),
            )
        except exceptions.TooManyRequests as error:
            self._raise_for(error, spec)
        except exceptions.Conflict:
            self._raise_taken_meanwhile(spec)
        registry.record(spec.name, self.location(spec.zone))
        progress(f"creating {spec.name} ({spec.accelerator_type}) in {spec.zone}")
        if not wait:
            return None
        deadline = Deadline(self.clock, timeout)
        try:
            self._wait_for_operation(operation, spec, progress, deadline)
        except WaitTimedOut:  # still being created: a node, soon, and still recorded
            raise
        except TpuctlError:  # a stockout or refusal: no node was made there
            registry.forget(spec.name, self.location(spec.zone))
            raise
        except KeyboardInterrupt:  # the API goes on creating it: a billed node, soon
            progress(
                f"interrupted: {spec.name} may still be being created in {spec.zone}; "
                f"`tpuctl down {spec.name}` deletes it"
            )
            raise
        return self._wait_until_ready(spec.name, spec.zone, progress, deadline)

    def _raise_taken_meanwhile(self, spec: NodeSpec) -> None:
        """A node of this name appeared between `up`'s look and its create request."""
        from tpuctl import ownership

        existing = self.get(spec.name, spec.zone)
        owner = ownership.describe_owner(existing.labels) if existing else "since deleted"
        raise TpuctlError(
            f"node {spec.name} was created in {spec.zone} by another request meanwhile "
            f"({owner}): choose another --name, or run `tpuctl up` again to reuse it if it "
            "is yours",
            exit_code=1,
        )

    def _wait_for_operation(
        self, operation: Any, spec: NodeSpec, progress: ProgressFn, deadline: Deadline
    ) -> None:
        """Poll the create operation, reporting the node's state as it changes, until it is
        done or `deadline` passes."""
        last_state = None
        for delay in _poll_delays():
            if self._call(operation.done):
                break
            node = self.get(spec.name, spec.zone)
            if node is not None and node.state != last_state:
                last_state = node.state
                progress(f"{spec.name}: {node.state}")
            if deadline.expired():
                now = f"is {node.state}" if node else "is not there yet (its creation unfinished)"
                raise deadline.not_ready(spec.name, f"{now} in {spec.zone}", spec.labels)
            self.clock.sleep(delay)
        error = operation.exception()
        if error is not None:
            self._raise_for(error, spec)

    def _wait_until_ready(
        self, name: str, zone: str, progress: ProgressFn, deadline: Deadline
    ) -> Node:
        last_state = None
        for delay in _poll_delays():
            node = self.get(name, zone)
            if node is None:
                raise TpuctlError(f"node {name} disappeared from {zone} while starting", 1)
            if node.state != last_state:
                last_state = node.state
                progress(f"{name}: {node.state}")
            if node.ready:
                return node
            if node.state in ("PREEMPTED", "TERMINATED", "STOPPED"):
                raise TpuctlError(
                    f"node {name} is {node.state} instead of READY; delete it with "
                    f"`tpuctl down {name}` and try again",
                    exit_code=1,
                )
            if deadline.expired():  # e.g. REPAIRING for hours: the service's to finish
                raise deadline.not_ready(name, f"is {node.state} in {zone}", node.labels)
            self.clock.sleep(delay)
        raise AssertionError("unreachable: _poll_delays is endless")

    def wait_until_ready(
        self,
        name: str,
        progress: ProgressFn,
        zone: str | None = None,
        timeout: float | None = None,
    ) -> Node:
        """Wait for an existing node (e.g. one still CREATING) to become READY, for at most
        `timeout` seconds (WaitTimedOut; the node is left as it is)."""
        return self._wait_until_ready(
            name, zone or self.zone, progress, Deadline(self.clock, timeout)
        )

    def wait_while_deleting(
        self, name: str, progress: ProgressFn, zone: str, timeout: float | None = None
    ) -> Node | None:
        """Wait, for at most `timeout` seconds, until node `name`, being deleted, is gone
        (None), or shows another state (that node: someone made it again)."""
        deadline = Deadline(self.clock, timeout)
        for delay in _poll_delays():
            node = self.get(name, zone)
            if node is None or node.state != "DELETING":
                return node
            if deadline.expired():
                raise deadline.timed_out(
                    f"node {name} is still DELETING in {zone}",
                    "nothing was created: run `tpuctl up` again once it is gone",
                )
            self.clock.sleep(delay)
        raise AssertionError("unreachable: _poll_delays is endless")

    def create_with_retries(
        self,
        spec: NodeSpec,
        progress: ProgressFn,
        *,
        fallback_zones: Sequence[str] = (),
        retry_for: float = 1800.0,
        backoff: Backoff = Backoff(),
        queued: bool = False,
        valid_for: float | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Node | None:
        """Create the node, walking `spec.zone` then `fallback_zones` and backing off between
        rounds while every zone is out of capacity, for at most `retry_for` seconds; then wait
        for it at most `timeout` seconds (the time in a queue not counted)."""
        zones = [spec.zone, *(z for z in fallback_zones if z != spec.zone)]
        attempts = 0
        started = self.clock.elapsed()  # the budget is this call's, not the provider's age
        for round_index in range(10_000):
            for zone in zones:
                attempts += 1
                zoned = replace(spec, zone=zone)
                try:
                    if queued:
                        return self.create_queued(
                            zoned, progress, valid_for=valid_for, wait=wait, timeout=timeout
                        )
                    return self.create(zoned, progress, wait=wait, timeout=timeout)
                except Stockout as stockout:
                    progress(f"stockout in {zone} (attempt {attempts}): {stockout.reason}")
            used = self.clock.elapsed() - started
            remaining = retry_for - used
            if remaining <= 0:
                break
            delay = min(backoff.delay(round_index), remaining)
            where = "all zones" if len(zones) > 1 else zones[0]
            progress(
                f"{where} out of capacity; retrying in {format_duration(delay)} "
                f"(attempt {attempts + 1}, {format_duration(used)} of "
                f"{format_duration(retry_for)} retry budget used)"
            )
            self.clock.sleep(delay)
        raise TpuctlError(
            f"no capacity for {spec.accelerator_type} in {', '.join(zones)} after {attempts} "
            f"attempts over {format_duration(self.clock.elapsed() - started)}; retry longer with "
            f"--retry-for 2h, or add zones with `tpuctl config set "
            f"accelerators.{spec.accelerator_type}.zones ZONE1,ZONE2`",
            exit_code=1,
        )

    # -- queued resources ------------------------------------------------------------------

    def create_queued(
        self,
        spec: NodeSpec,
        progress: ProgressFn,
        *,
        valid_for: float | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Node | None:
        """Ask for the node through a queued resource named like the node; wait until READY,
        for at most `timeout` seconds besides the time in the queue (--valid-for's).

        A queued resource that ends FAILED or SUSPENDED, or that the user interrupts, is
        deleted: orphans keep holding quota. One waited on past `timeout` is kept.
        """
        from google.api_core import exceptions
        from google.cloud import tpu_v2
        from google.protobuf import duration_pb2

        node = tpu_v2.Node(
            accelerator_type=spec.accelerator_type,
            runtime_version=spec.runtime_version,
            labels=spec.labels,
            metadata=spec.metadata,
            network_config=_network_config(spec),
        )
        queued = tpu_v2.QueuedResource(
            tpu=tpu_v2.QueuedResource.Tpu(
                node_spec=[
                    tpu_v2.QueuedResource.Tpu.NodeSpec(
                        parent=self._parent(spec.zone), node_id=spec.name, node=node
                    )
                ]
            )
        )
        if spec.scheduling == "spot":
            queued.spot = tpu_v2.QueuedResource.Spot()
        elif spec.scheduling == "reserved":
            queued.guaranteed = tpu_v2.QueuedResource.Guaranteed(reserved=True)
        if valid_for:
            queued.queueing_policy = tpu_v2.QueuedResource.QueueingPolicy(
                valid_until_duration=duration_pb2.Duration(seconds=int(valid_for))
            )
        path = self.queued_path(spec.name, spec.zone)
        try:
            operation = self._call(
                self.client.create_queued_resource,
                parent=self._parent(spec.zone),
                queued_resource_id=spec.name,
                queued_resource=queued,
                handles=(exceptions.Conflict, exceptions.TooManyRequests),
            )
        except exceptions.Conflict:
            self._check_existing_queued(path, spec)
            progress(f"queued resource {spec.name} already exists in {spec.zone}; waiting on it")
            operation = None
        except exceptions.TooManyRequests as error:
            self._raise_for(error, spec)
        # Recorded, and in _await_queued's care, from the moment it exists: an interrupt
        # while its create operation runs must not leave it behind unknown.
        registry.record(spec.name, self.location(spec.zone))
        return self._await_queued(
            path, spec, operation, progress, wait, Deadline(self.clock, timeout)
        )

    def _await_queued(
        self,
        path: str,
        spec: NodeSpec,
        operation: Any,
        progress: ProgressFn,
        wait: bool,
        deadline: Deadline,
    ) -> Node | None:
        """Wait for the queued resource's create `operation` (None: it existed already), then,
        when `wait`, for the queued resource and its node. Only a queued resource given up on
        (it ended FAILED or SUSPENDED, or the user interrupted) is deleted: the API failing
        meanwhile, or taking longer than `deadline`, is no reason to delete what may still be
        granted."""
        location = self.location(spec.zone)
        try:
            if operation is not None:
                self._wait_for_operation(operation, spec, lambda _msg: None, deadline)
                progress(f"queued resource {spec.name} created in {spec.zone}")
            if not wait:
                return None
            self._wait_for_queued(path, spec, progress, deadline)
            return self._wait_until_ready(spec.name, spec.zone, progress, deadline)
        except (KeyboardInterrupt, Stockout, QueuedResourceEnded):
            progress(f"giving up: deleting queued resource {spec.name} so it holds no quota")
            self.delete_queued(path, lambda _msg: None)
            registry.forget(spec.name, location)
            raise
        except QueuedResourceGone:
            registry.forget(spec.name, location)
            raise
        except WaitTimedOut as error:
            raise WaitTimedOut(
                f"{error} (and its queued resource)",
                exit_code=1,
            ) from None
        except TpuctlError as error:
            raise TpuctlError(
                f"{error} (queued resource {spec.name} may remain in {spec.zone}: `tpuctl up` "
                f"again waits on it, `tpuctl down {spec.name}` deletes it)",
                exit_code=error.exit_code,
            ) from None

    def _check_existing_queued(self, path: str, spec: NodeSpec) -> None:
        """A queued resource of the node's name exists already: `up` waits on it (and may
        delete it when it gives up) only when it is the same user's and asks for the same
        type and capacity (spot, on-demand, reserved), as an earlier `up --no-wait` of this
        node does. Anyone else's is left alone, and not offered for deletion."""
        from google.api_core import exceptions

        from tpuctl import ownership

        try:
            existing = self._call(
                self.client.get_queued_resource, name=path, handles=(exceptions.NotFound,)
            )
        except exceptions.NotFound:  # the conflict was the node's: it exists without one
            self._raise_taken_meanwhile(spec)
        specs = existing.tpu.node_spec
        node = specs[0].node if specs else None
        kind = node.accelerator_type if node is not None else "node of unknown type"
        labels = dict(node.labels) if node is not None else {}
        where = f"queued resource {spec.name} in {spec.zone}"
        if labels.get(ownership.USER_LABEL) != spec.labels.get(ownership.USER_LABEL):
            raise TpuctlError(
                f"{where} is not yours ({ownership.describe_owner(labels)}): choose another --name",
                exit_code=1,
            )
        differs = []
        if kind != spec.accelerator_type:
            differs.append(f"a {kind}, not a {spec.accelerator_type}")
        if (scheduling := _queued_scheduling(existing)) != spec.scheduling:
            differs.append(f"{scheduling} capacity, not {spec.scheduling}")
        if differs:  # waiting on it would give a node other than the one asked for
            raise TpuctlError(
                f"{where} asks for {' and '.join(differs)}: choose another --name, or delete "
                f"it first (`tpuctl down {spec.name}`)"
            )

    def _wait_for_queued(
        self, path: str, spec: NodeSpec, progress: ProgressFn, deadline: Deadline
    ) -> None:
        """Wait until the queued resource is ACTIVE; `deadline` counts from when it left the
        queue (its wait there is --valid-for's)."""
        from google.api_core import exceptions

        last_state = None
        for delay in _poll_delays():
            try:
                queued = self._call(
                    self.client.get_queued_resource, name=path, handles=(exceptions.NotFound,)
                )
            except exceptions.NotFound:
                raise QueuedResourceGone(
                    f"queued resource {spec.name} in {spec.zone} was deleted while `up` waited "
                    "on it (by `tpuctl down` or someone else); nothing is left to clean up",
                    exit_code=1,
                ) from None
            state = queued.state.state.name
            if state != last_state:
                last_state = state
                progress(f"queued resource {spec.name}: {state}")
            if state == "ACTIVE":
                return
            if state in ("FAILED", "SUSPENDED"):
                error = queued.state.failed_data.error
                reason = error.message or state.lower()
                if _lacks_capacity(error.code, reason):  # retried like any stockout
                    raise Stockout(
                        spec.zone, f"queued resource {spec.name} ended {state}: {reason}"
                    )
                raise QueuedResourceEnded(
                    f"queued resource {spec.name} in {spec.zone} ended {state}: {reason}",
                    exit_code=1,
                )
            if state in _QUEUE_STATES:
                deadline.restart()
            elif deadline.expired():  # e.g. PROVISIONING for hours
                raise deadline.not_ready(
                    spec.name,
                    f"is not there yet (queued resource {state}) in {spec.zone}",
                    spec.labels,
                )
            self.clock.sleep(delay)

    def delete_queued(self, path: str, progress: ProgressFn) -> bool:
        """Delete a queued resource and its node (force), waiting until it is gone; False
        when there was none. A deletion the API refuses is a TpuctlError."""
        from google.api_core import exceptions

        name = path.rsplit("/", 1)[-1]
        try:
            operation = self._call(
                self.client.delete_queued_resource,
                request={"name": path, "force": True},
                handles=(exceptions.NotFound,),
            )
        except exceptions.NotFound:
            return False
        progress(f"deleting queued resource {name}")
        for delay in _poll_delays():
            if self._call(operation.done):
                break
            self.clock.sleep(delay)
        error = operation.exception()
        if error is not None:
            raise TpuctlError(
                f"deleting queued resource {name} failed: {api_message(error)}", exit_code=1
            )
        return True

    # -- delete ----------------------------------------------------------------------------

    def delete(self, name: str, progress: ProgressFn) -> bool:
        """Delete the node (and the queued resource that made it); False if there was none."""
        from google.api_core import exceptions

        try:
            raw = self._call(
                self.client.get_node, name=self._node_path(name), handles=(exceptions.NotFound,)
            )
        except exceptions.NotFound:
            registry.forget(name, self.location())
            return False
        if raw.queued_resource:
            deleted = self.delete_queued(raw.queued_resource, progress)
            registry.forget(name, self.location())
            return deleted
        try:
            operation = self._call(
                self.client.delete_node,
                name=self._node_path(name),
                handles=(exceptions.NotFound,),
            )
        except exceptions.NotFound:
            registry.forget(name, self.location())
            return False
        progress(f"{name}: DELETING")
        for delay in _poll_delays():
            if self._call(operation.done):
                break
            self.clock.sleep(delay)
        error = operation.exception()
        if error is not None:
            raise TpuctlError(f"deleting {name} failed: {error.message}", exit_code=1)
        registry.forget(name, self.location())
        progress(f"{name}: deleted")
        return True

    # -- errors and retries of transient failures -----------------------------------------

    def _call(
        self,
        fn: Callable[..., T],
        *args: Any,
        handles: tuple[type[Exception], ...] = (),
        **kwargs: Any,
    ) -> T:
        """Call the API, retrying transient failures (500, 503, and 429: a read or poll
        over the rate limit) a few times with backoff.

        The exceptions in `handles` reach the caller, which knows what they mean there (a
        429 from a create is a quota or capacity answer); every other failure becomes a
        one-line TpuctlError.
        """
        from google.api_core import exceptions
        from google.auth import exceptions as auth_exceptions
        from requests.exceptions import ConnectionError as RequestsConnectionError

        transient = (
            exceptions.InternalServerError,
            exceptions.ServiceUnavailable,
            exceptions.TooManyRequests,
        )
        for attempt in range(_TRANSIENT_ATTEMPTS):
            try:
                return fn(*args, **kwargs)
            except handles:
                raise
            except transient as error:
                if attempt == _TRANSIENT_ATTEMPTS - 1:
                    raise TpuctlError(
                        f"the TPU API keeps failing ({error.code}: {api_message(error)}) after "
                        f"{_TRANSIENT_ATTEMPTS} attempts; try again later",
                        exit_code=1,
                    ) from None
                self.clock.sleep(2.0**attempt)
            except exceptions.GoogleAPICallError as error:
                self._raise_unexpected(error)
            except auth_exceptions.GoogleAuthError as error:
                # google-auth refreshes credentials before a request and again on a 401:
                # expired or revoked ones, or anonymous ones (which cannot be refreshed),
                # fail there, before the API says anything.
                raise credentials_refused(error) from None
            except RequestsConnectionError:
                endpoint = os.environ.get(ENDPOINT_ENV) or "tpu.googleapis.com"
                raise TpuctlError(
                    f"cannot reach the TPU API at {endpoint}; check the network "
                    f"(or {ENDPOINT_ENV} if you set it)",
                    exit_code=1,
                ) from None
        raise AssertionError("unreachable")

    def _raise_unexpected(self, error: Any) -> None:
        from google.api_core import exceptions

        message = api_message(error)
        # Unauthorized and Forbidden: the REST transport's 401 and 403 (gRPC's Unauthenticated
        # and PermissionDenied are their subclasses).
        if isinstance(error, exceptions.Unauthorized):
            raise TpuctlError(
                f"the TPU API refused your Google credentials ({error.code}: {message}): "
                f"run {_LOGIN}",
                exit_code=1,
            ) from None
        if isinstance(error, exceptions.Forbidden):
            raise TpuctlError(
                f"permission denied in project {self.project} ({error.code}: {message}): check "
                f"that the account of {_LOGIN} may use the project's TPU API",
                exit_code=1,
            ) from None
        refused = (exceptions.BadRequest, exceptions.InvalidArgument, exceptions.FailedPrecondition)
        if isinstance(error, refused):
            raise TpuctlError(f"the TPU API refused the request: {message}") from None
        raise TpuctlError(f"the TPU API failed: {error.code} {message}", exit_code=1) from None

    def _raise_for(self, error: Exception, spec: NodeSpec) -> None:
        from google.api_core import exceptions

        message = api_message(error)
        if isinstance(error, exceptions.TooManyRequests):
            if any(marker in message.lower() for marker in _CAPACITY_MARKERS):
                raise Stockout(spec.zone, message) from None
            raise TpuctlError(f"quota exceeded, not retrying: {message}", exit_code=1) from None
        if isinstance(error, exceptions.GoogleAPICallError):
            self._raise_unexpected(error)
        raise error


def credentials_refused(error: Exception) -> TpuctlError:
    """The one-line error for google-auth failing to get a token for the credentials."""
    from google.auth import exceptions as auth_exceptions

    if isinstance(error, auth_exceptions.TransportError):  # the token service, unreachable
        return TpuctlError(
            f"cannot reach Google's token service to refresh your credentials ({error}); "
            "check the network",
            exit_code=1,
        )
    return TpuctlError(f"your Google credentials were refused ({error}): run {_LOGIN}", 1)


def _lacks_capacity(code: int, message: str) -> bool:
    """A queued resource that failed RESOURCE_EXHAUSTED for capacity (not for quota)."""
    text = message.lower()
    capacity = any(marker in text for marker in (*_CAPACITY_MARKERS, "no capacity"))
    return code == _RESOURCE_EXHAUSTED and capacity and "quota" not in text


def api_message(error: Any) -> str:
    """The API's own words, without the "POST http://...: " prefix REST errors carry."""
    message = getattr(error, "message", None) or str(error)
    return re.sub(r"^(GET|POST|PUT|PATCH|DELETE) \S+: ", "", message)


def _poll_delays(initial: float = 1.0, factor: float = 1.5, maximum: float = 10.0):
    """Endless polling intervals: 1s growing to 10s (scaled by the provider's clock)."""
    delay = initial
    while True:
        yield delay
        delay = min(maximum, delay * factor)


def _scheduling_config(scheduling: str) -> Any:
    from google.cloud import tpu_v2

    if scheduling == "on-demand":
        return None
    return tpu_v2.SchedulingConfig(**{scheduling: True})


def _queued_scheduling(queued: Any) -> str:
    """The capacity a tpu_v2.QueuedResource asks for, as NodeSpec.scheduling names it."""
    if "spot" in queued:
        return "spot"
    if "guaranteed" in queued and queued.guaranteed.reserved:
        return "reserved"
    return "on-demand"


def _queued_from_api(raw: Any) -> QueuedNode:
    """A tpu_v2.QueuedResource as tpuctl's QueuedNode."""
    parts = raw.name.split("/")
    specs = raw.tpu.node_spec
    node = specs[0].node if specs else None
    return QueuedNode(
        name=parts[-1],
        project=parts[1],
        zone=parts[3],
        accelerator_type=node.accelerator_type if node is not None else "",
        state=raw.state.state.name,
        scheduling=_queued_scheduling(raw),
        created=raw.create_time if isinstance(raw.create_time, datetime) else None,
        labels=dict(node.labels) if node is not None else {},
    )


def _network_config(spec: NodeSpec) -> Any:
    from google.cloud import tpu_v2

    return tpu_v2.NetworkConfig(
        network=spec.network or "",
        subnetwork=spec.subnetwork or "",
        enable_external_ips=True,
    )


def node_from_api(raw: Any) -> Node:
    """Convert a tpu_v2.Node into tpuctl's provider-neutral Node."""
    parts = raw.name.split("/")
    scheduling = "on-demand"
    config = raw.scheduling_config
    if config.spot:
        scheduling = "spot"
    elif config.preemptible:
        scheduling = "preemptible"
    elif config.reserved:
        scheduling = "reserved"
    health = raw.health.name if raw.health else None
    created = raw.create_time if isinstance(raw.create_time, datetime) else None
    workers = tuple(
        Worker(
            index=i,
            internal_ip=endpoint.ip_address,
            external_ip=endpoint.access_config.external_ip or None,
        )
        for i, endpoint in enumerate(raw.network_endpoints)
    )
    return Node(
        name=parts[-1],
        zone=parts[3],
        accelerator_type=raw.accelerator_type,
        state=raw.state.name,
        project=parts[1],
        health=health,
        scheduling=scheduling,
        runtime_version=raw.runtime_version or None,
        created=created,
        workers=workers,
        labels=dict(raw.labels),
        provider="cloud",
    )
