"""A training job's figures over its lifetime, as ``ugro report`` and ``ugro compare`` show
them: ``JobReport`` and its parts, in the units of the metrics (seconds, bytes, ratios in 0..1,
Unix seconds; None where unknown). How each figure is made: ``collect``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_LOOKBACK = "7d"

EFFICIENCY_FORMULA = "efficiency = 100 × progress × input × gpu"
EFFICIENCY_HELP = f"""\
{EFFICIENCY_FORMULA}, each factor in 0..1:
  progress  share of the report's points from the first step (plus one rate window) to
            the last at which some rank completed a step within the preceding rate window
            (rate(ugro_train_steps_total) > 0): stalls lower it, start-up does not; a run
            shorter than one rate window is judged by the scrape intervals in which the
            step counter rose;
  input     1 - the largest per-rank share of stepping time spent waiting for the next
            batch (ugro_train_phase_seconds_total{{phase="data"}}): under synchronous DDP the
            slowest input pipeline sets every rank's pace;
  gpu       mean SM activity of the job's GPUs over its lifetime where they report it
            (job:ugro_gpu_sm_active:avg_ratio, NVML GPM on Hopper and newer), else their
            mean utilisation (job:ugro_gpu_utilization:avg_ratio).
A factor that cannot be measured (a CPU job has no GPU readings, a loop that does not time
its data loading has no data wait) counts as 1 and is shown as n/a."""

_DURATION = re.compile(r"^([0-9]+)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


class JobNotFound(LookupError):
    """Prometheus has no series of the job within the lookback window."""


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``36h``, ``7d``, ``2w`` → seconds; ValueError otherwise."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r}: expected a positive whole number and a unit s, m, h, d or w")
    return float(int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


@dataclass
class RankFigures:
    """One rank over the job's lifetime; None where the rank did not report the figure."""

    rank: int
    node: str | None = None
    gpu_uuid: str | None = None
    steps: int | None = None
    samples: int | None = None
    tokens: int | None = None
    restarts: int | None = None
    training_seconds: float | None = None
    tokens_per_second_mean: float | None = None
    step_seconds_mean: float | None = None
    data_wait_share: float | None = None
    straggler_score_mean: float | None = None
    loss_initial: float | None = None
    loss_initial_step: int | None = None
    loss_final: float | None = None
    loss_mean: float | None = None
    gpu_utilization_mean: float | None = None
    gpu_memory_used_peak_bytes: float | None = None
    gpu_temperature_mean_celsius: float | None = None
    gpu_temperature_peak_celsius: float | None = None


@dataclass
class FiredAlert:
    alertname: str
    severity: str | None
    rank: str | None
    node: str | None
    gpu_uuid: str | None
    first_seen: float | None  # Unix seconds, at the report's resolution
    last_seen: float | None


@dataclass
class Efficiency:
    score: float
    progress: float | None
    input: float | None
    gpu: float | None
    formula: str = EFFICIENCY_FORMULA


Points = list[tuple[float, float]]  # (Unix seconds, value)


@dataclass
class RankTime:
    """Where one rank's wall time went: seconds per goodput category
    (``ugro.catalogue.goodput.CATEGORIES``), made by ``goodput.account``."""

    rank: int
    wall_seconds: float  # its processes' lifetimes and the gaps between them
    seconds: dict[str, float]  # category → seconds; they add up to wall_seconds
    phase_seconds: dict[str, float]  # phase → seconds its counters counted, every incarnation
    incarnations: int = 1  # processes the rank ran as (torchrun restarts add one each)
    stall_episodes: int = 0

    def shares(self) -> dict[str, float | None]:
        return {c: _share(s, self.wall_seconds) for c, s in self.seconds.items()}


@dataclass
class TimeAccounting:
    """Where the job's time went: per rank, and for the job the mean over its ranks."""

    categories: tuple[str, ...]
    ranks: list[RankTime]

    @property
    def wall_seconds(self) -> float:
        return sum(r.wall_seconds for r in self.ranks) / len(self.ranks)

    @property
    def seconds(self) -> dict[str, float]:
        """Category → seconds of the mean rank (the ranks run side by side)."""
        return {c: sum(r.seconds[c] for r in self.ranks) / len(self.ranks) for c in self.categories}

    def shares(self) -> dict[str, float | None]:
        """Category → its share of all the ranks' wall time together."""
        return {c: _share(s, self.wall_seconds) for c, s in self.seconds.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "categories": list(self.categories),
            "job": {
                "wall_seconds": self.wall_seconds,
                "seconds": self.seconds,
                "shares": self.shares(),
            },
            "ranks": [
                {
                    "rank": r.rank,
                    "wall_seconds": r.wall_seconds,
                    "seconds": r.seconds,
                    "shares": r.shares(),
                    "phase_seconds": r.phase_seconds,
                    "incarnations": r.incarnations,
                    "stall_episodes": r.stall_episodes,
                }
                for r in self.ranks
            ],
        }


