"""The rank's Prometheus collector: fresh metric families on every scrape, from a stats snapshot.

Metric names are the project's public API; ``docs/metrics.md`` documents each one, and
``tests/trainer/test_metrics_contract.py`` keeps that document and this module in step.
Series carry no job or rank labels: those are target labels that Prometheus attaches (the
launcher writes them into file_sd targets), and ``ugro_train_rank_info`` carries the rank's
identity for joins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from .stats import RankStats

RANK_INFO_LABELS = ("job_id", "rank", "local_rank", "world_size", "node", "gpu_uuid")


@dataclass(frozen=True)
class RankSnapshot:
    """What one scrape reports: the stats plus the values read outside them."""

    stats: RankStats
    identity: dict[str, str]
    start_time: float
    end_time: float | None  # set when the rank closed its telemetry normally
    target_steps: int | None
    pending_steps: int
    cuda_max_memory_allocated_bytes: float | None


class RankMetricsCollector:
    """Turns ``snapshot()`` into metric families; it keeps no state of its own."""

    def __init__(self, snapshot: Callable[[], RankSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        stats = snap.stats

        info = GaugeMetricFamily(
            "ugro_train_rank_info",
            "Identity of this training rank (value 1); join on job_id/rank or node/gpu_uuid.",
            labels=RANK_INFO_LABELS,
        )
        info.add_metric([snap.identity[label] for label in RANK_INFO_LABELS], 1)
        yield info

        yield CounterMetricFamily(
            "ugro_train_steps", "Optimizer steps completed.", value=stats.steps
        )
        yield CounterMetricFamily(
            "ugro_train_tokens", "Tokens processed by this rank.", value=stats.tokens
        )
        yield CounterMetricFamily(
            "ugro_train_samples", "Samples (sequences) processed by this rank.", value=stats.samples
        )

        yield from _value_series(
            "ugro_train_loss", "Training loss", stats.loss.total, stats.loss.count, stats.loss.last
        )
        yield from _value_series(
            "ugro_train_grad_norm",
            "Total gradient norm (before clipping)",
            stats.grad_norm.total,
            stats.grad_norm.count,
            stats.grad_norm.last,
        )

        nonfinite = CounterMetricFamily(
            "ugro_train_nonfinite",
            "Steps whose loss or gradient norm was NaN or infinite, by quantity.",
            labels=["quantity"],
        )
        nonfinite.add_metric(["loss"], stats.loss.nonfinite)
        nonfinite.add_metric(["grad_norm"], stats.grad_norm.nonfinite)
        yield nonfinite

        if stats.learning_rate is not None:
            yield GaugeMetricFamily(
                "ugro_train_learning_rate",
                "Learning rate of the first parameter group at the last step.",
                value=stats.learning_rate,
            )

        yield HistogramMetricFamily(
            "ugro_train_step_duration_seconds",
            "Wall-clock time between consecutive completed steps, in seconds.",
            buckets=stats.step_duration.cumulative(),
            sum_value=stats.step_duration.total,
        )

        if stats.data_wait_seconds is not None:
            yield CounterMetricFamily(
                "ugro_train_data_wait_seconds",
                "Time the loop spent waiting for input batches (inside data_wait()), in seconds.",
                value=stats.data_wait_seconds,
            )

        if stats.last_step_timestamp is not None:
            yield GaugeMetricFamily(
                "ugro_train_last_step_timestamp_seconds",
                "Unix time at which the last step completed, in seconds.",
                value=stats.last_step_timestamp,
            )
        yield GaugeMetricFamily(
            "ugro_train_start_time_seconds",
            "Unix time at which this rank's telemetry started, in seconds.",
            value=snap.start_time,
        )
        if snap.end_time is not None:
            yield GaugeMetricFamily(
                "ugro_train_end_time_seconds",
                "Unix time at which this rank closed its telemetry normally, in seconds; "
                "absent while it runs and after a crash.",
                value=snap.end_time,
            )
        if snap.target_steps is not None:
            yield GaugeMetricFamily(
                "ugro_train_target_steps",
                "Number of optimizer steps the run is configured to take.",
                value=snap.target_steps,
            )
        if snap.cuda_max_memory_allocated_bytes is not None:
            yield GaugeMetricFamily(
                "ugro_train_cuda_max_memory_allocated_bytes",
                "Peak CUDA memory allocated by this rank's tensors, in bytes.",
                value=snap.cuda_max_memory_allocated_bytes,
            )

        yield GaugeMetricFamily(
            "ugro_train_telemetry_pending_steps",
            "Steps whose device values have not yet been copied back to the host.",
            value=snap.pending_steps,
        )
        yield CounterMetricFamily(
            "ugro_train_telemetry_errors",
            "Errors inside ugro telemetry, logged and kept away from the training loop.",
            value=stats.telemetry_errors,
        )


def _value_series(
    name: str, what: str, total: float, count: int, last: float | None
) -> Iterator[Metric]:
    """A per-step value as a summary (exact windowed means) plus a gauge of its last value."""
    yield SummaryMetricFamily(
        name,
        f"{what} per step; rate(_sum)/rate(_count) is the exact mean over a window "
        "(finite values only).",
        count_value=count,
        sum_value=total,
    )
    if last is not None:
        yield GaugeMetricFamily(f"{name}_last", f"{what} at the last step.", value=last)
