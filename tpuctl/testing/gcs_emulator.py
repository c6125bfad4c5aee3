"""A local Google Cloud Storage server for tests and demos.

Runs the `gcp-storage-emulator` package (the GCS JSON API over plain HTTP) in a child
process, so that several trainer processes, the google-cloud-storage client, gcsfs and
tensorstore can all talk to it at once without sharing our interpreter's GIL. Point
clients at it with `STORAGE_EMULATOR_HOST=<url>` (see `emulator_env`).

    python -m tpuctl.testing.gcs_emulator --port 9023 --bucket my-bucket
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http import HTTPStatus
from pathlib import Path

_START_TIMEOUT_S = 20.0


def emulator_env(url: str) -> dict[str, str]:
    """Environment that sends every GCS client we use (gcsfs, tensorstore, google-cloud-storage)
    to the emulator at `url` with anonymous credentials."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        # gcsfs would otherwise probe the gRPC storage-control API for each bucket (the
        # emulator has none), costing a 60 s timeout per bucket.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
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
    on: the SSH test pod's gateway, for example, when its hosts must reach it too.
    """

    def __init__(
        self, data_dir: str | Path | None = None, port: int | None = None, host: str = "127.0.0.1"
    ):
        self.data_dir = Path(data_dir).resolve() if data_dir else None
        self.host = host
        self.port = port
        self.url: str | None = None
        self._process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> str:
        """Start the server and wait until it answers; returns its URL."""
        self.port = self.port or _free_port(self.host)
        command = [sys.executable, "-m", "tpuctl.testing.gcs_emulator", "--port", str(self.port)]
        command += ["--host", self.host]
        if self.data_dir is not None:
            command += ["--data-dir", str(self.data_dir)]
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


def _add_generation_headers() -> None:
    """Make downloads carry `x-goog-generation`/`x-goog-metageneration`, as real GCS does.

    tensorstore (orbax's array store) reads an object's generation from these headers and
    fails with "Malformed StorageGeneration" without them; gcp-storage-emulator omits them.
    """
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: the original handler already answered 404
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])

    objects.download = download  # objects.get (alt=media) calls it by this name
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is original:
                handlers[method] = download


def _honour_generation_preconditions() -> None:
    """Answer 412 to uploads and deletes whose `ifGenerationMatch` does not match the
    object's generation (0: the object must not exist), as real GCS does; the emulator
    ignores the parameter. It serves one request at a time, so check-then-write is atomic.
    """
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    def conditional(original):
        def handler(request, response, storage, *args, **kwargs):
            wanted = request.query.get("ifGenerationMatch")
            if wanted:
                if "object_id" in request.params:
                    name = request.params["object_id"]
                elif "name" in request.query:
                    name = request.query["name"][0]
                else:
                    name = (request.data or {}).get("meta", {}).get("name")
                try:
                    obj = storage.get_file_obj(request.params["bucket_name"], name)
                    current = str(obj["generation"])
                except Exception:  # no such object
                    current = "0"
                if wanted[0] != current:
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    message = f"ifGenerationMatch {wanted[0]} != generation {current}"
                    response.json({"error": {"code": 412, "message": message, "errors": []}})
                    return
            original(request, response, storage, *args, **kwargs)

        return handler

    for original in (objects.insert, objects.delete):
        wrapped = conditional(original)
        for _, handlers in server.HANDLERS:
            for method, handler in handlers.items():
                if handler is original:
                    handlers[method] = wrapped
        if original is objects.insert:
            objects.insert = wrapped  # the router falls back to it by this name


def serve(
    port: int, data_dir: str | None = None, buckets: list[str] = (), host: str = "127.0.0.1"
) -> None:
    """Run the emulator in this process until SIGTERM or Ctrl-C."""
    import logging

    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    _add_generation_headers()
    _honour_generation_preconditions()
    # The emulator serves one request at a time; tensorstore opens dozens of connections per
    # process at once. With the default listen backlog of 5 the kernel drops the excess and
    # clients back off for seconds to minutes; a deep backlog just queues them.
    http.server.HTTPServer.request_queue_size = 1024
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
    args = parser.parse_args(argv)
    serve(args.port, args.data_dir, args.bucket, args.host)


if __name__ == "__main__":
    main()
