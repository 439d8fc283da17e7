"""Gathering one ``JobSnapshot`` for ``ugro watch``: one instant query per quantity, covering
all of the job's ranks, against the recording rules the Grafana dashboard and the alerts read
(and the alerts' condition series, ugro.catalogue.conditions), plus the job's alerts from
Alertmanager and, where this machine has it, ugro-launch's record of how the job ended.

What the gathered values mean, and how statuses follow from them: ``snapshot``.
"""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import replace

from ugro.catalogue import conditions
from ugro.catalogue.names import RANKS
from ugro.launcher import records

from .servers import Alertmanager, Prometheus, QueryError, Unreachable
from .snapshot import AlertState, JobSnapshot, RankState, job_rates, job_status, rank_status

# How far back a rank's last known identity, step count and target are looked up, so that a
# job whose ranks are down or whose targets are gone still shows where it stopped.
LOOKBACK = "15m"
# Queries whose answer is which ranks a condition holds for, not a value.
CONDITIONS = ("stalled", "straggling")
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def _queries(job_id: str) -> dict[str, str]:
    """One PromQL expression per quantity; each returns at most one series per rank."""
    j = f'job_id="{job_id}"'

    def last(metric: str) -> str:
        return f"last_over_time({metric}{{{j}}}[{LOOKBACK}])"

    return {
        "up": f"up{{{RANKS},{j}}}",
        "info": last("ugro_train_rank_info"),
        "steps": last("ugro_train_steps_total"),
        "target_steps": last("ugro_train_target_steps"),
        "last_step_at": last("ugro_train_last_step_timestamp_seconds"),
        "started_at": last("ugro_train_start_time_seconds"),
        "tokens": last("ugro_train_tokens_total"),
        "ended_at": last("ugro_train_end_time_seconds"),
        "loss_last": f"ugro_train_loss_last{{{j}}}",
        "loss_mean": f"job_rank:ugro_train_loss:mean1m{{{j}}}",
        "learning_rate": f"ugro_train_learning_rate{{{j}}}",
        "tokens_per_second": f"job_rank:ugro_train_tokens:rate1m{{{j}}}",
        "step_seconds": f"job_rank:ugro_train_step_duration_seconds:mean1m{{{j}}}",
        "step_seconds_lifetime": f"job_rank:ugro_train_step_duration_seconds:mean{{{j}}}",
        "steps_per_second": f"job_rank:ugro_train_steps:rate1m{{{j}}}",
        "straggler_score": f"job_rank:ugro_train_straggler_score:ratio{{{j}}}",
        # 0 for a rank that steps without non-finite values: absent means none.
        "recent_nonfinite": (
            f"sum by (rank) ({conditions.NONFINITE}{{{j}}})"
            f" or sum by (rank) (ugro_train_steps_total{{{j}}}) * 0"
        ),
        "stalled": f"group by (rank) ({conditions.STALLED}{{{j}}})",
        "straggling": f"group by (rank) ({conditions.STRAGGLER}{{{j}}})",
        "gpu_utilization": f"avg by (rank) (job_rank:ugro_gpu_utilization:ratio{{{j}}})",
        "sm_active": f"avg by (rank) (job_rank:ugro_gpu_sm_active:ratio{{{j}}})",
        "mfu": f"job_rank:ugro_train_mfu:ratio1m{{{j}}}",
        "job_mfu": f"job:ugro_train_mfu:ratio1m{{{j}}}",
        "job_tokens_per_second": f"job:ugro_train_tokens:rate1m{{{j}}}",
        "job_loss_mean": f"job:ugro_train_loss:mean5m{{{j}}}",
        "job_progress": f"job:ugro_train_progress:ratio{{{j}}}",
        "ranks_down_firing": f'ALERTS{{alertname="TrainingRanksDown",alertstate="firing",{j}}}',
    }


def _number(sample: dict) -> float:
    return float(sample["value"][1])  # Prometheus writes NaN and ±Inf as "NaN", "+Inf", "-Inf"


def _rank_of(sample: dict) -> int | None:
    try:
        return int(sample["metric"]["rank"])
    except (KeyError, ValueError):
        return None


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _alert_states(alerts: list[dict]) -> list[AlertState]:
    states = []
    for alert in alerts:
        labels = alert.get("labels", {})
        where = " on ".join(
            part
            for part in (
                f"rank {labels['rank']}" if "rank" in labels else "",
                labels.get("node", ""),
            )
            if part
        )
        states.append(
            AlertState(
                name=labels.get("alertname", "?"),
                severity=labels.get("severity", ""),
                summary=alert.get("annotations", {}).get("summary", ""),
                since=_parse_time(alert.get("startsAt")),
                where=where,
            )
        )
    states.sort(key=lambda a: (SEVERITY_ORDER.get(a.severity, 9), a.since or 0, a.name))
    return states


