"""Profiling figures through NVML GPM, and NVML field values, read by the background poller.

``ugro_gpu_utilization_ratio`` says only that *a* kernel ran; a GPU busy with one slow kernel
on a few SMs reads 100 %. GPM (GPU Performance Monitoring, Hopper and newer) gives the figures
DCGM's profiling fields give, straight from NVML: share of SMs busy, warp occupancy, tensor and
FP pipes, DRAM bandwidth, PCIe and NVLink bytes. GPM works on pairs of samples: each poll takes
a sample and asks for the metrics between it and the previous poll's, so the values are averages
over one poll interval and appear from the second poll on.

Field values (``nvmlDeviceGetFieldValues``, one call per GPU and poll) give the GPU's recovery
action and, on GPUs without GPM, the NVLink data counters (cumulative KiB per link) that two
polls turn into bytes per second.

``GpuProfiler`` holds one GPU's state (its two GPM samples, the previous counters); only the
poller thread uses it. NVML metric and field ids are read from the binding by name, so a
binding without one leaves that series out.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from .nvml import GpuLost, Nvml, NvmlCallError

log = logging.getLogger("ugro.exporter.profiling")

_MIB = 1024 * 1024  # GPM reports bandwidth in MiB/s
_KIB = 1024  # the NVLink field counters count KiB
_SUCCESS = 0
# Per-field return codes meaning "this field has no answer on this GPU/driver": stop asking.
# INVALID_ARGUMENT is what a driver answers for a field id newer than itself.
_FIELD_GONE = {2, 3, 4, 13}  # INVALID_ARGUMENT, NOT_SUPPORTED, NO_PERMISSION, FUNCTION_NOT_FOUND

# (pynvml's GPM metric id name, family, extra labels); percentages, turned into ratios 0-1.
_GPM_RATIOS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("NVML_GPM_METRIC_SM_UTIL", "ugro_gpu_sm_active_ratio", {}),
    ("NVML_GPM_METRIC_SM_OCCUPANCY", "ugro_gpu_sm_occupancy_ratio", {}),
    ("NVML_GPM_METRIC_ANY_TENSOR_UTIL", "ugro_gpu_tensor_active_ratio", {}),
    ("NVML_GPM_METRIC_DRAM_BW_UTIL", "ugro_gpu_dram_active_ratio", {}),
    ("NVML_GPM_METRIC_FP16_UTIL", "ugro_gpu_pipe_active_ratio", {"pipe": "fp16"}),
    ("NVML_GPM_METRIC_FP32_UTIL", "ugro_gpu_pipe_active_ratio", {"pipe": "fp32"}),
    ("NVML_GPM_METRIC_FP64_UTIL", "ugro_gpu_pipe_active_ratio", {"pipe": "fp64"}),
)
# The tensor pipes by kind: three more series per GPU, so only with --tensor-pipes.
_GPM_TENSOR_PIPES: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("NVML_GPM_METRIC_HMMA_TENSOR_UTIL", "ugro_gpu_pipe_active_ratio", {"pipe": "tensor_hmma"}),
    ("NVML_GPM_METRIC_DFMA_TENSOR_UTIL", "ugro_gpu_pipe_active_ratio", {"pipe": "tensor_dfma"}),
    ("NVML_GPM_METRIC_IMMA_TENSOR_UTIL", "ugro_gpu_pipe_active_ratio", {"pipe": "tensor_imma"}),
)
PCIE_FAMILY = "ugro_gpu_pcie_throughput_bytes_per_second"
NVLINK_FAMILY = "ugro_gpu_nvlink_throughput_bytes_per_second"
NVLINK_LINK_FAMILY = "ugro_gpu_nvlink_link_throughput_bytes_per_second"
# MiB/s, turned into bytes per second.
_GPM_RATES: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("NVML_GPM_METRIC_PCIE_TX_PER_SEC", PCIE_FAMILY, {"direction": "tx"}),
    ("NVML_GPM_METRIC_PCIE_RX_PER_SEC", PCIE_FAMILY, {"direction": "rx"}),
    ("NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC", NVLINK_FAMILY, {"direction": "tx"}),
    ("NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC", NVLINK_FAMILY, {"direction": "rx"}),
)
_DIRECTIONS = (("tx", "TX"), ("rx", "RX"))

# c_nvmlFieldValue_t.valueType -> the member of its value union.
_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


@dataclass(frozen=True)
class Series:
    """One sample for the scrape: family name, labels besides gpu/gpu_uuid, value."""

    name: str
    extra: tuple[tuple[str, str], ...]
    value: float


@dataclass(frozen=True)
class _Metric:
    metric_id: int
    name: str
    extra: tuple[tuple[str, str], ...]
    scale: float
    ratio: bool


class GpuProfiler:
    """One GPU's GPM samples and field-value counters; ``poll()`` turns them into series."""

    def __init__(
        self,
        nvml: Nvml,
        index: int,
        handle: Any,
        *,
        nvlink_per_link: bool = False,
        tensor_pipes: bool = False,
    ) -> None:
        self._nvml = nvml
        self.index = index
        self._handle = handle
        self._module = nvml.module
        self.gpm_supported = False
        self.gpm_reason = ""
        self._samples: list[Any] = []  # [previous, spare], allocated once, freed in close()
        self._have_previous = False
        self._metrics: list[_Metric] = []
        self._unavailable_logged: set[tuple[str, int]] = set()
        self._fields: list[int | tuple[int, int]] = []
        self._recovery_field = getattr(self._module, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None)
        self._nvlink_fields: dict[int, str] = {}  # field id -> direction
        self._previous_counters: dict[tuple[int, int], tuple[int, float]] = {}
        self._nvlink_per_link = nvlink_per_link

        self._set_up_gpm(tensor_pipes)
        links = self._link_count() if (nvlink_per_link or not self.gpm_supported) else 0
        if self.gpm_supported:
            if nvlink_per_link:
                self._add_per_link_gpm_metrics(links)
        else:
            self._set_up_nvlink_fields(links)
        if self._recovery_field is not None:
            self._fields.insert(0, self._recovery_field)
        if not self.gpm_supported:
            log.info(
                "GPU %d: no GPM profiling metrics (%s); ugro_gpu_sm_active_ratio and the other "
                "profiling series are left out, ugro_gpu_gpm_supported is 0%s",
                index,
                self.gpm_reason,
                "; NVLink totals come from field values" if self._nvlink_fields else "",
            )

    # -- set-up ----------------------------------------------------------------------------------

    def _set_up_gpm(self, tensor_pipes: bool) -> None:
        module, call = self._module, self._nvml.call
        if not hasattr(module, "c_nvmlGpmMetricsGet_t"):
            self.gpm_reason = "this NVML binding has no GPM API"
            return
        try:
            support = call("nvmlGpmQueryDeviceSupport", self._handle)
            if support is None:
                self.gpm_reason = "the driver has no GPM support"
                return
            if not support.isSupportedDevice:
                self.gpm_reason = "GPM needs a Hopper or newer GPU"
                return
            samples = [call("nvmlGpmSampleAlloc") for _ in range(2)]
        except (GpuLost, NvmlCallError) as error:
            self.gpm_reason = f"GPM set-up failed: {error}"
            return
        if any(sample is None for sample in samples):
            self.gpm_reason = "GPM samples cannot be allocated"
            self._free([s for s in samples if s is not None])
            return
        self._samples = samples
        self.gpm_supported = True
        tables = [(_GPM_RATIOS, 1.0, True), (_GPM_RATES, float(_MIB), False)]
        if tensor_pipes:
            tables.insert(1, (_GPM_TENSOR_PIPES, 1.0, True))
        for table, scale, ratio in tables:
            for constant, name, extra in table:
                metric_id = getattr(module, constant, None)
                if metric_id is not None:
                    self._metrics.append(
                        _Metric(metric_id, name, tuple(extra.items()), scale, ratio)
                    )

    def _add_per_link_gpm_metrics(self, links: int) -> None:
        for link in range(links):
            for direction, upper in _DIRECTIONS:
                metric_id = getattr(
                    self._module, f"NVML_GPM_METRIC_NVLINK_L{link}_{upper}_PER_SEC", None
                )
                if metric_id is not None:
                    extra = (("link", str(link)), ("direction", direction))
                    self._metrics.append(
                        _Metric(metric_id, NVLINK_LINK_FAMILY, extra, float(_MIB), False)
                    )

    def _link_count(self) -> int:
        field = getattr(self._module, "NVML_FI_DEV_NVLINK_LINK_COUNT", None)
        if field is None:
            return 0
        try:
            values = self._nvml.call("nvmlDeviceGetFieldValues", self._handle, [field])
        except (GpuLost, NvmlCallError) as error:
            log.info("GPU %d: NVLink link count unreadable (%s)", self.index, error)
            return 0
        if not values or values[0].nvmlReturn != _SUCCESS:
            return 0
        return int(field_value(values[0]))

    def _set_up_nvlink_fields(self, links: int) -> None:
        for direction, upper in _DIRECTIONS:
            field = getattr(self._module, f"NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_{upper}", None)
            if field is not None and links:
                self._nvlink_fields[field] = direction
                self._fields.extend((field, link) for link in range(links))

    # -- the poll --------------------------------------------------------------------------------

    @property
    def calls_per_poll(self) -> int:
        """NVML calls one ``poll()`` makes (GPM sample and metrics, field values)."""
        return (2 if self.gpm_supported else 0) + (1 if self._fields else 0)

    def poll(self) -> list[Series]:
        """This poll's series; ``GpuLost`` and ``NvmlCallError`` propagate."""
        series: list[Series] = []
        if self.gpm_supported:
            self._poll_gpm(series)
        if self._fields:
            self._poll_fields(series)
        return series

    def _poll_gpm(self, series: list[Series]) -> None:
        previous, current = self._samples
        if self._nvml.call("nvmlGpmSampleGet", self._handle, current) is None:
            self._have_previous = False  # e.g. MIG enabled since: no pair until it answers again
            return
        try:
            if self._have_previous and self._metrics:
                self._metrics_between(previous, current, series)
        finally:
            # The new sample is the next poll's "previous", whether or not this pair was read.
            self._samples = [current, previous]
            self._have_previous = True

    def _metrics_between(self, previous: Any, current: Any, series: list[Series]) -> None:
        module = self._module
        request = module.c_nvmlGpmMetricsGet_t()
        request.version = module.NVML_GPM_METRICS_GET_VERSION
        metrics = self._metrics[: len(request.metrics)]
        request.numMetrics = len(metrics)
        request.sample1, request.sample2 = previous, current
        for slot, metric in zip(request.metrics, metrics, strict=False):
            slot.metricId = metric.metric_id
        result = self._nvml.call("nvmlGpmMetricsGet", request)
        if result is None:
            return
        for slot, metric in zip(result.metrics, metrics, strict=False):
            if slot.nvmlReturn != _SUCCESS:
                self._log_unavailable("GPM metric", metric.metric_id, slot.nvmlReturn)
                continue
            value = slot.value * metric.scale
            if metric.ratio:  # a percentage; GPM rounds to slightly over 100 % at times
                value = min(max(slot.value / 100.0, 0.0), 1.0)
            series.append(Series(metric.name, metric.extra, value))

    def _poll_fields(self, series: list[Series]) -> None:
        values = self._nvml.call("nvmlDeviceGetFieldValues", self._handle, self._fields)
        if values is None:  # no field values on this driver (logged once by Nvml)
            self._fields = []
            return
        polled_at = time.time()
        counters: dict[tuple[int, int], tuple[int, float]] = {}
        gone: set[tuple[int, int]] = set()
        for value in values:
            key = (value.fieldId, value.scopeId)
            if value.nvmlReturn != _SUCCESS:
                if value.nvmlReturn in _FIELD_GONE:
                    gone.add(key)
                self._log_unavailable("field", value.fieldId, value.nvmlReturn)
                continue
            if value.fieldId == self._recovery_field:
                series.append(Series("ugro_gpu_recovery_action", (), float(field_value(value))))
            else:
                # NVML stamps each value in microseconds since the epoch; 0 if it did not.
                stamp = value.timestamp / 1e6 if value.timestamp > 0 else polled_at
                counters[key] = (int(field_value(value)), stamp)
        if gone:
            self._fields = [f for f in self._fields if _field_key(f) not in gone]
        if self._nvlink_fields:
            self._nvlink_rates(counters, series)

    def _nvlink_rates(
        self, counters: dict[tuple[int, int], tuple[int, float]], series: list[Series]
    ) -> None:
        previous, self._previous_counters = self._previous_counters, counters
        totals: dict[str, float] = {}
        links: list[Series] = []
        for (field, link), (kib, stamp) in sorted(counters.items()):
            before = previous.get((field, link))
            if before is None or stamp <= before[1] or kib < before[0]:
                continue  # first poll, or counters reset by a driver reload
            rate = (kib - before[0]) * _KIB / (stamp - before[1])
            direction = self._nvlink_fields[field]
            totals[direction] = totals.get(direction, 0.0) + rate
            if self._nvlink_per_link:
                extra = (("link", str(link)), ("direction", direction))
                links.append(Series(NVLINK_LINK_FAMILY, extra, rate))
        for direction, _ in _DIRECTIONS:
            if direction in totals:
                series.append(Series(NVLINK_FAMILY, (("direction", direction),), totals[direction]))
        series.extend(links)

    def _log_unavailable(self, kind: str, ident: int, code: int) -> None:
        if (kind, ident) not in self._unavailable_logged:
            self._unavailable_logged.add((kind, ident))
            log.info(
                "GPU %d: NVML %s %d is not available (return code %d); its series is left out",
                self.index, kind, ident, code,
            )  # fmt: skip

    # -- the end ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._free(self._samples)
        self._samples = []
        self.gpm_supported = False

    def _free(self, samples: list[Any]) -> None:
        for sample in samples:
            with contextlib.suppress(GpuLost, NvmlCallError):
                self._nvml.call("nvmlGpmSampleFree", sample)


def field_value(value: Any) -> float | int:
    """The number in a ``c_nvmlFieldValue_t``, read through the member its valueType names."""
    kind = value.valueType
    member = _VALUE_MEMBERS[kind] if 0 <= kind < len(_VALUE_MEMBERS) else "ullVal"
    return getattr(value.value, member)


def _field_key(field: int | tuple[int, int]) -> tuple[int, int]:
    return field if isinstance(field, tuple) else (field, 0)
