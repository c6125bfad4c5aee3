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

import inspect
import os
import sys

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
    jax's way: process 0's entries serve every host there.

    This replaces jax's private `_cache_write` with one that writes as it does, without its
    process-0 check (never by changing jax's process id, which other threads read). A jax
    whose private functions differ keeps its own, and the other processes compile as
    before."""
    import jax

    if jax.process_index() == 0 or jax.default_backend() != "cpu":
        return
    from jax._src import compilation_cache, compiler

    jax_write = getattr(compiler, "_cache_write", None)
    put = getattr(compilation_cache, "put_executable_and_time", None)
    if jax_write is None or put is None:
        return
    signature = inspect.signature(jax_write)
    if not _WRITE_ARGUMENTS.issubset(signature.parameters):
        return

    def write(*args, **kwargs) -> None:
        given = signature.bind(*args, **kwargs).arguments
        min_time_s = jax.config.jax_persistent_cache_min_compile_time_secs
        if given["host_callbacks"] or given["compile_time_secs"] < min_time_s:
            return  # jax keeps neither
        name = given["module_name"]
        try:
            put(
                cache_key=given["cache_key"],
                module_name=name,
                executable=given["executable"],
                backend=given["backend"],
                compile_time=int(given["compile_time_secs"]),
            )
        except Exception as e:  # as jax does: an entry not written costs a compile, not the run
            print(f"trainer: compile cache entry for {name!r} not written: {e}", file=sys.stderr)

    compiler._cache_write = write


# the arguments of jax's _cache_write that `write_from_every_cpu_process` reads
_WRITE_ARGUMENTS = {
    "cache_key",
    "compile_time_secs",
    "module_name",
    "backend",
    "executable",
    "host_callbacks",
}
