"""A training job's figures over its whole lifetime, read from Prometheus.

``collect(prometheus, job_id)`` finds when the job ran and gathers what ``ugro report`` and
``ugro compare`` show. Everything comes from PromQL over the job's series (``job_id="…"``),
through the recording rules where one exists, so a number means what it means on the Grafana
dashboard; the launcher's job record, when this machine has one, only widens the search window
and names how the job ended.

How each figure is made (this is the documentation of record; ``ugro report --help`` and the
README point here):

* **Lifetime.** Start: the launch, when this machine has ugro-launch's record of the job (the
  start-up before the telemetry, imports and model loading, is part of the run); else the
  earliest ``ugro_train_start_time_seconds`` of any rank (when its
  telemetry started). End: the latest
  ``ugro_train_last_step_timestamp_seconds`` (the last completed step), or now while a rank is
  still up. Both are searched ``--lookback`` back (default 7d).
* **Status.** ``running`` while a rank's target answers (``up == 1``); else the launcher
  record's final state when this machine has the record; else ``finished`` when the steps
  reached ``ugro_train_target_steps``; ``failed`` while ``TrainingRanksDown`` fires for the
  job; else ``incomplete`` (``ended`` when the target is unknown).
* **Totals.** Per rank, the *last* value of ``ugro_train_{steps,samples,tokens}_total``: a rank
  that restarted starts counting from zero again, and what it did before the restart was not
  progress that survived (``restarts`` counts those resets). The job's steps are the largest
  rank's (DDP ranks step together); samples and tokens are summed over ranks.
* **Training time** of a rank: steps × its mean step time
  (``ugro_train_step_duration_seconds_sum / _count``); the job's is the largest rank's, and
  ``overhead`` is the rest of the duration (start-up, waiting for peers, the end). Mean
  throughput is tokens (samples) per second of training time.
* **Curves** are range queries from the start to the end at a resolution of at most
  ``MAX_POINTS`` points and never finer than 1 s or the scrape interval (estimated from the
  number of samples a rank has). Rates are taken over a window of three scrape intervals or two
  resolution steps, whichever is longer (``rate_window_seconds``): the dashboards' one-minute
  rules would smear a job shorter than a few minutes, start-up included. Peak throughput is the
  highest point of the job's token rate curve (the sum over ranks).
* **Loss.** Each rank's *initial* loss is its first finite ``ugro_train_loss_last`` sample (the
  loss of whichever step was last when Prometheus first scraped it; that step is reported
  too); its *final* loss is its last finite sample; its *mean* is ``loss_sum / loss_count`` at
  the end (every finite step exactly). The job's initial and final loss are the means of the
  ranks'; *best* is the lowest point of the job's loss curve (the mean over ranks of
  ``ugro_train_loss_last`` at the report's resolution), the initial and final values included;
  *reduction* is ``(initial - final) / initial``.
* **GPUs**, through the rank↔GPU join rules: mean of ``job:ugro_gpu_utilization:avg_ratio``
  over the lifetime, peak of ``job_rank:ugro_gpu_memory_used:bytes``, mean and peak of
  ``job_rank:ugro_gpu_temperature:celsius``. All null for a job whose ranks name no GPU.
* **Per rank**, besides the above: data-wait share = ``ugro_train_data_wait_seconds_total``
  over the rank's stepping time (``step_duration_seconds_sum``), and the mean of the finite
  points of ``job_rank:ugro_train_straggler_score:ratio`` (1 = the job's median rank).
* **Efficiency**: see ``EFFICIENCY_HELP`` below.
* **Alerts**: every ``ALERTS{alertstate="firing"}`` series with the job's ``job_id`` at any time
  up to now (so "ranks down" after a crash counts), plus those on the job's GPUs
  (``gpu_uuid``) and nodes while it ran; first and last seen at the report's resolution.
"""

from __future__ import annotations

import itertools
import math
import re
import string
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ugro.launcher import records

from .servers import Prometheus, QueryError

