"""`tpuctl export`: the trainer's export as a CLI command, same options, same errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from tests.fixtures_hf import save_run
from tests.test_trainer_export import (  # the real checkpoint those tests make
    REPO,
    _hf_tensors,
    _import,
    hf_model_dir,  # noqa: F401 (a fixture)
)


def tpuctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tpuctl", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=180,
    )


def test_tpuctl_export_writes_the_same_directory_as_the_module(hf_model_dir, tmp_path):  # noqa: F811
    model_cfg, params = _import(hf_model_dir)
    save_run(str(tmp_path / "run"), model_cfg, params)
    out = tmp_path / "hf"
    result = tpuctl(
        "export", str(tmp_path / "run"), str(out), "--step", "7", "--max-shard-gb", "0.0001"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"exported step 7 of {tmp_path / 'run'} to {out}"
    original, exported = _hf_tensors(hf_model_dir), _hf_tensors(out)
    assert sorted(exported) == sorted(original)
    assert all(np.array_equal(exported[name], original[name]) for name in original)
    assert (out / "model.safetensors.index.json").is_file()  # --max-shard-gb reached it
    result = tpuctl("export", str(tmp_path / "run"), str(tmp_path / "o"), "--step", "99")
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert "--step 99" in result.stderr and result.stderr.count("\n") == 1
