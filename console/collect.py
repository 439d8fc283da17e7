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
  ``job_queries.MAX_POINTS`` points and never finer than 1 s or the scrape interval (estimated
  from the number of samples a rank has). Rates are taken over a window of three scrape
  intervals or two resolution steps, whichever is longer (``rate_window_seconds``): the
  dashboards' one-minute rules would smear a job shorter than a few minutes, start-up included.
  Peak throughput is the highest point of the job's token rate curve (the sum over ranks of
  the tokens counted in each window over its length: two samples, so that any store holding
  the samples answers the same, which ``rate()`` does not); a run shorter than one rate window
  has no curve, and its mean throughput stands in.
* **Loss.** Each rank's *initial* loss is its first finite ``ugro_train_loss_last`` sample (the
  loss of whichever step was last when Prometheus first scraped it; that step is reported
  too); its *final* loss is its last finite sample; its *mean* is ``loss_sum / loss_count`` at
  the end (every finite step exactly). The job's initial and final loss are the means of the
  ranks'; *best* is the lowest point of the job's loss curve (the mean over ranks of
  ``ugro_train_loss_last`` at the report's resolution), the initial and final values included;
  *reduction* is ``(initial - final) / initial``.
* **GPUs**, through the rank↔GPU join rules: mean of ``job:ugro_gpu_utilization:avg_ratio``
  (and of ``job:ugro_gpu_sm_active:avg_ratio``, SM activity, where the GPUs report GPM; the
  efficiency score's GPU factor uses it then). **MFU** is the mean of ``job:ugro_train_mfu:ratio1m``
  (model FLOP/s over the devices' peak) where the loop declared its FLOPs and a peak is known.
  over the lifetime, peak of ``job_rank:ugro_gpu_memory_used:bytes``, mean and peak of
  ``job_rank:ugro_gpu_temperature:celsius``. All null for a job whose ranks name no GPU.
* **Per rank**, besides the above: data-wait share = the rank's seconds in phase ``data``
  (``ugro_train_phase_seconds_total{phase="data"}``) over its stepping time
  (``step_duration_seconds_sum``), and the mean of the finite points of
  ``job_rank:ugro_train_straggler_score:ratio`` (1 = the job's median rank).
* **Efficiency**: see ``job_report.EFFICIENCY_HELP``.
* **Where the time went** and **checkpoints**: see ``goodput.py``.
* **Alerts**: every ``ALERTS{alertstate="firing"}`` series with the job's ``job_id`` at any time
  up to now (so "ranks down" after a crash counts), plus those on the job's GPUs
  (``gpu_uuid``) and nodes while it ran; first and last seen at the report's resolution.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

from ugro.launcher import records

from .formatting import span
from .job_queries import (
    JobQueries,
    fired_alerts,
    max_curve,
    mean_curve,
    rank_key,
    rate_window_for,
    raw_samples,
    resolution_for,
    server_time,
    sum_curve,
)
from .job_report import (
    DEFAULT_LOOKBACK,
    Curves,
    Efficiency,
    JobNotFound,
    JobReport,
    Points,
    RankFigures,
    parse_duration,
)
from .servers import Prometheus

# A job record older than the lookback widens the search to its start plus this margin.
_RECORD_MARGIN_SECONDS = 3600.0


_TOKENS_IN_WINDOW = "(ugro_train_tokens_total{$sel} - ugro_train_tokens_total{$sel} offset $rw)"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _job_record(job_id: str) -> records.JobRecord | None:
    try:
        return records.load_record(job_id)
    except (records.RecordError, TypeError):
        return None


def collect(
    prometheus: Prometheus, job_id: str, lookback_seconds: float | None = None
) -> JobReport:
    """Every figure of ``job_id`` over its lifetime; raises JobNotFound, Unreachable, QueryError."""
    lookback = lookback_seconds or parse_duration(DEFAULT_LOOKBACK)
    now = server_time(prometheus)
    record = _job_record(job_id)
    if record is not None and now - record.started_at > lookback:
        lookback = now - record.started_at + _RECORD_MARGIN_SECONDS

    q = JobQueries(prometheus, job_id, now, lookback)
    starts = q.by_rank("min by (rank) (min_over_time(ugro_train_start_time_seconds{$sel}[$w]))")
    if not starts:
        launched = " (ugro-launch has a record of it)" if record is not None else ""
        raise JobNotFound(
            f"no job {job_id!r} in Prometheus at {prometheus.url}{launched}: no "
            f'ugro_train_start_time_seconds{{job_id="{job_id}"}} in the last '
            f"{span(lookback)} (--lookback searches further back)"
        )
    start = min(starts.values())
    # From here on, windows reach from the job's start to now and nothing older.
    q = JobQueries(prometheus, job_id, now, now - start + 60)

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
        # The tokens counted in the window over its length, from two plain samples, not
        # rate(): a store that speaks MetricsQL computes rate() (and deriv()) differently (no
        # extrapolation to the window's edges, the sample before the window counted), and the
        # report must say the same wherever the series are kept (docs/remote-write.md). Across
        # a counter reset (a rank relaunched under the same labels) the difference is negative:
        # there the count since the reset is what the window holds.
        tokens_rate=curves_of(
            f"sum by (rank) ({_TOKENS_IN_WINDOW} >= 0"
            f" or (ugro_train_tokens_total{{$sel}} and {_TOKENS_IN_WINDOW} < 0)) / {window:.0f}"
        ),
    )
    _fill_losses(q, ranks, curves, start)
    curves.loss_job = mean_curve(curves.loss)
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
    peak = max((v for _, v in sum_curve(curves.tokens_rate)), default=None)

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
    # Profiling-class SM activity (GPM, Hopper and newer) where the GPUs report it: NVML's
    # utilisation counts a GPU busy inside one slow kernel as 100 %.
    sm_active = q.scalar("avg(avg_over_time(job:ugro_gpu_sm_active:avg_ratio{$sel}[$w]))")
    mfu = q.scalar("avg(avg_over_time(job:ugro_train_mfu:ratio1m{$sel}[$w]))")
    progress = None
    if last_step is not None:
        first_step = last_step - (training or 0.0)
        stepping = max_curve(curves_of("max by (rank) (rate(ugro_train_steps_total{$sel}[$rw]))"))
        # A window that began before the first step would count start-up as a stall.
        inside = [v for t, v in stepping if first_step + window <= t <= last_step]
        if inside:
            progress = sum(1 for v in inside if v > 0) / len(inside)
        else:  # a run shorter than one rate window: judge it scrape by scrape
            progress = _progress_between_scrapes(q, first_step, last_step, range_end)
    waits = [r.data_wait_share for r in ranks if r.data_wait_share is not None]
    gpu_busy = sm_active if sm_active is not None else gpu_util
    efficiency = _efficiency(progress, 1.0 - max(waits) if waits else None, gpu_busy)
    ranks_down = q.vector('ALERTS{alertname="TrainingRanksDown",alertstate="firing",$sel}')
    # Ranks that closed their telemetry normally: a loop without total_steps finishes too.
    ended = q.vector("last_over_time(ugro_train_end_time_seconds{$sel}[$w])")
    all_ended = bool(ranks) and len({s["metric"].get("rank") for s in ended}) >= len(ranks)

    return JobReport(
        job_id=job_id,
        prometheus=prometheus.url,
        status=run_status(running, bool(ranks_down), record, steps, target, all_ended),
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
        # A run shorter than one rate window has no rate points: its mean is its only rate.
        tokens_per_second_peak=peak
        if peak is not None
        else _rate(tokens_total, training or duration),
        samples_per_second_mean=_rate(samples_total, training or duration),
        step_seconds_mean=sum(step_means) / len(step_means) if step_means else None,
        loss_initial=loss_initial,
        loss_final=loss_final,
        loss_best=min(best_candidates) if best_candidates else None,
        loss_mean=loss_mean,
        gpu_count=len(gpus),
        gpu_utilization_mean=gpu_util,
        gpu_sm_active_mean=sm_active,
        mfu_mean=mfu,
        gpu_memory_used_peak_bytes=_max_known(r.gpu_memory_used_peak_bytes for r in ranks),
        gpu_temperature_mean_celsius=_mean_known(r.gpu_temperature_mean_celsius for r in ranks),
        gpu_temperature_peak_celsius=_max_known(r.gpu_temperature_peak_celsius for r in ranks),
        efficiency=efficiency,
        ranks=ranks,
        alerts=fired_alerts(q, start, end, step, gpus, nodes),
        curves=curves,
    )


def _rank_figures(q: JobQueries, starts: dict[int, float]) -> list[RankFigures]:
    def last(metric: str) -> dict[int, float]:
        return q.by_rank(f"max by (rank) (last_over_time({metric}{{$sel}}[$w]))")

    steps = last("ugro_train_steps_total")
    samples = last("ugro_train_samples_total")
    tokens = last("ugro_train_tokens_total")
    duration_sum = last("ugro_train_step_duration_seconds_sum")
    duration_count = last("ugro_train_step_duration_seconds_count")
    data_wait = q.by_rank(
        'max by (rank) (last_over_time(ugro_train_phase_seconds_total{$sel,phase="data"}[$w]))'
    )
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
        rank_key(s["metric"]): s["metric"]
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
        nodes = {rank_key(s["metric"]): s["metric"].get("node") for s in q.vector("up{$sel}")}
        for figure in figures:
            figure.node = nodes.get(figure.rank)
    return figures


def _fill_losses(q: JobQueries, ranks: list[RankFigures], curves: Curves, start: float) -> None:
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
        losses = raw_samples(q.matrix("ugro_train_loss_last{$sel}[$r]", at, **window))
        steps = raw_samples(q.matrix("ugro_train_steps_total{$sel}[$r]", at, **window))
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
    q: JobQueries, first_step: float, last_step: float, at: float
) -> float | None:
    """The share of scrape intervals from the first step to the last in which the step
    counter rose, for the rank that progressed most (under DDP every rank steps together)."""
    span = {"r": f"{math.ceil((at - first_step) * 1000) + 1000}ms"}
    steps = raw_samples(q.matrix("ugro_train_steps_total{$sel}[$r]", at, **span))
    shares = []
    for samples in steps.values():
        pairs = [
            (a, b) for a, b in itertools.pairwise(samples) if b[0] > first_step and a[0] < last_step
        ]
        if pairs:
            shares.append(sum(1 for a, b in pairs if b[1] > a[1]) / len(pairs))
    return max(shares) if shares else None


def _efficiency(progress: float | None, input_: float | None, gpu: float | None) -> Efficiency:
    score = 100.0
    for factor in (progress, input_, gpu):
        if factor is not None:
            score *= min(1.0, max(0.0, factor))
    return Efficiency(score=round(score, 1), progress=progress, input=input_, gpu=gpu)


def run_status(
    running: bool,
    ranks_down: bool,
    record: records.JobRecord | None,
    steps: int | None,
    target: float | None,
    all_ended: bool = False,
) -> str:
    """A run's status (finished, failed, stopped, lost, running): one rule, for ``ugro report``
    and ``ugro jobs`` alike."""
    if (target is not None and steps is not None and steps >= target) or all_ended:
        # Whatever the ranks did after their last step: they may still serve /metrics for a
        # few seconds (the final scrape that Telemetry.close() waits for) before exiting.
        return "finished"
    if running:
        return "running"
    if record is not None and record.state not in records.GOING:
        return record.state  # the launcher saw how it ended: finished, failed, stopped, lost
    if record is not None and record.shown_state == records.INTERRUPTED:
        return records.INTERRUPTED  # its launcher was killed half-way: `ugro-launch stop` it
    if ranks_down:  # TrainingRanksDown fires: its targets stay and nothing answers
        return "failed"
    return "ended" if target is None else "incomplete"


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