DEFAULT_LOOKBACK = "7d"
# Points per curve: enough for a readable plot and a fair "best loss", few enough to stay cheap
# (Prometheus refuses more than 11,000 points per series).
MAX_POINTS = 600
# A job record older than the lookback widens the search to its start plus this margin.
_RECORD_MARGIN_SECONDS = 3600.0

EFFICIENCY_FORMULA = "efficiency = 100 × progress × input × gpu"
EFFICIENCY_HELP = f"""\
{EFFICIENCY_FORMULA}, each factor in 0..1:
  progress  share of the report's points from the first step (plus one rate window) to
            the last at which some rank completed a step within the preceding rate window
            (rate(ugro_train_steps_total) > 0): stalls lower it, start-up does not; a run
            shorter than one rate window is judged by the scrape intervals in which the
            step counter rose;
  input     1 - the largest per-rank share of stepping time spent waiting for the next
            batch (ugro_train_data_wait_seconds_total): under synchronous DDP the slowest
            input pipeline sets every rank's pace;
  gpu       mean GPU utilisation of the job's GPUs over its lifetime
            (job:ugro_gpu_utilization:avg_ratio).
A factor that cannot be measured (a CPU job has no GPU readings, a loop that does not time
its data loading has no data wait) counts as 1 and is shown as n/a."""

_DURATION = re.compile(r"^([0-9]+)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


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
    curves: Curves = field(default_factory=Curves, repr=False)

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
                "memory_used_peak_bytes": self.gpu_memory_used_peak_bytes,
                "temperature_mean_celsius": self.gpu_temperature_mean_celsius,
                "temperature_peak_celsius": self.gpu_temperature_peak_celsius,
            },
            "efficiency": asdict(self.efficiency),
            "ranks": [asdict(rank) for rank in self.ranks],
            "alerts": [asdict(alert) for alert in self.alerts],
        }


# -- reading Prometheus ----------------------------------------------------------------------


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _rank_key(labels: dict[str, str]) -> int | None:
    try:
        return int(labels.get("rank", ""))
    except ValueError:
        return None


class _Queries:
    """Instant and range queries over one job's series, with ``$sel`` and ``$w`` filled in."""

    def __init__(self, prometheus: Prometheus, job_id: str, now: float, window: float) -> None:
        self.prometheus = prometheus
        self.now = now
        self.fill = {"sel": f'job_id="{job_id}"', "w": f"{math.ceil(window)}s"}

    def expr(self, template: str, **extra: str) -> str:
        return string.Template(template).substitute(self.fill, **extra)

    def vector(self, template: str, at: float | None = None, **extra: str) -> list[dict]:
        return self.prometheus.query(self.expr(template, **extra), self.now if at is None else at)

    def matrix(self, template: str, at: float, **extra: str) -> list[dict]:
        """A range selector's raw samples at ``at``: series with ``values``."""
        return self.prometheus.query(self.expr(template, **extra), at, matrix=True)

    def by_rank(self, template: str) -> dict[int, float]:
        """A query already aggregated ``by (rank)``: rank → value (non-finite values dropped)."""
        out = {}
        for sample in self.vector(template):
            rank, value = _rank_key(sample["metric"]), float(sample["value"][1])
            if rank is not None and math.isfinite(value):
                out[rank] = value
        return out

    def scalar(self, template: str) -> float | None:
        values = [float(s["value"][1]) for s in self.vector(template)]
        values = [v for v in values if math.isfinite(v)]
        return values[0] if values else None

    def rank_curves(
        self, template: str, start: float, end: float, step: float, **extra: str
    ) -> dict[int, Points]:
        out: dict[int, Points] = {}
        expr = self.expr(template, **extra)
        for series in self.prometheus.query_range(expr, start, end, step):
            rank = _rank_key(series["metric"])
            if rank is not None:
                out[rank] = [(float(t), float(v)) for t, v in series["values"]]
        return out


