"""Whether a recipe may resume a run's checkpoints, without jax or orbax: the refusals the
trainer makes before it loads a checkpoint (`trainer.checkpoint.Checkpointer.restore`), which
`tpuctl run` makes too, before it stores a recipe, for a run directory it can read.

A run's record is `checkpoints/model.json` beside the step directories: the model config, the
objective and the settings it last started with (`run_record`). Refused, in one line naming
the run's setting and the recipe's: another objective (its step count and optimizer state
would carry on under a different loss), another optimizer.name (its optimizer state does not
load into another optimizer's) and another model.init_from (a resume takes its weights from
the checkpoint, so the change would do nothing but change a DPO run's reference).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from trainer import io
from trainer.config import (
    ModelConfig,
    OptimizerConfig,
    Recipe,
    TrainerError,
    absolute_path,
    with_absolute_paths,
)
from trainer.contract import EXIT_BAD_INPUT

CHECKPOINTS_DIR = "checkpoints"  # in the run_dir: the step directories and the records below
MODEL_INFO_FILE = "model.json"  # beside the step directories: what export needs to know
# What orbax writes last into a step directory on gs:// (there is no atomic rename there):
# without it the step is not committed. Locally a step directory is renamed to its step once
# committed, from a temporary name that is no number.
_GCS_COMMIT_FILE = "commit_success.txt"
# The recipe settings besides the model's that a resume may change (it prints which did), as
# model.json records them; the others (mesh, eval, logging, checkpoint, data caching) change
# nothing a run computes. objective.name and optimizer.name are refused instead: the step
# count and optimizer state would carry on under another loss, or not load.
RESUME_SETTINGS = {
    "train": ("steps", "epochs", "batch_size", "seq_len", "grad_accum", "seed"),
    "optimizer": tuple(f.name for f in dataclasses.fields(OptimizerConfig)),
    "objective": ("name", "beta", "loss", "label_smoothing", "gamma", "reference"),
    "data": ("train", "eval", "format", "text_field", "chat_template"),
    "tokenizer": ("path", "add_bos", "add_eos"),
}
EXPORT_HINT = (
    "(to start from that run's weights, export them with `python -m trainer.export` and set "
    "model.init_from to the export)"
)


class CheckpointError(TrainerError):
    """A checkpoint is missing or cannot be used; the message says which one and what to do.
    `status`: EXIT_BAD_INPUT when another launch would fail alike (a checkpoint of another
    model), EXIT_CHECKPOINT_IO when storage failed to read it (a relaunch may well succeed)."""

    def __init__(self, message: str, status: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.status = status


def run_record(
    model: ModelConfig,
    tokenizer_path: str | None = None,
    objective: str | None = None,
    generation: dict | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of a run started with these (model.json's content): local paths absolute,
    since export runs from anywhere, not only where the trainer was started."""
    tokenizer = io.absolute(tokenizer_path) if tokenizer_path else None
    init_from = absolute_path(model.init_from) if model.init_from else None
    model_record = dataclasses.asdict(dataclasses.replace(model, init_from=init_from))
    record = {"model": model_record, "tokenizer": tokenizer}
    record |= {"objective": objective} if objective else {}
    record |= {"generation": generation} if generation else {}
    return record | ({"settings": settings} if settings else {})


def recipe_record(recipe: Recipe) -> dict[str, Any]:
    """What the trainer records for `recipe` as far as the refusals compare it: its model
    config, objective and resume settings (not its tokenizer or generation settings)."""
    recipe = with_absolute_paths(recipe)
    return run_record(
        recipe.model, objective=recipe.objective.name, settings=resume_settings(recipe)
    )


