"""Qwen-style and OLMo-2-style models fine-tuned through `tpuctl run` on a local pod (two
jax.distributed trainer processes on the CPU), then exported and loaded in transformers."""

from __future__ import annotations

import json

import pytest
from local_cli import LocalCli

from tests.fixtures_hf import (
    OLMO2_TEMPLATE,
    SHAPES,
    TINY_SFT,
    assert_export_matches,
    save_family_dir,
)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    cli = LocalCli(tmp_path_factory.mktemp("families"), timeout=600)
    cli.ok("up", "v4-16", "--local", "--name", "fam")  # 2 workers x 4 devices
    yield cli
    cli("down", "fam", "--yes")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "template"),
    [("qwen2-gqa-tied", "chatml"), ("olmo2-mha", None)],
    ids=["qwen2", "olmo2"],
)
def test_tpuctl_run_fine_tunes_then_export_loads_in_transformers(cli, shape, template):
    family = SHAPES[shape].family
    source = save_family_dir(cli.root / family / "hf", SHAPES[shape], template)
    run_dir = cli.root / family / "run"
    overrides = [f"model.init_from={source}", f"run_dir={run_dir}", "train.steps=3"]
    if template is None:  # a template FILE given relative to where tpuctl runs
        (cli.root / "olmo2.jinja").write_text(OLMO2_TEMPLATE)
        overrides.append("data.chat_template=olmo2.jinja")
    out = cli.ok(
        "run", TINY_SFT, "--name", "fam", "--all-workers", "--follow", "--run-id", family,
        "--", *overrides,
    )  # fmt: skip
    assert "x 1 machine(s) of 2 process(es)" in out  # one jax.distributed job over both workers
    assert json.loads((run_dir / "DONE").read_text())["step"] == 3
    assert_export_matches(run_dir, cli.root / family / "out", source)
