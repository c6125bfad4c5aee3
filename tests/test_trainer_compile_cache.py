"""`train.compile_cache`: a run started again on its run directory loads its compiled
programs from {run_dir}/compile_cache (jax's persistent cache) instead of compiling them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import pytest

from tests.fixtures_trainer import (
    REPO,
    TINY_RECIPE,
    assert_all_exited_0,
    launch_trainer,
    trainer_env,
    wait_all,
)
from trainer.compile_cache import cache_dir, enable
from trainer.config import load_recipe

TRAIN_STEP_HIT = "Persistent compilation cache hit for 'jit_train_step'"
# jax's compiler logging on; every compiled program cached, however fast this machine
# compiles it
COMPILER_LOGGING = {
    "JAX_DEBUG_LOG_MODULES": "jax._src.compiler",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}


def run_tiny(run_dir: str, steps: int, *overrides: str) -> subprocess.CompletedProcess:
    """One process of the tiny recipe (COMPILER_LOGGING), nothing from the caller's
    environment."""
    env = trainer_env(2, **COMPILER_LOGGING)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    args = [f"run_dir={run_dir}", f"train.steps={steps}", "eval.every_steps=0", *overrides]
    command = [sys.executable, "-m", "trainer", str(TINY_RECIPE), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow  # two tiny runs
def test_a_resumed_gs_run_loads_its_train_step_from_the_run_directory(gcs):
    first = run_tiny("gs://test-bucket/run", 2)
    assert TRAIN_STEP_HIT not in first.stderr
    # tensorstore looked for gcloud credentials the emulator needs none of, and logged an error
    assert "Could not find the credentials" not in first.stdout + first.stderr
    names = [b.name for b in gcs.client().list_blobs("test-bucket", prefix="run/compile_cache/")]
    assert any(name.startswith("run/compile_cache/jit_train_step-") for name in names), names
    resumed = run_tiny("gs://test-bucket/run", 3)
    assert "resuming from checkpoint step 2" in resumed.stdout
    assert TRAIN_STEP_HIT in resumed.stderr


def run_tiny_pod(run_dir: Path, steps: int, monkeypatch) -> list[str]:
    """The tiny recipe on 2 jax.distributed CPU processes (COMPILER_LOGGING); their outputs."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    args = [str(TINY_RECIPE), f"run_dir={run_dir}", f"train.steps={steps}", "eval.every_steps=0"]
    results = wait_all(launch_trainer(args, 2, 1, REPO, **COMPILER_LOGGING), timeout=600)
    assert_all_exited_0(results)
    return [output for _, output in results]


@pytest.mark.slow  # two 2-process tiny runs
def test_every_process_of_a_cpu_pod_loads_its_train_step_when_the_run_starts_again(
    tmp_path, monkeypatch
):
    """On a CPU each process has a key of its own, and jax writes only process 0's entries:
    the other processes compiled again at every start until they wrote theirs too."""
    run_tiny_pod(tmp_path / "run", 1, monkeypatch)
    entries = list((tmp_path / "run" / "compile_cache").glob("jit_train_step-*"))
    assert len(entries) == 2, entries  # one for each process
    outputs = run_tiny_pod(tmp_path / "run", 2, monkeypatch)
    assert "resuming from checkpoint step 1" in outputs[0]  # process 0 logs the run
    for output in outputs:
        assert TRAIN_STEP_HIT in output
        assert "PERSISTENT COMPILATION CACHE MISS for 'jit_train_step'" not in output


@pytest.mark.slow  # a tiny run
def test_compile_cache_false_leaves_no_cache_in_the_run_directory(tmp_path):
    run_tiny(str(tmp_path / "run"), 1, "train.compile_cache=false")
    assert (tmp_path / "run" / "DONE").exists()
    assert not (tmp_path / "run" / "compile_cache").exists()


def test_the_cache_is_in_the_run_directory_unless_turned_off_or_placed_by_the_user(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    recipe = lambda *o: load_recipe(str(TINY_RECIPE), ["run_dir=runs/a", *o])  # noqa: E731
    assert cache_dir(recipe()) == str(tmp_path / "runs" / "a" / "compile_cache")
    gs = load_recipe(str(TINY_RECIPE), ["run_dir=gs://b/runs/a"])
    assert cache_dir(gs) == "gs://b/runs/a/compile_cache"
    assert cache_dir(recipe("train.compile_cache=false")) is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    assert cache_dir(recipe()) is None


def test_a_gs_cache_holds_jax_executables_not_xla_file_caches(monkeypatch):
    """XLA's own caches (GPU autotuning) are local files: never under a gs:// directory."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_enable_xla_caches")
    before = {name: getattr(jax.config, name) for name in names}
    try:
        enable(load_recipe(str(TINY_RECIPE), ["run_dir=gs://b/run"]))
        assert jax.config.jax_compilation_cache_dir == "gs://b/run/compile_cache"
        assert jax.config.jax_persistent_cache_enable_xla_caches is None
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
