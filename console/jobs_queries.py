"""Every training job of a lookback window, for ``ugro jobs``: one row per job from PromQL over
all jobs at once (each query aggregated ``by (job_id)`` or ``by (job_id, rank)``, so an answer
grows with the jobs and ranks, never with the samples), merged with ugro-launch's records on
this machine.

How each figure is made (the documentation of record; ``ugro jobs --help`` points here). Every
range reaches ``--lookback`` back from Prometheus's own clock:

* **Jobs**: every ``job_id`` with an ``ugro_train_start_time_seconds`` in the lookback (what
  ``ugro report`` looks for), plus every ugro-launch record on this machine that started in it
  or is still running (``source.prometheus`` false when Prometheus has no series of it).
* **Status**: the very rule of ``ugro report`` (``collect``): ``running`` while a rank's target
  answers, ``finished`` when the steps reached the target or every rank closed its telemetry,
  else how the launcher's record says the job ended (finished, failed, stopped, lost), else
  ``failed`` while ``TrainingRanksDown`` fires, else ``incomplete`` (``ended`` without a target).
  A job Prometheus does not know has its record's state.
* **Start, end, duration**: as ``ugro report`` has them: from the launch where the record is
  here (else the first rank's telemetry start) to the last step, or to now while a rank is up.
* **Ranks and nodes**: the ranks that reported a start time; the nodes their
  ``ugro_train_rank_info`` names. For a job Prometheus does not know, the record's nodes ×
  ranks per node.
* **GPU-hours**: the ranks whose ``ugro_train_rank_info`` names a ``gpu_uuid`` × the duration.
  A rank without one (a CPU rank) counts 0; ``gpu.cpu_ranks`` says how many did.
* **Mean tokens/s** (as ``ugro report``'s): the ranks' last ``ugro_train_tokens_total`` summed,
  over the training time: the largest over ranks of steps × mean step time
  (``ugro_train_step_duration_seconds_sum / _count``), else the duration.
* **Final loss**: the mean over ranks of each rank's last ``ugro_train_loss_last``; a rank whose
  last loss is NaN/±Inf is left out (``ugro report`` then looks further back along its curve).
* **Alerts fired**: each ``ALERTS{alertstate="firing"}`` alert name with the job's ``job_id``
  in the lookback, with how many series (ranks, nodes) it fired for.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ugro.catalogue.names import RANKS
from ugro.launcher import records

from .collect import run_status as report_status
from .job_queries import rank_key, server_time
from .servers import Prometheus, QueryError, Unreachable

# The label that names a job, required non-empty on every series read here.
_ANY_JOB = 'job_id!=""'


@dataclass
class FiredAlert:
    alertname: str
    severity: str | None
    series: int  # how many series (ranks, nodes) it fired for


@dataclass
class JobRow:
    """One job over its lifetime; None where not known."""

    job_id: str
    status: str
    in_prometheus: bool
    local_record: bool
    start_time: float | None = None  # Unix seconds
    end_time: float | None = None
    duration_seconds: float | None = None
    ranks: int | None = None
    nodes: list[str] = field(default_factory=list)
    gpu_ranks: int | None = None  # ranks that name a GPU; None when not known
    tokens: int | None = None
    training_seconds: float | None = None
    tokens_per_second_mean: float | None = None
    loss_final: float | None = None
    alerts: list[FiredAlert] = field(default_factory=list)

    @property
    def cpu_ranks(self) -> int | None:
        if self.ranks is None or self.gpu_ranks is None:
            return None
        return self.ranks - self.gpu_ranks

    @property
    def gpu_hours(self) -> float | None:
        if self.gpu_ranks is None or self.duration_seconds is None:
            return None
        return self.gpu_ranks * self.duration_seconds / 3600.0

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status,
            "source": {"prometheus": self.in_prometheus, "local_record": self.local_record},
            "time": {
                "start": self.start_time,
                "end": self.end_time,
                "duration_seconds": self.duration_seconds,
                "training_seconds": self.training_seconds,
            },
            "ranks": self.ranks,
            "nodes": self.nodes,
            "gpu": {
                "ranks": self.gpu_ranks,
                "cpu_ranks": self.cpu_ranks,
                "hours": self.gpu_hours,
            },
            "tokens": self.tokens,
            "tokens_per_second_mean": self.tokens_per_second_mean,
            "loss_final": self.loss_final,
            "alerts": [
                {"alertname": a.alertname, "severity": a.severity, "series": a.series}
                for a in self.alerts
            ],
        }


@dataclass
class JobsOverview:
    """The jobs of a lookback window, newest first, and where they were read from."""

    prometheus: str
    lookback_seconds: float
    as_of: float  # Prometheus's clock, or this machine's when Prometheus did not answer
    jobs: list[JobRow]
    prometheus_error: str | None = None  # set: the rows are ugro-launch's records only
    record_errors: list[str] = field(default_factory=list)  # unreadable record files

    @property
    def local_only(self) -> bool:
        return self.prometheus_error is not None

    def by_status(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for job in self.jobs:
            counts[job.status] += 1
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    @property
    def gpu_hours(self) -> float:
        return sum(job.gpu_hours or 0.0 for job in self.jobs)

    def top_by_throughput(self, count: int) -> list[JobRow]:
        """The ``count`` jobs with the highest mean tokens/s (those with one), best first; on
        a tie the newer job first."""
        known = [j for j in self.jobs if _finite(j.tokens_per_second_mean)]
        return sorted(known, key=lambda j: -(j.tokens_per_second_mean or 0.0))[:count]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


class _AllJobs:
    """Instant queries at ``now`` over every job, a lookback of ``window`` seconds back."""

    def __init__(self, prometheus: Prometheus, now: float, window: float) -> None:
        self.prometheus = prometheus
        self.now = now
        self.range = f"[{math.ceil(window)}s]"

    def samples(self, expr: str) -> list[dict]:
        return self.prometheus.query(expr.replace("[$L]", self.range), self.now)

    def by_job(self, expr: str) -> dict[str, float]:
        """job_id → value of a query aggregated ``by (job_id)`` (non-finite values dropped)."""
        out = {}
        for sample in self.samples(expr):
            value = float(sample["value"][1])
            if math.isfinite(value):
                out[sample["metric"].get("job_id", "")] = value
        out.pop("", None)
        return out

    def by_job_rank(self, expr: str) -> dict[str, dict[int, float]]:
        """job_id → rank → value of a query aggregated ``by (job_id, rank)`` (non-finite
        values dropped)."""
        out: dict[str, dict[int, float]] = defaultdict(dict)
        for sample in self.samples(expr):
            job, rank = sample["metric"].get("job_id", ""), rank_key(sample["metric"])
            value = float(sample["value"][1])
            if job and rank is not None and math.isfinite(value):
                out[job][rank] = value
        return out

    def jobs_with(self, expr: str) -> set[str]:
        return {s["metric"].get("job_id", "") for s in self.samples(expr)} - {""}


def _last(metric: str) -> str:
    return f"max by (job_id, rank) (last_over_time({metric}{{{_ANY_JOB}}}[$L]))"


def _from_prometheus(
    prometheus: Prometheus, now: float, lookback: float, recorded: dict[str, records.JobRecord]
) -> list[JobRow]:
    q = _AllJobs(prometheus, now, lookback)
    starts = q.by_job_rank(
        f"min by (job_id, rank) (min_over_time(ugro_train_start_time_seconds{{{_ANY_JOB}}}[$L]))"
    )
    if not starts:
        return []
    steps = q.by_job_rank(_last("ugro_train_steps_total"))
    tokens = q.by_job_rank(_last("ugro_train_tokens_total"))
    step_sums = q.by_job_rank(_last("ugro_train_step_duration_seconds_sum"))
    step_counts = q.by_job_rank(_last("ugro_train_step_duration_seconds_count"))
    losses = q.by_job_rank(_last("ugro_train_loss_last"))
    last_steps = q.by_job(
        f"max by (job_id) (last_over_time(ugro_train_last_step_timestamp_seconds{{{_ANY_JOB}}}"
        "[$L]))"
    )
    targets = q.by_job(
        f"max by (job_id) (last_over_time(ugro_train_target_steps{{{_ANY_JOB}}}[$L]))"
    )
    ended = q.by_job_rank(
        f"group by (job_id, rank) (last_over_time(ugro_train_end_time_seconds{{{_ANY_JOB}}}[$L]))"
    )
    running = q.jobs_with(f"group by (job_id) (up{{{RANKS},{_ANY_JOB}}} == 1)")
    ranks_down = q.jobs_with(
        f'group by (job_id) (ALERTS{{alertname="TrainingRanksDown",alertstate="firing",'
        f"{_ANY_JOB}}})"
    )
    info = _rank_info(q)
    alerts = _fired_alerts(q)

    rows = []
    for job, rank_starts in starts.items():
        record = recorded.get(job)
        ranks = set(rank_starts) | set(steps.get(job, {}))
        job_steps = list(steps.get(job, {}).values())
        steps_done = round(max(job_steps)) if job_steps else None
        target = targets.get(job)
        all_ended = bool(ranks) and len(ended.get(job, {})) >= len(ranks)
        is_running = job in running
        status = report_status(is_running, job in ranks_down, record, steps_done, target, all_ended)
        # The lifetime as `ugro report` has it (collect): the telemetry's start, or the launch
        # where the record says when that was; the last step, or now while a rank is up.
        start = min(rank_starts.values())
        last_step = last_steps.get(job)
        end = now if is_running else (last_step if last_step is not None else start)
        launched = record.started_at if record is not None and record.started_at <= start else start
        training = _training_seconds(
            steps.get(job, {}), step_sums.get(job, {}), step_counts.get(job, {})
        )
        duration = max(0.0, end - launched)
        job_tokens = list(tokens.get(job, {}).values())
        tokens_total = round(sum(job_tokens)) if job_tokens else None
        job_info = info.get(job, {})
        finals = list(losses.get(job, {}).values())
        rows.append(
            JobRow(
                job_id=job,
                status=status,
                in_prometheus=True,
                local_record=record is not None,
                start_time=launched,
                end_time=end,
                duration_seconds=duration,
                ranks=len(ranks),
                nodes=sorted({labels.get("node", "") for labels in job_info.values()} - {""}),
                gpu_ranks=sum(1 for r in ranks if job_info.get(r, {}).get("gpu_uuid")),
                tokens=tokens_total,
                training_seconds=training,
                tokens_per_second_mean=_rate(tokens_total, training or duration),
                loss_final=sum(finals) / len(finals) if finals else None,
                alerts=sorted(alerts.get(job, []), key=lambda a: a.alertname),
            )
        )
    return rows


def _rank_info(q: _AllJobs) -> dict[str, dict[int, dict[str, str]]]:
    """job_id → rank → the labels of its ``ugro_train_rank_info`` (node, gpu_uuid, …)."""
    info: dict[str, dict[int, dict[str, str]]] = defaultdict(dict)
    for sample in q.samples(f"last_over_time(ugro_train_rank_info{{{_ANY_JOB}}}[$L])"):
        labels = sample["metric"]
        rank = rank_key(labels)
        if rank is not None:
            known = info[labels.get("job_id", "")].setdefault(rank, labels)
            if labels.get("gpu_uuid") and not known.get("gpu_uuid"):
                # A rank that named a GPU in some incarnation held one for the run.
                info[labels["job_id"]][rank] = labels
    return info


def _fired_alerts(q: _AllJobs) -> dict[str, list[FiredAlert]]:
    """job_id → the alerts that fired for it, by name, with how many series each."""
    alerts: dict[str, list[FiredAlert]] = defaultdict(list)
    for sample in q.samples(
        "count by (job_id, alertname, severity) "
        f'(max_over_time(ALERTS{{alertstate="firing",{_ANY_JOB}}}[$L]))'
    ):
        labels = sample["metric"]
        alerts[labels.get("job_id", "")].append(
            FiredAlert(
                alertname=labels.get("alertname", ""),
                severity=labels.get("severity"),
                series=round(float(sample["value"][1])),
            )
        )
    return alerts


def _training_seconds(
    steps: dict[int, float], sums: dict[int, float], counts: dict[int, float]
) -> float | None:
    """The largest over ranks of steps × mean step time (``ugro report``'s training time)."""
    per_rank = [
        steps[rank] * sums[rank] / counts[rank]
        for rank in steps
        if steps[rank] and counts.get(rank) and rank in sums
    ]
    return max(per_rank) if per_rank else None


def _rate(amount: float | None, seconds: float | None) -> float | None:
    if amount is None or not seconds or seconds <= 0:
        return None
    return amount / seconds


def _from_record(record: records.JobRecord, now: float) -> JobRow:
    """A job only this machine's ugro-launch record knows of."""
    state = record.shown_state
    going = state in records.GOING
    end = record.ended_at if record.ended_at is not None else (now if going else None)
    return JobRow(
        job_id=record.job_id,
        status=state,
        in_prometheus=False,
        local_record=True,
        start_time=record.started_at,
        end_time=end,
        duration_seconds=max(0.0, end - record.started_at) if end is not None else None,
        ranks=len(record.nodes) * record.nproc_per_node,
        nodes=sorted(record.nodes),
    )


def _local_records() -> tuple[dict[str, records.JobRecord], list[str]]:
    """This machine's ugro-launch records by job id, and a line naming each record file that
    cannot be read."""
    found, unreadable = records.scan_records()
    return {r.job_id: r for r in found}, [str(error) for error in unreadable]


def _in_window(record: records.JobRecord, now: float, lookback: float) -> bool:
    """A record of a job that started within the lookback or is still going."""
    going = record.state in records.GOING
    return going or record.started_at >= now - lookback


def overview(prometheus: Prometheus, lookback: float) -> JobsOverview:
    """Every job of the last ``lookback`` seconds. Never raises for a Prometheus that is down
    or answers an error: the overview then holds the local records and the message."""
    error = None
    try:
        now = server_time(prometheus)
    except (Unreachable, QueryError) as problem:
        now, error = time.time(), str(problem)
    # Every record, for the jobs Prometheus knows however long ago they were launched; only
    # those of the window stand for jobs Prometheus does not know.
    recorded, unreadable = _local_records()
    rows: list[JobRow] = []
    if error is None:
        try:
            rows = _from_prometheus(prometheus, now, lookback, recorded)
        except (Unreachable, QueryError) as problem:
            rows, error = [], str(problem)
    known = {row.job_id for row in rows}
    rows += [
        _from_record(record, now)
        for job, record in recorded.items()
        if job not in known and _in_window(record, now, lookback)
    ]
    rows.sort(key=lambda row: (-(row.start_time or 0.0), row.job_id))
    return JobsOverview(
        prometheus=prometheus.url,
        lookback_seconds=lookback,
        as_of=now,
        jobs=rows,
        prometheus_error=error,
        record_errors=unreadable,
    )
