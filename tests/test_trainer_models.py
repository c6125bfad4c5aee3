"""trainer.models: the families, `python -m trainer.models`, and presets of the real sizes."""

from __future__ import annotations

import subprocess
import sys

import jax
import pytest

from tests.fixtures_trainer import REPO
from trainer.config import PRESETS, ModelConfig
from trainer.model import count_params, init_params

# Parameter counts the model cards state (billions, rounded as they round them).
PUBLISHED_BILLIONS = {
    "llama3.1-8b": 8.03,
    "llama3.2-1b": 1.24,
    "llama3.2-3b": 3.21,
    "qwen2.5-0.5b": 0.49,
    "qwen2.5-7b": 7.62,
    "mistral-7b": 7.25,
    "olmo2-7b": 7.30,
}


@pytest.mark.parametrize("preset", PUBLISHED_BILLIONS)
def test_presets_have_the_published_parameter_counts(preset):
    cfg = ModelConfig(**PRESETS[preset])
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    assert round(count_params(shapes) / 1e9, 2) == PUBLISHED_BILLIONS[preset]


def test_python_m_trainer_models_lists_families_and_presets():
    result = subprocess.run(
        [sys.executable, "-m", "trainer.models"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for name in ("llama", "qwen2", "mistral", "olmo2", "Olmo2ForCausalLM", "qwen2.5-7b"):
        assert name in result.stdout
