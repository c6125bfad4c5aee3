"""`python -m trainer.export RUN_DIR OUT_DIR [--step N]`: a checkpoint as a Hugging Face
directory of its family (config.json with its model_type and architectures,
generation_config.json with the run's stop tokens (trainer.generation), safetensors shards
with its tensor names, the tokenizer's files with the chat template the run trained on) that
`AutoModelForCausalLM.from_pretrained` loads; a reward model's (a `score` head) as its
*ForSequenceClassification with one label.

RUN_DIR and OUT_DIR may be local or gs://. Only the parameters are read, on this host's CPU,
whatever mesh saved them. Errors print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import tempfile

import numpy as np

from trainer import generation, io
from trainer.config import ModelConfig, RecipeError, TrainerError
from trainer.hf import GENERATION_CONFIG
from trainer.resume import CHECKPOINTS_DIR
from trainer.tokenizer import (
    CHAT_TEMPLATE_FILE,
    CONFIG_FILES,
    SENTENCEPIECE_MODEL,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    load_tokenizer,
    tokenizer_files,
)

DEFAULT_SHARD_BYTES = 2 * 1024**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Every file an export may write: what a previous export left in OUT_DIR and this one did
# not write is removed.
EXPORT_FILE = re.compile(
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json"
    rf"|{re.escape(GENERATION_CONFIG)}"
    rf"|{re.escape(TOKENIZER_JSON)}|{re.escape(SENTENCEPIECE_MODEL)}"
    + "".join(f"|{re.escape(name)}" for name in CONFIG_FILES)
)


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
    generation_config: dict | None = None,
    chat_template: str | None = None,
) -> list[str]:
    """Write config.json, generation_config.json (when given), safetensors shards (+ index
    when more than one) and the files of the tokenizer at `tokenizer_path` into a local
    directory, with `chat_template` (when given) as the tokenizer's; returns the file names
    written. The tokenizer's model file is written under the name transformers looks for
    (tokenizer.json or tokenizer.model), whatever it was called."""
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
    if generation_config is not None:
        _write_json(os.path.join(out_dir, GENERATION_CONFIG), generation_config)
        written.append(GENERATION_CONFIG)
    files = tokenizer_files(tokenizer_path) if tokenizer_path else []
    for i, source in enumerate(files):
        name = source.rsplit("/", 1)[-1]
        if i == 0:  # the model file: a tokenizer.json by another name is still one
            name = SENTENCEPIECE_MODEL if name.endswith(".model") else TOKENIZER_JSON
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(io.read_bytes(source))
        written.append(name)
    if SENTENCEPIECE_MODEL in written and TOKENIZER_CONFIG not in written:
        _write_json(os.path.join(out_dir, TOKENIZER_CONFIG), _sentencepiece_config(tokenizer_path))
        written.append(TOKENIZER_CONFIG)
    if chat_template is not None:
        _write_chat_template(out_dir, chat_template, written)
    return written


def _write_chat_template(out_dir: str, template: str, written: list[str]) -> None:
    """Make `template` the exported tokenizer's chat template: chat_template.jinja (where
    transformers 5 reads it first) and, in a tokenizer_config.json, its `chat_template` (where
    transformers 4 reads it), so that no reader finds the template the source came with."""
    with open(os.path.join(out_dir, CHAT_TEMPLATE_FILE), "w") as f:
        f.write(template)
    if CHAT_TEMPLATE_FILE not in written:
        written.append(CHAT_TEMPLATE_FILE)
    if TOKENIZER_CONFIG in written:
        path = os.path.join(out_dir, TOKENIZER_CONFIG)
        with open(path) as f:
            config = json.load(f)
        _write_json(path, config | {"chat_template": template})


def _sentencepiece_config(tokenizer_path: str) -> dict:
    """A tokenizer_config.json for a bare tokenizer.model: transformers reads one alone as a
    tokenizer that adds no BOS, though the trainer put one before every example. It names no
    tokenizer class: as LlamaTokenizer, transformers would place "▁" otherwise than the
    sentencepiece the trainer ran (none after a special token, none before a leading space);
    without one, it converts the model to tokenise as sentencepiece does."""
    from trainer.config import TokenizerConfig

    tokenizer = load_tokenizer(TokenizerConfig(path=tokenizer_path))
    return {
        "add_bos_token": tokenizer.bos_id is not None,
        "add_eos_token": False,  # generation ends at EOS; the prompt does not
        "legacy": True,  # a dummy prefix after each special token, as sentencepiece
        **tokenizer.special_tokens,
    }


def replace_export(staging: str, out_dir: str, written: list[str]) -> None:
    """Move the export staged in `staging` into `out_dir` (local or gs://), then remove what
    a previous export left there and this one did not write: transformers would load a stale
    model.safetensors before the new shards' index, or an old tokenizer.json before a new
    tokenizer.model. Other files in `out_dir` are left alone."""
    for name in written:
        io.publish(os.path.join(staging, name), io.join(out_dir, name))
    for name in io.listdir(out_dir):
        if name not in written and EXPORT_FILE.fullmatch(name):
            io.remove(io.join(out_dir, name))


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

    checkpoints = io.join(run_dir, CHECKPOINTS_DIR)
    step, params = load_params(checkpoints, step)
    model_cfg, tokenizer_path, recorded = _run_description(checkpoints, recipe)
    _check_fits(params, model_cfg, "--recipe" if recipe else "the run's recorded model")
    tensors = params_to_hf(params, model_cfg)
    score_head = "score" in params
    hf_config, generation_config = generation.export_configs(
        hf_config_from_model(model_cfg, score_head=score_head),
        _special_token_ids(tokenizer_path) if tokenizer_path else {},
        recorded,
        can_generate=not score_head,
    )
    # Staged first: OUT_DIR may hold the tokenizer being exported (a run fine-tuned from an
    # earlier export), which writing in place would empty before reading it.
    # A local export is staged inside OUT_DIR, so that its files move in without a copy.
    io.makedirs(out_dir)
    near = None if io.is_gcs(out_dir) else out_dir
    with tempfile.TemporaryDirectory(prefix=".export-", dir=near) as staging:
        written = write_hf_dir(
            staging,
            tensors,
            hf_config,
            tokenizer_path,
            max_shard_bytes,
            generation_config,
            recorded.get("chat_template"),
        )
        replace_export(staging, out_dir, written)
    return step


def _check_fits(params: dict, model_cfg: ModelConfig, source: str) -> None:
    """Refuse a model config whose parameters are not the checkpoint's (a recipe for another
    size would write a model that does not load, or silently drop layers)."""
    import jax

    from trainer.model import init_params

    head = "score" if "score" in params else "lm"
    expected = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0), head=head))
    want = {
        jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)
    }
    got = {
        jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    for name in sorted(want.keys() | got.keys()):
        if want.get(name) != got.get(name):
            raise RecipeError(
                f"{source}: its model does not match the checkpoint's parameters: {name} is "
                f"{got.get(name, 'missing')} in the checkpoint and {want.get(name, 'missing')} "
                "for the model; pass the recipe the run trained with"
            )


def _special_token_ids(tokenizer_path: str) -> dict[str, int]:
    """The tokenizer's bos/eos token ids, for config.json: the config class's defaults are
    not this tokenizer's, and generate() stops at its EOS."""
    from trainer.config import TokenizerConfig

    tokenizer = load_tokenizer(TokenizerConfig(path=tokenizer_path))
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return {key: value for key, value in ids.items() if value is not None}


