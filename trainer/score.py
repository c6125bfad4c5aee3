"""`python -m trainer.score SOURCE DATA [--out SCORES] [--step N] [--recipe RECIPE]`: a reward
model's score of every example in DATA, one JSON line per example, in order.

SOURCE is a reward run's directory (its newest committed checkpoint, or `--step N`) or a
directory `python -m trainer.export` wrote from one (config.json, safetensors, tokenizer);
local or gs://. DATA is any input the trainer reads (a jsonl file, Parquet, `hf:NAME`...).
Examples are rendered as training renders them (trainer.data, trainer.preference): a record
with `chosen` and `rejected` as `data.format: preference` reads it gets
`{"chosen": S, "rejected": S}` (one with only one of them is an error naming the other); any
other gets `{"score": S}`, rendered as chat if it has
`messages`, as prompt + completion if it has `prompt` (or `instruction`), else as text. A score is the score head
at the sequence's final token, as in training and in transformers'
`*ForSequenceClassification`, computed in float32. BOS/EOS and the chat template are the defaults, or `--recipe`'s
`tokenizer.*` and `data.chat_template`. Errors print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator

import numpy as np

from trainer import data, io, preference, sources
from trainer.config import DataConfig, ModelConfig, RecipeError, TokenizerConfig, TrainerError
from trainer.resume import CHECKPOINTS_DIR

BATCH = 16  # sequences scored together


def load_reward_model(source: str, step: int | None = None) -> tuple[ModelConfig, dict, str | None]:
    """(model config, params, tokenizer path) of a reward run's checkpoint or its export."""
    from trainer.checkpoint import load_params, read_model_info
    from trainer.hf import load_hf_dir

    checkpoints = io.join(source, CHECKPOINTS_DIR)
    if io.exists(io.join(source, "config.json")):
        if step is not None:
            raise RecipeError(f"--step: {source} is an exported directory, not a run directory")
        model_cfg, params = load_hf_dir(source, ModelConfig(param_dtype="float32"))
        tokenizer_path: str | None = source
    elif io.exists(checkpoints):
        _, params = load_params(checkpoints, step)
        model_cfg, tokenizer_path = read_model_info(checkpoints)
    else:
        raise RecipeError(
            f"{source}: neither a run directory (no checkpoints/) nor an exported model (no "
            "config.json); give a reward run's run_dir or its export"
        )
    if "score" not in params:
        raise RecipeError(
            f"{source} is a language model, not a reward model (it has no score head); give a "
            "run or export of objective: reward"
        )
    # float32 compute, as transformers scores by default (and not bf16 rounding of the score)
    return dataclasses.replace(model_cfg, dtype="float32"), params, tokenizer_path


def sequences(record: object, tok, cfg: DataConfig, max_len: int) -> dict[str, list[int]]:
    """The token ids to score for one record, by output field: chosen/rejected or score."""
    if isinstance(record, dict) and ("chosen" in record or "rejected" in record):
        # Whole, not fitted to a training budget; a tie or an empty response scores as it is.
        # Half a pair is refused naming the missing side, not read as another format.
        (pc, rc, _), (pr, rr, _) = preference.render_pair(record, tok, cfg)
        named = {"chosen": pc + rc, "rejected": pr + rr}
    else:
        if isinstance(record, dict) and "messages" in record:
            kind = "chat"
        elif isinstance(record, dict) and ("prompt" in record or "instruction" in record):
            kind = "prompt_completion"
        else:
            kind = "text"
        named = {"score": data.tokenize(record, tok, dataclasses.replace(cfg, format=kind))[0]}
    for name, tokens in named.items():
        if len(tokens) > max_len:
            raise RecipeError(
                f"{name}: {len(tokens)} tokens, longer than the model's max_seq_len {max_len}; "
                "shorten the example"
            )
        if not tokens:
            raise RecipeError(f"{name}: the example renders to no tokens")
    return named


def scorer(model_cfg: ModelConfig, params: dict):
    """A function of a list of token id lists to their scores (final-token score head)."""
    import jax
    import jax.numpy as jnp

    from trainer.model import Decoder

    apply = jax.jit(Decoder(model_cfg, "score").apply)

    def score(batch: list[list[int]]) -> list[float]:
        # Right-padded to a power of two (few compilations); causal attention keeps the padding
        # out of every real token's score.
        width = 1 << (max(map(len, batch)) - 1).bit_length()
        tokens = np.zeros((len(batch), width), np.int32)
        for row, ids in zip(tokens, batch, strict=True):
            row[: len(ids)] = ids
        scores = np.asarray(apply({"params": params}, jnp.asarray(tokens)), np.float64)
        return [float(scores[i, len(ids) - 1]) for i, ids in enumerate(batch)]

    return score


def score_file(
    source: str, data_spec: str, step: int | None = None, recipe: str | None = None
) -> Iterator[dict[str, float]]:
    """The scores of each example of `data_spec`, in order (see the module docstring)."""
    from trainer.tokenizer import load_tokenizer

    model_cfg, params, tokenizer_path = load_reward_model(source, step)
    tok_cfg, data_cfg = TokenizerConfig(path=tokenizer_path or ""), DataConfig()
    if recipe is not None:
        from trainer.config import load_recipe

        loaded = load_recipe(recipe)
        tok_cfg = dataclasses.replace(
            loaded.tokenizer, path=tokenizer_path or loaded.tokenizer.path
        )
        data_cfg = loaded.data
    tok = load_tokenizer(tok_cfg)
    score = scorer(model_cfg, params)
    pending: list[dict[str, list[int]]] = []
    plain = not data_spec.startswith(sources.HF_PREFIX) and not io.has_glob(data_spec)
    if plain and not io.exists(data_spec):
        raise RecipeError(f"DATA: {data_spec} does not exist; give a file of examples")
    for unit in sources.expand(data_spec, "DATA"):
        for where, record in sources.read_located(unit):
            try:
                pending.append(sequences(record, tok, data_cfg, model_cfg.max_seq_len))
            except RecipeError as e:
                raise RecipeError(f"{where}: {e}") from None
            if len(pending) >= BATCH:
                yield from _scored(pending, score)
                pending = []
    yield from _scored(pending, score)


def _scored(examples: list[dict[str, list[int]]], score) -> Iterator[dict[str, float]]:
    if not examples:
        return
    flat = [tokens for named in examples for tokens in named.values()]
    scores = iter(score(flat))
    for named in examples:
        yield {name: next(scores) for name in named}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("source", help="a reward run's directory, or its export (local or gs://)")
    parser.add_argument("data", help="examples to score: a jsonl file or any trainer input")
    parser.add_argument("--out", help="write the scores here (default: standard output)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest committed)")
    parser.add_argument("--recipe", help="take tokenizer.* and data.chat_template from it")
    args = parser.parse_args(argv)
    from absl import logging as absl_logging  # orbax's progress chatter is not for this CLI

    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        lines = [json.dumps(s) for s in score_file(args.source, args.data, args.step, args.recipe)]
    except (TrainerError, RecipeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = "".join(line + "\n" for line in lines)
    if args.out:
        try:
            io.write_text(args.out, text)
        except OSError as e:  # a directory, or under a file
            print(f"error: --out {args.out}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"scored {len(lines)} examples into {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
