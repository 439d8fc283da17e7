from __future__ import annotations

import logging
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ugro.exporter.gpu import CLOCK_EVENT_REASONS, GpuCollector
from ugro.exporter.health import HealthCollector, TimedCollector
from ugro.exporter.nvml import Nvml, NvmlUnavailable

from ..support import wait_for
from .fake_nvml import FakeNvml, h100s

SLOW_QUERIES = (
    "nvmlDeviceGetPcieThroughput",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlGpmSampleGet",
    "nvmlGpmMetricsGet",
    "nvmlDeviceGetFieldValues",
)


@pytest.fixture
def fake() -> FakeNvml:
    fake = FakeNvml(h100s(8))
    fake.gpus[1].clock_event_reasons = 0x4 | 0x40  # power cap and hardware thermal slowdown
    fake.gpus[2].ecc_uncorrected = 3
    return fake


@pytest.fixture
def setup(fake):
    collector = GpuCollector(Nvml(fake))
    registry = CollectorRegistry()
    registry.register(TimedCollector(collector))
    registry.register(HealthCollector([collector.health]))
    yield collector, registry
    collector.close()


def gpu_labels(fake: FakeNvml, index: int, **extra: str) -> dict[str, str]:
    return {"gpu": str(index), "gpu_uuid": fake.gpus[index].uuid, **extra}


def test_every_gpu_reading_in_base_units(fake, setup):
    _, registry = setup
    get = registry.get_sample_value
    assert get("ugro_node_gpus") == 8
    assert get("ugro_exporter_collector_up", {"collector": "gpu"}) == 1
    for index in (0, 7):
        labels = gpu_labels(fake, index)
        gpu = fake.gpus[index]
        assert get("ugro_gpu_up", labels) == 1
        assert get("ugro_gpu_utilization_ratio", labels) == pytest.approx((90 - index) / 100)
        assert get("ugro_gpu_memory_utilization_ratio", labels) == pytest.approx((40 + index) / 100)
        assert get("ugro_gpu_memory_used_bytes", labels) == gpu.memory_used
        assert get("ugro_gpu_memory_total_bytes", labels) == 81559 * 2**20
        assert get("ugro_gpu_temperature_celsius", labels) == 60 + index
        assert get("ugro_gpu_power_watts", labels) == pytest.approx(600 + index)
        assert get("ugro_gpu_power_limit_watts", labels) == 700
        assert get("ugro_gpu_sm_clock_hertz", labels) == 1.98e9
        assert get("ugro_gpu_memory_clock_hertz", labels) == 2.619e9
        assert get("ugro_gpu_pcie_replays_total", labels) == 0
        assert get("ugro_gpu_performance_state", labels) == 0
        assert get("ugro_gpu_compute_processes", labels) == 1
        info = {
            **labels,
            "name": gpu.name,
            "pci_bus_id": gpu.bus_id,
            "driver_version": "580.159.04",
        }
        assert get("ugro_gpu_info", info) == 1


def test_clock_event_reasons_and_ecc_errors(fake, setup):
    _, registry = setup
    get = registry.get_sample_value
    active = {
        reason
        for _, reason in CLOCK_EVENT_REASONS
        if get("ugro_gpu_clock_event_active", gpu_labels(fake, 1, reason=reason)) == 1
    }
    assert active == {"sw_power_cap", "hw_thermal_slowdown"}
    assert get("ugro_gpu_clock_event_active", gpu_labels(fake, 0, reason="sw_power_cap")) == 0
    uncorrected = gpu_labels(fake, 2, type="uncorrected")
    assert get("ugro_gpu_ecc_errors_total", uncorrected) == 3
    assert get("ugro_gpu_ecc_errors_total", gpu_labels(fake, 2, type="corrected")) == 0


def test_slow_queries_stay_off_the_scrape_path(fake, setup):
    collector, registry = setup
    generate_latest(registry)
    assert all(fake.calls[q] == 0 for q in SLOW_QUERIES)
    labels = gpu_labels(fake, 3)
    assert registry.get_sample_value("ugro_gpu_energy_joules_total", labels) is None

    collector.poll()  # what the background poller does
    collector.poll()  # GPM figures need a second sample
    calls_after_poll = {q: fake.calls[q] for q in SLOW_QUERIES}
    # These H100s have GPM, which gives PCIe throughput without the 21 ms query.
    assert calls_after_poll == {
        "nvmlDeviceGetPcieThroughput": 0,
        "nvmlDeviceGetTotalEnergyConsumption": 16,
        "nvmlGpmSampleGet": 16,
        "nvmlGpmMetricsGet": 8,
        "nvmlDeviceGetFieldValues": 16,  # the recovery action
    }
    get = registry.get_sample_value
    assert get("ugro_gpu_energy_joules_total", labels) == 4000.0  # 4,000,000 mJ
    tx = get("ugro_gpu_pcie_throughput_bytes_per_second", {**labels, "direction": "tx"})
    assert tx == pytest.approx(4000 * 1024)  # GPM's MiB/s, in bytes per second
    assert 0 <= get("ugro_exporter_poll_age_seconds", {"collector": "gpu"}) < 5
    generate_latest(registry)
    assert {q: fake.calls[q] for q in SLOW_QUERIES} == calls_after_poll


