"""A local Google Cloud Storage server for local pods' gs:// paths, tests and demos.

Runs the `gcp-storage-emulator` package (the GCS JSON API over plain HTTP) in a child
process, so that several trainer processes, the google-cloud-storage client, gcsfs and
tensorstore can all talk to it at once without sharing our interpreter's GIL. Point
clients at it with `STORAGE_EMULATOR_HOST=<url>` (see `emulator_env`).

    python -m tpuctl.gcs_emulator --port 9023 --bucket my-bucket
"""

from __future__ import annotations

import argparse
import contextlib
import http
import http.server
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

_START_TIMEOUT_S = 20.0
EMULATOR_TOKEN_ENV, EMULATOR_TOKEN = "GOOGLE_AUTH_TOKEN_FOR_TESTING", "anonymous-emulator"


def emulator_env(url: str) -> dict[str, str]:
    """Environment that sends every GCS client we use (gcsfs, tensorstore, google-cloud-storage)
    to the emulator at `url` with anonymous credentials."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        # gcsfs would otherwise probe the gRPC storage-control API for each bucket (the
        # emulator has none), costing a 60 s timeout per bucket.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # tensorstore's fixed token: without one it looks for gcloud credentials and logs an
        # E-line error, which the emulator needs none of.
        EMULATOR_TOKEN_ENV: EMULATOR_TOKEN,
    }


def storage_client(url: str):
    """A real google-cloud-storage client for the emulator at `url`, anonymous."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="test-project",
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=url),
    )


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class GcsEmulator:
    """A GCS emulator in a child process; in memory unless `data_dir` is given.

    Use as a context manager, or call `start()` / `stop()`. `host` is the address it listens
    on: the SSH test pod's gateway, for example, when its hosts must reach it too. Writes to
    objects whose `bucket/name` matches the regular expression `fail_writes` fail with 403
    (fault injection: a checkpoint save that fails); with `fail_times` only the first that
    many matching writes fail (a fault that a retry gets past).
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        fail_writes: str | None = None,
        fail_times: int | None = None,
    ):
        self.data_dir = Path(data_dir).resolve() if data_dir else None
        self.fail_writes = fail_writes
        self.fail_times = fail_times
        self.host = host
        self.port = port
        self.url: str | None = None
        self._process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> str:
        """Start the server and wait until it answers; returns its URL."""
        self.port = self.port or _free_port(self.host)
        command = [sys.executable, "-m", "tpuctl.gcs_emulator", "--port", str(self.port)]
        command += ["--host", self.host]
        if self.data_dir is not None:
            command += ["--data-dir", str(self.data_dir)]
        if self.fail_writes:
            command += ["--fail-writes", self.fail_writes]
        if self.fail_times is not None:
            command += ["--fail-times", str(self.fail_times)]
        # A file, not a pipe: nobody drains a pipe while tests run, and a full one blocks the server.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._log)
        self.url = f"http://{self.host}:{self.port}"
        self._wait_until_serving()
        return self.url

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"GCS emulator exited at start: {self.log()[-500:]}")
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b?project=test", timeout=1)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"GCS emulator did not answer on {self.url} within {_START_TIMEOUT_S} s")

    def stop(self) -> None:
        """Stop the server (its in-memory data is gone)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def log(self) -> str:
        """What the server wrote to stderr so far."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace").strip()

    @property
    def pid(self) -> int | None:
        """The server's process id (tests pause it with SIGSTOP to make GCS hang)."""
        return self._process.pid if self._process is not None else None

    def wait(self) -> None:
        """Block until the server process exits."""
        if self._process is not None:
            self._process.wait()

    def client(self):
        """A real google-cloud-storage client bound to this emulator."""
        return storage_client(self.url)

    def create_bucket(self, name: str) -> None:
        """Create a bucket (with the real google-cloud-storage client)."""
        self.client().create_bucket(name)

    def __enter__(self) -> GcsEmulator:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class _Precondition(Exception):
    """A request's generation precondition does not hold: answer `status` (412 or 304)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_preconditions(query: dict[str, list[str]], current: dict | None, *, read: bool) -> None:
    """Raise _Precondition when the GCS preconditions in `query` fail for an object whose live
    resource is `current` (None: no live object), as GCS documents them:

    - `ifGenerationMatch=N`: the live generation is N; N=0 means "no live object".
    - `ifGenerationNotMatch=N`: there is a live object and its generation is not N.
    - `ifMetagenerationMatch` / `ifMetagenerationNotMatch`: the same for the metageneration.

    A NotMatch that fails on a read is 304 Not Modified, every other failure 412; a read of a
    missing object with no `ifGenerationMatch` is left to the handler (404).
    """

    def value(name: str) -> int | None:
        values = query.get(name)
        return int(values[0]) if values else None

    generation = int(current["generation"]) if current else 0
    if (match := value("ifGenerationMatch")) is not None and match != generation:
        raise _Precondition(412, f"ifGenerationMatch={match}, live generation {generation}")
    conditions = [value(name) for name in ("ifGenerationNotMatch", "ifMetagenerationMatch",
                                           "ifMetagenerationNotMatch")]  # fmt: skip
    if current is None:
        if not read and any(c is not None for c in conditions):
            raise _Precondition(412, "a precondition on an object that does not exist")
        return
    not_match, meta_match, meta_not_match = conditions
    metageneration = int(current["metageneration"])
    if not_match is not None and not_match == generation:
        raise _Precondition(304 if read else 412, f"ifGenerationNotMatch={not_match} is live")
    if meta_match is not None and meta_match != metageneration:
        raise _Precondition(412, f"ifMetagenerationMatch={meta_match}, live {metageneration}")
    if meta_not_match is not None and meta_not_match == metageneration:
        raise _Precondition(304 if read else 412, f"ifMetagenerationNotMatch={meta_not_match}")


def _answer(response, status: int, message: str) -> None:
    response.status = http.HTTPStatus(status)
    if status != 304:  # a 304 has no body
        response.json({"error": {"code": status, "message": message, "errors": [
            {"domain": "global", "reason": "conditionNotMet", "message": message}]}})  # fmt: skip


class _Faults:
    """The fault switch: object writes whose `bucket/name` matches `pattern` fail with 403,
    a status GCS clients do not retry, so the writer sees the failure at once; `times`
    bounds how many fail (None: all of them)."""

    def __init__(self, pattern: str | None, times: int | None = None):
        self.pattern = re.compile(pattern) if pattern else None
        self.left = times

    def fails(self, bucket: str, name: str) -> bool:
        if not (self.pattern and self.pattern.search(f"{bucket}/{name}")):
            return False
        if self.left is None:
            return True
        self.left -= 1  # the server handles one request at a time: no lock needed
        return self.left >= 0


def _upload_target(request, storage) -> tuple[str, str | None]:
    """(bucket, object name) an upload request writes to."""
    bucket = request.params["bucket_name"]
    if request.params.get("object_id"):  # the XML API's PUT /BUCKET/NAME
        return bucket, request.params["object_id"]
    if "upload_id" in request.query:  # a resumable upload's chunk: the name is on record
        return bucket, storage.get_resumable_file_obj(request.query["upload_id"][0])["name"]
    if "name" in request.query:
        return bucket, request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        meta = data.get("meta") if "meta" in data else data
        if isinstance(meta, dict):
            return bucket, meta.get("name")
    return bucket, None


def _live(storage, bucket: str, name: str | None) -> dict | None:
    from gcp_storage_emulator.exceptions import NotFound

    if name is None:
        return None
    try:
        return storage.get_file_obj(bucket, name)
    except NotFound:
        return None


def _make_faithful(faults: _Faults) -> None:
    """Patch gcp-storage-emulator's handlers into what tensorstore (orbax's array store), gcsfs
    and google-cloud-storage rely on from real GCS:

    - generation preconditions (`check_preconditions`) on uploads, reads, deletes and
      metadata patches; the emulator ignores them, so concurrent conditional writers (OCDBT
      manifests, orbax commit markers) all "won" and overwrote each other;
    - strictly increasing generation numbers, one per write (the emulator derives them from
      the wall clock, which can repeat or step back);
    - `x-goog-generation`/`x-goog-metageneration` headers on downloads: tensorstore reads an
      object's generation from them and fails with "Malformed StorageGeneration" without;
    - the fault switch (`_Faults`).

    The server handles one request at a time, so each check and its write are atomic.
    """
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    original_resource = objects._make_object_resource
    last_generation = [0]

    def make_object_resource(*args, **kwargs):
        obj = original_resource(*args, **kwargs)
        generation = max(int(obj["generation"]), last_generation[0] + 1)
        last_generation[0] = generation
        obj["generation"] = str(generation)
        obj["id"] = f"{obj['bucket']}/{obj['name']}/{generation}"
        obj["mediaLink"] = re.sub(r"generation=\d+", f"generation={generation}", obj["mediaLink"])
        return obj

    objects._make_object_resource = make_object_resource

    def guarded_write(handler):
        def write(request, response, storage, *args, **kwargs):
            _ = request.data  # read the body first: answering before it resets the connection
            bucket, name = _upload_target(request, storage)
            if name is not None and faults.fails(bucket, name):
                _answer(response, 403, f"injected fault: writes to {bucket}/{name} fail")
                return None
            try:
                check_preconditions(request.query, _live(storage, bucket, name), read=False)
            except _Precondition as e:
                _answer(response, e.status, str(e))
                return None
            return handler(request, response, storage, *args, **kwargs)

        return write

    def guarded_object(handler, *, read: bool):
        def call(request, response, storage, *args, **kwargs):
            _ = request.data  # read the body first: answering before it resets the connection
            bucket, name = request.params["bucket_name"], request.params["object_id"]
            current = _live(storage, bucket, name)
            try:
                check_preconditions(request.query, current, read=read)
            except _Precondition as e:
                _answer(response, e.status, str(e))
                return None
            result = handler(request, response, storage, *args, **kwargs)
            if read and current is not None:
                response["x-goog-generation"] = str(current["generation"])
                response["x-goog-metageneration"] = str(current["metageneration"])
            return result

        return call

    wrapped = {
        objects.insert: guarded_write(objects.insert),
        objects.upload_partial: guarded_write(objects.upload_partial),
        objects.xml_upload: guarded_write(objects.xml_upload),
        objects.get: guarded_object(objects.get, read=True),
        objects.download: guarded_object(objects.download, read=True),
        objects.delete: guarded_object(objects.delete, read=False),
        objects.patch: guarded_object(objects.patch, read=False),
    }
    # Only the routes change: handlers that call each other (get -> download, insert ->
    # upload_partial) keep calling the originals, so each request is checked once.
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler in wrapped:
                handlers[method] = wrapped[handler]


def serve(
    port: int,
    data_dir: str | None = None,
    buckets: list[str] = (),
    host: str = "127.0.0.1",
    fail_writes: str | None = None,
    fail_times: int | None = None,
) -> None:
    """Run the emulator in this process until SIGTERM or Ctrl-C; object writes whose
    `bucket/name` matches the regular expression `fail_writes` fail (fault injection), all
    of them or the first `fail_times`."""
    import logging

    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    _make_faithful(_Faults(fail_writes, fail_times))
    # The emulator serves one request at a time; tensorstore opens dozens of connections per
    # process at once. With the default listen backlog of 5 the kernel drops the excess and
    # clients back off for seconds to minutes; a deep backlog just queues them.
    http.server.HTTPServer.request_queue_size = 1024
    # A client that gave up on a request (tensorstore cancels reads it no longer needs) is
    # not the server's error: no traceback in the log for it.
    default_handle_error = http.server.HTTPServer.handle_error

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            default_handle_error(self, request, client_address)

    http.server.HTTPServer.handle_error = handle_error
    if data_dir:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
    server = create_server(host, port, in_memory=not data_dir, data_dir=data_dir)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    server.start()
    try:
        url = f"http://{host}:{port}"
        for bucket in buckets:
            storage_client(url).create_bucket(bucket)
        exports = " ".join(f"{k}={v}" for k, v in emulator_env(url).items())
        print(f"GCS emulator on {url}; export {exports}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stopped.wait()
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9023)
    parser.add_argument("--data-dir", help="keep objects on disk here (default: in memory)")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create")
    parser.add_argument(
        "--fail-writes",
        metavar="REGEX",
        help="fault injection: writes to matching BUCKET/NAME fail",
    )
    parser.add_argument(
        "--fail-times",
        type=int,
        metavar="N",
        help="only the first N writes that --fail-writes matches fail (default: all)",
    )
    args = parser.parse_args(argv)
    if problem := _cannot_listen(args.host, args.port):
        # the emulator's server thread would die on it, and this process wait for good
        parser.exit(2, f"error: cannot listen on {args.host}:{args.port} ({problem}); pass "
                       "another --port\n")  # fmt: skip
    serve(args.port, args.data_dir, args.bucket, args.host, args.fail_writes, args.fail_times)


def _cannot_listen(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port (in use, say), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.strerror or str(error)
    return None


if __name__ == "__main__":
    main()