def server_time(prometheus: Prometheus) -> float:
    """Prometheus's own clock: ``now`` for the queries, immune to this machine's clock skew."""
    samples = prometheus.query("time()")
    now = float(samples[0]["value"][1]) if samples else math.nan
    if not math.isfinite(now):  # time() always has a value: whatever answered is not Prometheus
        raise QueryError(f"Prometheus at {prometheus.url} answered time() without a time")
    return now


def _job_record(job_id: str) -> records.JobRecord | None:
    try:
        return records.load_record(job_id)
    except (records.RecordError, TypeError):
        return None


def resolution_for(duration: float, scrape_interval: float | None) -> float:
    """The range-query step: at most MAX_POINTS points, no finer than 1 s nor than the scrape
    interval."""
    return round(max(1.0, duration / MAX_POINTS, scrape_interval or 0.0), 3)


def rate_window_for(step: float, scrape_interval: float | None) -> float:
    """The window of the report's rates: three scrapes (so a rate has samples to work with)
    and two report steps (so consecutive windows overlap and no step goes unseen)."""
    return float(math.ceil(max(2.0, 3 * (scrape_interval or 1.0), 2 * step)))


def collect(
    prometheus: Prometheus, job_id: str, lookback_seconds: float | None = None
) -> JobReport:
    """Every figure of ``job_id`` over its lifetime; raises JobNotFound, Unreachable, QueryError."""
    lookback = lookback_seconds or parse_duration(DEFAULT_LOOKBACK)
    now = server_time(prometheus)
    record = _job_record(job_id)
    if record is not None and now - record.started_at > lookback:
        lookback = now - record.started_at + _RECORD_MARGIN_SECONDS

    q = _Queries(prometheus, job_id, now, lookback)
    starts = q.by_rank("min by (rank) (min_over_time(ugro_train_start_time_seconds{$sel}[$w]))")
    if not starts:
        launched = " (ugro-launch has a record of it)" if record is not None else ""
        raise JobNotFound(
            f"no job {job_id!r} in Prometheus at {prometheus.url}{launched}: no "
            f'ugro_train_start_time_seconds{{job_id="{job_id}"}} in the last '
            f"{_span(lookback)} (--lookback searches further back)"
        )
    start = min(starts.values())
    # From here on, windows reach from the job's start to now and nothing older.
    q = _Queries(prometheus, job_id, now, now - start + 60)

    last_steps = q.by_rank(
        "max by (rank) (last_over_time(ugro_train_last_step_timestamp_seconds{$sel}[$w]))"
    )
    running = bool(q.vector("up{$sel} == 1"))
    last_step = max(last_steps.values()) if last_steps else None
    end = now if running else (last_step if last_step is not None else start)
    # The run began at its launch: imports, data and model loading before the telemetry
    # started are part of it (start-up), where the launcher's record says when that was.
    launched = record.started_at if record is not None and record.started_at <= start else start
    duration = max(0.0, end - start)  # what Prometheus saw of the run

    ranks = _rank_figures(q, starts)
    by_rank = {r.rank: r for r in ranks}
    # The scrape interval, roughly: the rank's series has one sample per scrape over its life.
    scrapes = q.scalar("max(count_over_time(ugro_train_start_time_seconds{$sel}[$w]))")
    interval = duration / scrapes if scrapes and duration > 0 else None
    step = resolution_for(max(duration, 1.0), interval)
    window = rate_window_for(step, interval)
    # Past the last step by a scrape, so the curves end on the final values.
    range_end = now if running else min(now, end + step + (interval or 0.0))

    def curves_of(template: str) -> dict[int, Points]:
        return q.rank_curves(template, start, range_end, step, rw=f"{window:.0f}s")

    curves = Curves(
        loss=curves_of("max by (rank) (ugro_train_loss_last{$sel})"),
        tokens_rate=curves_of("sum by (rank) (rate(ugro_train_tokens_total{$sel}[$rw]))"),
    )
    _fill_losses(q, ranks, curves, start)
    curves.loss_job = _mean_curve(curves.loss)
    for rank, points in curves_of(
        "max by (rank) (job_rank:ugro_train_straggler_score:ratio{$sel})"
    ).items():
        finite = [v for _, v in points if math.isfinite(v)]
        if rank in by_rank and finite:
            by_rank[rank].straggler_score_mean = sum(finite) / len(finite)

    target = q.scalar("max(last_over_time(ugro_train_target_steps{$sel}[$w]))")
    steps = max((r.steps for r in ranks if r.steps is not None), default=None)
    samples_total = _sum_known(r.samples for r in ranks)
    tokens_total = _sum_known(r.tokens for r in ranks)
    training = max((r.training_seconds for r in ranks if r.training_seconds), default=None)
    step_means = [r.step_seconds_mean for r in ranks if r.step_seconds_mean is not None]
    peak = max((v for _, v in _sum_curve(curves.tokens_rate)), default=None)

    initials = [r.loss_initial for r in ranks if r.loss_initial is not None]
    finals = [r.loss_final for r in ranks if r.loss_final is not None]
    loss_initial = sum(initials) / len(initials) if initials else None
    loss_final = sum(finals) / len(finals) if finals else None
    best_candidates = [v for _, v in curves.loss_job]
    best_candidates += [v for v in (loss_initial, loss_final) if v is not None]
    loss_sums = q.by_rank("max by (rank) (last_over_time(ugro_train_loss_sum{$sel}[$w]))")
    loss_counts = q.by_rank("max by (rank) (last_over_time(ugro_train_loss_count{$sel}[$w]))")
    for rank, count in loss_counts.items():
        if rank in by_rank and count > 0 and rank in loss_sums:
            by_rank[rank].loss_mean = loss_sums[rank] / count
    count_all = sum(loss_counts.values())
    loss_mean = sum(loss_sums.values()) / count_all if count_all > 0 else None

    info = q.vector("last_over_time(ugro_train_rank_info{$sel}[$w])")
    sizes = [s["metric"].get("world_size", "") for s in info]
    world_sizes = [int(size) for size in sizes if size.isascii() and size.isdigit()]
    gpus = sorted({s["metric"].get("gpu_uuid", "") for s in info} - {""})
    nodes = sorted({r.node for r in ranks if r.node})

    gpu_util = q.scalar("avg(avg_over_time(job:ugro_gpu_utilization:avg_ratio{$sel}[$w]))")
    progress = None
    if last_step is not None:
        first_step = last_step - (training or 0.0)
        stepping = _max_curve(curves_of("max by (rank) (rate(ugro_train_steps_total{$sel}[$rw]))"))
        # A window that began before the first step would count start-up as a stall.
        inside = [v for t, v in stepping if first_step + window <= t <= last_step]
        if inside:
            progress = sum(1 for v in inside if v > 0) / len(inside)
        else:  # a run shorter than one rate window: judge it scrape by scrape
            progress = _progress_between_scrapes(q, first_step, last_step, range_end)
    waits = [r.data_wait_share for r in ranks if r.data_wait_share is not None]
    efficiency = _efficiency(progress, 1.0 - max(waits) if waits else None, gpu_util)
    ranks_down = q.vector('ALERTS{alertname="TrainingRanksDown",alertstate="firing",$sel}')
    # Ranks that closed their telemetry normally: a loop without total_steps finishes too.
    ended = q.vector("last_over_time(ugro_train_end_time_seconds{$sel}[$w])")
    all_ended = bool(ranks) and len({s["metric"].get("rank") for s in ended}) >= len(ranks)

    return JobReport(
        job_id=job_id,
        prometheus=prometheus.url,
        status=_status(running, bool(ranks_down), record, steps, target, all_ended),
        start_time=launched,
        end_time=end,
        duration_seconds=max(0.0, end - launched),
        training_seconds=training,
        resolution_seconds=step,
        rate_window_seconds=window,
        world_size=max(world_sizes) if world_sizes else (len(ranks) or None),
        nodes=nodes,
        steps=steps,
        target_steps=int(target) if target is not None else None,
        samples=samples_total,
        tokens=tokens_total,
        tokens_per_second_mean=_rate(tokens_total, training or duration),
        tokens_per_second_peak=peak,
        samples_per_second_mean=_rate(samples_total, training or duration),
        step_seconds_mean=sum(step_means) / len(step_means) if step_means else None,
        loss_initial=loss_initial,
        loss_final=loss_final,
        loss_best=min(best_candidates) if best_candidates else None,
        loss_mean=loss_mean,
        gpu_count=len(gpus),
        gpu_utilization_mean=gpu_util,
        gpu_memory_used_peak_bytes=_max_known(r.gpu_memory_used_peak_bytes for r in ranks),
        gpu_temperature_mean_celsius=_mean_known(r.gpu_temperature_mean_celsius for r in ranks),
        gpu_temperature_peak_celsius=_max_known(r.gpu_temperature_peak_celsius for r in ranks),
        efficiency=efficiency,
        ranks=ranks,
        alerts=_alerts(q, start, end, step, gpus, nodes),
        curves=curves,
    )


