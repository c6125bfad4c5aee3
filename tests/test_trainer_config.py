"""Recipes: parsing, overrides, one-line errors naming the key, and the shipped recipes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures_trainer import REPO, trainer_env
from trainer import io
from trainer.config import (
    DatasetConfig,
    MeshConfig,
    RecipeError,
    TrainConfig,
    check_batch_divisible,
    load_recipe,
    mesh_shape,
)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def recipe_text(extra: str = "") -> str:
    data = REPO / "recipes" / "data"
    return (
        f"run_dir: runs/x\nmodel: {{preset: tiny}}\ntokenizer: {{path: {data}/tokenizer.model}}\n"
        f"data: {{train: [{data}/tiny_train.txt]}}\ntrain: {{steps: 5, batch_size: 8, seq_len: 64}}\n"
        + extra
    )


def test_env_values_reach_the_job_as_written(tmp_path):
    """YAML read PIN: 0755 as 493, yes as True and 1:30 as 90, in the file and in env.X=
    overrides alike; an environment variable is the text."""
    env = "env:\n  PIN: 0755\n  yes: on\n  T: 1:30\n  Q: '0123'\n  F: 0.9\n  NAME:\n"
    recipe = load_recipe(write(tmp_path, recipe_text(env)), ["env.A=0x1F", "env.B=no", "env.C="])
    assert recipe.env == {
        **{"PIN": "0755", "yes": "on", "T": "1:30", "Q": "0123", "F": "0.9", "NAME": None},
        **{"A": "0x1F", "B": "no", "C": ""},
    }
    with pytest.raises(RecipeError, match=r"env\.L: a value is text, not a list"):
        load_recipe(write(tmp_path, recipe_text("env: {L: [1, 2]}\n")))


def test_tiny_recipe_loads_with_preset_dims_and_relative_paths(tiny_recipe, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # paths resolve against the recipe's folder when not in cwd
    recipe = load_recipe(str(tiny_recipe))
    assert recipe.model.dim == 64 and recipe.model.dtype == "float32"
    assert Path(recipe.tokenizer.path).is_file()
    assert recipe.run_id == "tiny" and recipe.train.steps == 100
    assert recipe.data_cache_dir == str(Path("runs/tiny/data_cache"))


def test_dotted_overrides_are_typed_and_win(tiny_recipe):
    recipe = load_recipe(
        str(tiny_recipe),
        ["train.steps=7", "optimizer.lr=1e-5", "run_dir=gs://b/r", "model.remat=true", "env.A=1"],
    )
    assert recipe.train.steps == 7 and recipe.optimizer.lr == 1e-5
    assert recipe.run_dir == "gs://b/r" and recipe.model.remat is True
    assert recipe.model.remat_policy == "full"  # recipes written before remat policies
    named = load_recipe(str(tiny_recipe), ["model.remat=dots_saveable", "model.attention=splash"])
    assert named.model.remat_policy == "dots_saveable" and named.model.attention == "splash"
    assert recipe.env == {"A": "1"}
    assert recipe.model.dim == 64  # the preset still fills what was not overridden


def test_data_entries_are_paths_or_mixture_mappings(tmp_path):
    data = REPO / "recipes" / "data"
    override = (
        f"data.train=[{data}/tiny_train.txt, {{path: [{data}/*.jsonl, hf:org/name/cfg:train], "
        "fraction: 0.5, name: chat}]"
    )
    recipe = load_recipe(write(tmp_path, recipe_text()), [override])
    plain, mixed = recipe.data.train
    assert plain == DatasetConfig(path=[f"{data}/tiny_train.txt"])
    assert mixed == DatasetConfig(
        path=[f"{data}/*.jsonl", "hf:org/name/cfg:train"], fraction=0.5, name="chat"
    )
    weighted = load_recipe(
        write(tmp_path, recipe_text()),
        [
            f"data.train=[{{path: {data}/tiny_train.txt, weight: 3}}, {{path: {data}/tiny_eval.txt, weight: 1}}]"
        ],
    )
    assert [e.weight for e in weighted.data.train] == [3.0, 1.0]


def test_explicit_dims_override_the_preset(tmp_path):
    recipe = load_recipe(
        write(tmp_path, recipe_text().replace("{preset: tiny}", "{preset: tiny, dim: 96}"))
    )
    assert recipe.model.dim == 96 and recipe.model.n_layers == 2


@pytest.mark.parametrize(
    ("extra", "overrides", "message"),
    [
        ("optimizer: {lrr: 1}\n", [], "unknown key optimizer.lrr: remove it or use one of"),
        ("", ["train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
        (
            "",
            ["model.remat=maybe"],
            "model.remat: 'maybe' is not a policy; use one of none, full, dots_saveable, "
            "dots_with_no_batch_dims_saveable, save_qkv_proj, save_attention_out (or true / false)",
        ),
        (
            "",
            ["model.attention=flash"],
            "model.attention: 'flash' is not supported; use one of auto",
        ),
        (
            "",
            ["model.attention=cudnn", "model.dtype=float32"],
            "model.attention: cudnn needs model.dtype bfloat16 or float16",
        ),
        (
            "",
            ["model.attention=chunked", "model.attention_chunk=0"],
            "model.attention_chunk must be positive for the chunked path, got 0",
        ),
        (
            "",
            ["train.profile_steps=[5, 5]"],
            "train.profile_steps: give [start, end] with 0 <= start < end, got [5, 5]",
        ),
        ("", ["train.profile_steps=[3]"], "train.profile_steps: give [start, end]"),
        (
            "",
            ["train.profile_steps=[1, x]"],
            "train.profile_steps[1]: expected an integer, got 'x'",
        ),
        ("", ["mesh.data=0"], "mesh.data must be a positive size or -1"),
        ("mesh: {data: -1, fsdp: -1}\n", [], "at most one axis may be -1"),
        (
            "",
            ["train.batch_size=6", "train.grad_accum=4"],
            "train.batch_size (6) must be divisible",
        ),
        ("", ["tokenizer.path=/nope/tok.model"], "tokenizer.path: /nope/tok.model does not exist"),
        ("", ["data.format=csv"], "data.format: 'csv' is not supported; use one of text, chat"),
        ("", ["model.preset=llama9"], "model.preset: unknown preset 'llama9'"),
        ("", ["train.epochs=2"], "set exactly one of them"),
        ("", ["train.seq_len=4096"], "exceeds model.max_seq_len"),
        ("", ["steps=3"], "unknown key steps"),
        ("", ["train"], "write overrides as key=value"),
        (
            "",
            ["data.train=[{path: a.txt, weight: 1}, b.txt]"],
            "give every entry a weight, or none",
        ),
        ("", ["data.train=[{path: a, fraction: 0.5, size: 3}]"], "set fraction or size, not both"),
        ("", ["data.train=[{path: a, weight: -1}]"], "data.train[0].weight must be positive"),
        (  # below 1/131072 of the total: no row of any block, silently
            "",
            ["data.eval=[{path: a, weight: 1}, {path: b, weight: 0.000007}, {path: c, weight: 1}]"],
            "data.eval[1].weight: 7e-06 of the weights' total 2.00001 rounds to 0 of the 65536 ",
        ),
        ("", ["data.train=[{paths: a}]"], "unknown key data.train[0].paths: remove it"),
        ("", ["data.train=[/nope/*.jsonl.gz]"], "data.train[0]: no file matches /nope/*.jsonl.gz"),
        ("", ["data.cache_memory_mb=0"], "data.cache_memory_mb must be positive"),
        ("", ["model.family=gemma"], "model.family: 'gemma' is not supported; use one of llama"),
        ("", ["model.rope_scaling=yarn"], "model.rope_scaling: 'yarn' is not supported for llama"),
        ("", ["model.family=qwen2", "model.rope_scaling=llama3"], "not supported for qwen2"),
        # trained windowed, then exported without the window: other logits in transformers
        ("", ["model.sliding_window=16"], "model.sliding_window: llama has no sliding window"),
        ("", ["model.family=mistral", "model.sliding_window=0"], "sliding_window must be posi"),
        ("", ["data.chat_template=nope.jinja"], "data.chat_template: nope.jinja does not exist"),
        ("", ["objective=ppo"], "objective.name: 'ppo' is not supported; use one of lm, dpo"),
        ("", ["objective=dpo"], "dpo and reward train on preference pairs, so set both"),
        ("", ["data.format=preference"], "objective.name lm with data.format preference"),
        (
            "objective: dpo\n",
            ["data.format=preference", "objective.loss=orpo"],
            "objective.loss: 'orpo' is not supported; use one of sigmoid, ipo, hinge, simpo",
        ),
        (
            "objective: dpo\n",
            ["data.format=preference", "objective.beta=0"],
            "objective.beta must be positive",
        ),
        (
            "objective: dpo\n",
            ["data.format=preference", "objective.label_smoothing=0.5"],
            "objective.label_smoothing must be in [0, 0.5)",
        ),
        (
            "objective: {name: dpo, loss: ipo, label_smoothing: 0.1}\n",
            ["data.format=preference"],
            "objective.label_smoothing applies to objective.loss sigmoid or simpo only",
        ),
        (
            "objective: dpo\n",
            ["data.format=preference", "objective.gamma=1.0"],
            "objective.gamma applies to objective.loss simpo only, not sigmoid",
        ),
        (
            "objective: {name: dpo, loss: simpo}\n",
            ["data.format=preference", "objective.gamma=-0.5"],
            "objective.gamma must be zero or positive",
        ),
        (
            "objective: {name: dpo, loss: simpo}\n",
            ["data.format=preference", "objective.beta=-2"],
            "objective.beta must be positive, got -2",
        ),
        (
            "objective: {name: dpo, loss: simpo}\n",
            ["data.format=preference", "objective.reference=precompute"],
            "objective.reference does not apply to objective.loss simpo",
        ),
        (
            "",
            ["objective.reference=cached"],
            "'cached' is not supported; use one of frozen, precompute",
        ),
        ("", ["objective.betta=1"], "unknown key objective.betta"),
        # each of these once passed and failed later with a traceback
        ("", ["logging.every_steps=0"], "logging.every_steps must be at least 1, got 0"),
        ("", ["eval.batches=0"], "eval.batches must be at least 1, got 0"),
        ("", ["train.seed=-1"], "train.seed must be at least 0, got -1"),
        ("", ["checkpoint.save_timeout_s=0"], "checkpoint.save_timeout_s must be more than 0"),
        ("", ["data.chat_template=/tmp"], "data.chat_template: /tmp is a directory"),
        ("", ["train.steps=null", "train.epochs=.nan"], "train.epochs: expected a finite number"),
        (
            "",
            ["data.train=[{path: a.txt, weight: .inf}, {path: b.txt, weight: 1}]"],
            "data.train[0].weight: expected a finite number, got inf",
        ),
    ],
)
def test_bad_recipes_get_one_line_errors_naming_the_key(tmp_path, extra, overrides, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, recipe_text(extra)), overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_objective_is_a_name_or_a_section_and_overrides_reach_either(tmp_path):
    assert load_recipe(write(tmp_path, recipe_text())).objective.name == "lm"
    short = write(tmp_path, recipe_text("objective: dpo\n"))
    recipe = load_recipe(short, ["data.format=preference", "objective.beta=0.5"])
    assert (recipe.objective.name, recipe.objective.beta) == ("dpo", 0.5)
    assert recipe.objective.loss == "sigmoid" and recipe.objective.reference == "frozen"
    tiny = load_recipe(str(REPO / "recipes" / "tiny-dpo.yaml"), ["objective.loss=hinge"])
    assert (tiny.objective.name, tiny.objective.loss) == ("dpo", "hinge")
    assert tiny.data.format == "preference"


def test_init_from_implies_its_tokenizer_and_templates_resolve_like_files(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "mine.jinja").write_text("{{ messages }}")
    text = (
        f"run_dir: runs/x\nmodel: {{init_from: hf}}\ntrain: {{steps: 5, seq_len: 64}}\n"
        f"data: {{train: [{REPO}/recipes/data/tiny_chat.jsonl], chat_template: mine.jinja}}\n"
    )
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.tokenizer.path == recipe.model.init_from == str(tmp_path / "hf")
    assert recipe.data.chat_template == str(tmp_path / "mine.jinja")
    named = load_recipe(write(tmp_path, recipe_text()), ["data.chat_template=llama3"])
    assert named.data.chat_template == "llama3" and named.tokenizer.path.endswith("tokenizer.model")
    with pytest.raises(RecipeError, match=r"tokenizer\.path: set it .*or set model\.init_from"):
        load_recipe(write(tmp_path, recipe_text()), ["tokenizer.path="])


def test_mesh_rest_axis_and_impossible_meshes():
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=1), 8) == {
        "data": 2,
        "fsdp": 4,
        "tensor": 1,
    }
    with pytest.raises(RecipeError, match="needs 12 devices but there are 8"):
        mesh_shape(MeshConfig(data=2, fsdp=3, tensor=2), 8)
    with pytest.raises(RecipeError, match="8 devices are not divisible by 3"):
        mesh_shape(MeshConfig(data=3, fsdp=-1), 8)


def test_batch_must_divide_over_data_parallel_devices():
    sizes = {"data": 2, "fsdp": 4, "tensor": 1}
    check_batch_divisible(TrainConfig(steps=1, batch_size=16, grad_accum=2), sizes)
    with pytest.raises(
        RecipeError, match="not divisible by the data-parallel size data\\*fsdp = 8"
    ):
        check_batch_divisible(TrainConfig(steps=1, batch_size=16, grad_accum=4), sizes)


def remote_files(recipe_path: Path) -> list[str]:
    """The gs:// inputs a recipe names (everything but its run_dir)."""
    raw = yaml.safe_load(recipe_path.read_text())
    found: list[str] = []

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value.startswith("gs://"):
            found.append(value)

    walk({k: v for k, v in raw.items() if k != "run_dir"})
    return found


