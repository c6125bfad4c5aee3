"""`python -m trainer RECIPE [key=value ...]`: validate the recipe, join the pod, train.

Recipe problems print one `error: ...` line and exit 2 (EXIT_BAD_INPUT); a pod whose processes
did not all join exits 69 (EXIT_PEER_LOST), with the line naming the missing ones; a run whose
loss or gradient norm stops being finite exits 65 (EXIT_DIVERGED) with a line naming the step
and the newest checkpoint, saved before it.
A process that fails before it joined the pod ends the processes waiting for it at once, and
after joining, a recipe problem ends every process at once with its line and exit 2, any
other failure within about a minute (trainer.distributed).
"""

from __future__ import annotations

import os
import sys

from trainer import distributed, preemption
from trainer.config import RecipeError, TrainerError, load_recipe
from trainer.contract import EXIT_BAD_INPUT

USAGE = """usage: python -m trainer RECIPE [key=value ...]

RECIPE is a YAML file (local path or gs:// URI); overrides use dotted keys,
e.g. train.steps=200 optimizer.lr=1e-5 run_dir=gs://bucket/runs/x"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else EXIT_BAD_INPUT
    # First: a SIGTERM while reading the recipe or importing jax ends the start-up as one
    # while joining or compiling does (exit 75, resumable), not the process by the signal.
    preemption.watch()
    preemption.while_starting(distributed.stop_while_starting)
    try:
        recipe = load_recipe(args[0], args[1:])
        for name, value in recipe.env.items():  # before jax starts, so LIBTPU_INIT_ARGS etc. apply
            if value is not None:  # a name only: tpuctl passed the value in the environment
                os.environ.setdefault(name, value)
        from trainer import compile_cache

        distributed.provide_cpu_devices(recipe.mesh)
        compile_cache.enable(recipe)
        distributed.initialize()
    except Exception as e:  # the others may be waiting for this process to join: tell them
        return distributed.failed_before_joining(e)
    try:
        compile_cache.write_from_every_cpu_process()
        from trainer.train import train

        try:
            status = train(recipe)
            distributed.finish()
            return status
        except (RecipeError, TrainerError):
            raise
        except Exception as e:
            distributed.crash(e)
    except (RecipeError, TrainerError, ImportError) as e:
        return distributed.failed_after_joining(e)


if __name__ == "__main__":
    sys.exit(main())
