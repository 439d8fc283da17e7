"""GPM profiling figures, NVLink throughput and the recovery action, against the scripted NVML.

One node mixes an H100 (GPM) with an A100 (no GPM: NVLink from field values), as a fleet in
transition does; a driver without GPM at all is scripted with ``missing``.
"""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ugro.exporter.gpu import GpuCollector
from ugro.exporter.health import HealthCollector, TimedCollector
from ugro.exporter.nvml import Nvml

from .fake_nvml import NVML_GPM_METRIC_FP64_UTIL, FakeNvml, a100, h100s

MIB = 2**20
GPM_FAMILIES = (
    "ugro_gpu_sm_active_ratio",
    "ugro_gpu_sm_occupancy_ratio",
    "ugro_gpu_tensor_active_ratio",
    "ugro_gpu_dram_active_ratio",
    "ugro_gpu_pipe_active_ratio",
)


def mixed_node() -> FakeNvml:
    return FakeNvml([*h100s(1), a100(1)])


def labels(fake: FakeNvml, index: int, **extra: str) -> dict[str, str]:
    return {"gpu": str(index), "gpu_uuid": fake.gpus[index].uuid, **extra}


@pytest.fixture
def make():
    """``make(fake, **options)`` -> (collector, registry); everything made is closed after."""
    made: list[GpuCollector] = []

    def build(fake: FakeNvml, **options: bool) -> tuple[GpuCollector, CollectorRegistry]:
        collector = GpuCollector(Nvml(fake), **options)
        made.append(collector)
        registry = CollectorRegistry()
        registry.register(TimedCollector(collector))
        registry.register(HealthCollector([collector.health]))
        return collector, registry

    yield build
    for collector in made:
        collector.close()


def two_polls(collector: GpuCollector) -> None:
    collector.poll()
    time.sleep(0.02)  # GPM wants its second sample later than the first, as NVLink rates do
    collector.poll()


def test_gpm_figures_in_base_units_from_the_second_poll_on(make):
    fake = FakeNvml(h100s(2))
    collector, registry = make(fake)
    get = registry.get_sample_value
    collector.poll()
    gpu1 = labels(fake, 1)
    assert get("ugro_gpu_gpm_supported", gpu1) == 1
    assert get("ugro_gpu_sm_active_ratio", gpu1) is None  # one sample is no interval yet
    time.sleep(0.02)
    collector.poll()
    assert get("ugro_gpu_sm_active_ratio", gpu1) == pytest.approx(0.69)
    assert get("ugro_gpu_sm_occupancy_ratio", gpu1) == pytest.approx(0.31)
    assert get("ugro_gpu_tensor_active_ratio", gpu1) == pytest.approx(0.49)
    assert get("ugro_gpu_dram_active_ratio", gpu1) == pytest.approx(0.41)
    pipes = {"fp16": 0.05, "fp32": 0.11, "fp64": 0.01}
    for pipe, ratio in pipes.items():
        assert get("ugro_gpu_pipe_active_ratio", {**gpu1, "pipe": pipe}) == pytest.approx(ratio)
    assert get("ugro_gpu_pipe_active_ratio", {**gpu1, "pipe": "tensor_hmma"}) is None  # opt-in
    # GPM's MiB/s as bytes per second: 18 links at 200 MiB/s tx, 400 MiB/s rx.
    nvlink = "ugro_gpu_nvlink_throughput_bytes_per_second"
    assert get(nvlink, {**gpu1, "direction": "tx"}) == pytest.approx(18 * 200 * MIB)
    assert get(nvlink, {**gpu1, "direction": "rx"}) == pytest.approx(18 * 400 * MIB)
    pcie = "ugro_gpu_pcie_throughput_bytes_per_second"
    assert get(pcie, {**gpu1, "direction": "rx"}) == pytest.approx(4000 / 1024 * MIB)
    assert get("ugro_gpu_recovery_action", gpu1) == 0
    assert get("ugro_exporter_collector_errors_total", {"collector": "gpu"}) == 0
    assert fake.calls["nvmlDeviceGetPcieThroughput"] == 0