def gather(job_id: str, prometheus: Prometheus, alertmanager: Alertmanager) -> JobSnapshot:
    """One snapshot of the job. Never raises for a server that is down or answers an error:
    the snapshot carries the message instead."""
    taken_at = time.time()
    urls = {"prometheus_url": prometheus.url, "alertmanager_url": alertmanager.url}
    alerts: list[AlertState] = []
    alertmanager_error = None
    try:
        alerts = _alert_states(alertmanager.alerts(job_id=job_id))
    except (Unreachable, QueryError) as error:
        alertmanager_error = str(error)

    results: dict[str, list[dict]] = {}
    try:
        for name, expr in _queries(job_id).items():
            results[name] = prometheus.query(expr)
    except (Unreachable, QueryError) as error:
        return JobSnapshot(
            job_id,
            taken_at,
            **urls,
            status="waiting",
            alerts=alerts,
            prometheus_error=str(error),
            alertmanager_error=alertmanager_error,
        )
    # Prometheus's evaluation time: ages and the elapsed time use the server's clock.
    for samples in results.values():
        if samples:
            taken_at = float(samples[0]["value"][0])
            break

    facts: dict[int, dict] = {}
    for name in ("up", "info", "steps"):  # the queries that name a rank's node
        for sample in results[name]:
            rank = _rank_of(sample)
            if rank is not None and sample["metric"].get("node"):
                facts.setdefault(rank, {})["node"] = sample["metric"]["node"]
    world_sizes = set()
    answered = set()
    for sample in results["info"]:
        rank = _rank_of(sample)
        if rank is not None:
            facts.setdefault(rank, {})
            answered.add(rank)
        size = sample["metric"].get("world_size", "")
        if size.isascii() and size.isdigit():  # isdigit alone passes "²", which int() refuses
            world_sizes.add(int(size))
    for sample in results["up"]:
        rank = _rank_of(sample)
        if rank is not None:
            facts.setdefault(rank, {})["up"] = _number(sample) == 1
    per_rank = (
        "steps",
        "target_steps",
        "loss_last",
        "loss_mean",
        "learning_rate",
        "tokens_per_second",
        "step_seconds",
        "step_seconds_lifetime",
        "steps_per_second",
        "straggler_score",
        "recent_nonfinite",
        "gpu_utilization",
        "sm_active",
        "mfu",
    )
    for name in (*per_rank, "last_step_at", "started_at", "ended_at", "tokens"):
        for sample in results[name]:
            rank = _rank_of(sample)
            value = _number(sample)
            # A ratio of two rates is NaN while nothing happened in its window (0/0): that is
            # "no value", not a non-finite loss. Only the last loss's NaN/Inf is news.
            if rank is not None and (name == "loss_last" or math.isfinite(value)):
                facts.setdefault(rank, {})[name] = value

    # Conditions: a rank is flagged while its condition series exists.
    flagged = {name: {_rank_of(sample) for sample in results[name]} for name in CONDITIONS}
    ranks = []
    for rank in sorted(facts):
        known = facts[rank]
        state = RankState(
            rank=rank,
            node=known.get("node", ""),
            up=known.get("up"),
            answered=rank in answered,
            ended="ended_at" in known,
            # A step scraped while this snapshot was being gathered is 0 s old, not less.
            seconds_since_step=(
                max(0.0, taken_at - known["last_step_at"]) if "last_step_at" in known else None
            ),
            stalled=rank in flagged["stalled"],
            straggling=rank in flagged["straggling"],
            **{name: known[name] for name in per_rank if name in known},
        )
        ranks.append(replace(state, status=rank_status(state)))

    def job_value(name: str) -> float | None:
        value = _number(results[name][0]) if results[name] else math.nan
        return value if math.isfinite(value) else None

    starts = [facts[r]["started_at"] for r in facts if "started_at" in facts[r]]
    last_steps = [facts[r]["last_step_at"] for r in facts if "last_step_at" in facts[r]]
    steps = [r.steps for r in ranks if r.steps is not None]
    targets = [r.target_steps for r in ranks if r.target_steps]
    rates = [r.steps_per_second for r in ranks if r.steps_per_second is not None]
    rates = [rate for rate in rates if math.isfinite(rate)]
    status = job_status(ranks)
    progress = job_value("job_progress")
    # The recording rule lags the raw step counts by an evaluation and is gone with the targets:
    # a job that is over shows the progress of the step count it shows.
    if (progress is None or status in ("finished", "ended")) and steps and targets:
        progress = max(steps) / max(targets)
    started_at = min(starts) if starts else None
    steps_per_second, tokens_per_second = job_rates(
        windowed=(sum(rates) / len(rates) if rates else None, job_value("job_tokens_per_second")),
        totals=(
            max(steps) if steps else None,
            sum(f["tokens"] for f in facts.values() if "tokens" in f),
        ),
        started_at=started_at if status == "running" else None,
        taken_at=taken_at,
    )
    return JobSnapshot(
        job_id,
        taken_at,
        **urls,
        status=status,
        ranks=ranks,
        world_size=max(world_sizes) if world_sizes else None,
        started_at=started_at,
        last_step_at=max(last_steps) if last_steps else None,
        steps=max(steps) if steps else None,
        target_steps=max(targets) if targets else None,
        progress=progress,
        steps_per_second=steps_per_second,
        tokens_per_second=tokens_per_second,
        loss_mean=job_value("job_loss_mean"),
        mfu=job_value("job_mfu"),
        alerts=alerts,
        ranks_down_firing=bool(results["ranks_down_firing"]),
        alertmanager_error=alertmanager_error,
    )


def recorded_end(job_id: str) -> str | None:
    """How ugro-launch's record of the job on this machine says it ended, if it has ended."""
    try:
        state = records.load_record(job_id).state
    except (records.RecordError, TypeError):
        return None
    ended = (records.FINISHED, records.FAILED, records.STOPPED, records.LOST)
    return state if state in ended else None
