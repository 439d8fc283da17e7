"""MFU inputs (model FLOPs, peak FLOP/s) and the CUDA allocator series."""

from __future__ import annotations

import logging

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from ugro.trainer.config import TelemetryConfig, TelemetryConfigError
from ugro.trainer.flops import (
    measure_flops,
    measure_flops_per_token,
    peak_flops_for,
    transformer_flops_per_token,
)
from ugro.trainer.model import ModelConfig, TinyCausalLM, flops_per_token
from ugro.trainer.train import parse_args

from .test_device_values import FakeCudaCopies, FakeCudaScalar

ALLOCATOR_SERIES = (
    "ugro_train_cuda_memory_peak_allocated_bytes",
    "ugro_train_cuda_memory_peak_reserved_bytes",
    "ugro_train_cuda_alloc_retries_total",
    "ugro_train_cuda_ooms_total",
)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def offline(registry: CollectorRegistry, **kwargs):
    from ugro.trainer.telemetry import Telemetry

    return Telemetry(serve=False, registry=registry, env={}, **kwargs)


# -- model FLOPs counter -------------------------------------------------------------------------


def test_model_flops_are_flops_per_token_times_the_tokens_counted(registry):
    telemetry = offline(registry, flops_per_token=6e9)
    telemetry.step(tokens=64)
    telemetry.micro_step(tokens=16)
    telemetry.step(tokens=16)
    telemetry.step(tokens=2.5)  # rejected: no tokens, so no FLOPs
    assert registry.get_sample_value("ugro_train_tokens_total") == 96
    assert registry.get_sample_value("ugro_train_model_flops_total") == 96 * 6e9


def test_model_flops_per_sample_count_samples(registry):
    telemetry = offline(registry, flops_per_sample=1.5e12)
    telemetry.step(tokens=512, samples=4)
    telemetry.step(tokens=512, samples=4)
    assert registry.get_sample_value("ugro_train_model_flops_total") == 8 * 1.5e12


def test_model_flops_count_device_tokens_when_they_reach_the_host(registry):
    copies = FakeCudaCopies()
    telemetry = offline(registry, flops_per_token=1000.0, device_copier=copies)
    telemetry.step(tokens=FakeCudaScalar(32.0))
    assert registry.get_sample_value("ugro_train_model_flops_total") == 0
    copies.complete()
    assert registry.get_sample_value("ugro_train_model_flops_total") == 32_000


def test_without_flops_or_peak_no_mfu_series(registry):
    telemetry = offline(registry)
    telemetry.step(tokens=64)
    assert registry.get_sample_value("ugro_train_model_flops_total") is None
    assert registry.get_sample_value("ugro_train_peak_flops_per_second") is None


def test_flops_and_peak_come_from_the_environment_and_are_checked():
    env = {"UGRO_FLOPS_PER_TOKEN": "6.2e9", "UGRO_PEAK_FLOPS": "1e12", "UGRO_TRAIN_DTYPE": "tf32"}
    config = TelemetryConfig.resolve(env)
    assert (config.flops_per_token, config.flops_per_sample) == (6.2e9, None)
    assert (config.peak_flops, config.train_dtype) == (1e12, "tf32")
    # An argument for either figure wins over both variables.
    config = TelemetryConfig.resolve(env, flops_per_sample=3.0)
    assert (config.flops_per_token, config.flops_per_sample) == (None, 3.0)
    assert TelemetryConfig.resolve({}, train_dtype="torch.bfloat16").train_dtype == "bf16"

    for bad, named in (
        ({"UGRO_FLOPS_PER_TOKEN": "many"}, "UGRO_FLOPS_PER_TOKEN"),
        ({"UGRO_FLOPS_PER_SAMPLE": "-1"}, "UGRO_FLOPS_PER_SAMPLE"),
        ({"UGRO_PEAK_FLOPS": "inf"}, "UGRO_PEAK_FLOPS"),
        ({"UGRO_TRAIN_DTYPE": "fp8"}, "UGRO_TRAIN_DTYPE"),
        ({"UGRO_FLOPS_PER_TOKEN": "1", "UGRO_FLOPS_PER_SAMPLE": "1"}, "both set"),
    ):
        with pytest.raises(TelemetryConfigError, match=named):
            TelemetryConfig.resolve(bad)


# -- estimate and measurement --------------------------------------------------------------------


def test_transformer_estimate_is_six_n_plus_the_attention_term():
    # nanoGPT's GPT-2 small: 124M parameters, 12 layers, width 768, context 1024.
    n = 124_000_000
    assert transformer_flops_per_token(n, 12, 768, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert transformer_flops_per_token(10, 0, 0, 0) == 60.0
    with pytest.raises(ValueError, match="n_layer"):
        transformer_flops_per_token(10, -1, 8, 8)


def test_measurement_of_a_linear_layer_equals_the_analytic_count():
    vocab, width, batch, length = 50, 16, 3, 7
    model = nn.Sequential(nn.Embedding(vocab, width), nn.Linear(width, vocab))
    tokens = torch.randint(0, vocab, (batch, length))
    # Forward 2·in·out per token; backward twice that (gradients of the input and the weight);
    # the embedding is a lookup, not a matrix multiply, and bias additions are not model FLOPs.
    assert measure_flops(model, tokens) == 6 * width * vocab * batch * length
    assert measure_flops_per_token(model, tokens) == 6 * width * vocab
    assert all(p.grad is None for p in model.parameters())  # the model's gradients untouched


def test_measurement_takes_mapping_batches_and_a_loss_output():
    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 4, bias=False)

        def forward(self, input_ids, features):
            return {"loss": self.linear(features).square().mean(), "logits": None}

    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "features": torch.randn(2, 5, 8)}
    # The input does not need its gradient: forward and the weight's gradient only, 4·in·out.
    assert measure_flops_per_token(WithLoss(), batch) == 4 * 8 * 4
    assert measure_flops_per_token(WithLoss(), batch, tokens=5) == 4 * 8 * 4 * 2
    with pytest.raises(ValueError, match="tokens"):
        measure_flops_per_token(WithLoss(), {"features": torch.randn(2, 5, 8)})


