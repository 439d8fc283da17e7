from __future__ import annotations

import os
import time

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ugro.exporter.health import HealthCollector, TimedCollector
from ugro.exporter.host import HostCollector


def registry_for(collector: HostCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(TimedCollector(collector))
    registry.register(HealthCollector([collector.health]))
    return registry


def test_memory_cpu_and_system_readings_match_psutil():
    collector = HostCollector()
    registry = registry_for(collector)
    get = registry.get_sample_value
    memory = psutil.virtual_memory()
    assert get("ugro_node_memory_total_bytes") == memory.total
    assert get("ugro_node_memory_available_bytes") == pytest.approx(memory.available, rel=0.05)
    assert get("ugro_node_memory_used_bytes") == pytest.approx(
        memory.total - memory.available, rel=0.2
    )
    assert get("ugro_node_swap_total_bytes") == psutil.swap_memory().total
    assert get("ugro_node_cpus") == psutil.cpu_count()
    idle = get("ugro_node_cpu_seconds_total", {"mode": "idle"})
    assert idle == pytest.approx(psutil.cpu_times().idle, abs=5 * psutil.cpu_count())
    assert get("ugro_node_load1") == pytest.approx(psutil.getloadavg()[0], abs=2)
    assert get("ugro_node_boot_time_seconds") == pytest.approx(psutil.boot_time(), abs=2)
    assert get("ugro_node_processes") > 1
    assert get("ugro_exporter_collector_up", {"collector": "host"}) == 1
    assert get("ugro_exporter_collector_errors_total", {"collector": "host"}) == 0


def test_cpu_utilization_is_measured_between_polls():
    collector = HostCollector()
    registry = registry_for(collector)
    collector.poll()
    assert registry.get_sample_value("ugro_node_cpu_utilization_ratio") is None
    deadline = time.perf_counter() + 0.3
    while time.perf_counter() < deadline:  # keep one core busy for the window
        pass
    collector.poll()
    utilization = registry.get_sample_value("ugro_node_cpu_utilization_ratio")
    assert 1 / psutil.cpu_count() * 0.5 <= utilization <= 1.0
    age = registry.get_sample_value("ugro_exporter_poll_age_seconds", {"collector": "host"})
    assert 0 <= age < 5


def test_filesystems_are_real_ones_one_per_device():
    collector = HostCollector()
    mounts = collector.mounts()
    devices = [device for _, device, _ in mounts]
    assert len(devices) == len(set(devices))
    assert not {fstype for *_, fstype in mounts} & {"tmpfs", "proc", "sysfs", "overlay", "devtmpfs"}


def test_chosen_mount_is_reported_with_psutil_sizes():
    collector = HostCollector(mountpoints=["/"])
    registry = registry_for(collector)
    [(_, device, fstype)] = collector.mounts()
    labels = {"mountpoint": "/", "device": device, "fstype": fstype}
    usage = psutil.disk_usage("/")
    assert registry.get_sample_value("ugro_node_filesystem_size_bytes", labels) == usage.total
    free = registry.get_sample_value("ugro_node_filesystem_free_bytes", labels)
    assert free == pytest.approx(usage.free, rel=0.05)


def test_network_counters_leave_out_loopback():
    registry = registry_for(HostCollector())
    text = generate_latest(registry).decode()
    assert 'interface="lo"' not in text
    counters = psutil.net_io_counters(pernic=True)
    real = [name for name in counters if name != "lo" and not name.startswith(("veth", "ifb"))]
    for name in real:
        sent = registry.get_sample_value(
            "ugro_node_network_transmit_bytes_total", {"interface": name}
        )
        assert sent >= counters[name].bytes_sent


def test_disk_counters_cover_whole_disks_not_partitions():
    registry = registry_for(HostCollector())
    devices = {
        sample.labels["device"]
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "ugro_node_disk_read_bytes_total"
    }
    assert devices, "no disk counters at all"
    assert devices <= set(os.listdir("/sys/block"))  # whole disks; partitions live below them
    assert not {d for d in devices if d.startswith(("loop", "ram"))}
    per_disk = psutil.disk_io_counters(perdisk=True)
    for device in devices:
        assert (
            registry.get_sample_value("ugro_node_disk_read_bytes_total", {"device": device})
            >= per_disk[device].read_bytes
        )


class FailingNetwork:
    """Real psutil, except that the network counters fail as a vanished /proc entry would."""

    def __getattr__(self, name):
        return getattr(psutil, name)

    def net_io_counters(self, pernic=False):
        raise OSError("no such file: /proc/net/dev")


def test_a_failing_section_is_counted_and_the_rest_still_served(caplog):
    collector = HostCollector(psutil_module=FailingNetwork())
    registry = registry_for(collector)
    get = registry.get_sample_value
    assert get("ugro_node_memory_total_bytes") == psutil.virtual_memory().total
    assert get("ugro_node_network_receive_bytes_total", {"interface": "eth0"}) is None
    assert get("ugro_exporter_collector_errors_total", {"collector": "host"}) >= 1
    assert get("ugro_exporter_collector_up", {"collector": "host"}) == 1
    assert "no such file: /proc/net/dev" in caplog.text


def test_host_series_fit_in_80_per_node(promtool):
    collector = HostCollector()
    registry = registry_for(collector)
    collector.poll()
    collector.poll()
    series = sum(len(family.samples) for family in registry.collect())
    assert series <= 80
    result = promtool(generate_latest(registry).decode())
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout
