"""GPU health through NVML: fast queries at scrape time, slow ones from a background poller.

On an H100 most NVML queries take microseconds, but PCIe throughput takes ~21 ms per GPU and
total energy ~4 ms: ``poll()`` reads those off the scrape path and a scrape serialises the cached
values (``ugro_exporter_poll_age_seconds`` says how old they are). XID errors arrive as NVML
events, waited on in a thread of their own and counted by code. The poller also reads the GPM
profiling figures, NVLink throughput and the recovery action (profiling.py); on a GPU with GPM,
PCIe throughput comes from GPM too and the 21 ms query is not made.

Every series carries ``gpu`` (NVML index) and ``gpu_uuid``; join with the ranks'
``ugro_train_rank_info`` on ``gpu_uuid`` (and ``node``) to attribute a GPU to a job and rank.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .health import CollectorHealth
from .nvml import GpuLost, Nvml, NvmlCallError, NvmlUnavailable
from .profiling import GpuProfiler, Series

log = logging.getLogger("ugro.exporter.gpu")

# NVML argument values (nvml.h).
_TEMPERATURE_GPU = 0
_CLOCK_SM, _CLOCK_MEM = 1, 2
_ECC_CORRECTED, _ECC_UNCORRECTED, _ECC_VOLATILE = 0, 1, 0
_PCIE_TX, _PCIE_RX = 0, 1
_EVENT_XID_CRITICAL = 0x8
# NVML reports PCIe throughput in KB/s (1 KB = 1024 bytes).
_KIB = 1024

# Clock-event (throttle) reason bits, nvmlClocksEventReason* in nvml.h, as label values.
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x001, "gpu_idle"),
    (0x002, "applications_clocks_setting"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal_slowdown"),
    (0x040, "hw_thermal_slowdown"),
    (0x080, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)

# How often a down collector tries nvmlInit again (a driver loaded after boot, say).
_REINIT_INTERVAL_SECONDS = 60.0
# How long the XID thread blocks in one wait; bounds how fast it notices shutdown.
_XID_WAIT_MS = 500

GPU_LABELS = ("gpu", "gpu_uuid")

# name -> (type, help); the families a scrape can contain besides info/up/XID.
_GPU_METRICS: dict[str, tuple[str, str]] = {
    "ugro_gpu_utilization_ratio": (
        "gauge", "Fraction of the last sample period in which a kernel ran on the GPU (0-1).",
    ),
    "ugro_gpu_memory_utilization_ratio": (
        "gauge", "Fraction of the last sample period in which device memory was read or written.",
    ),
    "ugro_gpu_memory_used_bytes": ("gauge", "Device memory in use, in bytes."),
    "ugro_gpu_memory_total_bytes": ("gauge", "Device memory installed, in bytes."),
    "ugro_gpu_temperature_celsius": ("gauge", "GPU core temperature, in degrees Celsius."),
    "ugro_gpu_power_watts": ("gauge", "Power draw of the board, in watts."),
    "ugro_gpu_power_limit_watts": ("gauge", "Enforced power limit, in watts."),
    "ugro_gpu_sm_clock_hertz": ("gauge", "Current SM clock, in hertz."),
    "ugro_gpu_memory_clock_hertz": ("gauge", "Current memory clock, in hertz."),
    "ugro_gpu_clock_event_active": (
        "gauge", "1 while the clock-event (throttle) reason is active, else 0.",
    ),
    "ugro_gpu_ecc_errors": (
        "counter", "ECC errors since the driver loaded (volatile), by type.",
    ),
    "ugro_gpu_pcie_replays": ("counter", "PCIe replay counter (link-level retransmissions)."),
    "ugro_gpu_performance_state": ("gauge", "Performance state: 0 (P0, fastest) to 15."),
    "ugro_gpu_compute_processes": ("gauge", "Compute processes running on the GPU."),
    "ugro_gpu_energy_joules": (
        "counter", "Energy consumed since the driver loaded, in joules (polled).",
    ),
    "ugro_gpu_pcie_throughput_bytes_per_second": (
        "gauge",
        "PCIe throughput by direction: GPM's average over the last poll interval where the GPU "
        "supports GPM, else the driver's last 20 ms window (polled).",
    ),
    "ugro_gpu_gpm_supported": (
        "gauge", "1 when the GPU and driver give GPM profiling metrics, else 0.",
    ),
    "ugro_gpu_sm_active_ratio": (
        "gauge", "Share of SMs busy, averaged over the last poll interval (GPM, 0-1).",
    ),
    "ugro_gpu_sm_occupancy_ratio": (
        "gauge", "Active warps over the SMs' maximum, averaged over the last poll interval (GPM).",
    ),
    "ugro_gpu_tensor_active_ratio": (
        "gauge", "Share of time the SMs ran any tensor-core instruction (GPM, 0-1).",
    ),
    "ugro_gpu_dram_active_ratio": (
        "gauge", "Device memory bandwidth used over its maximum (GPM, 0-1).",
    ),
    "ugro_gpu_pipe_active_ratio": (
        "gauge", "Share of time the SMs used the pipe (non-tensor FP16/32/64, tensor kinds) (GPM).",
    ),
    "ugro_gpu_nvlink_throughput_bytes_per_second": (
        "gauge", "NVLink data throughput over all links, by direction (last poll interval).",
    ),
    "ugro_gpu_nvlink_link_throughput_bytes_per_second": (
        "gauge", "NVLink data throughput of one link, by direction (--nvlink-per-link).",
    ),
    "ugro_gpu_recovery_action": (
        "gauge",
        "Recovery the driver asks for: 0 none, 1 GPU reset, 2 node reboot, 3 drain P2P, "
        "4 drain and reset; 5-7 on newer drivers (NVML's enum, docs/metrics.md).",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    handle: Any

    @property
    def labels(self) -> list[str]:
        return [str(self.index), self.uuid]


@dataclass(frozen=True)
class SlowReadings:
    energy_joules: float | None
    pcie_tx_bytes_per_second: float | None
    pcie_rx_bytes_per_second: float | None
    profile: tuple[Series, ...] = ()


class GpuCollector:
    """Collector for every GPU NVML can see on this node."""

    def __init__(
        self,
        nvml: Nvml | None,
        unavailable: NvmlUnavailable | None = None,
        *,
        nvlink_per_link: bool = False,
        tensor_pipes: bool = False,
    ) -> None:
        """``nvml`` is None when the binding could not even be loaded (``unavailable`` says why).

        ``nvlink_per_link`` and ``tensor_pipes`` add series beyond the 40-per-GPU budget: one
        per NVLink and direction, and the HMMA/DFMA/IMMA tensor pipes.
        """
        self.health = CollectorHealth("gpu")
        self._nvml = nvml
        self._nvlink_per_link = nvlink_per_link
        self._tensor_pipes = tensor_pipes
        self._profilers: dict[int, GpuProfiler] = {}
        self._lock = threading.Lock()
        self._gpus: list[Gpu] = []
        self._driver_version = ""
        self._slow: dict[int, SlowReadings] = {}
        self._xids: dict[tuple[int, int], int] = {}
        self._lost: set[int] = set()
        self._last_init_attempt = 0.0
        self._stop = threading.Event()
        self._xid_thread: threading.Thread | None = None
        if nvml is None:
            reason = unavailable or NvmlUnavailable("module_missing", "no NVML binding")
            self.health.set_down(reason.reason, str(reason))
        else:
            self._start()

    # -- life cycle ----------------------------------------------------------------------------

    def _start(self) -> None:
        """Initialise NVML and discover the GPUs; on failure, stay down with the reason."""
        assert self._nvml is not None
        self._last_init_attempt = time.monotonic()
        try:
            self._nvml.init()
            gpus = [self._identify(index) for index in range(self._nvml.call("nvmlDeviceGetCount"))]
            driver = self._nvml.call("nvmlSystemGetDriverVersion") or ""
        except NvmlUnavailable as error:
            self.health.set_down(error.reason, str(error))
            return
        except (GpuLost, NvmlCallError) as error:
            self.health.set_down("init_failed", f"GPU discovery failed: {error}")
            return
        profilers = {
            gpu.index: GpuProfiler(
                self._nvml,
                gpu.index,
                gpu.handle,
                nvlink_per_link=self._nvlink_per_link,
                tensor_pipes=self._tensor_pipes,
            )
            for gpu in gpus
        }
        self._close_profilers()
        with self._lock:
            self._gpus, self._driver_version = gpus, driver
            self._profilers = profilers
        self.health.set_up()
        log.info("NVML: %d GPU(s), driver %s", len(gpus), driver or "unknown")
        if gpus:
            self._xid_thread = threading.Thread(
                target=self._watch_xids, name="ugro-xid-events", daemon=True
            )
            self._xid_thread.start()

    def _identify(self, index: int) -> Gpu:
        nvml = self._nvml
        assert nvml is not None
        handle = nvml.call("nvmlDeviceGetHandleByIndex", index)
        pci = nvml.call("nvmlDeviceGetPciInfo", handle)
        bus_id = getattr(pci, "busId", "") if pci is not None else ""
        return Gpu(
            index=index,
            uuid=nvml.call("nvmlDeviceGetUUID", handle) or "",
            name=nvml.call("nvmlDeviceGetName", handle) or "",
            pci_bus_id=bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id),
            handle=handle,
        )

    def close(self) -> None:
        self._stop.set()
        if self._xid_thread is not None:
            self._xid_thread.join(timeout=2)
        self._close_profilers()
        if self._nvml is not None:
            self._nvml.shutdown()

    def _close_profilers(self) -> None:
        with self._lock:
            profilers, self._profilers = list(self._profilers.values()), {}
        for profiler in profilers:
            profiler.close()

    @property
    def gpus(self) -> list[Gpu]:
        with self._lock:
            return list(self._gpus)

    # -- background work -----------------------------------------------------------------------

    def poll(self) -> None:
        """Read the slow queries for every GPU (called by the exporter's poller thread)."""
        if self._nvml is None:
            return
        if not self.health.up:
            if time.monotonic() - self._last_init_attempt >= _REINIT_INTERVAL_SECONDS:
                self._start()
            return
        readings = {}
        for gpu in self.gpus:
            try:
                readings[gpu.index] = self._read_slow(gpu)
            except GpuLost:
                continue  # reported at scrape time
            except NvmlCallError as error:
                self.health.record_error("poll", error)
        with self._lock:
            self._slow = readings
        self.health.polled_at = time.monotonic()

    def _read_slow(self, gpu: Gpu) -> SlowReadings:
        call, handle = self._nvml.call, gpu.handle  # type: ignore[union-attr]
        energy = call("nvmlDeviceGetTotalEnergyConsumption", handle)
        profiler = self._profilers.get(gpu.index)
        tx = rx = None
        if profiler is None or not profiler.gpm_supported:  # else GPM gives PCIe throughput
            tx = call("nvmlDeviceGetPcieThroughput", handle, _PCIE_TX)
            rx = call("nvmlDeviceGetPcieThroughput", handle, _PCIE_RX)
        profile: list[Series] = []
        if profiler is not None:
            try:
                profile = profiler.poll()
            except NvmlCallError as error:  # energy and PCIe are still worth serving
                self.health.record_error("profiling", error)
        return SlowReadings(
            energy_joules=None if energy is None else energy / 1000.0,
            pcie_tx_bytes_per_second=None if tx is None else tx * _KIB,
            pcie_rx_bytes_per_second=None if rx is None else rx * _KIB,
            profile=tuple(profile),
        )

    def calls_per_poll(self) -> int:
        """NVML calls one ``poll()`` makes for all GPUs (for the benchmark and the docs)."""
        total = 0
        for gpu in self.gpus:
            profiler = self._profilers.get(gpu.index)
            gpm = profiler is not None and profiler.gpm_supported
            total += 1 + (0 if gpm else 2) + (profiler.calls_per_poll if profiler else 0)
        return total

    def _watch_xids(self) -> None:
        """Count XID (critical error) events per GPU and code until ``close()``."""
        nvml = self._nvml
        assert nvml is not None
        module = nvml.module
        try:
            event_set = nvml.call("nvmlEventSetCreate")
            registered = 0
            for gpu in self.gpus:
                try:
                    nvml.call(
                        "nvmlDeviceRegisterEvents", gpu.handle, _EVENT_XID_CRITICAL, event_set
                    )
                    registered += 1
                except (GpuLost, NvmlCallError) as error:
                    self.health.record_error("xid-register", error)
        except (GpuLost, NvmlCallError) as error:
            self.health.record_error("xid-register", error)
            return
        if event_set is None or not registered:
            log.info("NVML XID events are not available here; ugro_gpu_xid_errors_total is absent")
            return
        by_uuid = {gpu.uuid: gpu.index for gpu in self.gpus}
        while not self._stop.is_set():
            try:
                event = module.nvmlEventSetWait_v2(event_set, _XID_WAIT_MS)
            except module.NVMLError as error:
                if not nvml.is_timeout(error):
                    self.health.record_error("xid-wait", error)
                    self._stop.wait(1.0)
                continue
            try:
                uuid = nvml.call("nvmlDeviceGetUUID", event.device)
            except (GpuLost, NvmlCallError):
                uuid = None
            index = by_uuid.get(uuid, -1)
            key = (index, int(event.eventData))
            with self._lock:
                self._xids[key] = self._xids.get(key, 0) + 1
            log.warning("XID %d on GPU %s (%s)", event.eventData, index, uuid)
        with contextlib.suppress(GpuLost, NvmlCallError):
            nvml.call("nvmlEventSetFree", event_set)

    # -- the scrape ----------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        if not self.health.up:
            return
        with self._lock:
            gpus = list(self._gpus)
            slow = dict(self._slow)
            profilers = dict(self._profilers)
            xids = dict(self._xids)
            driver = self._driver_version

        yield GaugeMetricFamily("ugro_node_gpus", "GPUs NVML sees on this node.", value=len(gpus))
        info = GaugeMetricFamily(
            "ugro_gpu_info",
            "Identity of each GPU (value 1).",
            labels=[*GPU_LABELS, "name", "pci_bus_id", "driver_version"],
        )
        up = GaugeMetricFamily(
            "ugro_gpu_up", "1 while the GPU answers NVML, 0 once it is lost.", labels=GPU_LABELS
        )
        families = _Families()
        for gpu in gpus:
            info.add_metric([*gpu.labels, gpu.name, gpu.pci_bus_id, driver], 1)
            try:
                self._read_fast(gpu, families)
            except GpuLost as error:
                up.add_metric(gpu.labels, 0)
                self._note_lost(gpu, error)
                continue
            up.add_metric(gpu.labels, 1)
            self._note_alive(gpu)
            profiler = profilers.get(gpu.index)
            if profiler is not None:
                families.add(
                    "ugro_gpu_gpm_supported", gpu.labels, 1 if profiler.gpm_supported else 0
                )
            readings = slow.get(gpu.index)
            if readings is not None:
                families.add("ugro_gpu_energy_joules", gpu.labels, readings.energy_joules)
                for direction, value in (
                    ("tx", readings.pcie_tx_bytes_per_second),
                    ("rx", readings.pcie_rx_bytes_per_second),
                ):
                    families.add(
                        "ugro_gpu_pcie_throughput_bytes_per_second",
                        gpu.labels,
                        value,
                        direction=direction,
                    )
                for series in readings.profile:
                    families.add(series.name, gpu.labels, series.value, **dict(series.extra))
        yield info
        yield up
        yield from families.all()

        if xids:
            by_index = {gpu.index: gpu for gpu in gpus}
            xid = CounterMetricFamily(
                "ugro_gpu_xid_errors",
                "XID (critical) errors reported by the driver, by XID code.",
                labels=[*GPU_LABELS, "xid"],
            )
            for (index, code), count in sorted(xids.items()):
                gpu = by_index.get(index)
                xid.add_metric([str(index), gpu.uuid if gpu else "", str(code)], count)
            yield xid

    def _read_fast(self, gpu: Gpu, families: _Families) -> None:
        """The microsecond queries; a GpuLost anywhere aborts this GPU for this scrape."""
        call, handle, labels = self._nvml.call, gpu.handle, gpu.labels  # type: ignore[union-attr]

        def read(function: str, *args: Any) -> Any:
            try:
                return call(function, handle, *args)
            except NvmlCallError as error:
                self.health.record_error(function, error)
                return None

        utilization = read("nvmlDeviceGetUtilizationRates")
        if utilization is not None:
            families.add("ugro_gpu_utilization_ratio", labels, utilization.gpu / 100.0)
            families.add("ugro_gpu_memory_utilization_ratio", labels, utilization.memory / 100.0)
        memory = read("nvmlDeviceGetMemoryInfo")
        if memory is not None:
            families.add("ugro_gpu_memory_used_bytes", labels, memory.used)
            families.add("ugro_gpu_memory_total_bytes", labels, memory.total)
        families.add(
            "ugro_gpu_temperature_celsius",
            labels,
            read("nvmlDeviceGetTemperature", _TEMPERATURE_GPU),
        )
        families.add("ugro_gpu_power_watts", labels, _milli(read("nvmlDeviceGetPowerUsage")))
        families.add(
            "ugro_gpu_power_limit_watts", labels, _milli(read("nvmlDeviceGetEnforcedPowerLimit"))
        )
        families.add(
            "ugro_gpu_sm_clock_hertz", labels, _mega(read("nvmlDeviceGetClockInfo", _CLOCK_SM))
        )
        families.add(
            "ugro_gpu_memory_clock_hertz", labels, _mega(read("nvmlDeviceGetClockInfo", _CLOCK_MEM))
        )
        reasons = read("nvmlDeviceGetCurrentClocksEventReasons")
        if reasons is None:  # drivers before 535 only know the older name
            reasons = read("nvmlDeviceGetCurrentClocksThrottleReasons")
        if reasons is not None:
            for bit, reason in CLOCK_EVENT_REASONS:
                families.add(
                    "ugro_gpu_clock_event_active", labels, 1 if reasons & bit else 0, reason=reason
                )
        for kind, code in (("corrected", _ECC_CORRECTED), ("uncorrected", _ECC_UNCORRECTED)):
            families.add(
                "ugro_gpu_ecc_errors",
                labels,
                read("nvmlDeviceGetTotalEccErrors", code, _ECC_VOLATILE),
                type=kind,
            )
        families.add("ugro_gpu_pcie_replays", labels, read("nvmlDeviceGetPcieReplayCounter"))
        families.add("ugro_gpu_performance_state", labels, read("nvmlDeviceGetPerformanceState"))
        processes = read("nvmlDeviceGetComputeRunningProcesses")
        if processes is not None:
            families.add("ugro_gpu_compute_processes", labels, len(processes))

    def _note_lost(self, gpu: Gpu, error: GpuLost) -> None:
        with self._lock:
            newly = gpu.index not in self._lost
            self._lost.add(gpu.index)
        if newly:
            log.error(
                "GPU %d (%s) is lost: %s; other GPUs are still served", gpu.index, gpu.uuid, error
            )

    def _note_alive(self, gpu: Gpu) -> None:
        if gpu.index in self._lost:
            with self._lock:
                self._lost.discard(gpu.index)
            log.warning("GPU %d (%s) answers again", gpu.index, gpu.uuid)


class _Families:
    """Metric families created on first use, so a query nobody could answer leaves no family."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def add(self, name: str, labels: list[str], value: float | None, **extra: str) -> None:
        if value is None:
            return
        family = self._families.get(name)
        if family is None:
            kind, help_text = _GPU_METRICS[name]
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = cls(name, help_text, labels=[*GPU_LABELS, *extra])
            self._families[name] = family
        family.add_metric([*labels, *extra.values()], value)

    def all(self) -> Iterator[Metric]:
        return iter(self._families.values())


def _milli(value: float | None) -> float | None:
    return None if value is None else value / 1000.0


def _mega(value: float | None) -> float | None:
    return None if value is None else value * 1_000_000.0
