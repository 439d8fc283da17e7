"""A scripted stand-in for ``pynvml`` on machines without an NVIDIA GPU.

It has the names the exporter uses, with pynvml's conventions: an ``NVMLError`` whose
constructor maps a return code to a subclass (``NVMLError_GpuIsLost``, ...), ``.value`` holding
the code, milliwatts, millijoules, MHz and KB/s where NVML uses them, and
``nvmlEventSetWait_v2`` raising ``NVMLError_Timeout`` when no event arrives. Calls before
``nvmlInit`` raise ``NVMLError_Uninitialized``, as the real library does.

GPM (``nvmlGpmQueryDeviceSupport``, ``nvmlGpmSampleAlloc``/``Get``/``Free``, ``nvmlGpmMetricsGet``)
and ``nvmlDeviceGetFieldValues`` take and return ctypes structures of pynvml's shape
(``c_nvmlGpmMetricsGet_t``, ``c_nvmlFieldValue_t``, ...), so the exporter fills and reads them
exactly as it does the real ones; a GPU with ``gpm_supported=False`` (``a100``) answers as a
pre-Hopper GPU does. NVLink field values are cumulative KiB counters per link that grow with time
at the GPU's scripted rate.

Scripts: ``library_missing`` (nvmlInit fails as without a driver), ``unsupported`` (queries that
answer NOT_SUPPORTED), ``missing`` (functions an older driver lacks: FUNCTION_NOT_FOUND),
``lose(i)`` (GPU i falls off the bus), ``inject_xid(i, code)``, and ``slow`` (PCIe throughput
and energy take as long as on an H100). ``calls`` counts calls per function. A process started
with ``--nvml-module tests.exporter.fake_nvml:from_environment`` is scripted through environment
variables and a control directory (see ``from_environment``).
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import os
import pathlib
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import ClassVar

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_PCIE_UTIL_TX_BYTES = 0
NVML_PCIE_UTIL_RX_BYTES = 1
nvmlEventTypeXidCriticalError = 0x8
nvmlClocksEventReasonSwPowerCap = 0x4
nvmlClocksEventReasonHwThermalSlowdown = 0x40

# Field ids (nvmlDeviceGetFieldValues) and value types, as in pynvml.
NVML_FI_DEV_NVLINK_LINK_COUNT = 91
NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX = 138  # cumulative KiB, per link (scopeId)
NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 139
NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = 230
_NVLINK_COUNTERS = (NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX)
NVML_VALUE_TYPE_DOUBLE = 0
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_GPU_RECOVERY_ACTION_NONE = 0
NVML_GPU_RECOVERY_ACTION_GPU_RESET = 1
NVML_GPU_RECOVERY_ACTION_NODE_REBOOT = 2
NVML_GPU_RECOVERY_ACTION_DRAIN_P2P = 3
NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET = 4

# GPM metric ids (pynvml): percentages 0-100, or MiB/s for the *_PER_SEC ones.
NVML_GPM_METRIC_GRAPHICS_UTIL = 1
NVML_GPM_METRIC_SM_UTIL = 2
NVML_GPM_METRIC_SM_OCCUPANCY = 3
NVML_GPM_METRIC_INTEGER_UTIL = 4
NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
NVML_GPM_METRIC_DFMA_TENSOR_UTIL = 6
NVML_GPM_METRIC_HMMA_TENSOR_UTIL = 7
NVML_GPM_METRIC_IMMA_TENSOR_UTIL = 9
NVML_GPM_METRIC_DRAM_BW_UTIL = 10
NVML_GPM_METRIC_FP64_UTIL = 11
NVML_GPM_METRIC_FP32_UTIL = 12
NVML_GPM_METRIC_FP16_UTIL = 13
NVML_GPM_METRIC_PCIE_TX_PER_SEC = 20
NVML_GPM_METRIC_PCIE_RX_PER_SEC = 21
NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC = 60
NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC = 61
NVML_GPM_METRIC_MAX = 477
NVML_GPM_METRICS_GET_VERSION = 1
NVML_GPM_SUPPORT_VERSION = 1


def _per_link_gpm_id(link: int, direction: str) -> int:
    """pynvml's NVML_GPM_METRIC_NVLINK_L<n>_<RX|TX>_PER_SEC: links 0-17 from 62, 18-35 from 212."""
    base = 62 + 2 * link if link < 18 else 212 + 2 * (link - 18)
    return base + (1 if direction == "TX" else 0)