def test_a_gpu_without_gpm_says_why_and_reads_nvlink_from_field_values(make, caplog):
    fake = mixed_node()
    with caplog.at_level(logging.INFO, logger="ugro.exporter.profiling"):
        collector, registry = make(fake)
        two_polls(collector)
        time.sleep(0.02)
        collector.poll()  # said once, not once per poll
    why = [r.getMessage() for r in caplog.records if "no GPM" in r.getMessage()]
    assert why == [
        "GPU 1: no GPM profiling metrics (GPM needs a Hopper or newer GPU); "
        "ugro_gpu_sm_active_ratio and the other profiling series are left out, "
        "ugro_gpu_gpm_supported is 0; NVLink totals come from field values"
    ]
    get = registry.get_sample_value
    h100, old = labels(fake, 0), labels(fake, 1)
    assert get("ugro_gpu_gpm_supported", h100) == 1
    assert get("ugro_gpu_gpm_supported", old) == 0
    assert get("ugro_gpu_sm_active_ratio", h100) == pytest.approx(0.70)
    text = generate_latest(registry).decode()
    for family in GPM_FAMILIES:
        assert f'{family}{{gpu="1"' not in text
    # 12 links, each counting 300 MiB/s (tx) and 400 MiB/s (rx) in KiB, over two polls.
    nvlink = "ugro_gpu_nvlink_throughput_bytes_per_second"
    assert get(nvlink, {**old, "direction": "tx"}) == pytest.approx(12 * 300 * MIB, rel=1e-2)
    assert get(nvlink, {**old, "direction": "rx"}) == pytest.approx(12 * 400 * MIB, rel=1e-2)
    # PCIe from the older query on the A100 only.
    assert fake.calls["nvmlDeviceGetPcieThroughput"] == 2 * 3
    pcie = get("ugro_gpu_pcie_throughput_bytes_per_second", {**old, "direction": "tx"})
    assert pcie == 0
    assert get("ugro_gpu_recovery_action", old) == 0
    assert get("ugro_exporter_collector_errors_total", {"collector": "gpu"}) == 0


def test_a_driver_without_gpm_leaves_the_gpm_series_out(make, caplog):
    fake = FakeNvml(h100s(2), missing=frozenset({"nvmlGpmQueryDeviceSupport"}))
    with caplog.at_level(logging.INFO, logger="ugro.exporter.profiling"):
        collector, registry = make(fake)
    two_polls(collector)
    assert "the driver has no GPM support" in caplog.text
    get = registry.get_sample_value
    assert get("ugro_gpu_gpm_supported", labels(fake, 0)) == 0
    assert "ugro_gpu_sm_active_ratio" not in generate_latest(registry).decode()
    # The H100's NVLink counters still give totals, and PCIe comes from the older query.
    nvlink = get("ugro_gpu_nvlink_throughput_bytes_per_second", labels(fake, 1, direction="tx"))
    assert nvlink == pytest.approx(18 * 200 * MIB, rel=1e-2)
    pcie = get("ugro_gpu_pcie_throughput_bytes_per_second", labels(fake, 1, direction="tx"))
    assert pcie == 2000 * 1024
    assert fake.calls["nvmlGpmSampleAlloc"] == 0
    assert get("ugro_exporter_collector_errors_total", {"collector": "gpu"}) == 0


def test_a_metric_the_gpu_does_not_answer_is_left_out_alone(make):
    fake = FakeNvml(h100s(1))
    del fake.gpus[0].gpm[NVML_GPM_METRIC_FP64_UTIL]
    collector, registry = make(fake)
    two_polls(collector)
    get = registry.get_sample_value
    assert get("ugro_gpu_pipe_active_ratio", labels(fake, 0, pipe="fp64")) is None
    assert get("ugro_gpu_pipe_active_ratio", labels(fake, 0, pipe="fp32")) == pytest.approx(0.1)
    assert get("ugro_exporter_collector_errors_total", {"collector": "gpu"}) == 0


def test_ratios_stay_within_0_and_1(make):
    fake = FakeNvml(h100s(1))
    fake.gpus[0].gpm[2] = 100.4  # SM_UTIL as GPM reports it now and then
    collector, registry = make(fake)
    two_polls(collector)
    assert registry.get_sample_value("ugro_gpu_sm_active_ratio", labels(fake, 0)) == 1.0


