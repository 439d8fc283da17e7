"""``ugro watch JOB``: a live terminal view of one training job.

Every refresh gathers a ``JobSnapshot`` — one instant query per quantity, covering all of the
job's ranks, against the recording rules the Grafana dashboard and the alerts read, plus the
job's alerts from Alertmanager — and draws it with Rich. Gathering (``gather``) talks to the
servers; drawing (``render``) is a pure function of a snapshot.

How a rank's status is decided (first match wins). The conditions are the alerts' own
recorded series (ugro.catalogue.conditions), so the view and the alerts cannot disagree and no
threshold is restated here:

* ``finished``   its last known step count reached the run's target steps, or it closed its
                 telemetry normally (``ugro_train_end_time_seconds``);
* ``down``       Prometheus cannot scrape it (``up == 0``) although it answered before and did
                 not say it finished (as ``job_rank:ugro_train_down:bool`` records);
* ``gone``       it has no scrape target any more (the job's targets were removed);
* ``stalled``    its stall condition holds (no step for longer than the stall alert allows);
* ``non-finite`` its last loss is NaN/±Inf, or its non-finite condition holds (a NaN/Inf loss
                 or gradient norm counted within the alert's window);
* ``straggler``  its straggler condition holds (score below the alert's ratio);
* ``starting``   it has not answered a scrape yet, or has completed no step; ``ok`` otherwise.

The job is ``waiting`` while Prometheus has no series for it, ``starting`` while no rank has
answered, ``finished`` when every rank finished, ``ended`` when its targets are gone
(``ugro-launch`` removes them when the job exits normally or is stopped), ``down`` when a rank
is down, ``stalled`` when a rank is stalled and ``running`` otherwise. With ``--until-done`` the
command exits once the job is over: 0 when it is ``finished`` or ``ended``; 1 when every rank
that did not finish is down and Prometheus fires ``TrainingRanksDown`` for the job (a crash: the
alert's ``for:`` outlasts the few seconds in which a normally ending job's ranks are gone but its
targets not yet removed). A job that never answers is waited for.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ugro.catalogue import conditions
from ugro.catalogue.names import RANKS
from ugro.launcher import records
from ugro.launcher.records import JOB_ID, JOB_ID_EXPECTED

from .servers import Alertmanager, Prometheus, QueryError, Unreachable

# How far back a rank's last known identity, step count and target are looked up, so that a
# job whose ranks are down or whose targets are gone still shows where it stopped.
LOOKBACK = "15m"
# One server round trip must not hold up a refresh (or Ctrl-C) for long.
QUERY_TIMEOUT_SECONDS = 5.0
# The window of the recorded rates (job_rank:…:rate1m): a younger job's rates count time before
# it existed.
RATE_WINDOW_SECONDS = 60.0
# Queries whose answer is which ranks a condition holds for, not a value.
CONDITIONS = ("stalled", "straggling")
# `--until-done` exit codes, by how the job ended (documented in `ugro watch --help`).
OUTCOME_CODES = {"finished": 0, "failed": 1, "stopped": 3, "ended": 4}

STATUS_STYLES = {
    # ranks
    "ok": "green",
    "finished": "bold blue",
    "starting": "cyan",
    "straggler": "yellow",
    "non-finite": "bold red",
    "stalled": "bold red",
    "down": "bold red",
    "gone": "dim",
    # the job
    "running": "bold green",
    "waiting": "yellow",
    "ended": "blue",
    "failed": "bold red",
    "lost": "bold red",
    "stopped": "magenta",
}
SEVERITY_STYLES = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
MISSING = "–"


# -- the snapshot -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RankState:
    """One rank as Prometheus saw it. ``None`` means Prometheus has no value for it."""

    rank: int
    node: str = ""
    up: bool | None = None  # None: no scrape target (the job's targets were removed)
    answered: bool = True  # it answered a scrape within LOOKBACK
    ended: bool = False  # it closed its telemetry normally (ugro_train_end_time_seconds)
    status: str = "ok"
    steps: float | None = None  # last known, within LOOKBACK
    target_steps: float | None = None
    seconds_since_step: float | None = None
    gpu_utilization: float | None = None  # ratio 0..1; None when the rank has no GPU
    loss_last: float | None = None
    loss_mean: float | None = None  # mean over the last minute (finite losses)
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    step_seconds: float | None = None  # mean step time over the last minute
    step_seconds_lifetime: float | None = None  # mean over the rank's life (the stall base)
    steps_per_second: float | None = None
    straggler_score: float | None = None  # 1 = the job's median rank
    recent_nonfinite: float | None = None  # non-finite steps within the alert's window
    stalled: bool = False  # the stall condition holds
    straggling: bool = False  # the straggler condition holds


@dataclass(frozen=True)
class AlertState:
    """A firing alert about the job, from Alertmanager."""

    name: str
    severity: str = ""
    summary: str = ""
    since: float | None = None  # Unix seconds
    where: str = ""  # "rank 1 on node-a", or empty for a job-wide alert


@dataclass(frozen=True)
class JobSnapshot:
    """Everything one frame shows. ``taken_at`` is Prometheus's clock (Unix seconds)."""

    job_id: str
    taken_at: float
    prometheus_url: str = ""
    alertmanager_url: str = ""
    status: str = "waiting"
    ranks: list[RankState] = field(default_factory=list)
    world_size: int | None = None
    started_at: float | None = None
    last_step_at: float | None = None
    steps: float | None = None  # the furthest rank's step count
    target_steps: float | None = None
    progress: float | None = None  # ratio 0..1
    steps_per_second: float | None = None
    tokens_per_second: float | None = None  # the whole job
    loss_mean: float | None = None  # the whole job, over 5 minutes
    alerts: list[AlertState] = field(default_factory=list)
    ranks_down_firing: bool = False  # Prometheus fires TrainingRanksDown for the job
    # How ugro-launch's record on this machine says the job ended (finished, failed, stopped,
    # lost), or None: still running, or launched elsewhere.
    recorded_end: str | None = None
    prometheus_error: str | None = None
    alertmanager_error: str | None = None

    @property
    def elapsed_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.last_step_at if self.status in ("finished", "ended") else self.taken_at
        return max(0.0, (end or self.taken_at) - self.started_at)

    @property
    def eta_seconds(self) -> float | None:
        """Time to the target step at the current step rate; None when either is unknown."""
        if self.status != "running" or self.steps is None or self.target_steps is None:
            return None
        if not self.steps_per_second or self.steps_per_second <= 0:
            return None
        return max(0.0, self.target_steps - self.steps) / self.steps_per_second

    @property
    def complete(self) -> bool:
        """Both servers answered and Prometheus knows the job."""
        return (
            self.prometheus_error is None
            and self.alertmanager_error is None
            and self.status != "waiting"
        )

    @property
    def outcome(self) -> int | None:
        """None while the job goes on; else ``--until-done``'s exit code: 0 finished, 1 failed
        (crashed, ranks down, lost), 3 stopped, 4 ended without saying how (its targets are
        gone, its ranks did not say they finished, and no record of it here)."""
        if self.status == "finished":
            return OUTCOME_CODES["finished"]
        if self.recorded_end is not None:  # the launcher saw how it ended
            return OUTCOME_CODES.get(self.recorded_end, OUTCOME_CODES["failed"])
        if self.prometheus_error is not None:
            return None
        if self.status == "ended":
            return OUTCOME_CODES["ended"]
        if self.ranks_down_firing and all(r.status in ("finished", "down") for r in self.ranks):
            return OUTCOME_CODES["failed"]
        return None