for _link in range(36):
    for _direction in ("RX", "TX"):
        globals()[f"NVML_GPM_METRIC_NVLINK_L{_link}_{_direction}_PER_SEC"] = _per_link_gpm_id(
            _link, _direction
        )


# pynvml's structures, field for field (pynvml.py: c_nvmlValue_t, c_nvmlFieldValue_t,
# c_nvmlGpmSupport_t, c_nvmlGpmMetric_t, c_nvmlGpmMetricsGet_t); a GPM sample is an opaque
# pointer there, here a pointer to the fake's sample number.
class c_nvmlValue_t(ctypes.Union):
    _fields_ = [
        ("dVal", ctypes.c_double),
        ("uiVal", ctypes.c_uint),
        ("ulVal", ctypes.c_ulong),
        ("ullVal", ctypes.c_ulonglong),
        ("sllVal", ctypes.c_longlong),
        ("siVal", ctypes.c_int),
        ("usVal", ctypes.c_ushort),
    ]


class c_nvmlFieldValue_t(ctypes.Structure):
    _fields_ = [
        ("fieldId", ctypes.c_uint32),
        ("scopeId", ctypes.c_uint32),
        ("timestamp", ctypes.c_int64),
        ("latencyUsec", ctypes.c_int64),
        ("valueType", ctypes.c_uint),
        ("nvmlReturn", ctypes.c_uint),
        ("value", c_nvmlValue_t),
    ]


class struct_c_nvmlGpmSample_t(ctypes.Structure):
    _fields_ = [("serial", ctypes.c_uint)]


c_nvmlGpmSample_t = ctypes.POINTER(struct_c_nvmlGpmSample_t)


class c_metricInfo_t(ctypes.Structure):
    _fields_ = [
        ("shortName", ctypes.c_char_p),
        ("longName", ctypes.c_char_p),
        ("unit", ctypes.c_char_p),
    ]


class c_nvmlGpmMetric_t(ctypes.Structure):
    _fields_ = [
        ("metricId", ctypes.c_uint),
        ("nvmlReturn", ctypes.c_uint),
        ("value", ctypes.c_double),
        ("metricInfo", c_metricInfo_t),
    ]


class c_nvmlGpmMetricsGet_t(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("numMetrics", ctypes.c_uint),
        ("sample1", c_nvmlGpmSample_t),
        ("sample2", c_nvmlGpmSample_t),
        ("metrics", c_nvmlGpmMetric_t * NVML_GPM_METRIC_MAX),
    ]


class c_nvmlGpmSupport_t(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint), ("isSupportedDevice", ctypes.c_uint)]


_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH: "Argument version mismatch",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """pynvml's base error: ``NVMLError(code)`` builds the subclass for that code."""

    _value_class: ClassVar[dict[int, type[NVMLError]]] = {}

    def __new__(cls, value: int):
        if cls is NVMLError:
            cls = NVMLError._value_class.get(value, cls)
        error = Exception.__new__(cls)
        error.value = value
        return error

    def __init__(self, value: int) -> None:
        super().__init__(value)

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")


def _error_class(name: str, code: int) -> type[NVMLError]:
    def new(cls, *args):
        return NVMLError.__new__(cls, code)

    cls = type(name, (NVMLError,), {"__new__": new, "__init__": lambda self, *a: None})
    NVMLError._value_class[code] = cls
    return cls


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_Timeout = _error_class("NVMLError_Timeout", NVML_ERROR_TIMEOUT)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_FunctionNotFound = _error_class(
    "NVMLError_FunctionNotFound", NVML_ERROR_FUNCTION_NOT_FOUND
)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)

H100_MEMORY_BYTES = 81559 * 1024 * 1024  # what NVML reports for an H100 80GB HBM3


