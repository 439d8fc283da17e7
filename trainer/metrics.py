"""The rank's Prometheus collector: fresh metric families on every scrape, from a stats snapshot.

Metric names are the project's public API; ``docs/metrics.md`` documents each one, and
``tests/trainer/test_metrics_contract.py`` keeps that document and this module in step.
Series carry no job or rank labels: those are target labels that Prometheus attaches (the
launcher writes them into file_sd targets), and ``ugro_train_rank_info`` carries the rank's
identity for joins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from ugro.common.phases import STARTUP

from .stats import RankStats

# torchrun's TORCHELASTIC_RESTART_COUNT. Not "ugro_train_restart_count": promtool's lint
# reserves the _count suffix for histograms and summaries.
RESTARTS_METRIC = "ugro_train_restarts"

RANK_INFO_LABELS = ("job_id", "rank", "local_rank", "world_size", "node", "gpu_uuid")

# The keys of torch.cuda.memory_stats() each allocator series is read from.
CUDA_MEMORY_STATS_KEYS = {
    "peak_allocated_bytes": "allocated_bytes.all.peak",
    "peak_reserved_bytes": "reserved_bytes.all.peak",
    "alloc_retries": "num_alloc_retries",
    "ooms": "num_ooms",
}


@dataclass(frozen=True)
class CudaMemory:
    """The CUDA caching allocator's health, from one ``torch.cuda.memory_stats`` reading.

    A value the reading lacks (an allocator that does not keep it, or CUDA not initialised yet,
    when the dict is empty) is None and its series is left out, never reported as 0.
    """

    peak_allocated_bytes: float | None = None
    peak_reserved_bytes: float | None = None
    alloc_retries: float | None = None
    ooms: float | None = None

    @classmethod
    def from_stats(cls, stats: Mapping[str, object]) -> CudaMemory:
        values = {}
        for field_name, key in CUDA_MEMORY_STATS_KEYS.items():
            value = stats.get(key)
            values[field_name] = None if value is None else float(value)  # type: ignore[arg-type]
        return cls(**values)


@dataclass(frozen=True)
class RankSnapshot:
    """What one scrape reports: the stats plus the values read outside them."""

    stats: RankStats
    identity: dict[str, str]
    start_time: float
    end_time: float | None  # set when the rank closed its telemetry normally
    target_steps: int | None
    pending_steps: int
    peak_flops: float | None = None  # the device's peak FLOP/s for the training dtype, if known
    cuda_memory: CudaMemory | None = None  # CUDA ranks only
    phase: str = STARTUP  # the phase the rank is in now
    phase_start_time: float = 0.0  # unix time the current phase began
    # Seconds per phase entered so far, the current one up to the snapshot; startup always.
    phase_seconds: Mapping[str, float] = field(default_factory=dict)
    process_start_time: float = 0.0
    restart_count: int = 0


class RankMetricsCollector:
    """Turns ``snapshot()`` into metric families; it keeps no state of its own.

    A scrape never fails: a value that is not a float (an int beyond float range, say) is
    exposed as +/-Inf or NaN, and a family that cannot be built is left out; each such failure
    goes to ``on_error`` (Telemetry counts it in ``ugro_train_telemetry_errors_total``).
    """

    def __init__(
        self,
        snapshot: Callable[[], RankSnapshot],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._on_error = on_error

    def collect(self) -> Iterator[Metric]:
        # prometheus_client calls float() on every value while it writes the exposition, after
        # collect() has returned: one value that fails there fails the whole scrape (HTTP 500),
        # and on every later scrape too. So values are floats before they leave this method, and
        # whatever still fails while the families are built costs only the families after it.
        families: list[Metric] = []
        try:
            families.extend(self._families())
        except Exception as error:
            self._error(error)
        yield from families

    def _error(self, error: BaseException) -> None:
        if self._on_error is not None:
            self._on_error(error)

    def _number(self, value: object) -> float:
        """``value`` as a float for the exposition; never raises."""
        try:
            return float(value)  # type: ignore[arg-type]
        except OverflowError as error:  # an int (or fraction) beyond float range
            self._error(error)
            return math.inf if value > 0 else -math.inf  # type: ignore[operator]
        except (TypeError, ValueError) as error:
            self._error(error)
            return math.nan

    def _phase_families(self, snap: RankSnapshot) -> Iterator[Metric]:
        number = self._number
        phase = GaugeMetricFamily(
            "ugro_train_phase",
            "The phase this rank is in now (value 1; the phase label changes as the rank moves).",
            labels=["phase"],
        )
        phase.add_metric([snap.phase], 1.0)
        yield phase
        yield GaugeMetricFamily(
            "ugro_train_phase_start_time_seconds",
            "Unix time at which the current phase began, in seconds.",
            value=number(snap.phase_start_time),
        )
        seconds = CounterMetricFamily(
            "ugro_train_phase_seconds",
            "Seconds this rank's process spent in each phase, the current one up to this scrape; "
            "the sum over phases is the process's age.",
            labels=["phase"],
        )
        for name, spent in snap.phase_seconds.items():
            seconds.add_metric([name], number(spent))
        yield seconds
        yield GaugeMetricFamily(
            "ugro_train_process_start_time_seconds",
            "Unix time at which this rank's process started, in seconds.",
            value=number(snap.process_start_time),
        )
        yield GaugeMetricFamily(
            RESTARTS_METRIC,
            "How often torchrun had restarted the workers before this incarnation "
            "(TORCHELASTIC_RESTART_COUNT; 0 when unset).",
            value=number(snap.restart_count),
        )

    def _checkpoint_families(self, stats: RankStats) -> Iterator[Metric]:
        if stats.last_checkpoint_timestamp is None:
            return  # no checkpoint completed yet: absent, not 0
        number = self._number
        yield CounterMetricFamily(
            "ugro_train_checkpoints", "Checkpoints completed.", value=number(stats.checkpoints)
        )
        yield GaugeMetricFamily(
            "ugro_train_last_checkpoint_timestamp_seconds",
            "Unix time at which the last checkpoint completed, in seconds.",
            value=number(stats.last_checkpoint_timestamp),
        )
        yield GaugeMetricFamily(
            "ugro_train_last_checkpoint_duration_seconds",
            "How long the last checkpoint took, in seconds.",
            value=number(stats.last_checkpoint_duration),
        )
        if stats.checkpoint_bytes is not None:
            yield CounterMetricFamily(
                "ugro_train_checkpoint_bytes",
                "Bytes written by the checkpoints that reported them.",
                value=number(stats.checkpoint_bytes),
            )

    def _families(self) -> Iterator[Metric]:
        number = self._number
        snap = self._snapshot()
        stats = snap.stats

        info = GaugeMetricFamily(
            "ugro_train_rank_info",
            "Identity of this training rank (value 1); join on job_id/rank or node/gpu_uuid.",
            labels=RANK_INFO_LABELS,
        )
        info.add_metric([str(snap.identity[label]) for label in RANK_INFO_LABELS], 1.0)
        yield info

        yield CounterMetricFamily(
            "ugro_train_steps", "Optimizer steps completed.", value=number(stats.steps)
        )
        yield CounterMetricFamily(
            "ugro_train_tokens", "Tokens processed by this rank.", value=number(stats.tokens)
        )
        yield CounterMetricFamily(
            "ugro_train_samples",
            "Samples (sequences) processed by this rank.",
            value=number(stats.samples),
        )

        for name, what, series in (
            ("ugro_train_loss", "Training loss", stats.loss),
            ("ugro_train_grad_norm", "Total gradient norm (before clipping)", stats.grad_norm),
        ):
            yield SummaryMetricFamily(
                name,
                f"{what} per step; rate(_sum)/rate(_count) is the exact mean over a window "
                "(finite values only).",
                count_value=number(series.count),
                sum_value=number(series.total),
            )
            if series.last is not None:
                yield GaugeMetricFamily(
                    f"{name}_last", f"{what} at the last step.", value=number(series.last)
                )

        nonfinite = CounterMetricFamily(
            "ugro_train_nonfinite",
            "Steps whose loss or gradient norm was NaN, infinite or beyond float32 range, "
            "by quantity.",
            labels=["quantity"],
        )
        nonfinite.add_metric(["loss"], number(stats.loss.nonfinite))
        nonfinite.add_metric(["grad_norm"], number(stats.grad_norm.nonfinite))
        yield nonfinite

        if stats.learning_rate is not None:
            yield GaugeMetricFamily(
                "ugro_train_learning_rate",
                "Learning rate of the first parameter group at the last step.",
                value=number(stats.learning_rate),
            )

        yield HistogramMetricFamily(
            "ugro_train_step_duration_seconds",
            "Wall-clock time between consecutive completed steps, in seconds.",
            buckets=[(bound, number(count)) for bound, count in stats.step_duration.cumulative()],
            sum_value=number(stats.step_duration.total),
        )

        yield from self._phase_families(snap)
        yield from self._checkpoint_families(stats)

        if stats.last_step_timestamp is not None:
            yield GaugeMetricFamily(
                "ugro_train_last_step_timestamp_seconds",
                "Unix time at which the last step completed, in seconds.",
                value=number(stats.last_step_timestamp),
            )
        yield GaugeMetricFamily(
            "ugro_train_start_time_seconds",
            "Unix time at which this rank's telemetry started, in seconds.",
            value=number(snap.start_time),
        )
        if snap.end_time is not None:
            yield GaugeMetricFamily(
                "ugro_train_end_time_seconds",
                "Unix time at which this rank closed its telemetry normally, in seconds; "
                "absent while it runs and after a crash.",
                value=number(snap.end_time),
            )
        if snap.target_steps is not None:
            yield GaugeMetricFamily(
                "ugro_train_target_steps",
                "Number of optimizer steps the run is configured to take.",
                value=number(snap.target_steps),
            )
        if stats.model_flops is not None:
            yield CounterMetricFamily(
                "ugro_train_model_flops",
                "Model FLOPs of the steps done (FLOPs per token x tokens, or per sample x "
                "samples); rate() over the peak FLOP/s is the MFU.",
                value=number(stats.model_flops),
            )
        if snap.peak_flops is not None:
            yield GaugeMetricFamily(
                "ugro_train_peak_flops_per_second",
                "Dense peak FLOP/s of this rank's device for the training dtype.",
                value=number(snap.peak_flops),
            )
        memory = snap.cuda_memory
        if memory is not None:
            for metric, family, help_text, reading in (
                (
                    "ugro_train_cuda_memory_peak_allocated_bytes",
                    GaugeMetricFamily,
                    "Peak CUDA memory allocated to this rank's tensors, in bytes.",
                    memory.peak_allocated_bytes,
                ),
                (
                    "ugro_train_cuda_memory_peak_reserved_bytes",
                    GaugeMetricFamily,
                    "Peak CUDA memory reserved by this rank's caching allocator, in bytes.",
                    memory.peak_reserved_bytes,
                ),
                (
                    "ugro_train_cuda_alloc_retries",
                    CounterMetricFamily,
                    "CUDA allocations that failed at first and succeeded after the allocator "
                    "freed its cached blocks.",
                    memory.alloc_retries,
                ),
                (
                    "ugro_train_cuda_ooms",
                    CounterMetricFamily,
                    "CUDA out-of-memory errors the allocator raised.",
                    memory.ooms,
                ),
            ):
                if reading is not None:
                    yield family(metric, help_text, value=number(reading))

        yield GaugeMetricFamily(
            "ugro_train_telemetry_pending_steps",
            "Steps whose device values have not yet been copied back to the host.",
            value=number(snap.pending_steps),
        )
        yield CounterMetricFamily(
            "ugro_train_telemetry_errors",
            "Errors inside ugro telemetry (rejected values included), logged and kept away "
            "from the training loop.",
            value=number(stats.telemetry_errors),
        )
        yield CounterMetricFamily(
            "ugro_train_telemetry_rejected_values",
            "Values passed to step()/micro_step() that were dropped as invalid (wrong type, "
            "a count that is not a whole number in range); also counted as telemetry errors.",
            value=number(stats.rejected_values),
        )