def test_opt_in_per_link_nvlink_and_tensor_pipes(make):
    fake = mixed_node()
    collector, registry = make(fake, nvlink_per_link=True, tensor_pipes=True)
    two_polls(collector)
    get = registry.get_sample_value
    per_link = "ugro_gpu_nvlink_link_throughput_bytes_per_second"
    h100, old = labels(fake, 0), labels(fake, 1)
    for link in (0, 17):
        rx = get(per_link, {**h100, "link": str(link), "direction": "rx"})
        assert rx == pytest.approx(200 * MIB)
    assert get(per_link, {**h100, "link": "18", "direction": "rx"}) is None
    for link in (0, 11):
        tx = get(per_link, {**old, "link": str(link), "direction": "tx"})
        assert tx == pytest.approx(300 * MIB, rel=1e-2)
    tensor = {"tensor_hmma": 0.45, "tensor_dfma": 0.005, "tensor_imma": 0.02}
    for pipe, ratio in tensor.items():
        assert get("ugro_gpu_pipe_active_ratio", {**h100, "pipe": pipe}) == pytest.approx(ratio)
        assert get("ugro_gpu_pipe_active_ratio", {**old, "pipe": pipe}) is None


@pytest.mark.parametrize(("action", "expected"), [(1, 1.0), (4, 4.0), (None, None)])
def test_recovery_action_where_the_driver_offers_it(make, action, expected):
    fake = FakeNvml(h100s(1))
    fake.gpus[0].recovery_action = action
    collector, registry = make(fake)
    collector.poll()
    collector.poll()
    assert registry.get_sample_value("ugro_gpu_recovery_action", labels(fake, 0)) == expected
    assert registry.get_sample_value("ugro_gpu_sm_active_ratio", labels(fake, 0)) is not None
    if action is None:  # not asked for again once the driver said it has no such field
        assert fake.calls["nvmlDeviceGetFieldValues"] == 1
    assert collector.health.errors == 0


def test_gpm_samples_are_allocated_once_and_freed_on_close(make):
    fake = FakeNvml(h100s(2))
    collector, _ = make(fake)
    for _ in range(3):
        collector.poll()
        time.sleep(0.005)
    assert fake.calls["nvmlGpmSampleAlloc"] == 4
    assert len(fake.gpm_samples) == 4
    collector.close()
    assert fake.gpm_samples == {}


def test_a_lost_gpu_skips_gpm_and_picks_up_again(make):
    fake = FakeNvml(h100s(2))
    collector, registry = make(fake)
    two_polls(collector)
    fake.lose(1)
    collector.poll()
    get = registry.get_sample_value
    assert get("ugro_gpu_up", labels(fake, 1)) == 0
    assert get("ugro_gpu_sm_active_ratio", labels(fake, 0)) == pytest.approx(0.70)
    fake.restore(1)
    time.sleep(0.005)
    collector.poll()
    assert get("ugro_gpu_sm_active_ratio", labels(fake, 1)) == pytest.approx(0.69)
    assert collector.health.errors == 0


def test_series_per_gpu_stay_within_40_by_default(make):
    fake = mixed_node()
    collector, registry = make(fake)
    two_polls(collector)
    fake.inject_xid(0, 79)
    per_gpu: dict[str, int] = {}
    deadline = time.monotonic() + 5
    while "ugro_gpu_xid_errors_total" not in generate_latest(registry).decode():
        assert time.monotonic() < deadline, "no XID"
        time.sleep(0.01)
    for family in registry.collect():
        for sample in family.samples:
            if "gpu_uuid" in sample.labels:
                per_gpu[sample.labels["gpu"]] = per_gpu.get(sample.labels["gpu"], 0) + 1
    assert per_gpu == {"0": 40, "1": 32}  # 39 + one XID code on the H100; no GPM on the A100


def test_calls_per_poll_counts_what_a_poll_makes(make):
    fake = mixed_node()
    collector, _ = make(fake)
    collector.poll()
    before = sum(fake.calls.values())
    collector.poll()
    # H100: energy, GPM sample + metrics, field values; A100: energy, PCIe x2, field values.
    assert sum(fake.calls.values()) - before == collector.calls_per_poll() == 4 + 4