@dataclass
class FakeGpu:
    """One scripted GPU; the readings are in NVML's own units."""

    index: int
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    utilization_gpu: int = 0  # percent
    utilization_memory: int = 0  # percent
    memory_used: int = 0  # bytes
    memory_total: int = H100_MEMORY_BYTES
    temperature: int = 0  # °C
    power_mw: int = 0
    power_limit_mw: int = 700_000
    sm_clock_mhz: int = 1980
    memory_clock_mhz: int = 2619
    clock_event_reasons: int = 0
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    pcie_replays: int = 0
    performance_state: int = 0
    processes: int = 1
    energy_mj: int = 0
    pcie_tx_kb_s: int = 0
    pcie_rx_kb_s: int = 0
    lost: bool = False
    gpm_supported: bool = True  # Hopper and newer; False answers as an A100 does
    # GPM metric id -> its value between any two samples (percent, or MiB/s). PCIe and NVLink
    # rates come from the fields above and below unless set here.
    gpm: dict[int, float] = field(default_factory=dict)
    nvlink_links: int = 18
    nvlink_link_tx_mib_s: float = 0.0  # per link
    nvlink_link_rx_mib_s: float = 0.0
    recovery_action: int | None = NVML_GPU_RECOVERY_ACTION_NONE  # None: a driver without it

    @property
    def bus_id(self) -> str:
        return f"00000000:{0x18 + 0x10 * self.index:02X}:00.0"


def h100s(count: int) -> list[FakeGpu]:
    """``count`` busy H100s whose readings differ by index, so mix-ups show."""
    return [
        FakeGpu(
            index=i,
            uuid=f"GPU-{i:08x}-1111-2222-3333-444455556666",
            utilization_gpu=90 - i,
            utilization_memory=40 + i,
            memory_used=(20 + i) * 1024**3,
            temperature=60 + i,
            power_mw=600_000 + 1000 * i,
            energy_mj=1_000_000 * (i + 1),
            pcie_tx_kb_s=1000 * (i + 1),
            pcie_rx_kb_s=2000 * (i + 1),
            gpm={
                NVML_GPM_METRIC_GRAPHICS_UTIL: 90 - i,
                NVML_GPM_METRIC_SM_UTIL: 70 - i,
                NVML_GPM_METRIC_SM_OCCUPANCY: 30 + i,
                NVML_GPM_METRIC_ANY_TENSOR_UTIL: 50 - i,
                NVML_GPM_METRIC_HMMA_TENSOR_UTIL: 45 - i,
                NVML_GPM_METRIC_DFMA_TENSOR_UTIL: 0.5,
                NVML_GPM_METRIC_IMMA_TENSOR_UTIL: 2.0,
                NVML_GPM_METRIC_DRAM_BW_UTIL: 40 + i,
                NVML_GPM_METRIC_FP16_UTIL: 5.0,
                NVML_GPM_METRIC_FP32_UTIL: 10 + i,
                NVML_GPM_METRIC_FP64_UTIL: 1.0,
            },
            nvlink_link_tx_mib_s=100.0 * (i + 1),
            nvlink_link_rx_mib_s=200.0 * (i + 1),
        )
        for i in range(count)
    ]


def a100(index: int) -> FakeGpu:
    """A GPU before Hopper: no GPM; 12 NVLinks whose counters NVML's field values read."""
    return FakeGpu(
        index=index,
        uuid=f"GPU-{index:08x}-aaaa-bbbb-cccc-ddddeeeeffff",
        name="NVIDIA A100-SXM4-80GB",
        utilization_gpu=100,
        temperature=50,
        gpm_supported=False,
        nvlink_links=12,
        nvlink_link_tx_mib_s=300.0,
        nvlink_link_rx_mib_s=400.0,
    )


@dataclass(frozen=True)
class _Handle:
    index: int