@dataclass
class Checkpoints:
    """The job's checkpoints; ``count`` 0 when none was recorded."""

    count: int
    steps_between_mean: float | None = None  # steps at the last checkpoint / checkpoints
    last_time: float | None = None  # Unix seconds the last one completed
    last_age_seconds: float | None = None  # from it to the end of the run (0: at the end)
    last_duration_seconds: float | None = None
    seconds: float | None = None  # the checkpoint category's seconds (mean rank)
    share: float | None = None  # … and its share of the wall time
    bytes: int | None = None  # written by all ranks; None when no rank reported bytes


@dataclass
class Curves:
    """The series behind the plots, at ``JobReport.resolution_seconds``."""

    loss: dict[int, Points] = field(default_factory=dict)  # per rank, ugro_train_loss_last
    loss_job: Points = field(default_factory=list)  # mean over ranks
    tokens_rate: dict[int, Points] = field(default_factory=dict)  # job_rank:…tokens:rate1m


@dataclass
class JobReport:
    job_id: str
    prometheus: str
    status: str
    start_time: float  # the launch, where ugro-launch's record is here; else the first telemetry
    end_time: float
    duration_seconds: float
    training_seconds: float | None
    resolution_seconds: float
    rate_window_seconds: float
    world_size: int | None
    nodes: list[str]
    steps: int | None
    target_steps: int | None
    samples: int | None
    tokens: int | None
    tokens_per_second_mean: float | None
    tokens_per_second_peak: float | None
    samples_per_second_mean: float | None
    step_seconds_mean: float | None
    loss_initial: float | None
    loss_final: float | None
    loss_best: float | None
    loss_mean: float | None
    gpu_count: int
    gpu_utilization_mean: float | None
    gpu_memory_used_peak_bytes: float | None
    gpu_temperature_mean_celsius: float | None
    gpu_temperature_peak_celsius: float | None
    efficiency: Efficiency
    ranks: list[RankFigures]
    alerts: list[FiredAlert]
    gpu_sm_active_mean: float | None = None  # GPM; None where the GPUs do not report it
    mfu_mean: float | None = None  # None where the loop declared no FLOPs or no peak is known
    curves: Curves = field(default_factory=Curves, repr=False)
    # Filled by ``goodput.add_time_accounting``; None where the ranks report no phases.
    time_accounting: TimeAccounting | None = None
    checkpoints: Checkpoints | None = None

    @property
    def loss_reduction_percent(self) -> float | None:
        if self.loss_initial is None or self.loss_final is None or self.loss_initial <= 0:
            return None
        return 100.0 * (self.loss_initial - self.loss_final) / self.loss_initial

    @property
    def overhead_seconds(self) -> float | None:
        if self.training_seconds is None:
            return None
        return max(0.0, self.duration_seconds - self.training_seconds)

    def to_json(self) -> dict[str, Any]:
        """One JSON object with stable keys: numbers as numbers, null where unknown."""
        return {
            "job_id": self.job_id,
            "prometheus": self.prometheus,
            "status": self.status,
            "time": {
                "start": self.start_time,
                "end": self.end_time,
                "duration_seconds": self.duration_seconds,
                "training_seconds": self.training_seconds,
                "overhead_seconds": self.overhead_seconds,
                "resolution_seconds": self.resolution_seconds,
                "rate_window_seconds": self.rate_window_seconds,
            },
            "world_size": self.world_size,
            "nodes": self.nodes,
            "work": {
                "steps": self.steps,
                "target_steps": self.target_steps,
                "samples": self.samples,
                "tokens": self.tokens,
            },
            "throughput": {
                "tokens_per_second_mean": self.tokens_per_second_mean,
                "tokens_per_second_peak": self.tokens_per_second_peak,
                "samples_per_second_mean": self.samples_per_second_mean,
                "step_seconds_mean": self.step_seconds_mean,
            },
            "loss": {
                "initial": self.loss_initial,
                "final": self.loss_final,
                "best": self.loss_best,
                "mean": self.loss_mean,
                "reduction_percent": self.loss_reduction_percent,
            },
            "gpu": {
                "count": self.gpu_count,
                "utilization_mean": self.gpu_utilization_mean,
                "sm_active_mean": self.gpu_sm_active_mean,
                "mfu_mean": self.mfu_mean,
                "memory_used_peak_bytes": self.gpu_memory_used_peak_bytes,
                "temperature_mean_celsius": self.gpu_temperature_mean_celsius,
                "temperature_peak_celsius": self.gpu_temperature_peak_celsius,
            },
            "efficiency": asdict(self.efficiency),
            "goodput": self.time_accounting.to_json() if self.time_accounting else None,
            "checkpoints": asdict(self.checkpoints) if self.checkpoints else None,
            "ranks": [asdict(rank) for rank in self.ranks],
            "alerts": [asdict(alert) for alert in self.alerts],
        }