def _rank_figures(q: _Queries, starts: dict[int, float]) -> list[RankFigures]:
    def last(metric: str) -> dict[int, float]:
        return q.by_rank(f"max by (rank) (last_over_time({metric}{{$sel}}[$w]))")

    steps = last("ugro_train_steps_total")
    samples = last("ugro_train_samples_total")
    tokens = last("ugro_train_tokens_total")
    duration_sum = last("ugro_train_step_duration_seconds_sum")
    duration_count = last("ugro_train_step_duration_seconds_count")
    data_wait = last("ugro_train_data_wait_seconds_total")
    restarts = q.by_rank("sum by (rank) (resets(ugro_train_steps_total{$sel}[$w]))")
    gpu_util = q.by_rank(
        "avg by (rank) (avg_over_time(job_rank:ugro_gpu_utilization:ratio{$sel}[$w]))"
    )
    gpu_memory = q.by_rank(
        "max by (rank) (max_over_time(job_rank:ugro_gpu_memory_used:bytes{$sel}[$w]))"
    )
    temperature_mean = q.by_rank(
        "avg by (rank) (avg_over_time(job_rank:ugro_gpu_temperature:celsius{$sel}[$w]))"
    )
    temperature_peak = q.by_rank(
        "max by (rank) (max_over_time(job_rank:ugro_gpu_temperature:celsius{$sel}[$w]))"
    )
    info = {
        _rank_key(s["metric"]): s["metric"]
        for s in q.vector("last_over_time(ugro_train_rank_info{$sel}[$w])")
    }

    figures = []
    for rank in sorted(set(starts) | set(steps)):
        labels = info.get(rank, {})
        figure = RankFigures(
            rank=rank,
            node=labels.get("node"),
            gpu_uuid=labels.get("gpu_uuid") or None,
            steps=_int(steps.get(rank)),
            samples=_int(samples.get(rank)),
            tokens=_int(tokens.get(rank)),
            restarts=_int(restarts.get(rank)),
            gpu_utilization_mean=gpu_util.get(rank),
            gpu_memory_used_peak_bytes=gpu_memory.get(rank),
            gpu_temperature_mean_celsius=temperature_mean.get(rank),
            gpu_temperature_peak_celsius=temperature_peak.get(rank),
        )
        count, total = duration_count.get(rank), duration_sum.get(rank)
        if count and total is not None:
            figure.step_seconds_mean = total / count
            if figure.steps:
                figure.training_seconds = figure.steps * figure.step_seconds_mean
                figure.tokens_per_second_mean = _rate(figure.tokens, figure.training_seconds)
            if rank in data_wait and total > 0:
                figure.data_wait_share = min(1.0, max(0.0, data_wait[rank] / total))
        figures.append(figure)
    if not any(r.node for r in figures):  # no rank info: the target label still names the node
        nodes = {_rank_key(s["metric"]): s["metric"].get("node") for s in q.vector("up{$sel}")}
        for figure in figures:
            figure.node = nodes.get(figure.rank)
    return figures


