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
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GcsEmulator:
    """A GCS emulator in a child process; in memory unless `data_dir` is given.

    Use as a context manager, or call `start()` / `stop()`.
    """

    def __init__(self, data_dir: str | Path | None = None, port: int | None = None):
        self.data_dir = Path(data_dir).resolve() if data_dir else None
        self.port = port
        self.url: str | None = None
        self._process: subprocess.Popen | None = None

    def start(self) -> str:
        """Start the server and wait until it answers; returns its URL."""
        self.port = self.port or _free_port()
        command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--quiet"]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        env = dict(os.environ)
        if self.data_dir is None:
            command.append("--in-memory")
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            env["STORAGE_BASE"] = str(self.data_dir)
        self._process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_until_serving()
        return self.url

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                stderr = self._process.stderr.read().decode(errors="replace")
                raise RuntimeError(f"GCS emulator exited at start: {stderr.strip()[-500:]}")
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
        if self._process is not None and self._process.stderr:
            self._process.stderr.close()
        self._process = None

    def wait(self) -> None:
        """Block until the server process exits."""
        if self._process is not None:
            self._process.wait()

    def client(self):
        """A real google-cloud-storage client bound to this emulator."""
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="test-project",
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=self.url),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (with the real google-cloud-storage client)."""
        self.client().create_bucket(name)

    def __enter__(self) -> GcsEmulator:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9023)
    parser.add_argument("--data-dir", help="keep objects on disk here (default: in memory)")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create")
    args = parser.parse_args(argv)
    # Turn SIGTERM into a normal exit so the emulator child is stopped with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with GcsEmulator(args.data_dir, args.port) as emulator:
        for bucket in args.bucket:
            emulator.create_bucket(bucket)
        exports = " ".join(f"{k}={v}" for k, v in emulator_env(emulator.url).items())
        print(f"GCS emulator on {emulator.url}; export {exports}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            emulator.wait()


if __name__ == "__main__":
    main()
