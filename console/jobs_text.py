"""The text of ``ugro jobs``: a Rich renderable of a ``JobsOverview``, every value written by
``formatting`` where it has a writer (the same as ``ugro report`` writes it)."""

from __future__ import annotations

import datetime

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from . import formatting as fmt
from .formatting import MISSING
from .jobs_queries import JobRow, JobsOverview


def started(unix: float | None) -> str:
    """A start in UTC to the minute, ``01-15 08:00``: the table has no room for more (the
    year is in --json)."""
    if not fmt.finite(unix):
        return MISSING
    return datetime.datetime.fromtimestamp(unix, tz=datetime.UTC).strftime("%m-%d %H:%M")


def gpu_hours(row: JobRow) -> str:
    """GPU-hours; ``0 (CPU)`` for a job whose ranks name no GPU, so a 0 reads as measured."""
    if row.gpu_hours is None:
        return MISSING
    if row.gpu_ranks == 0:
        return "0 (CPU)"
    return f"{row.gpu_hours:,.2f}" if row.gpu_hours >= 1 else f"{row.gpu_hours:.3g}"


def _ranks(row: JobRow) -> str:
    return fmt.count(row.ranks) if row.ranks is not None else MISSING


def _alerts(row: JobRow) -> str:
    return str(len(row.alerts)) if row.in_prometheus else MISSING


def heading(overview: JobsOverview) -> Text:
    window = fmt.span(overview.lookback_seconds)
    if overview.local_only:
        return Text.assemble(
            (f"Jobs in the last {window}: ugro-launch's records on this machine only", "bold"),
            f"\n(Prometheus at {overview.prometheus} did not answer); times in UTC",
        )
    return Text.assemble(
        (f"Jobs in the last {window}, as of {fmt.timestamp(overview.as_of)}", "bold"),
        f"\nfrom Prometheus at {overview.prometheus} and ugro-launch's records on this "
        "machine; times in UTC",
    )


def _table(overview: JobsOverview) -> Table:
    # Two spaces between columns (a right pad and the box's blank separator): ten columns fit
    # the 100 characters of plain output.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    # A job id folds onto a second line rather than lose characters (it is what `ugro report`
    # takes); every other column keeps its width. The node names are in --json.
    table.add_column("job", overflow="fold", min_width=8)
    for name in ("status", "started", "duration", "ranks", "nodes", "GPU-h", "tokens/s",
                 "loss", "alerts"):  # fmt: skip
        right = name not in ("status", "started")
        table.add_column(name, justify="right" if right else "left", no_wrap=True)
    for row in overview.jobs:
        # Marked only beside rows that Prometheus had: without it, every row is a record.
        mark = "" if row.in_prometheus or overview.local_only else " *"
        table.add_row(
            row.job_id + mark,
            row.status,
            started(row.start_time),
            fmt.clock(row.duration_seconds),
            _ranks(row),
            str(len(row.nodes)) if row.nodes else MISSING,
            gpu_hours(row),
            fmt.rate(row.tokens_per_second_mean),
            fmt.loss(row.loss_final),
            _alerts(row),
        )
    return table


def _totals(overview: JobsOverview) -> Text:
    statuses = ", ".join(f"{count} {status}" for status, count in overview.by_status().items())
    jobs = len(overview.jobs)
    lines = [f"Totals: {jobs} job{'s' if jobs != 1 else ''}: {statuses}"]
    if overview.local_only:
        lines.append("GPU-hours: unknown without Prometheus")
    else:
        line = f"GPU-hours: {overview.gpu_hours:,.3g}"
        cpu = [row.job_id for row in overview.jobs if row.cpu_ranks]
        if cpu:
            line += f" (CPU ranks count 0: {', '.join(cpu)})"
        lines.append(line)
    return Text("\n".join(lines))


def _top(overview: JobsOverview, count: int) -> RenderableType:
    top = overview.top_by_throughput(count)
    title = Text(f"Top {count} by throughput (mean tokens/s while training)", style="bold")
    if not top:
        return Group(title, Text("  none: no job has a throughput"))
    width = max(len(row.job_id) for row in top)
    lines = [
        Text(f"  {i}. {row.job_id:<{width}}  {fmt.rate(row.tokens_per_second_mean)}")
        for i, row in enumerate(top, 1)
    ]
    return Group(title, *lines)


def _alerts_fired(overview: JobsOverview) -> RenderableType:
    title = Text("Alerts fired", style="bold")
    lines = []
    for row in overview.jobs:
        if row.alerts:
            fired = ", ".join(
                f"{a.alertname} ({a.severity or MISSING}, {a.series} series)" for a in row.alerts
            )
            lines.append(Text(f"  {row.job_id}: {fired}"))
    return Group(title, *(lines or [Text("  none")]))


LEGEND = (
    "GPU-h: ranks naming a GPU × duration; tokens/s: mean while training; loss: final, mean "
    "of the ranks"
)
LOCAL_ONLY_MARK = "* known only from ugro-launch's record: Prometheus has no series of it"


def render_jobs(overview: JobsOverview, top: int) -> RenderableType:
    notes: list[RenderableType] = []
    if not overview.local_only:
        notes.append(Text(LEGEND))
        if any(not row.in_prometheus for row in overview.jobs):
            notes.append(Text(LOCAL_ONLY_MARK))
    parts = [heading(overview), Text(), _table(overview), Text(), *notes]
    parts += [Text(), _totals(overview)] if notes else [_totals(overview)]
    if not overview.local_only:
        parts += [Text(), _top(overview, top), Text(), _alerts_fired(overview)]
    return Group(*parts)
