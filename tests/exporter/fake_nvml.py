"""A scripted stand-in for ``pynvml`` on machines without an NVIDIA GPU.

It has the names the exporter uses, with pynvml's conventions: an ``NVMLError`` whose
constructor maps a return code to a subclass (``NVMLError_GpuIsLost``, ...), ``.value`` holding
the code, milliwatts, millijoules, MHz and KB/s where NVML uses them, and
``nvmlEventSetWait_v2`` raising ``NVMLError_Timeout`` when no event arrives. Calls before
``nvmlInit`` raise ``NVMLError_Uninitialized``, as the real library does.

Scripts: ``library_missing`` (nvmlInit fails as without a driver), ``unsupported`` (queries that
answer NOT_SUPPORTED), ``lose(i)`` (GPU i falls off the bus), ``inject_xid(i, code)``, and
``slow`` (PCIe throughput and energy take as long as on an H100). ``calls`` counts calls per
function. A process started with ``--nvml-module tests.exporter.fake_nvml:from_environment``
is scripted through environment variables and a control directory (see ``from_environment``).
"""

from __future__ import annotations

import collections
import os
import pathlib
import threading
import time
from dataclasses import dataclass
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
        )
        for i in range(count)
    ]


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
        slow: bool = False,
    ) -> None:
        self.gpus = gpus if gpus is not None else h100s(8)
        self.driver_version = driver_version
        self.library_missing = library_missing
        self.unsupported = set(unsupported)
        self.slow = slow
        self.initialised = False
        self.calls: collections.Counter[str] = collections.Counter()
        self._events: collections.deque[tuple[int, int]] = collections.deque()
        self._event_ready = threading.Condition()
        self._registered: set[int] = set()

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
        if value is None or not (name.startswith(("NVML", "nvml"))):
            raise AttributeError(name)
        return value

    def _enter(self, function: str, handle: _Handle | None = None) -> FakeGpu | None:
        self.calls[function] += 1
        if not self.initialised:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
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
