"""PromQL over one job's series for ``collect``: templated instant and range queries, the
report's resolution and rate window, curves combined over ranks, and the alerts that fired.
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from collections.abc import Iterable

from .job_report import FiredAlert, Points
from .servers import Prometheus, QueryError

# Points per curve: enough for a readable plot and a fair "best loss", few enough to stay cheap
# (Prometheus refuses more than 11,000 points per series).
MAX_POINTS = 600


def rank_key(labels: dict[str, str]) -> int | None:
    try:
        return int(labels.get("rank", ""))
    except ValueError:
        return None


class JobQueries:
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
            rank, value = rank_key(sample["metric"]), float(sample["value"][1])
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
            rank = rank_key(series["metric"])
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


def resolution_for(duration: float, scrape_interval: float | None) -> float:
    """The range-query step: at most MAX_POINTS points, no finer than 1 s nor than the scrape
    interval."""
    return round(max(1.0, duration / MAX_POINTS, scrape_interval or 0.0), 3)


def rate_window_for(step: float, scrape_interval: float | None) -> float:
    """The window of the report's rates: three scrapes (so a rate has samples to work with)
    and two report steps (so consecutive windows overlap and no step goes unseen)."""
    return float(math.ceil(max(2.0, 3 * (scrape_interval or 1.0), 2 * step)))


def raw_samples(matrix: list[dict]) -> dict[int, list[tuple[float, float]]]:
    """A range selector's finite samples by rank, oldest first. NaN and infinite samples are
    left out: every caller wants values, and a distributed store may return Prometheus's
    staleness markers as NaN points where Prometheus returns none (VictoriaMetrics does)."""
    out: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for series in matrix:
        rank = rank_key(series["metric"])
        if rank is not None:
            points = ((float(t), float(v)) for t, v in series.get("values", []))
            out[rank].extend((t, v) for t, v in points if math.isfinite(v))
    for samples in out.values():
        samples.sort()
    return out


def mean_curve(curves: dict[int, Points]) -> Points:
    by_time: dict[float, list[float]] = defaultdict(list)
    for points in curves.values():
        for t, v in points:
            if math.isfinite(v):
                by_time[t].append(v)
    return [(t, sum(vs) / len(vs)) for t, vs in sorted(by_time.items())]


def sum_curve(curves: dict[int, Points]) -> Points:
    by_time: dict[float, float] = defaultdict(float)
    for points in curves.values():
        for t, v in points:
            if math.isfinite(v):
                by_time[t] += v
    return sorted(by_time.items())


def max_curve(curves: dict[int, Points]) -> Points:
    by_time: dict[float, float] = {}
    for points in curves.values():
        for t, v in points:
            if math.isfinite(v):
                by_time[t] = max(v, by_time.get(t, v))
    return sorted(by_time.items())


def fired_alerts(
    q: JobQueries, start: float, end: float, step: float, gpus: list[str], nodes: list[str]
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
