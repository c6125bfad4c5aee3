"""`train.compile_cache`: a run started again on its run directory loads its compiled
programs from {run_dir}/compile_cache (jax's persistent cache) instead of compiling them."""

from __future__ import annotations

import subprocess
import sys

import jax
import pytest

from tests.fixtures_trainer import TINY_RECIPE, trainer_env
from trainer.compile_cache import cache_dir, enable
from trainer.config import load_recipe

TRAIN_STEP_HIT = "Persistent compilation cache hit for 'jit_train_step'"


def run_tiny(run_dir: str, steps: int, *overrides: str) -> subprocess.CompletedProcess:
    """One process of the tiny recipe, jax's compiler logging on; every compiled program
    cached (however fast this machine compiles it), nothing from the caller's environment."""
    env = trainer_env(
        2,
        JAX_DEBUG_LOG_MODULES="jax._src.compiler",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
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
    names = [b.name for b in gcs.client().list_blobs("test-bucket", prefix="run/compile_cache/")]
    assert any(name.startswith("run/compile_cache/jit_train_step-") for name in names), names
    resumed = run_tiny("gs://test-bucket/run", 3)
    assert "resuming from checkpoint step 2" in resumed.stdout
    assert TRAIN_STEP_HIT in resumed.stderr


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
