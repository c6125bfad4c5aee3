"""FLOPs, peaks and the metrics log."""

from __future__ import annotations

import json

import jax
import pytest

from trainer import metrics
from trainer.config import ModelConfig
from trainer.model import count_params, init_params


def test_matmul_params_are_all_params_but_the_input_embedding():
    cfg = ModelConfig(
        vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=96, max_seq_len=64
    )
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    norms = cfg.dim * (2 * cfg.n_layers + 1)
    assert metrics.matmul_params(cfg) == count_params(params) - cfg.vocab_size * cfg.dim - norms
    assert metrics.flops_per_token(cfg, 128) == 6 * metrics.matmul_params(cfg) + 6 * 2 * 128 * 64


def test_published_peaks_match_device_kinds():
    assert metrics.published_peak("TPU v4") == 275e12
    assert metrics.published_peak("TPU v5 lite") == 197e12
    assert metrics.published_peak("TPU v5p") == 459e12
    assert metrics.published_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.published_peak("NVIDIA H100 PCIe") == 756e12
    assert metrics.published_peak("NVIDIA H200") == 989e12
    assert metrics.published_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert metrics.published_peak("TPU v5") == 459e12
    assert metrics.published_peak("TPU v6 lite") == 918e12
    assert metrics.published_peak("cpu") is None


def test_cpu_peak_is_measured():
    peak, source = metrics.hardware_peak(jax.devices()[:1], "float32", 1)
    assert 1e9 < peak < 1e14 and source.startswith("measured float32 matmul on cpu")


def test_metrics_log_appends_json_lines(tmp_path):
    log = metrics.MetricsLog(str(tmp_path / "run"))
    log.write({"step": 1, "loss": 2.0})
    metrics.MetricsLog(str(tmp_path / "run")).write({"step": 2, "loss": 1.5})  # a restart appends
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_metrics_log_on_gcs_keeps_earlier_lines(gcs):
    run_dir = "gs://test-bucket/runs/m"
    metrics.MetricsLog(run_dir).write({"step": 1})
    metrics.MetricsLog(run_dir).write({"step": 2})
    from trainer import io

    assert [
        json.loads(x)["step"] for x in io.read_text(f"{run_dir}/metrics.jsonl").splitlines()
    ] == [1, 2]


def test_optional_sinks_say_what_to_install(tmp_path):
    with pytest.raises(ImportError, match="pip install wandb"):
        metrics.MetricsLog(str(tmp_path), wandb_project="p")
    with pytest.raises(ImportError, match="pip install tensorboardX"):
        metrics.MetricsLog(str(tmp_path), tensorboard=True)