def resume_settings(recipe: Recipe) -> dict[str, Any]:
    """`recipe`'s RESUME_SETTINGS by dotted key, as JSON holds them, with local paths absolute
    (tpuctl launches a run with absolute ones: by hand and by tpuctl are the same run)."""
    recipe = with_absolute_paths(recipe)
    settings: dict[str, Any] = {}
    for section, keys in RESUME_SETTINGS.items():
        values = dataclasses.asdict(getattr(recipe, section))
        settings |= {f"{section}.{key}": values[key] for key in keys}
    for split in ("data.train", "data.eval"):  # entries without their unset fields: shorter lines
        settings[split] = [{k: v for k, v in e.items() if v is not None} for e in settings[split]]
    return json.loads(json.dumps(settings))  # tuples as lists: as a record read back compares


def check_resumable(directory: str, ours: dict, theirs: dict, step: int) -> None:
    """Refuse to resume the run whose checkpoints in `directory` (newest committed `step`)
    `theirs` records (its model.json) with a recipe recorded as `ours` (`run_record`); an
    empty record on either side compares nothing."""
    where = f"{directory} holds checkpoints of"
    if ours.get("objective") and theirs.get("objective") not in (None, ours["objective"]):
        raise CheckpointError(
            f"{where} an objective '{theirs['objective']}' run (newest step {step}) and this "
            f"recipe's objective is '{ours['objective']}': set a new run_dir {EXPORT_HINT}"
        )
    name = ours.get("settings", {}).get("optimizer.name")
    saved = theirs.get("settings", {}).get("optimizer.name")
    if name and saved not in (None, name):
        raise CheckpointError(
            f"{where} an optimizer.name '{saved}' run (newest step {step}) and this recipe's "
            f"optimizer.name is '{name}', whose optimizer state is another: set "
            f"optimizer.name={saved} to resume it, or a new run_dir {EXPORT_HINT}"
        )
    if ours and theirs:
        _check_init_from(
            directory, ours["model"]["init_from"], theirs["model"].get("init_from"), step
        )


def _check_init_from(directory: str, ours: str | None, saved: str | None, step: int) -> None:
    if (absolute_path(saved) if saved else None) == ours:
        return
    back = f"set model.init_from={saved}" if saved else "drop model.init_from"
    start = f"from {ours}" if ours else "from fresh weights"
    raise CheckpointError(
        f"{directory} holds checkpoints of a run started from model.init_from "
        f"{saved or 'none (fresh weights)'} (newest step {step}) and this recipe's "
        f"model.init_from is {ours or 'none'}: a resume takes its weights from its "
        f"checkpoint; {back} to resume it, or set a new run_dir to start {start}"
    )


def check_recipe(recipe: Recipe) -> None:
    """Refuse `recipe` for the run in its run_dir as the trainer would before loading the
    newest committed checkpoint there (none: nothing to refuse), reading the run directory
    from this process."""
    directory = io.join(absolute_path(recipe.run_dir), CHECKPOINTS_DIR)
    step = newest_step(directory)
    if step is not None:
        check_resumable(directory, recipe_record(recipe), recorded_info(directory) or {}, step)


def newest_step(directory: str) -> int | None:
    """The newest committed step in checkpoint `directory`, as orbax tells it (see
    _GCS_COMMIT_FILE), or None: no such directory, or no committed step in it."""
    try:
        names = io.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return None
    steps = sorted((int(n) for n in names if n.isascii() and n.isdigit()), reverse=True)
    for step in steps:
        if not io.is_gcs(directory) or io.exists(io.join(directory, str(step), _GCS_COMMIT_FILE)):
            return step
    return None


def recorded_info(directory: str) -> dict | None:
    """What a Checkpointer recorded beside the checkpoints in `directory`, None if nothing."""
    path = io.join(directory, MODEL_INFO_FILE)
    if not io.exists(path):
        return None
    try:
        info = json.loads(io.read_text(path))
    except ValueError:
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("model"), dict):
        raise CheckpointError(
            f"{path} is not the model record the trainer writes (cut short, or edited): "
            "restore it from a copy, or delete it and pass the recipe the run trained with"
        )
    return info
