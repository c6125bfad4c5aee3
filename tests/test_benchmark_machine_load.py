"""benchmarks/machine_load.py: a benchmark warns when other work loads the machine before
its run, and only then (its own processes load the machine during and after it)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def machine_load():
    spec = importlib.util.spec_from_file_location(
        "machine_load", REPO / "benchmarks" / "machine_load.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("load", "warned"), [(0.4, False), (2.0, False), (2.6, True)])
def test_a_busy_machine_before_the_run_is_warned_of(
    machine_load, monkeypatch, capsys, load, warned
):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 1.0, 0.5))
    assert machine_load.before_run() == [load, 1.0, 0.5]
    warning = capsys.readouterr().err
    assert ("warning: load average" in warning) == warned
    assert not warned or "rerun once the load average is under 2" in warning


def test_the_load_after_the_run_is_recorded_without_a_warning(machine_load, monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (180.0, 60.0, 20.0))  # its own 128 hosts
    assert machine_load.after_run() == [180.0, 60.0, 20.0]
    assert capsys.readouterr().err == ""
