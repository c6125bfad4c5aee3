"""`python -m trainer.export RUN_DIR OUT_DIR [--step N]`: a checkpoint as a Hugging Face
directory of its family (config.json with its model_type and architectures, safetensors shards
with its tensor names, the tokenizer's files) that `AutoModelForCausalLM.from_pretrained` loads;
a reward model's (a `score` head) as its *ForSequenceClassification with one label.

RUN_DIR and OUT_DIR may be local or gs://. Only the parameters are read, on this host's CPU,
whatever mesh saved them. Errors print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from trainer import io
from trainer.config import ModelConfig, RecipeError, TrainerError
from trainer.tokenizer import tokenizer_files

DEFAULT_SHARD_BYTES = 2 * 1024**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def shard_tensors(
    tensors: dict[str, np.ndarray], max_shard_bytes: int
) -> list[dict[str, np.ndarray]]:
    """Split tensors (in name order) into groups of at most `max_shard_bytes` (a single larger
    tensor gets a group of its own)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    return shards


def write_hf_dir(
    out_dir: str,
    tensors: dict[str, np.ndarray],
    hf_config: dict,
    tokenizer_path: str | None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Write config.json, safetensors shards (+ index when more than one) and the files of the
    tokenizer at `tokenizer_path` into a local directory; returns the file names written."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    shards = shard_tensors(tensors, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    written = list(names)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
            "weight_map": {
                t: name for name, shard in zip(names, shards, strict=True) for t in shard
            },
        }
        _write_json(os.path.join(out_dir, INDEX_FILE), index)
        written.append(INDEX_FILE)
    _write_json(os.path.join(out_dir, "config.json"), hf_config)
    written.append("config.json")
    for source in tokenizer_files(tokenizer_path) if tokenizer_path else []:
        name = source.rsplit("/", 1)[-1]
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(io.read_bytes(source))
        written.append(name)
    return written


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def export(
    run_dir: str,
    out_dir: str,
    step: int | None = None,
    recipe: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> int:
    """Export the checkpoint at `step` (default: newest committed) of `run_dir` to `out_dir`;
    the model config comes from the run's checkpoints, or from `recipe` when given. Returns
    the step exported."""
    from trainer.checkpoint import load_params
    from trainer.hf import hf_config_from_model, params_to_hf

    checkpoints = io.join(run_dir, "checkpoints")
    step, params = load_params(checkpoints, step)
    model_cfg, tokenizer_path = _model_and_tokenizer(checkpoints, recipe)
    tensors = params_to_hf(params, model_cfg)
    hf_config = hf_config_from_model(model_cfg, score_head="score" in params)
    if not io.is_gcs(out_dir):
        write_hf_dir(out_dir, tensors, hf_config, tokenizer_path, max_shard_bytes)
        return step
    with tempfile.TemporaryDirectory(prefix="trainer-export-") as staging:
        write_hf_dir(staging, tensors, hf_config, tokenizer_path, max_shard_bytes)
        io.copy_tree(staging, out_dir)
    return step


def _model_and_tokenizer(checkpoints: str, recipe: str | None) -> tuple[ModelConfig, str | None]:
    from trainer.checkpoint import read_model_info

    if recipe is None:
        return read_model_info(checkpoints)
    from trainer.config import load_recipe

    loaded = load_recipe(recipe)
    return loaded.model, loaded.tokenizer.path or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__)
    parser.add_argument("run_dir", help="the run directory (local or gs://)")
    parser.add_argument("out_dir", help="where to write the Hugging Face directory")
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest committed)")
    parser.add_argument(
        "--recipe", help="take the model config from this recipe (runs that did not record it)"
    )
    parser.add_argument(
        "--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1024**3, help="per file"
    )
    args = parser.parse_args(argv)
    from absl import logging as absl_logging  # orbax's progress chatter is not for this CLI

    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        step = export(
            args.run_dir, args.out_dir, args.step, args.recipe, int(args.max_shard_gb * 1024**3)
        )
    except (TrainerError, RecipeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {args.run_dir} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