@pytest.mark.parametrize(
    ("name", "devices"),
    [
        ("llama2-7b-sft-v3-256.yaml", 256),
        ("llama-1b-pretrain-v4-64.yaml", 32),
        ("llama3.1-8b-sft-v4-32.yaml", 16),
        ("llama3.1-8b-dpo-v4-32.yaml", 16),
        ("qwen2.5-7b-sft-v3-256.yaml", 256),
    ],
)
def test_realistic_recipes_validate_for_their_pod(gcs, name, devices):
    recipe_path = REPO / "recipes" / name
    inputs = remote_files(recipe_path)
    gcs.create_bucket("tpuctl-examples")
    with pytest.raises(RecipeError, match="does not exist; fix the path"):
        load_recipe(str(recipe_path))  # the inputs are not there yet
    for uri in inputs:  # placeholders stand in for the real tokenizer, data and weights
        uri = uri.replace("*", "00000")  # one file for each glob
        io.write_text(uri if "." in uri.rsplit("/", 1)[-1] else f"{uri}/config.json", "{}")
    recipe = load_recipe(str(recipe_path))
    sizes = mesh_shape(recipe.mesh, devices)
    check_batch_divisible(recipe.train, sizes)
    assert sizes["data"] * sizes["fsdp"] * sizes["tensor"] == devices
    assert recipe.model.dtype == "bfloat16" and recipe.model.n_layers >= 22


def test_malformed_recipe_on_the_command_line_is_one_error_line_and_exit_2(tmp_path):
    bad = write(tmp_path, recipe_text("optimizer: {name: sgd}\n"))
    result = subprocess.run(
        [sys.executable, "-m", "trainer", bad],
        capture_output=True,
        text=True,
        env=trainer_env(1),
        timeout=60,
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == "error: optimizer.name: 'sgd' is not supported; use one of adamw, adafactor, lion\n"
    )
    assert "Traceback" not in result.stdout + result.stderr


def test_config_module_does_not_import_jax(tiny_recipe):
    code = f"import sys, trainer.config as c; c.load_recipe({str(tiny_recipe)!r}); print('jax' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=trainer_env(1), timeout=60
    )
    assert out.stdout.strip() == "False", out.stderr