def _fill_losses(q: _Queries, ranks: list[RankFigures], curves: Curves, start: float) -> None:
    """Initial loss and its step from the raw samples; final loss from the last sample."""
    by_rank = {r.rank: r for r in ranks}
    firsts = {}
    for rank, points in curves.loss.items():
        finite = [t for t, v in points if math.isfinite(v)]
        if finite:
            firsts[rank] = finite[0]
    if firsts:
        # The first curve point with a value lies within one step of the first raw sample:
        # fetch the raw samples from the start up to there, a few per rank.
        at = max(firsts.values())
        window = {"r": f"{math.ceil((at - start) * 1000) + 1000}ms"}
        losses = _raw_samples(q.matrix("ugro_train_loss_last{$sel}[$r]", at, **window))
        steps = _raw_samples(q.matrix("ugro_train_steps_total{$sel}[$r]", at, **window))
        for rank, samples in losses.items():
            first = next(((t, v) for t, v in samples if math.isfinite(v)), None)
            if first is None or rank not in by_rank:
                continue
            by_rank[rank].loss_initial = first[1]
            at_step = dict(steps.get(rank, []))
            if first[0] in at_step:
                by_rank[rank].loss_initial_step = int(at_step[first[0]])

    finals = q.by_rank("max by (rank) (last_over_time(ugro_train_loss_last{$sel}[$w]))")
    for rank, figure in by_rank.items():
        if rank in finals:
            figure.loss_final = finals[rank]
        else:  # the very last sample was NaN/Inf: the last finite point of the curve
            finite = [v for _, v in curves.loss.get(rank, []) if math.isfinite(v)]
            figure.loss_final = finite[-1] if finite else None


