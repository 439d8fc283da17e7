"""Node health through psutil: CPU, load, memory, swap, filesystems, disk and network I/O.

Cumulative quantities are counters (``rate()`` gives exact utilisation over any window); the
CPU utilisation gauge is measured by the background poller over its interval, so concurrent
scrapers do not disturb each other's reading.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .health import CollectorHealth

# Interfaces that are plumbing for containers and VMs, not the node's own links.
DEFAULT_EXCLUDED_INTERFACES = re.compile(
    r"^(lo|veth|docker|br-|virbr|cni|flannel|cali|tun|tap|vxlan|ifb)"
)
# Block devices that are not disks.
_NOT_DISKS = re.compile(r"^(loop|ram|zram|sr|fd)")
_SYS_BLOCK = "/sys/block"
CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


class HostCollector:
    """Collector for the node's CPU, memory, disks and network."""

    def __init__(
        self,
        *,
        mountpoints: Sequence[str] | None = None,
        excluded_interfaces: re.Pattern[str] = DEFAULT_EXCLUDED_INTERFACES,
        psutil_module: Any = psutil,
    ) -> None:
        """``mountpoints``: the filesystems to report; default every real (device-backed) one."""
        self.health = CollectorHealth("host")
        self._psutil = psutil_module
        self._mountpoints = list(mountpoints) if mountpoints is not None else None
        self._excluded_interfaces = excluded_interfaces
        self._lock = threading.Lock()
        self._previous_cpu: Any = None
        self._cpu_utilization: float | None = None

    def poll(self) -> None:
        """Measure CPU utilisation since the previous poll (called by the poller thread)."""
        times = self._psutil.cpu_times()
        with self._lock:
            previous, self._previous_cpu = self._previous_cpu, times
            if previous is not None:
                total = sum(times) - sum(previous)
                idle = (times.idle + getattr(times, "iowait", 0.0)) - (
                    previous.idle + getattr(previous, "iowait", 0.0)
                )
                if total > 0:
                    self._cpu_utilization = min(1.0, max(0.0, 1.0 - idle / total))
        self.health.polled_at = time.monotonic()

    def mounts(self) -> list[tuple[str, str, str]]:
        """(mountpoint, device, fstype) of the filesystems reported, one per device."""
        partitions = self._psutil.disk_partitions(all=self._mountpoints is not None)
        if self._mountpoints is not None:
            wanted = {os.path.normpath(m) for m in self._mountpoints}
            chosen = [p for p in partitions if p.mountpoint in wanted]
            chosen.sort(key=lambda p: p.mountpoint)
        else:
            # Containers bind-mount single files from the host disk: one entry per device,
            # the shortest mountpoint.
            chosen = sorted(partitions, key=lambda p: (len(p.mountpoint), p.mountpoint))
        seen: set[str] = set()
        result = []
        for partition in chosen:
            if partition.mountpoint in seen or (
                self._mountpoints is None and partition.device in {d for _, d, _ in result}
            ):
                continue
            seen.add(partition.mountpoint)
            result.append((partition.mountpoint, partition.device, partition.fstype))
        return result

    def collect(self) -> Iterator[Metric]:
        yield from self._guard("cpu", self._cpu)
        yield from self._guard("load", self._load)
        yield from self._guard("memory", self._memory)
        yield from self._guard("filesystems", self._filesystems)
        yield from self._guard("disks", self._disks)
        yield from self._guard("network", self._network)
        yield from self._guard("system", self._system)

    def _guard(self, section: str, build: Callable[[], Iterator[Metric]]) -> Iterator[Metric]:
        """One failing section is counted and left out; the rest of the scrape goes on."""
        try:
            families = list(build())
        except (OSError, psutil.Error) as error:
            self.health.record_error(section, error)
            return
        yield from families

    def _cpu(self) -> Iterator[Metric]:
        ps = self._psutil
        seconds = CounterMetricFamily(
            "ugro_node_cpu_seconds",
            "CPU time spent in each mode, summed over all CPUs, in seconds.",
            labels=["mode"],
        )
        times = ps.cpu_times()
        for mode in CPU_MODES:
            if hasattr(times, mode):
                seconds.add_metric([mode], getattr(times, mode))
        yield seconds
        yield GaugeMetricFamily("ugro_node_cpus", "Logical CPUs.", value=ps.cpu_count() or 0)
        with self._lock:
            utilization = self._cpu_utilization
        if utilization is not None:
            yield GaugeMetricFamily(
                "ugro_node_cpu_utilization_ratio",
                "Fraction of CPU time not idle over the last poll interval (0-1).",
                value=utilization,
            )

    def _load(self) -> Iterator[Metric]:
        for period, value in zip((1, 5, 15), self._psutil.getloadavg(), strict=True):
            yield GaugeMetricFamily(
                f"ugro_node_load{period}", f"{period}-minute load average.", value=value
            )

    def _system(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ugro_node_processes", "Processes on the node.", value=len(self._psutil.pids())
        )
        yield GaugeMetricFamily(
            "ugro_node_boot_time_seconds",
            "Unix time at which the node booted, in seconds.",
            value=self._psutil.boot_time(),
        )

    def _memory(self) -> Iterator[Metric]:
        memory = self._psutil.virtual_memory()
        swap = self._psutil.swap_memory()
        for name, help_text, value in (
            ("ugro_node_memory_total_bytes", "Physical memory, in bytes.", memory.total),
            (
                "ugro_node_memory_available_bytes",
                "Memory available to new processes without swapping, in bytes.",
                memory.available,
            ),
            (
                "ugro_node_memory_used_bytes",
                "Memory in use (total minus available), in bytes.",
                memory.total - memory.available,
            ),
            ("ugro_node_swap_total_bytes", "Swap space, in bytes.", swap.total),
            ("ugro_node_swap_used_bytes", "Swap space in use, in bytes.", swap.used),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)

    def _filesystems(self) -> Iterator[Metric]:
        labels = ["mountpoint", "device", "fstype"]
        size = GaugeMetricFamily(
            "ugro_node_filesystem_size_bytes", "Filesystem size, in bytes.", labels=labels
        )
        free = GaugeMetricFamily(
            "ugro_node_filesystem_free_bytes",
            "Filesystem space available to unprivileged users, in bytes.",
            labels=labels,
        )
        for mountpoint, device, fstype in self.mounts():
            try:
                usage = self._psutil.disk_usage(mountpoint)
            except OSError as error:  # unmounted or unreadable since listing: leave it out
                self.health.record_error("filesystems", error)
                continue
            size.add_metric([mountpoint, device, fstype], usage.total)
            free.add_metric([mountpoint, device, fstype], usage.free)
        yield size
        yield free

    def _disks(self) -> Iterator[Metric]:
        counters = self._psutil.disk_io_counters(perdisk=True) or {}
        try:
            whole_disks = set(os.listdir(_SYS_BLOCK))
        except OSError:
            whole_disks = set(counters)
        read = CounterMetricFamily(
            "ugro_node_disk_read_bytes", "Bytes read from the disk.", labels=["device"]
        )
        written = CounterMetricFamily(
            "ugro_node_disk_written_bytes", "Bytes written to the disk.", labels=["device"]
        )
        busy = CounterMetricFamily(
            "ugro_node_disk_io_time_seconds",
            "Time the disk spent doing I/O, in seconds (rate() is its utilisation).",
            labels=["device"],
        )
        for device, io in sorted(counters.items()):
            if device not in whole_disks or _NOT_DISKS.match(device):
                continue  # partitions and pseudo devices would double-count
            read.add_metric([device], io.read_bytes)
            written.add_metric([device], io.write_bytes)
            if hasattr(io, "busy_time"):
                busy.add_metric([device], io.busy_time / 1000.0)
        yield from (read, written, busy)

    def _network(self) -> Iterator[Metric]:
        counters = self._psutil.net_io_counters(pernic=True) or {}
        labels = ["interface"]
        families = {
            "bytes_recv": CounterMetricFamily(
                "ugro_node_network_receive_bytes", "Bytes received.", labels=labels
            ),
            "bytes_sent": CounterMetricFamily(
                "ugro_node_network_transmit_bytes", "Bytes sent.", labels=labels
            ),
            "errin": CounterMetricFamily(
                "ugro_node_network_receive_errors", "Receive errors.", labels=labels
            ),
            "errout": CounterMetricFamily(
                "ugro_node_network_transmit_errors", "Transmit errors.", labels=labels
            ),
        }
        for interface, io in sorted(counters.items()):
            if self._excluded_interfaces.match(interface):
                continue
            for field, family in families.items():
                family.add_metric([interface], getattr(io, field))
        yield from families.values()