# -- deciding statuses --------------------------------------------------------------------------


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def rank_status(rank: RankState) -> str:
    """The rank's status, as described in the module docstring."""
    if rank.steps is not None and rank.target_steps and rank.steps >= rank.target_steps:
        return "finished"
    if rank.ended:  # said so before it went: a loop without total_steps finishes too
        return "finished"
    if rank.up is False:
        return "down" if rank.answered else "starting"
    if rank.up is None:
        return "gone"
    if rank.stalled:
        return "stalled"
    if (rank.loss_last is not None and not math.isfinite(rank.loss_last)) or (
        rank.recent_nonfinite or 0
    ) > 0:
        return "non-finite"
    if rank.straggling:
        return "straggler"
    if not rank.steps:
        return "starting"
    return "ok"


def job_status(ranks: list[RankState]) -> str:
    """The job's status from its ranks' (already decided) statuses."""
    if not ranks:
        return "waiting"
    statuses = {r.status for r in ranks}
    if statuses == {"finished"}:
        return "finished"
    if statuses <= {"finished", "gone"}:
        return "ended"
    if not any(r.answered for r in ranks):
        return "starting"
    if "down" in statuses:
        return "down"
    if "stalled" in statuses:
        return "stalled"
    return "running"


# -- gathering --------------------------------------------------------------------------------


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
    rates = [r.steps_per_second for r in ranks if _finite(r.steps_per_second)]
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
        alerts=alerts,
        ranks_down_firing=bool(results["ranks_down_firing"]),
        alertmanager_error=alertmanager_error,
    )