def test_a_lost_gpu_is_reported_lost_and_the_others_keep_flowing(fake, setup, caplog):
    collector, registry = setup
    collector.poll()
    fake.lose(3)
    get = registry.get_sample_value
    with caplog.at_level(logging.ERROR, logger="ugro.exporter.gpu"):
        generate_latest(registry)
        generate_latest(registry)
    assert len([r for r in caplog.records if "GPU 3" in r.getMessage()]) == 1  # logged once
    assert get("ugro_gpu_up", gpu_labels(fake, 3)) == 0
    assert get("ugro_gpu_temperature_celsius", gpu_labels(fake, 3)) is None
    assert get("ugro_gpu_info", {**gpu_labels(fake, 3), "name": fake.gpus[3].name,
                                 "pci_bus_id": fake.gpus[3].bus_id,
                                 "driver_version": "580.159.04"}) == 1  # fmt: skip
    assert get("ugro_gpu_up", gpu_labels(fake, 4)) == 1
    assert get("ugro_gpu_temperature_celsius", gpu_labels(fake, 4)) == 64
    assert get("ugro_exporter_collector_up", {"collector": "gpu"}) == 1

    collector.poll()  # the poller survives the lost GPU too
    fake.restore(3)
    assert get("ugro_gpu_up", gpu_labels(fake, 3)) == 1


def test_xid_events_are_counted_by_gpu_and_code(fake, setup):
    _, registry = setup
    fake.inject_xid(5, 79)
    fake.inject_xid(5, 79)
    fake.inject_xid(2, 48)
    get = registry.get_sample_value
    wait_for(
        lambda: (
            get("ugro_gpu_xid_errors_total", gpu_labels(fake, 5, xid="79")) == 2
            and get("ugro_gpu_xid_errors_total", gpu_labels(fake, 2, xid="48")) == 1
        ),
        5,
        "the XID counters",
    )
    assert get("ugro_gpu_xid_errors_total", gpu_labels(fake, 0, xid="79")) is None


def test_unsupported_fields_are_left_out_not_zero():
    fake = FakeNvml(
        h100s(2),
        unsupported=frozenset({"nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetPcieThroughput"}),
    )
    collector = GpuCollector(Nvml(fake))
    registry = CollectorRegistry()
    registry.register(TimedCollector(collector))
    collector.poll()
    text = generate_latest(registry).decode()
    assert "ugro_gpu_ecc_errors" not in text
    assert "ugro_gpu_pcie_throughput" not in text
    assert "ugro_gpu_energy_joules_total" in text
    assert "ugro_gpu_temperature_celsius" in text
    assert collector.health.errors == 0
    collector.close()


def test_older_drivers_use_the_throttle_reasons_query():
    fake = FakeNvml(h100s(1), unsupported=frozenset({"nvmlDeviceGetCurrentClocksEventReasons"}))
    fake.gpus[0].clock_event_reasons = 0x4
    collector = GpuCollector(Nvml(fake))
    registry = CollectorRegistry()
    registry.register(TimedCollector(collector))
    labels = gpu_labels(fake, 0, reason="sw_power_cap")
    assert registry.get_sample_value("ugro_gpu_clock_event_active", labels) == 1
    collector.close()


@pytest.mark.parametrize(
    ("nvml", "unavailable", "reason"),
    [
        (Nvml(FakeNvml(library_missing=True)), None, "library_not_found"),
        (None, NvmlUnavailable("module_missing", "cannot import 'pynvml'"), "module_missing"),
    ],
)
def test_without_nvml_the_collector_is_down_with_its_reason(nvml, unavailable, reason):
    collector = GpuCollector(nvml, unavailable)
    registry = CollectorRegistry()
    registry.register(TimedCollector(collector))
    registry.register(HealthCollector([collector.health]))
    get = registry.get_sample_value
    assert get("ugro_exporter_collector_up", {"collector": "gpu"}) == 0
    assert get("ugro_exporter_collector_down_reason", {"collector": "gpu", "reason": reason}) == 1
    assert get("ugro_node_gpus") is None
    collector.poll()  # harmless while down
    collector.close()


def test_series_per_gpu_at_most_40(fake, setup):
    collector, registry = setup
    collector.poll()
    time.sleep(0.01)
    collector.poll()  # the GPM series appear from the second poll on
    fake.inject_xid(0, 79)
    wait_for(lambda: "ugro_gpu_xid_errors_total" in generate_latest(registry).decode(), 5, "XID")
    per_gpu: dict[str, int] = {}
    for family in registry.collect():
        for sample in family.samples:
            if "gpu_uuid" in sample.labels:
                per_gpu[sample.labels["gpu"]] = per_gpu.get(sample.labels["gpu"], 0) + 1
    assert len(per_gpu) == 8
    assert max(per_gpu.values()) <= 40, per_gpu


def test_exposition_is_clean_under_promtool(fake, setup, promtool):
    collector, registry = setup
    collector.poll()
    fake.inject_xid(1, 31)
    wait_for(lambda: "xid=" in generate_latest(registry).decode(), 5, "XID")
    result = promtool(generate_latest(registry).decode())
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout
