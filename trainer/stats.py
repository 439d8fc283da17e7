"""The running totals one rank accumulates between scrapes.

Plain numbers, no locking and no Prometheus types: ``Telemetry`` owns the lock, and the metrics
collector turns a consistent copy of these totals into metric families at scrape time.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

# Step durations from 3 ms (a small GPU-bound step) to a minute (a large model, many
# microbatches), about x3 apart: ten bounds, so that with the +Inf bucket, _sum and _count the
# histogram takes 13 of a rank's 55 series. The exact mean comes from _sum/_count; the buckets
# are for quantiles, where a bucket x3 wide is enough to tell a 90th percentile from the mean.
STEP_DURATION_BUCKETS_SECONDS: tuple[float, ...] = (
    0.003,
    0.01,
    0.03,
    0.1,
    0.3,
    1.0,
    3.0,
    10.0,
    30.0,
    60.0,
)

# The largest magnitude a per-step value may have and still enter a ``_sum``: float32's largest
# finite value. A loss or gradient norm beyond it has overflowed in the float32/bfloat16 maths
# training runs in (where it would already be inf); taken as a finite float64 it is the same
# event, and adding it would leave the sum at +Inf (1.7e308 twice) or swamp every later value
# for the rest of the run. Below it, a sum cannot overflow in any realistic number of steps.
SUMMABLE_LIMIT = 3.4028234663852886e38


@dataclass
class ValueSeries:
    """A value reported once per step: the last one, and the exact sum and count of finite ones.

    Non-finite values, and finite ones beyond ``SUMMABLE_LIMIT``, are counted separately and kept
    out of the sum, so one NaN or overflow does not poison every windowed mean computed from
    ``_sum``/``_count`` afterwards. ``last`` keeps such a value as it was.
    """

    last: float | None = None
    total: float = 0.0
    count: int = 0
    nonfinite: int = 0

    def observe(self, value: float) -> None:
        self.last = value
        if math.isfinite(value) and abs(value) <= SUMMABLE_LIMIT:
            self.total += value
            self.count += 1
        else:
            self.nonfinite += 1


@dataclass
class DurationHistogram:
    """A cumulative-on-read histogram with fixed upper bounds, in seconds."""

    bounds: tuple[float, ...] = STEP_DURATION_BUCKETS_SECONDS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """Buckets as Prometheus exposes them: (upper bound, observations at or below it)."""
        running = 0
        buckets = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), running))
        return buckets


@dataclass
class RankStats:
    """Everything one rank has reported so far."""

    steps: int = 0
    tokens: int = 0
    samples: int = 0
    loss: ValueSeries = field(default_factory=ValueSeries)
    grad_norm: ValueSeries = field(default_factory=ValueSeries)
    learning_rate: float | None = None
    step_duration: DurationHistogram = field(default_factory=DurationHistogram)
    last_step_timestamp: float | None = None
    model_flops: float | None = None  # None unless FLOPs per token or per sample are known
    telemetry_errors: int = 0  # rejected values included
    rejected_values: int = 0  # values dropped at the door as invalid
    checkpoints: int = 0
    last_checkpoint_timestamp: float | None = None  # None until the first checkpoint completed
    last_checkpoint_duration: float | None = None
    checkpoint_bytes: int | None = None  # None until a checkpoint reported the bytes it wrote

    def copy(self) -> RankStats:
        return RankStats(
            steps=self.steps,
            tokens=self.tokens,
            samples=self.samples,
            loss=ValueSeries(**vars(self.loss)),
            grad_norm=ValueSeries(**vars(self.grad_norm)),
            learning_rate=self.learning_rate,
            step_duration=DurationHistogram(
                self.step_duration.bounds,
                list(self.step_duration.counts),
                self.step_duration.total,
                self.step_duration.count,
            ),
            last_step_timestamp=self.last_step_timestamp,
            model_flops=self.model_flops,
            telemetry_errors=self.telemetry_errors,
            rejected_values=self.rejected_values,
            checkpoints=self.checkpoints,
            last_checkpoint_timestamp=self.last_checkpoint_timestamp,
            last_checkpoint_duration=self.last_checkpoint_duration,
            checkpoint_bytes=self.checkpoint_bytes,
        )
