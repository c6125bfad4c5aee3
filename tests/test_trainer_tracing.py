"""`train.profile_steps`: a tiny run writes a jax.profiler trace of those steps."""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import pytest

from trainer import train
from trainer.config import load_recipe
from trainer.tracing import StepTrace


@pytest.mark.slow  # a whole tiny run
def test_profile_steps_write_an_xplane_trace_under_the_run_dir(tiny_recipe, tmp_path, capsys):
    overrides = [f"run_dir={tmp_path}", "train.steps=4", "train.profile_steps=[1, 3]",
                 "eval.every_steps=0", "logging.every_steps=2"]  # fmt: skip
    assert train.train(load_recipe(str(tiny_recipe), overrides)) == 0
    traces = list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert f"trainer: profile of steps 2-3 in {tmp_path}/profile" in capsys.readouterr().out


def test_a_gs_run_dir_gets_the_trace_uploaded_when_it_stops(gcs, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    StepTrace("gs://test-bucket/untraced", [])
    trace = StepTrace("gs://test-bucket/run", [0, 1])
    x = jnp.ones((64, 64))
    trace.at_step(0, x)
    x = jax.jit(lambda a: a @ a)(x)
    trace.at_step(1, x)
    names = [b.name for b in gcs.client().list_blobs("test-bucket", prefix="run/profile/")]
    assert any(
        n.startswith("run/profile/plugins/profile/") and n.endswith(".xplane.pb") for n in names
    )
    assert not list(tmp_path.iterdir())  # nothing left behind in the temporary directory