class FakeNvml:
    """A scripted NVML library (use the instance where ``pynvml`` would go)."""

    NVMLError = NVMLError

    def __init__(
        self,
        gpus: list[FakeGpu] | None = None,
        *,
        driver_version: str = "580.159.04",
        library_missing: bool = False,
        unsupported: frozenset[str] = frozenset(),
        missing: frozenset[str] = frozenset(),
        slow: bool = False,
    ) -> None:
        self.gpus = gpus if gpus is not None else h100s(8)
        self.driver_version = driver_version
        self.library_missing = library_missing
        self.unsupported = set(unsupported)
        self.missing = set(missing)
        self.slow = slow
        self.initialised = False
        self.calls: collections.Counter[str] = collections.Counter()
        self._events: collections.deque[tuple[int, int]] = collections.deque()
        self._event_ready = threading.Condition()
        self._registered: set[int] = set()
        self._started = time.time()  # the NVLink counters grow from here
        self._sample_serials = itertools.count(1)
        # live GPM samples: serial -> (GPU index, time taken) once nvmlGpmSampleGet filled it
        self.gpm_samples: dict[int, tuple[int, float] | None] = {}

    # -- scripting -----------------------------------------------------------------------------

    def lose(self, index: int) -> None:
        self.gpus[index].lost = True

    def restore(self, index: int) -> None:
        self.gpus[index].lost = False

    def inject_xid(self, index: int, code: int) -> None:
        with self._event_ready:
            self._events.append((index, code))
            self._event_ready.notify_all()

    # -- the pynvml API ------------------------------------------------------------------------

    def __getattr__(self, name: str):
        # The module constants and error classes, as attributes of the instance.
        value = globals().get(name)
        if value is None or not (name.startswith(("NVML", "nvml", "c_nvml"))):
            raise AttributeError(name)
        return value

    def _enter(self, function: str, handle: _Handle | None = None) -> FakeGpu | None:
        self.calls[function] += 1
        if not self.initialised:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        if function in self.missing:  # pynvml's answer when the driver lacks the function
            raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        if function in self.unsupported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if handle is None:
            return None
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return gpu

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.library_missing:
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return self._enter("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._enter("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetPciInfo(self, handle: _Handle) -> SimpleNamespace:
        gpu = self._enter("nvmlDeviceGetPciInfo", handle)
        return SimpleNamespace(busId=gpu.bus_id.encode())  # pynvml's struct field is bytes

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> SimpleNamespace:
        gpu = self._enter("nvmlDeviceGetUtilizationRates", handle)
        return SimpleNamespace(gpu=gpu.utilization_gpu, memory=gpu.utilization_memory)

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle) -> SimpleNamespace:
        gpu = self._enter("nvmlDeviceGetMemoryInfo", handle)
        return SimpleNamespace(
            total=gpu.memory_total, used=gpu.memory_used, free=gpu.memory_total - gpu.memory_used
        )

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        gpu = self._enter("nvmlDeviceGetTemperature", handle)
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        return self._enter("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: _Handle) -> int:
        return self._enter("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_mw

    def nvmlDeviceGetClockInfo(self, handle: _Handle, clock: int) -> int:
        gpu = self._enter("nvmlDeviceGetClockInfo", handle)
        return {NVML_CLOCK_SM: gpu.sm_clock_mhz, NVML_CLOCK_MEM: gpu.memory_clock_mhz}[clock]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: _Handle) -> int:
        return self._enter("nvmlDeviceGetCurrentClocksEventReasons", handle).clock_event_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: _Handle) -> int:
        gpu = self._enter("nvmlDeviceGetCurrentClocksThrottleReasons", handle)
        return gpu.clock_event_reasons

    def nvmlDeviceGetTotalEccErrors(self, handle: _Handle, error_type: int, counter: int) -> int:
        gpu = self._enter("nvmlDeviceGetTotalEccErrors", handle)
        return gpu.ecc_corrected if error_type == 0 else gpu.ecc_uncorrected

    def nvmlDeviceGetPcieReplayCounter(self, handle: _Handle) -> int:
        return self._enter("nvmlDeviceGetPcieReplayCounter", handle).pcie_replays

    def nvmlDeviceGetPerformanceState(self, handle: _Handle) -> int:
        return self._enter("nvmlDeviceGetPerformanceState", handle).performance_state

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[SimpleNamespace]:
        gpu = self._enter("nvmlDeviceGetComputeRunningProcesses", handle)
        return [SimpleNamespace(pid=1000 + n, usedGpuMemory=1 << 30) for n in range(gpu.processes)]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: _Handle) -> int:
        gpu = self._enter("nvmlDeviceGetTotalEnergyConsumption", handle)
        if self.slow:
            time.sleep(0.004)
        return gpu.energy_mj

    def nvmlDeviceGetPcieThroughput(self, handle: _Handle, counter: int) -> int:
        gpu = self._enter("nvmlDeviceGetPcieThroughput", handle)
        if self.slow:
            time.sleep(0.021)
        return gpu.pcie_tx_kb_s if counter == NVML_PCIE_UTIL_TX_BYTES else gpu.pcie_rx_kb_s

    # -- GPM ----------------------------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, handle: _Handle) -> c_nvmlGpmSupport_t:
        gpu = self._enter("nvmlGpmQueryDeviceSupport", handle)
        return c_nvmlGpmSupport_t(NVML_GPM_SUPPORT_VERSION, 1 if gpu.gpm_supported else 0)

    def nvmlGpmSampleAlloc(self):
        self._enter("nvmlGpmSampleAlloc")
        serial = next(self._sample_serials)
        self.gpm_samples[serial] = None
        return ctypes.pointer(struct_c_nvmlGpmSample_t(serial))

    def _sample_serial(self, sample) -> int:
        serial = sample.contents.serial if sample else 0
        if serial not in self.gpm_samples:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return serial

    def nvmlGpmSampleFree(self, sample) -> None:
        self._enter("nvmlGpmSampleFree")
        del self.gpm_samples[self._sample_serial(sample)]

    def nvmlGpmSampleGet(self, handle: _Handle, sample):
        gpu = self._enter("nvmlGpmSampleGet", handle)
        if not gpu.gpm_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        self.gpm_samples[self._sample_serial(sample)] = (gpu.index, time.monotonic())
        return sample

    def nvmlGpmMetricsGet(self, request: c_nvmlGpmMetricsGet_t) -> c_nvmlGpmMetricsGet_t:
        self._enter("nvmlGpmMetricsGet")
        if request.version != NVML_GPM_METRICS_GET_VERSION:
            raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        first = self.gpm_samples[self._sample_serial(request.sample1)]
        second = self.gpm_samples[self._sample_serial(request.sample2)]
        # Both samples taken, of one GPU, the second after the first (as NVML requires).
        if first is None or second is None or first[0] != second[0] or second[1] <= first[1]:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if not 0 < request.numMetrics <= NVML_GPM_METRIC_MAX:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[first[0]]
        if gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        for metric in request.metrics[: request.numMetrics]:
            value = self._gpm_value(gpu, metric.metricId)
            metric.nvmlReturn = NVML_SUCCESS if value is not None else NVML_ERROR_NOT_SUPPORTED
            metric.value = value or 0.0
        return request

    @staticmethod
    def _gpm_value(gpu: FakeGpu, metric_id: int) -> float | None:
        if metric_id in gpu.gpm:
            return float(gpu.gpm[metric_id])
        rates = {
            NVML_GPM_METRIC_PCIE_TX_PER_SEC: gpu.pcie_tx_kb_s / 1024,
            NVML_GPM_METRIC_PCIE_RX_PER_SEC: gpu.pcie_rx_kb_s / 1024,
            NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC: gpu.nvlink_links * gpu.nvlink_link_tx_mib_s,
            NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC: gpu.nvlink_links * gpu.nvlink_link_rx_mib_s,
        }
        for link in range(gpu.nvlink_links):
            rates[_per_link_gpm_id(link, "TX")] = gpu.nvlink_link_tx_mib_s
            rates[_per_link_gpm_id(link, "RX")] = gpu.nvlink_link_rx_mib_s
        return rates.get(metric_id)

    # -- field values -----------------------------------------------------------------------

    def nvmlDeviceGetFieldValues(self, handle: _Handle, field_ids: list) -> ctypes.Array:
        gpu = self._enter("nvmlDeviceGetFieldValues", handle)
        values = (c_nvmlFieldValue_t * len(field_ids))()
        now = time.time()
        for value, requested in zip(values, field_ids, strict=True):
            # pynvml takes a field id, or a (field id, scope id) pair
            value.fieldId, value.scopeId = (
                requested if isinstance(requested, tuple) else (requested, 0)
            )
            value.timestamp = int(now * 1e6)
            value.nvmlReturn = NVML_SUCCESS
            self._fill_field(gpu, value, now)
        return values

    def _fill_field(self, gpu: FakeGpu, value: c_nvmlFieldValue_t, now: float) -> None:
        field_id, link = value.fieldId, value.scopeId
        if field_id == NVML_FI_DEV_NVLINK_LINK_COUNT:
            value.valueType, value.value.uiVal = NVML_VALUE_TYPE_UNSIGNED_INT, gpu.nvlink_links
        elif field_id in _NVLINK_COUNTERS:
            if link >= gpu.nvlink_links:
                value.nvmlReturn = NVML_ERROR_INVALID_ARGUMENT
                return
            tx = field_id == NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX
            mib_s = gpu.nvlink_link_tx_mib_s if tx else gpu.nvlink_link_rx_mib_s
            value.valueType = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
            value.value.ullVal = int(mib_s * 1024 * (now - self._started))  # KiB so far
        elif field_id == NVML_FI_DEV_GET_GPU_RECOVERY_ACTION and gpu.recovery_action is not None:
            value.valueType, value.value.uiVal = NVML_VALUE_TYPE_UNSIGNED_INT, gpu.recovery_action
        else:
            value.nvmlReturn = NVML_ERROR_NOT_SUPPORTED

    def nvmlEventSetCreate(self) -> object:
        self._enter("nvmlEventSetCreate")
        return object()

    def nvmlDeviceRegisterEvents(self, handle: _Handle, event_types: int, event_set: object):
        self._enter("nvmlDeviceRegisterEvents", handle)
        if event_types & nvmlEventTypeXidCriticalError:
            self._registered.add(handle.index)

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> SimpleNamespace:
        self._enter("nvmlEventSetWait_v2")
        with self._event_ready:
            if not self._events:
                self._event_ready.wait(timeout_ms / 1000.0)
            if not self._events:
                raise NVMLError(NVML_ERROR_TIMEOUT)
            index, code = self._events.popleft()
        return SimpleNamespace(
            device=_Handle(index), eventType=nvmlEventTypeXidCriticalError, eventData=code
        )

    def nvmlEventSetFree(self, event_set: object) -> None:
        self._enter("nvmlEventSetFree")