def job_rates(
    *,
    windowed: tuple[float | None, float | None],
    totals: tuple[float | None, float],
    started_at: float | None,
    taken_at: float,
) -> tuple[float | None, float | None]:
    """Steps/s and tokens/s of a job: the recorded 1-minute rates, except while the job is
    younger than their window, whose rates would count time before it existed; then what the
    data supports, its totals since its start."""
    steps, tokens = totals
    if started_at is None or not steps:
        return windowed
    age = taken_at - started_at
    if not 0 < age < RATE_WINDOW_SECONDS:
        return windowed
    return steps / age, (tokens / age if tokens else windowed[1])


# -- drawing ----------------------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """``1:02:03``, ``2d 03:04:05``; the missing mark when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return MISSING
    whole = round(max(0.0, seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {hours:02d}:{minutes:02d}:{secs:02d}" if days else clock


def format_step_time(seconds: float | None) -> str:
    if not _finite(seconds):
        return MISSING
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_loss(value: float | None) -> Text:
    if value is None:
        return Text(MISSING)
    if math.isnan(value):
        return Text("NaN", style="bold red")
    if math.isinf(value):
        return Text("+Inf" if value > 0 else "-Inf", style="bold red")
    return Text(f"{value:.3f}")


def format_count(value: float | None) -> str:
    return f"{value:,.0f}" if _finite(value) else MISSING


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _header(snapshot: JobSnapshot) -> Text:
    status = snapshot.status
    line = Text()
    line.append(f" {status.upper()} ", style=f"reverse {STATUS_STYLES.get(status, '')}")
    line.append("   elapsed ")
    line.append(format_duration(snapshot.elapsed_seconds), style="bold")
    if snapshot.steps is not None:
        line.append("   step ")
        step = format_count(snapshot.steps)
        if snapshot.target_steps:
            step += f" / {format_count(snapshot.target_steps)}"
        line.append(step, style="bold")
    if snapshot.progress is not None and math.isfinite(snapshot.progress):
        line.append(f" ({100 * snapshot.progress:.1f} %)")
    if snapshot.target_steps and snapshot.status == "running":
        line.append("   ETA ")
        line.append(format_duration(snapshot.eta_seconds), style="bold")
    line.append("   world size ")
    line.append(str(snapshot.world_size) if snapshot.world_size else MISSING, style="bold")
    second = Text("job ")
    second.append(format_count(snapshot.tokens_per_second), style="bold")
    second.append(" tokens/s   mean loss (5 m) ")
    second.append(format_loss(snapshot.loss_mean))
    return Text("\n").join([line, second])


def _rank_table(snapshot: JobSnapshot) -> Table:
    table = Table(header_style="bold", box=None, pad_edge=False)
    for name in ("Rank", "Node", "Step", "GPU", "Loss", "Loss 1m", "LR", "Tok/s", "Step time"):
        table.add_column(name, justify="left" if name == "Node" else "right", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    for rank in snapshot.ranks:
        gpu = rank.gpu_utilization
        table.add_row(
            str(rank.rank),
            rank.node or MISSING,
            format_count(rank.steps),
            f"{100 * gpu:.0f} %" if _finite(gpu) else MISSING,
            format_loss(rank.loss_last),
            format_loss(rank.loss_mean),
            f"{rank.learning_rate:.1e}" if _finite(rank.learning_rate) else MISSING,
            format_count(rank.tokens_per_second),
            format_step_time(rank.step_seconds),
            Text(rank.status, style=STATUS_STYLES.get(rank.status, "")),
        )
    return table


def _alerts_panel(snapshot: JobSnapshot, retry: str) -> Panel:
    if snapshot.alertmanager_error:
        body = Text(snapshot.alertmanager_error + retry, style="bold red")
    elif not snapshot.alerts:
        body = Text("none firing", style="dim")
    else:
        body = Table.grid(padding=(0, 2))
        for alert in snapshot.alerts:
            since = _ago(snapshot.taken_at - alert.since) if alert.since is not None else ""
            body.add_row(
                Text(alert.severity or "?", style=SEVERITY_STYLES.get(alert.severity, "")),
                Text(alert.name, style="bold"),
                alert.where,
                alert.summary,
                Text(since, style="dim"),
            )
    title = f"Alerts ({len(snapshot.alerts)} firing)" if snapshot.alerts else "Alerts"
    return Panel(body, title=title, title_align="left", border_style="dim")


def render(snapshot: JobSnapshot, interval: float | None = None) -> RenderableType:
    """The frame for ``snapshot``; ``interval`` (live mode) adds the retry period to errors."""
    retry = f" (retrying every {interval:g} s)" if interval else ""
    ended = None
    if snapshot.recorded_end is not None:
        ended = Text.assemble(
            (
                f" {snapshot.recorded_end.upper()} ",
                f"reverse {STATUS_STYLES.get(snapshot.status, '')}",
            ),
            "  as ugro-launch's record of the job on this machine says",
        )
    if snapshot.prometheus_error:
        body: RenderableType = Text(snapshot.prometheus_error + retry, style="bold red")
        if ended is not None:
            body = Group(ended, body)
    elif not snapshot.ranks and ended is not None:
        body = ended
    elif not snapshot.ranks:
        body = Text(
            f"Prometheus at {snapshot.prometheus_url} has no series for job "
            f"{snapshot.job_id} (in the last {LOOKBACK}): not started yet, or not registered "
            "as a Prometheus target?",
            style="yellow",
        )
    else:
        body = Group(_header(snapshot), Text(), _rank_table(snapshot))
    clock = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    footer = f"as of {clock}"
    if interval:
        footer += f" · refreshed every {interval:g} s · Ctrl-C to quit"
    return Group(
        Panel(
            body,
            title=f"[bold]ugro watch[/] · job [bold]{snapshot.job_id}[/]",
            title_align="left",
        ),
        _alerts_panel(snapshot, retry),
        Text(footer, style="dim"),
    )


# -- the command ------------------------------------------------------------------------------


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "watch",
        help="a live view of a training job: its ranks and its firing alerts",
        description="A live view of one training job, from Prometheus and Alertmanager. "
        "Ctrl-C quits.",
    )
    parser.add_argument("job", metavar="JOB", help="the job id (the job_id label)")
    parser.add_argument(
        "--interval",
        type=_interval,
        default=2.0,
        metavar="SECONDS",
        help="seconds between refreshes (default %(default)g)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--once",
        action="store_true",
        help="print one frame and exit: 0 when both servers answered and the job has series, "
        "else 1",
    )
    mode.add_argument(
        "--until-done",
        action="store_true",
        help="exit when the job is over: 0 when it finished (every rank reached its target "
        "steps or closed its telemetry normally), 1 when it failed (ranks down, a failed or "
        "lost job), 3 when it was stopped (ugro-launch stop), 4 when its targets are gone "
        "without saying how it ended. Where ugro-launch's record of the job is on this machine "
        "($UGRO_STATE_DIR), it says how the job ended, however long ago",
    )
    parser.set_defaults(run=run)


def recorded_end(job_id: str) -> str | None:
    """How ugro-launch's record of the job on this machine says it ended, if it has ended."""
    try:
        state = records.load_record(job_id).state
    except (records.RecordError, TypeError):
        return None
    ended = (records.FINISHED, records.FAILED, records.STOPPED, records.LOST)
    return state if state in ended else None


def with_record(frame: JobSnapshot, end: str | None) -> JobSnapshot:
    """The frame, told how the job ended where Prometheus no longer shows it running."""
    if end is None or frame.status not in ("waiting", "ended", "down", "starting"):
        return frame
    return replace(frame, recorded_end=end, status=end)


def run(args: argparse.Namespace) -> int:
    if not JOB_ID.fullmatch(args.job):
        print(f"ugro watch: job id {args.job!r}: expected {JOB_ID_EXPECTED}", file=sys.stderr)
        return 2
    prometheus = Prometheus(args.prometheus, timeout=QUERY_TIMEOUT_SECONDS)
    alertmanager = Alertmanager(args.alertmanager, timeout=QUERY_TIMEOUT_SECONDS)

    def snapshot() -> JobSnapshot:
        return with_record(gather(args.job, prometheus, alertmanager), recorded_end(args.job))

    console = Console()
    try:
        if args.once:
            frame = snapshot()
            console.print(render(frame))
            return 0 if frame.complete else 1
        return watch(snapshot, console, args.interval, args.until_done)
    except KeyboardInterrupt:
        return 0


def watch(
    snapshot: Callable[[], JobSnapshot],
    console: Console,
    interval: float,
    until_done: bool = False,
) -> int:
    """Redraw every ``interval`` seconds until Ctrl-C (exit 0) or, with ``until_done``, until
    the job is over (its ``outcome``). On a terminal the frame is redrawn in place; elsewhere
    (a pipe, a file) only the last frame is written, when the command ends."""
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            started = time.monotonic()
            frame = snapshot()
            live.update(render(frame, interval), refresh=True)
            if until_done and frame.outcome is not None:
                return frame.outcome
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
