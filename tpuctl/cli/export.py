"""`tpuctl export RUN_DIR OUT_DIR`: a run's checkpoint as a Hugging Face model directory.

The same command as `python -m trainer.export`, with the same options; the trainer (and
jax) load only when it runs, so the rest of the CLI stays fast.
"""

from __future__ import annotations

import typer

from tpuctl.cli.app import app
from tpuctl.errors import TpuctlError

TRAINER_MISSING = (
    "tpuctl export needs the trainer's libraries (jax, orbax, safetensors): "
    "pip install -e '.[trainer]'"
)


@app.command()
def export(
    run_dir: str = typer.Argument(..., help="The run directory (local or gs://)."),
    out_dir: str = typer.Argument(..., help="Where to write the Hugging Face directory."),
    step: int | None = typer.Option(None, "--step", help="Checkpoint step (default: newest)."),
    recipe: str | None = typer.Option(
        None,
        "--recipe",
        help="Take the model config from this recipe (runs that did not record it).",
    ),
    max_shard_gb: float | None = typer.Option(
        None, "--max-shard-gb", help="Largest safetensors file (default: the trainer's, 2)."
    ),
) -> None:
    """Export a checkpoint (parameters only, read on this machine's CPU, whatever mesh saved
    them) in its family's Hugging Face format: config.json, generation_config.json,
    safetensors shards and the tokenizer's files, which
    `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads."""
    try:
        from trainer import export as trainer_export
    except ImportError:
        raise TpuctlError(TRAINER_MISSING) from None
    args = [run_dir, out_dir]
    args += ["--max-shard-gb", str(max_shard_gb)] if max_shard_gb is not None else []
    args += ["--step", str(step)] if step is not None else []
    args += ["--recipe", recipe] if recipe else []
    code = trainer_export.main(args)
    if code:
        raise typer.Exit(code)