def test_reference_model_estimate_is_close_to_its_measurement():
    config = ModelConfig(context=32, width=64, depth=2, heads=4)
    tokens = torch.randint(0, config.vocab_size, (2, config.context))
    model = TinyCausalLM(config)
    measured = measure_flops(model, (tokens, tokens)) / tokens.numel()
    estimate = flops_per_token(config)
    # The estimate also counts biases and layer norms in N, and attention in full, where the
    # counter sees only the kernels it knows (not every fused attention kernel): within 15 %.
    assert estimate == pytest.approx(measured, rel=0.15)


def test_reference_trainer_takes_a_peak(monkeypatch):
    assert parse_args(["--peak-flops", "2e12"]).peak_flops == 2e12
    assert parse_args([]).peak_flops is None


# -- peak FLOP/s ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H100 NVL", "bf16", 835e12),
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "fp16", 312e12),
        ("NVIDIA A100 80GB PCIe", "tf32", 156e12),
        ("NVIDIA L40S", "fp32", 91.6e12),
        ("NVIDIA L4", "bf16", 121e12),
        ("NVIDIA A10G", "bf16", 125e12),
        ("NVIDIA B200", "bf16", 2250e12),
        ("NVIDIA GB200", "bf16", 2500e12),
        ("NVIDIA B200", "fp32", None),  # no figure for the dtype: no MFU rather than a guess
        ("NVIDIA GeForce RTX 4090", "bf16", None),
        ("Tesla V100-SXM2-16GB", "fp16", None),
    ],
)
def test_peak_table_lookup_by_device_name(name, dtype, peak):
    assert peak_flops_for(name, dtype) == peak


def test_peak_is_given_or_looked_up_from_the_device_name(registry, monkeypatch):
    offline(registry, peak_flops=5e11)  # e.g. a CPU, for tests
    assert registry.get_sample_value("ugro_train_peak_flops_per_second") == 5e11

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H100 80GB HBM3")
    looked_up = CollectorRegistry()
    offline(looked_up, device="cuda:0", gpu_uuid="GPU-1", cuda_memory_stats=lambda index: {})
    assert looked_up.get_sample_value("ugro_train_peak_flops_per_second") == 989e12

    overridden = CollectorRegistry()
    offline(overridden, device="cuda:0", gpu_uuid="GPU-1", peak_flops=1e15, cuda_memory_stats=dict)
    assert overridden.get_sample_value("ugro_train_peak_flops_per_second") == 1e15


def test_unknown_gpu_has_no_peak(registry, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA GeForce GTX 1080")
    with caplog.at_level(logging.INFO, logger="ugro.trainer"):
        offline(registry, device="cuda:0", gpu_uuid="GPU-1", cuda_memory_stats=lambda index: {})
    assert registry.get_sample_value("ugro_train_peak_flops_per_second") is None
    assert "UGRO_PEAK_FLOPS" in caplog.text


# -- CUDA allocator ------------------------------------------------------------------------------


def test_allocator_series_are_absent_on_cpu(registry):
    telemetry = offline(registry, peak_flops=1e12)
    telemetry.step(tokens=8, loss=torch.tensor(1.0))
    for name in ALLOCATOR_SERIES:
        assert registry.get_sample_value(name) is None


def test_allocator_series_read_memory_stats_at_scrape_time(registry, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H100 PCIe")
    readings: list[int] = []
    stats = {  # a few of the keys torch.cuda.memory_stats() returns, as it names them
        "allocated_bytes.all.current": 1 << 30,
        "allocated_bytes.all.peak": 3 << 30,
        "reserved_bytes.all.current": 2 << 30,
        "reserved_bytes.all.peak": 4 << 30,
        "num_alloc_retries": 2,
        "num_ooms": 1,
        "num_device_alloc": 17,
    }

    def memory_stats(index: int) -> dict[str, int]:
        readings.append(index)
        return stats

    telemetry = offline(registry, device="cuda:1", gpu_uuid="GPU-1", cuda_memory_stats=memory_stats)
    for _ in range(3):
        telemetry.step(tokens=8)
    assert readings == []  # nothing on the step path
    get = registry.get_sample_value
    assert get("ugro_train_cuda_memory_peak_allocated_bytes") == 3 << 30
    assert get("ugro_train_cuda_memory_peak_reserved_bytes") == 4 << 30
    assert get("ugro_train_cuda_alloc_retries_total") == 2
    assert get("ugro_train_cuda_ooms_total") == 1
    assert set(readings) == {1}


def test_allocator_reading_without_a_key_or_failing_leaves_series_out(registry):
    # CUDA not initialised yet: memory_stats() is {}; no zeros are made up.
    offline(registry, device="cuda:0", gpu_uuid="GPU-1", cuda_memory_stats=lambda index: {})
    for name in ALLOCATOR_SERIES:
        assert registry.get_sample_value(name) is None

    def broken(index: int) -> dict[str, int]:
        raise RuntimeError("driver gone")

    failing = CollectorRegistry()
    offline(failing, device="cuda:0", gpu_uuid="GPU-1", cuda_memory_stats=broken)
    assert failing.get_sample_value("ugro_train_cuda_ooms_total") is None
    assert failing.get_sample_value("ugro_train_telemetry_errors_total") >= 1
    assert failing.get_sample_value("ugro_train_steps_total") == 0  # the scrape still works