def _run_description(checkpoints: str, recipe: str | None) -> tuple[ModelConfig, str | None, dict]:
    """The model config, tokenizer path and generation settings (trainer.generation) the run
    recorded, or those of `recipe`."""
    from trainer.checkpoint import read_generation_info, read_model_info

    if recipe is None:
        return *read_model_info(checkpoints), read_generation_info(checkpoints)
    from trainer.config import load_recipe

    loaded = load_recipe(recipe)
    return loaded.model, loaded.tokenizer.path or None, generation.record(loaded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__)
    parser.add_argument("run_dir", help="the run directory (local or gs://)")
    parser.add_argument("out_dir", help="where to write the Hugging Face directory")
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest committed)")
    parser.add_argument(
        "--recipe", help="take the model config from this recipe (runs that did not record it)"
    )
    parser.add_argument(
        "--max-shard-gb", type=_positive_gb, default=DEFAULT_SHARD_BYTES / 1024**3, help="per file"
    )
    args = parser.parse_args(argv)
    from absl import logging as absl_logging  # orbax's progress chatter is not for this CLI

    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # its retries' tracebacks: one line
    try:
        step = export(
            args.run_dir, args.out_dir, args.step, args.recipe, int(args.max_shard_gb * 1024**3)
        )
    except (TrainerError, RecipeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # OUT_DIR a file or not writable, RUN_DIR's bucket unreachable
        where = e.filename or f"{args.run_dir} to {args.out_dir}"
        print(f"error: cannot export {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {args.run_dir} to {args.out_dir}")
    return 0


def _positive_gb(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value * 1024**3 >= 1):
        raise argparse.ArgumentTypeError(f"{text}: give a size in GB above 0, e.g. 2 or 0.5")
    return value


if __name__ == "__main__":
    sys.exit(main())