class ControlledFakeNvml(FakeNvml):
    """A ``FakeNvml`` that a test in another process scripts through files in a directory.

    ``lost`` holds GPU indices to report lost, one per line; each new line ``INDEX CODE`` of
    ``xid`` injects one XID event.
    """

    def __init__(self, control_dir: pathlib.Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self._control = control_dir
        self._xid_lines_seen = 0
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while True:
            self._sync()
            time.sleep(0.05)

    def _sync(self) -> None:
        lost_file = self._control / "lost"
        lost = set()
        if lost_file.exists():
            lost = {int(line) for line in lost_file.read_text().split()}
        for gpu in self.gpus:
            gpu.lost = gpu.index in lost
        xid_file = self._control / "xid"
        if xid_file.exists():
            lines = xid_file.read_text().splitlines()
            for line in lines[self._xid_lines_seen :]:
                index, code = line.split()
                self.inject_xid(int(index), int(code))
            self._xid_lines_seen = len(lines)


def from_environment() -> FakeNvml:
    """For ``ugro-exporter --nvml-module tests.exporter.fake_nvml:from_environment``.

    ``UGRO_FAKE_NVML_GPUS`` (default 8) H100s; ``UGRO_FAKE_NVML_MISSING=1``: no NVML library;
    ``UGRO_FAKE_NVML_SLOW=1``: H100-like slow queries; ``UGRO_FAKE_NVML_CONTROL``: a control
    directory (see ``ControlledFakeNvml``).
    """
    options = dict(
        gpus=h100s(int(os.environ.get("UGRO_FAKE_NVML_GPUS", "8"))),
        library_missing=os.environ.get("UGRO_FAKE_NVML_MISSING") == "1",
        slow=os.environ.get("UGRO_FAKE_NVML_SLOW") == "1",
    )
    control = os.environ.get("UGRO_FAKE_NVML_CONTROL")
    if control:
        return ControlledFakeNvml(pathlib.Path(control), **options)
    return FakeNvml(**options)
