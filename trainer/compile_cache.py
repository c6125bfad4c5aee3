"""`train.compile_cache`: jax's persistent compilation cache in {run_dir}/compile_cache.

A run started again on the same run directory (a resume, `tpuctl babysit` relaunching it
after a preemption) loads the programs compiled before instead of compiling them again: on
a TPU pod that is minutes of every restart. jax writes entries from process 0 only and every
process reads them, so the directory must be one that all hosts see, as a gs:// run_dir is
(jax reaches it through etils' epath and gcsfs). On a CPU pod every process writes its own
entries (`write_from_every_cpu_process`). jax caches only programs that took at least
a second to compile (`jax_persistent_cache_min_compile_time_secs`), and a program whose
entry cannot be read is compiled as if there were none. A JAX_COMPILATION_CACHE_DIR set by
the user wins.
"""

from __future__ import annotations

import os

from trainer import io
from trainer.config import Recipe

CACHE_DIR = "compile_cache"


def cache_dir(recipe: Recipe) -> str | None:
    """Where this run's compiled programs are kept, or None when the recipe turns it off
    or the user's environment already chose a place."""
    if not recipe.train.compile_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    return io.join(io.absolute(recipe.run_dir), CACHE_DIR)


def enable(recipe: Recipe) -> None:
    """Point jax at the run's cache; call before anything compiles (jax decides once per
    process, at its first compilation, whether it uses a cache)."""
    path = cache_dir(recipe)
    if path is not None:
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        if io.is_gcs(path):
            # jax also points XLA's own caches (a GPU's autotuning results) under it, and
            # XLA writes those with plain file I/O, which cannot reach gs://
            jax.config.update("jax_persistent_cache_enable_xla_caches", None)


def write_from_every_cpu_process() -> None:
    """On a multi-process CPU run (a local pod), let processes other than 0 write their
    programs to the persistent cache too; call after jax.distributed is up.

    jax writes entries from process 0 only, for all hosts to read. On a CPU the cache key
    holds a topology fingerprint that differs from process to process, so the other
    processes never found an entry and compiled every program at every start: a 4-process
    local run of the tiny recipe took about 35 s to finish, 15 s once each process found its
    own entries. Their keys differ, so no two processes write one entry. TPUs and GPUs keep
    jax's way: process 0's entries serve every host there. A jax without the private
    function this wraps compiles as before."""
    import jax

    if jax.process_index() == 0 or jax.default_backend() != "cpu":
        return
    from jax._src import compiler
    from jax._src import distributed as jax_distributed

    write = getattr(compiler, "_cache_write", None)
    state = jax_distributed.global_state
    if write is None or not hasattr(state, "process_id"):
        return

    def write_as_process_0(*args, **kwargs):  # jax's check is `process_id != 0`: skip it
        process_id, state.process_id = state.process_id, 0
        try:
            return write(*args, **kwargs)
        finally:
            state.process_id = process_id

    compiler._cache_write = write_as_process_0
