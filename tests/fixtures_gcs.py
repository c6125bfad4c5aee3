"""The `gcs` fixture: a real GCS emulator (gcp-storage-emulator) for each test that asks."""

from __future__ import annotations

import pytest

from tpuctl.gcs_emulator import GcsEmulator, emulator_env


@pytest.fixture
def gcs(monkeypatch):
    """A running emulator with a bucket `test-bucket`; `STORAGE_EMULATOR_HOST` (and the
    tensorstore/gcsfs settings) point at it for this process and its children."""
    with GcsEmulator() as emulator:
        for name, value in emulator_env(emulator.url).items():
            monkeypatch.setenv(name, value)
        emulator.create_bucket("test-bucket")
        yield emulator
