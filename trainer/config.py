"""Recipes: one YAML file describes a training run.

This module imports no jax: tpuctl validates recipes on the user's machine with it before
anything is launched. `load_recipe` parses YAML, applies dotted `key=value` overrides, checks
every key and type against the dataclasses below and raises `RecipeError` with one line naming
the key and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from trainer import io, yaml_input
from trainer.models import FAMILIES


class RecipeError(ValueError):
    """A recipe problem, described in one line that names the key and the fix."""


class TrainerError(RuntimeError):
    """A run-time failure (e.g. a pod started on only some workers), in one line."""


MESH_AXES = ("data", "fsdp", "tensor")
MIXTURE_BLOCK = 1 << 16  # rows per weighted block (trainer.mixture): the weights' resolution


@dataclass(frozen=True)
class ModelConfig:
    """Decoder family and dimensions. `preset` fills the ones you leave out; `init_from` sets
    them all from the checkpoint's config.json."""

    preset: str | None = None
    init_from: str | None = None  # a Hugging Face model directory (config.json + safetensors)
    family: str = "llama"  # llama | qwen2 | mistral | olmo2 (python -m trainer.models)
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    mlp_dim: int = 11008
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_scaling: str | None = None  # "llama3": Llama 3.1/3.2 frequency-dependent scaling
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    sliding_window: int | None = (
        None  # mistral: each token sees at most this many (itself included)
    )
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights and optimizer state
    # what each layer keeps for the backward pass (REMAT_POLICIES); true = full, false = none
    remat: bool | str = "none"
    # auto: splash kernel on TPU, cuDNN flash attention on GPU (bf16/fp16), chunked on CPU
    attention: str = "auto"  # auto | xla | cudnn | splash | chunked
    # the chunked path's query chunk (skips the masked key blocks); 0: one whole-sequence call
    attention_chunk: int = 128
    scan_unroll: int = 1  # layers per iteration of the layer scan (n_layers: no loop at all)
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def remat_policy(self) -> str:
        """`remat` as a policy name: true and false are full and none."""
        if isinstance(self.remat, bool):
            return "full" if self.remat else "none"
        return self.remat

    @property
    def qkv_bias(self) -> bool:
        return FAMILIES[self.family].qkv_bias

    @property
    def qk_norm(self) -> bool:
        return FAMILIES[self.family].qk_norm

    @property
    def post_norms(self) -> bool:
        return FAMILIES[self.family].post_norms


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=192,
                 max_seq_len=512),
    "llama-1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                     mlp_dim=5632, max_seq_len=2048),
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, mlp_dim=11008,
                      max_seq_len=4096),
    "llama2-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, mlp_dim=13824,
                       max_seq_len=4096),
    "llama2-70b": dict(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       mlp_dim=28672, max_seq_len=4096),
    "llama3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        mlp_dim=14336, max_seq_len=131072, rope_theta=500000.0,
                        rope_scaling="llama3", rope_factor=8.0),
    "llama3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        mlp_dim=8192, max_seq_len=131072, rope_theta=500000.0,
                        rope_scaling="llama3", rope_factor=32.0, tie_embeddings=True),
    "llama3.2-3b": dict(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8,
                        mlp_dim=8192, max_seq_len=131072, rope_theta=500000.0,
                        rope_scaling="llama3", rope_factor=32.0, tie_embeddings=True),
    "qwen2.5-0.5b": dict(family="qwen2", vocab_size=151936, dim=896, n_layers=24, n_heads=14,
                         n_kv_heads=2, mlp_dim=4864, max_seq_len=32768, rope_theta=1000000.0,
                         norm_eps=1e-6, tie_embeddings=True),
    "qwen2.5-7b": dict(family="qwen2", vocab_size=152064, dim=3584, n_layers=28, n_heads=28,
                       n_kv_heads=4, mlp_dim=18944, max_seq_len=32768, rope_theta=1000000.0,
                       norm_eps=1e-6),
    "mistral-7b": dict(family="mistral", vocab_size=32768, dim=4096, n_layers=32, n_heads=32,
                       n_kv_heads=8, mlp_dim=14336, max_seq_len=32768, rope_theta=1000000.0),
    "olmo2-7b": dict(family="olmo2", vocab_size=100352, dim=4096, n_layers=32, n_heads=32,
                     mlp_dim=11008, max_seq_len=4096, rope_theta=500000.0, norm_eps=1e-6),
}  # fmt: skip


@dataclass(frozen=True)
class TokenizerConfig:
    # a sentencepiece tokenizer.model, a Hugging Face tokenizer.json, or a directory holding one
    # (local or gs://); empty: model.init_from's directory (trainer/tokenizer.py)
    path: str = ""
    add_bos: bool = True
    add_eos: bool = True


@dataclass(frozen=True)
class DatasetConfig:
    """One entry of data.train / data.eval: its inputs and, in a mixture, how much of it to use.

    A recipe may write an entry as a bare path string. `weight`: the share of batch rows drawn
    from it (every entry then needs one). `fraction` / `size`: a fresh random subset of that
    share / that many of its rows in every epoch. None of them: all of its rows every epoch.
    """

    path: list[str]  # files, globs, save_to_disk directories, hf:NAME[/CONFIG][:SPLIT]
    weight: float | None = None
    fraction: float | None = None
    size: int | None = None
    name: str | None = None  # in the build summary; default: the first path


@dataclass(frozen=True)
class DataConfig:
    train: list[DatasetConfig] = field(default_factory=list)
    eval: list[DatasetConfig] = field(default_factory=list)
    format: str = "text"  # text | chat | prompt_completion | preference
    text_field: str = "text"
    # chat: tulu | llama3 | chatml | a Jinja FILE; default the tokenizer's own, else tulu
    chat_template: str | None = None
    cache_dir: str | None = None  # default: {run_dir}/data_cache
    cache_memory_mb: int = 1024  # rows buffered while building the cache, over all its workers
    cache_workers: int = 0  # tokenising processes per host; 0: one per core


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; one axis may be -1, meaning "the rest of the devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # adamw | adafactor | lion
    lr: float = 3e-4
    end_lr: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = None  # optimizer updates; or give `epochs`
    epochs: float | None = None
    batch_size: int = 8  # global sequences per optimizer update
    seq_len: int = 2048
    grad_accum: int = 1  # micro-batches per update (scanned inside the jitted step)
    seed: int = 0
    # [start, end]: a jax.profiler trace of the updates after step start up to step end, in
    # {run_dir}/profile (trainer/tracing.py); empty: no trace
    profile_steps: list[int] = field(default_factory=list)
    # keep compiled programs in {run_dir}/compile_cache, so that a resumed or relaunched run
    # loads them instead of compiling again (trainer/compile_cache.py)
    compile_cache: bool = True
    # a process whose loop completes no iteration (step, logging, eval, save) for this long
    # prints its threads' stacks and ends the run with exit 70 (trainer/watchdog.py); 0: never
    stall_timeout_s: float = 1800.0


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the loss is. A recipe may write `objective: dpo` for `objective: {name: dpo}`."""

    shorthand: ClassVar[str] = "name"
    # lm: next-token loss | dpo, reward: on preference pairs (data.format: preference)
    name: str = "lm"
    beta: float = 0.1  # dpo: strength of the pull towards the reference policy
    loss: str = "sigmoid"  # dpo: sigmoid | ipo | hinge | simpo (reference-free)
    label_smoothing: float = 0.0  # dpo sigmoid, simpo: assumed share of flipped labels (cDPO)
    gamma: float = 0.5  # dpo simpo: target reward margin (TRL's simpo_gamma)
    # dpo: the starting weights' log-probs, from a frozen sharded copy of them (frozen) or
    # computed once before training and stored in the run directory (precompute)
    reference: str = "frozen"

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares against the starting weights (every DPO loss but SimPO)."""
        return self.name == "dpo" and self.loss != "simpo"


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 0  # 0: no periodic eval
    batches: int = 4


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10
    wandb_project: str | None = None
    tensorboard: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 3
    milestone_every: int | None = None
    every_minutes: float | None = None
    async_save: bool = True
    save_timeout_s: float = 600.0


@dataclass(frozen=True)
class Recipe:
    run_dir: str
    run_id: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    env: dict[str, str | None] = field(default_factory=dict)  # exported on every worker

    @property
    def data_cache_dir(self) -> str:
        return self.data.cache_dir or io.join(self.run_dir, "data_cache")


def absolute_path(path: str) -> str:
    """A local path made absolute; URIs and `hf:NAME` datasets as they are."""
    return path if "://" in path or path.startswith("hf:") else os.path.abspath(path)


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """`recipe` with every local path in it absolute: what tpuctl stores for the workers (they
    do not start in the directory it ran from) and what a run's record compares on resume
    (by hand and through tpuctl are the same run)."""

    def entries(split: list[DatasetConfig]) -> list[DatasetConfig]:
        return [dataclasses.replace(e, path=[absolute_path(p) for p in e.path]) for e in split]

    def optional(path: str | None) -> str | None:
        return absolute_path(path) if path else path

    data, template = recipe.data, recipe.data.chat_template
    if template and template not in CHAT_TEMPLATE_NAMES:  # a FILE, not a built-in's name
        template = absolute_path(template)
    return dataclasses.replace(
        recipe,
        run_dir=absolute_path(recipe.run_dir),
        tokenizer=dataclasses.replace(recipe.tokenizer, path=optional(recipe.tokenizer.path)),
        model=dataclasses.replace(recipe.model, init_from=optional(recipe.model.init_from)),
        data=dataclasses.replace(
            data,
            train=entries(data.train),
            eval=entries(data.eval),
            chat_template=template,
            cache_dir=optional(data.cache_dir),
        ),
    )


def recipe_differences(ours: Recipe, theirs: Recipe) -> list[tuple[str, Any, Any]]:
    """(dotted key, ours, theirs) of each setting in which two recipes differ, their local
    paths made absolute; `env` by its names alone (its values are never stored) and `run_id`
    left out (tpuctl gives each launch its own)."""

    def settings(recipe: Recipe) -> dict[str, Any]:
        recipe = with_absolute_paths(recipe)
        recipe = dataclasses.replace(recipe, run_id="", env=dict.fromkeys(sorted(recipe.env)))
        flat = {}  # section.field: value (a section's fields are the same in both)
        for name, value in dataclasses.asdict(recipe).items():
            if isinstance(value, dict) and name != "env":
                flat.update({f"{name}.{key}": inner for key, inner in value.items()})
            else:
                flat[name] = value
        return flat

    mine, other = settings(ours), settings(theirs)
    return [(key, mine[key], other[key]) for key in mine if mine[key] != other[key]]


def load_recipe(source: str, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe (local path or gs:// URI), apply `a.b=value` overrides and validate it."""
    raw = _parse_yaml(_read_recipe_text(source), source)
    for override in overrides:
        _apply_override(raw, override)
    raw.setdefault("run_id", _default_run_id(source))
    recipe = _build(Recipe, raw, "")
    recipe = _with_model_preset(recipe, raw.get("model") or {})
    recipe = _resolve_local_paths(recipe, source)
    validate(recipe)
    return recipe


def _read_recipe_text(source: str) -> bytes:
    if "://" in source:
        if not io.exists(source):
            raise RecipeError(f"recipe {source} does not exist: check the URI")
    elif not Path(source).is_file():
        raise RecipeError(f"recipe file {source} not found: give a path to a YAML recipe")
    with io.open_file(source, "rb") as handle:
        try:
            return yaml_input.read_capped(handle, source)
        except yaml_input.YamlInputError as e:
            raise RecipeError(str(e)) from None


def _parse_yaml(text: bytes, source: str) -> dict[str, Any]:
    try:
        raw = yaml_input.load_yaml(text, source)
    except yaml_input.YamlInputError as e:
        raise RecipeError(str(e)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{source}{where}: not valid YAML ({getattr(e, 'problem', e)})") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of keys, not {type(raw).__name__}")
    if isinstance(raw.get("env"), dict):
        raw["env"] = _env_as_written(text)
    return raw


NULL_TAG = "tag:yaml.org,2002:null"


def _env_as_written(text: bytes) -> dict[str, str | None]:
    """The `env:` block as the recipe's text spells it. YAML would read `PIN: 0755` as the
    octal number 493, `yes` as True and `1:30` as 90, names included; an environment
    variable's name and value are text. A null value (a name only) stays None."""
    document = yaml.compose(text.decode("utf-8"), Loader=yaml.SafeLoader)
    env = next(value for key, value in document.value if key.value == "env")
    written: dict[str, str | None] = {}
    for key, value in env.value:
        if not isinstance(value, yaml.ScalarNode):
            raise RecipeError(f"env.{key.value}: a value is text, not a list or a mapping")
        written[str(key.value)] = None if value.tag == NULL_TAG else value.value
    return written


def _default_run_id(source: str) -> str:
    return Path(source.rstrip("/").rsplit("/", 1)[-1]).stem


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        # Only up to the first character no key has: `env.TOKEN:VALUE` must not echo VALUE.
        shown = re.match(r"[A-Za-z0-9_.]*", override)[0]
        shown = override if shown == override else f"{shown}..."
        raise RecipeError(f"override {shown!r}: write overrides as key=value, e.g. train.steps=200")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    if key.startswith("env.") and key.count(".") == 1:
        value = text  # a variable's value is its text, not YAML's reading of it (0755, yes)
    node, section = raw, Recipe
    parts = key.split(".")
    for part in parts[:-1]:
        section = typing.get_type_hints(section).get(part) if section else None
        section = section if dataclasses.is_dataclass(section) else None
        if section is not None and part in node:  # `objective: dpo`, then `objective.beta=0.2`
            node[part] = _expand_shorthand(section, node[part])
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {key}: {part} is not a section, so it has no sub-keys")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value type."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{prefix.rstrip('.')}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise RecipeError(
            f"unknown key {prefix}{unknown[0]}: remove it or use one of {', '.join(sorted(fields))}"
        )
    values = {}
    for name, value in raw.items():
        key = prefix + name
        annotation = hints[name]
        values[name] = (
            _build(annotation, _expand_shorthand(annotation, value) or {}, key + ".")
            if dataclasses.is_dataclass(annotation)
            else _check_type(key, value, annotation)
        )
    missing = [
        n
        for n, f in fields.items()
        if n not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RecipeError(f"missing key {prefix}{missing[0]}: add it to the recipe")
    return cls(**values)


def _expand_shorthand(cls: type, value: Any) -> Any:
    """`section: VALUE` for `section: {SHORTHAND: VALUE}` where the section declares one."""
    shorthand = getattr(cls, "shorthand", None)
    return {shorthand: value} if shorthand and isinstance(value, str) else value


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        for option in inner[:-1]:  # `bool | str`: the first type that takes the value
            with contextlib.suppress(RecipeError):
                return _check_type(key, value, option)
        return _check_type(key, value, inner[-1])
    if origin is list:
        (item,) = typing.get_args(annotation)
        items = value if isinstance(value, list) else [value]
        if dataclasses.is_dataclass(item):  # data.train entries: a mapping or a bare path
            return [
                _build(item, v if isinstance(v, dict) else {"path": v}, f"{key}[{i}].")
                for i, v in enumerate(items)
            ]
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            # Not the value itself: it may be a secret typed in the wrong place (env=TOKEN).
            raise RecipeError(
                f"{key}: expected a mapping of NAME: value, got a {type(value).__name__}"
            )
        # A null value is a name only (tpuctl's stored recipes): the value comes from the
        # environment the process was started with.
        return {str(k): None if v is None else str(v) for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan and .inf
            raise RecipeError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled recipe type {annotation} for {key}")


def _with_model_preset(recipe: Recipe, raw_model: dict[str, Any]) -> Recipe:
    """Fill dimensions from the preset, keeping the ones the recipe sets explicitly."""
    model = recipe.model
    if model.preset is None:
        return recipe
    if model.preset not in PRESETS:
        raise RecipeError(
            f"model.preset: unknown preset {model.preset!r}; use one of {', '.join(PRESETS)}"
        )
    dims = {k: v for k, v in PRESETS[model.preset].items() if k not in raw_model}
    return dataclasses.replace(recipe, model=dataclasses.replace(model, **dims))


def _resolve_local_paths(recipe: Recipe, source: str) -> Recipe:
    """Relative file paths are taken from the working directory, else from the recipe's folder."""
    base = Path(source).parent if "://" not in source else None

    def resolve(path: str) -> str:
        if not path or ":" in path or os.path.isabs(path) or os.path.exists(path) or base is None:
            return path  # URIs, hf: names, absolute paths, paths from the working directory
        candidate = base / path
        found = glob.glob(str(candidate)) if io.has_glob(path) else candidate.exists()
        return str(candidate) if found else path

    def resolve_entries(entries: list[DatasetConfig]) -> list[DatasetConfig]:
        return [dataclasses.replace(e, path=[resolve(p) for p in e.path]) for e in entries]

    data, init_from = recipe.data, recipe.model.init_from
    init_from = resolve(init_from) if init_from else None
    template = data.chat_template
    if template is not None and template not in CHAT_TEMPLATE_NAMES:
        template = resolve(template)
    return dataclasses.replace(
        recipe,
        # model.init_from implies its directory's tokenizer
        tokenizer=dataclasses.replace(
            recipe.tokenizer, path=resolve(recipe.tokenizer.path) or init_from or ""
        ),
        data=dataclasses.replace(
            data,
            train=resolve_entries(data.train),
            eval=resolve_entries(data.eval),
            chat_template=template,
        ),
        model=dataclasses.replace(recipe.model, init_from=init_from),
    )


def validate(recipe: Recipe) -> None:
    """Check everything that can be checked without devices; raise RecipeError on the first problem."""
    _validate_model(recipe.model)
    _validate_train(recipe.train, recipe.model)
    _validate_choices(recipe)
    _validate_objective(recipe.objective, recipe.data)
    _validate_mesh_axes(recipe.mesh)
    _validate_data(recipe.data)
    _validate_floors(recipe)
    _validate_files(recipe)


# Numbers no other check bounds: (key, the smallest value, whether that value is allowed).
# 0 turns off periodic eval and step-based saves, keeps every checkpoint, clips nothing.
_FLOORS = (
    ("train.seed", 0, True),
    ("logging.every_steps", 1, True),
    ("eval.every_steps", 0, True),
    ("eval.batches", 1, True),
    ("checkpoint.every_steps", 0, True),
    ("checkpoint.keep", 0, True),
    ("checkpoint.milestone_every", 1, True),
    ("checkpoint.every_minutes", 0, False),
    ("checkpoint.save_timeout_s", 0, False),
    ("optimizer.lr", 0, True),
    ("optimizer.end_lr", 0, True),
    ("optimizer.warmup_steps", 0, True),
    ("optimizer.weight_decay", 0, True),
    ("optimizer.eps", 0, False),
    ("optimizer.clip_norm", 0, True),
)


def _validate_floors(recipe: Recipe) -> None:
    for key, floor, allowed in _FLOORS:
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value is not None and (value < floor or (value == floor and not allowed)):
            bound = f"at least {floor}" if allowed else f"more than {floor}"
            raise RecipeError(f"{key} must be {bound}, got {value}")


def _validate_model(model: ModelConfig) -> None:
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "mlp_dim", "max_seq_len"):
        if getattr(model, name) <= 0:
            raise RecipeError(f"model.{name} must be positive, got {getattr(model, name)}")
    if model.dim % model.n_heads:
        raise RecipeError(
            f"model.dim ({model.dim}) must be divisible by model.n_heads ({model.n_heads})"
        )
    if model.head_dim % 2:
        raise RecipeError(
            f"model.dim / model.n_heads = {model.head_dim} must be even for rotary embeddings"
        )
    if model.n_heads % model.kv_heads:
        raise RecipeError(
            f"model.n_heads ({model.n_heads}) must be a multiple of model.n_kv_heads ({model.kv_heads})"
        )
    if model.family not in FAMILIES:
        raise RecipeError(
            f"model.family: {model.family!r} is not supported; use one of {', '.join(FAMILIES)}"
        )
    scalings = FAMILIES[model.family].rope_scaling
    if model.rope_scaling is not None and model.rope_scaling not in scalings:
        raise RecipeError(
            f"model.rope_scaling: {model.rope_scaling!r} is not supported for {model.family}; "
            f"use {' or '.join([*scalings, 'null'])}"
        )
    if model.sliding_window is not None:
        if not FAMILIES[model.family].sliding_window:  # its export would attend to everything
            windowed = ", ".join(f.name for f in FAMILIES.values() if f.sliding_window)
            raise RecipeError(
                f"model.sliding_window: {model.family} has no sliding window attention (only "
                f"{windowed}); set it to null or change model.family"
            )
        if model.sliding_window <= 0:
            raise RecipeError(f"model.sliding_window must be positive, got {model.sliding_window}")
    for name in ("dtype", "param_dtype"):
        if getattr(model, name) not in ("float32", "bfloat16", "float16"):
            raise RecipeError(
                f"model.{name}: use float32, bfloat16 or float16, not {getattr(model, name)!r}"
            )
    _validate_attention(model)
    if model.remat_policy not in REMAT_POLICIES:
        raise RecipeError(
            f"model.remat: {model.remat!r} is not a policy; use one of "
            f"{', '.join(REMAT_POLICIES)} (or true / false)"
        )


ATTENTION = ("auto", "xla", "cudnn", "splash", "chunked")  # trainer/model.py: attend
# trainer/model.py: REMAT; the jax.checkpoint_policies MaxText's remat_policy offers
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "save_qkv_proj", "save_attention_out")  # fmt: skip


def _validate_attention(model: ModelConfig) -> None:
    """What the chosen path cannot run; the platform is checked when the model is traced."""
    if model.attention not in ATTENTION:
        raise RecipeError(
            f"model.attention: {model.attention!r} is not supported; use one of {', '.join(ATTENTION)}"
        )
    if model.attention_chunk < 0 or (model.attention == "chunked" and not model.attention_chunk):
        raise RecipeError(
            f"model.attention_chunk must be positive for the chunked path, got {model.attention_chunk}"
        )
    if model.attention == "cudnn" and cudnn_problem(model):
        raise RecipeError(f"model.attention: cudnn {cudnn_problem(model)}; use auto or xla")


def cudnn_problem(model: ModelConfig) -> str | None:
    """Why cuDNN flash attention cannot run this model (None if it can)."""
    if model.dtype == "float32":
        return "needs model.dtype bfloat16 or float16, not float32"
    if model.head_dim % 8 or model.head_dim > 128:
        return f"needs a head dim that is a multiple of 8 up to 128, not {model.head_dim}"
    return None


def _validate_train(train: TrainConfig, model: ModelConfig) -> None:
    if (train.steps is None) == (train.epochs is None):
        raise RecipeError("train.steps / train.epochs: set exactly one of them")
    if train.steps is not None and train.steps <= 0:
        raise RecipeError(f"train.steps must be positive, got {train.steps}")
    if train.epochs is not None and train.epochs <= 0:
        raise RecipeError(f"train.epochs must be positive, got {train.epochs}")
    for name in ("batch_size", "seq_len", "grad_accum"):
        if getattr(train, name) <= 0:
            raise RecipeError(f"train.{name} must be positive, got {getattr(train, name)}")
    if train.batch_size % train.grad_accum:
        raise RecipeError(
            f"train.batch_size ({train.batch_size}) must be divisible by train.grad_accum ({train.grad_accum})"
        )
    if train.stall_timeout_s < 0:
        raise RecipeError(
            f"train.stall_timeout_s must be 0 (never) or a number of seconds, got {train.stall_timeout_s}"
        )
    profile = train.profile_steps
    if profile and (len(profile) != 2 or not 0 <= profile[0] < profile[1]):
        raise RecipeError(
            f"train.profile_steps: give [start, end] with 0 <= start < end, got {profile}"
        )
    if train.seq_len > model.max_seq_len:
        raise RecipeError(
            f"train.seq_len ({train.seq_len}) exceeds model.max_seq_len ({model.max_seq_len}): lower it or raise max_seq_len"
        )


CHAT_TEMPLATE_NAMES = ("tulu", "llama3", "chatml")  # trainer/chat.py; anything else is a FILE

CHOICES = {
    "data.format": ("text", "chat", "prompt_completion", "preference"),
    "optimizer.name": ("adamw", "adafactor", "lion"),
    "optimizer.schedule": ("cosine", "linear", "constant"),
    "objective.name": ("lm", "dpo", "reward"),
    "objective.loss": ("sigmoid", "ipo", "hinge", "simpo"),
    "objective.reference": ("frozen", "precompute"),
}


def _validate_choices(recipe: Recipe) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value not in allowed:
            raise RecipeError(f"{key}: {value!r} is not supported; use one of {', '.join(allowed)}")


def _validate_objective(objective: ObjectiveConfig, data: DataConfig) -> None:
    pairs = data.format == "preference"
    if (objective.name != "lm") != pairs:
        raise RecipeError(
            f"objective.name {objective.name} with data.format {data.format}: dpo and reward "
            "train on preference pairs, so set both (e.g. objective: dpo, data.format: "
            "preference) or neither"
        )
    if objective.name != "dpo":
        defaults = ObjectiveConfig(name=objective.name)
        for f in dataclasses.fields(ObjectiveConfig):
            if getattr(objective, f.name) != getattr(defaults, f.name):
                raise RecipeError(
                    f"objective.{f.name} applies to objective dpo only; remove it for "
                    f"objective {objective.name}"
                )
    if objective.beta <= 0:
        raise RecipeError(f"objective.beta must be positive, got {objective.beta}")
    if not 0 <= objective.label_smoothing < 0.5:
        raise RecipeError(
            f"objective.label_smoothing must be in [0, 0.5), got {objective.label_smoothing}"
        )
    if objective.label_smoothing and objective.loss not in ("sigmoid", "simpo"):
        raise RecipeError(
            f"objective.label_smoothing applies to objective.loss sigmoid or simpo only, not "
            f"{objective.loss}; set it to 0 or use loss sigmoid"
        )
    if objective.loss != "simpo" and objective.gamma != ObjectiveConfig.gamma:
        raise RecipeError(
            f"objective.gamma applies to objective.loss simpo only, not {objective.loss}; "
            "remove it or set objective.loss: simpo"
        )
    if objective.gamma < 0:
        raise RecipeError(f"objective.gamma must be zero or positive, got {objective.gamma}")
    if objective.loss == "simpo" and objective.reference != ObjectiveConfig.reference:
        raise RecipeError(
            "objective.reference does not apply to objective.loss simpo, which is reference-free; "
            "remove it"
        )


def _validate_mesh_axes(mesh: MeshConfig) -> None:
    sizes = {axis: getattr(mesh, axis) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise RecipeError(f"mesh.{axis} must be a positive size or -1 (the rest), got {size}")
    if list(sizes.values()).count(-1) > 1:
        raise RecipeError("mesh: at most one axis may be -1 (the rest of the devices)")


def _validate_data(data: DataConfig) -> None:
    if not data.train:
        raise RecipeError("data.train: list at least one training input (a file, glob or hf:NAME)")
    for split in ("train", "eval"):
        entries = getattr(data, split)
        weighted = [e.weight is not None for e in entries]
        if any(weighted) and not all(weighted):
            raise RecipeError(f"data.{split}: give every entry a weight, or none of them")
        for i, entry in enumerate(entries):
            _validate_entry(entry, f"data.{split}[{i}]")
        if all(weighted) and entries:
            _validate_weights([e.weight for e in entries], f"data.{split}")
    for name in ("cache_memory_mb", "cache_workers"):
        if getattr(data, name) < (1 if name == "cache_memory_mb" else 0):
            raise RecipeError(f"data.{name} must be positive, got {getattr(data, name)}")


def _validate_entry(entry: DatasetConfig, key: str) -> None:
    if not entry.path:
        raise RecipeError(f"{key}.path: list at least one input")
    if entry.fraction is not None and entry.size is not None:
        raise RecipeError(f"{key}: set fraction or size, not both")
    if entry.weight is not None and (entry.fraction is not None or entry.size is not None):
        raise RecipeError(f"{key}: weight picks rows by share, so drop fraction/size here")
    for name in ("weight", "fraction", "size"):
        value = getattr(entry, name)
        if value is not None and value <= 0:
            raise RecipeError(f"{key}.{name} must be positive, got {value}")


def _validate_weights(weights: list[float], key: str) -> None:
    """A weight too small for one row of a block would never be read, silently."""
    total = sum(weights)
    for i, count in enumerate(weighted_counts(weights)):
        if not count:
            raise RecipeError(
                f"{key}[{i}].weight: {weights[i]:g} of the weights' total {total:g} rounds to 0 "
                f"of the {MIXTURE_BLOCK} rows a block of batches draws by weight, so this dataset "
                f"would never be read; give it at least 1/{MIXTURE_BLOCK} of the total, or remove "
                "the entry"
            )


def weighted_counts(weights: list[float], block: int = MIXTURE_BLOCK) -> list[int]:
    """Rows per block for each dataset: `block` split by weight, largest remainders first."""
    total = sum(weights)
    exact = [w / total * block for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])  # stable
    for i in by_remainder[: block - sum(counts)]:
        counts[i] += 1
    return counts


def _validate_files(recipe: Recipe) -> None:
    if not recipe.tokenizer.path:
        raise RecipeError(
            "tokenizer.path: set it to a tokenizer.model, a tokenizer.json or a model directory "
            "(or set model.init_from, whose directory holds one)"
        )
    checks = [("tokenizer.path", recipe.tokenizer.path)]
    template = recipe.data.chat_template
    if template is not None and template not in CHAT_TEMPLATE_NAMES:
        checks.append(("data.chat_template", template))
        if io.isdir(template):
            raise RecipeError(
                f"data.chat_template: {template} is a directory; name a Jinja template file, "
                "or tulu, llama3 or chatml"
            )
    for split in ("train", "eval"):
        for i, entry in enumerate(getattr(recipe.data, split)):
            checks += [(f"data.{split}[{i}]", p) for p in entry.path if not p.startswith("hf:")]
    if recipe.model.init_from:
        checks.append(("model.init_from", recipe.model.init_from))
    for key, path in checks:
        if io.has_glob(path):
            if not io.glob(path):
                raise RecipeError(f"{key}: no file matches {path}; fix the pattern")
        elif not _path_exists(path):
            raise RecipeError(f"{key}: {path} does not exist; fix the path or create the file")


def _path_exists(path: str) -> bool:
    if "://" in path:
        return io.exists(path)
    return os.path.exists(path)


def mesh_shape(mesh: MeshConfig, device_count: int) -> dict[str, int]:
    """Resolve -1 and check that the axes multiply to `device_count` (no jax needed)."""
    sizes = {axis: getattr(mesh, axis) for axis in MESH_AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    rest = [axis for axis, s in sizes.items() if s == -1]
    described = ", ".join(f"{a}={s}" for a, s in sizes.items())
    if rest:
        if device_count % known:
            raise RecipeError(
                f"mesh ({described}): {device_count} devices are not divisible by {known}; change the mesh sizes"
            )
        sizes[rest[0]] = device_count // known
    elif known != device_count:
        raise RecipeError(
            f"mesh ({described}) needs {known} devices but there are {device_count}; make the product {device_count} or set one axis to -1"
        )
    return sizes


def check_batch_divisible(train: TrainConfig, sizes: dict[str, int]) -> None:
    """Each micro-batch is split over data x fsdp, so it must divide evenly."""
    parallel = sizes["data"] * sizes["fsdp"]
    micro = train.batch_size // train.grad_accum
    if micro % parallel:
        raise RecipeError(
            f"train.batch_size ({train.batch_size}) / grad_accum ({train.grad_accum}) = {micro} is not divisible by the data-parallel size data*fsdp = {parallel}; use a multiple of {parallel}"
        )