def _progress_between_scrapes(
    q: _Queries, first_step: float, last_step: float, at: float
) -> float | None:
    """The share of scrape intervals from the first step to the last in which the step
    counter rose, for the rank that progressed most (under DDP every rank steps together)."""
    span = {"r": f"{math.ceil((at - first_step) * 1000) + 1000}ms"}
    steps = _raw_samples(q.matrix("ugro_train_steps_total{$sel}[$r]", at, **span))
    shares = []
    for samples in steps.values():
        pairs = [
            (a, b) for a, b in itertools.pairwise(samples) if b[0] > first_step and a[0] < last_step
        ]
        if pairs:
            shares.append(sum(1 for a, b in pairs if b[1] > a[1]) / len(pairs))
    return max(shares) if shares else None


def _raw_samples(matrix: list[dict]) -> dict[int, list[tuple[float, float]]]:
    out: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for series in matrix:
        rank = _rank_key(series["metric"])
        if rank is not None:
            out[rank].extend((float(t), float(v)) for t, v in series.get("values", []))
    for samples in out.values():
        samples.sort()
    return out


def _mean_curve(curves: dict[int, Points]) -> Points:
    by_time: dict[float, list[float]] = defaultdict(list)
    for points in curves.values():
        for t, v in points:
            if math.isfinite(v):
                by_time[t].append(v)
    return [(t, sum(vs) / len(vs)) for t, vs in sorted(by_time.items())]


def _sum_curve(curves: dict[int, Points]) -> Points:
    by_time: dict[float, float] = defaultdict(float)
    for points in curves.values():
        for t, v in points:
            if math.isfinite(v):
                by_time[t] += v
    return sorted(by_time.items())


def _max_curve(curves: dict[int, Points]) -> Points:
    by_time: dict[float, float] = {}
    for points in curves.values():
        for t, v in points:
            if math.isfinite(v):
                by_time[t] = max(v, by_time.get(t, v))
    return sorted(by_time.items())


def _efficiency(progress: float | None, input_: float | None, gpu: float | None) -> Efficiency:
    score = 100.0
    for factor in (progress, input_, gpu):
        if factor is not None:
            score *= min(1.0, max(0.0, factor))
    return Efficiency(score=round(score, 1), progress=progress, input=input_, gpu=gpu)


def _alerts(
    q: _Queries, start: float, end: float, step: float, gpus: list[str], nodes: list[str]
) -> list[FiredAlert]:
    """Alerts of the job (any time up to now) and of its GPUs and nodes (while it ran)."""
    while_running = (end, f"{math.ceil(end - start) + 1}s")
    sources = [('ALERTS{alertstate="firing",$sel}', (q.now, q.fill["w"]))]
    if gpus:
        selector = f'ALERTS{{alertstate="firing",job_id="",gpu_uuid=~"{_any_of(gpus)}"}}'
        sources.append((selector, while_running))
    if nodes:
        selector = f'ALERTS{{alertstate="firing",job_id="",gpu_uuid="",node=~"{_any_of(nodes)}"}}'
        sources.append((selector, while_running))

    by = "alertname, severity, rank, node, gpu_uuid"
    found: dict[tuple, FiredAlert] = {}
    for selector, (at, window) in sources:
        fill = {"r": window, "res": f"{math.ceil(step)}s"}
        # The raw range finds even an alert that fired for one evaluation; the subqueries,
        # sampled at the report's resolution, date it.
        fired = q.vector(f"max by ({by}) (max_over_time({selector}[$r]))", at, **fill)
        if not fired:
            continue
        firsts = q.vector(f"min by ({by}) (min_over_time(timestamp({selector})[$r:$res]))",
                          at, **fill)  # fmt: skip
        lasts = q.vector(f"max by ({by}) (max_over_time(timestamp({selector})[$r:$res]))",
                         at, **fill)  # fmt: skip
        first_at = {_alert_key(s["metric"]): float(s["value"][1]) for s in firsts}
        last_at = {_alert_key(s["metric"]): float(s["value"][1]) for s in lasts}
        for sample in fired:
            labels, key = sample["metric"], _alert_key(sample["metric"])
            found.setdefault(
                key,
                FiredAlert(
                    alertname=labels.get("alertname", ""),
                    severity=labels.get("severity"),
                    rank=labels.get("rank"),
                    node=labels.get("node"),
                    gpu_uuid=labels.get("gpu_uuid"),
                    first_seen=first_at.get(key),
                    last_seen=last_at.get(key),
                ),
            )
    return sorted(
        found.values(),
        key=lambda a: (a.first_seen or math.inf, a.alertname, a.rank or "", a.gpu_uuid or ""),
    )


def _alert_key(labels: dict[str, str]) -> tuple:
    return tuple(labels.get(k, "") for k in ("alertname", "severity", "rank", "node", "gpu_uuid"))


def _any_of(values: Iterable[str]) -> str:
    """A PromQL regex (inside a double-quoted string) matching exactly one of ``values``."""
    return "|".join(re.escape(v) for v in values).replace("\\", "\\\\")


def _status(
    running: bool,
    ranks_down: bool,
    record: records.JobRecord | None,
    steps: int | None,
    target: float | None,
    all_ended: bool = False,
) -> str:
    if (target is not None and steps is not None and steps >= target) or all_ended:
        # Whatever the ranks did after their last step: they may still serve /metrics for a
        # few seconds (the final scrape that Telemetry.close() waits for) before exiting.
        return "finished"
    if running:
        return "running"
    if record is not None and record.state not in (records.RUNNING, records.LAUNCHING):
        return record.state  # the launcher saw how it ended: finished, failed, stopped, lost
    if record is not None and record.shown_state == records.INTERRUPTED:
        return records.INTERRUPTED  # its launcher was killed half-way: `ugro-launch stop` it
    if ranks_down:  # TrainingRanksDown fires: its targets stay and nothing answers
        return "failed"
    return "ended" if target is None else "incomplete"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:.0f}s"


def _int(value: float | None) -> int | None:
    return round(value) if _finite(value) else None


def _rate(amount: float | None, seconds: float | None) -> float | None:
    if amount is None or not seconds or seconds <= 0:
        return None
    return amount / seconds


def _sum_known(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _max_known(values: Iterable[float | None]) -> float | None:
    return max((v for v in values if v is not None), default=None)


def _mean_known(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None
