"""The text of ``ugro report`` and ``ugro compare``: Rich renderables of ``JobReport``s, every
value written by ``formatting`` (the same as ``ugro watch`` writes it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ugro.catalogue import goodput

from . import formatting as fmt
from .formatting import MISSING
from .job_report import JobReport

GOODPUT = goodput.PRODUCTIVE  # the category whose share is the goodput
# What the report says of a category (ugro.catalogue.goodput.CATEGORIES), where it says more.
_CATEGORY_NOTES = {GOODPUT: "completing steps (goodput)"}

# -- the report ------------------------------------------------------------------------------


def _section(title: str, rows: list[tuple[str, str]]) -> Group:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(min_width=13)
    grid.add_column()
    for name, value in rows:
        grid.add_row(Text("  " + name), Text(value))
    return Group(Text(title, style="bold"), grid)


def efficiency_line(report: JobReport) -> str:
    e = report.efficiency
    return (
        f"{e.score:.1f} / 100 = 100 × progress {fmt.factor(e.progress)} × input "
        f"{fmt.factor(e.input)} × gpu {fmt.factor(e.gpu)}"
    )


def render_report(report: JobReport) -> RenderableType:
    r = report
    steps = fmt.count(r.steps)
    if r.target_steps is not None:
        steps += f" of {fmt.count(r.target_steps)}"
    heading = Text(f"Job {r.job_id}: {r.status}, {steps} steps", style="bold")
    where = Text(
        f"{fmt.timestamp(r.start_time)} to {fmt.timestamp(r.end_time)}, "
        f"from Prometheus at {r.prometheus}\n"
        f"(curves at {r.resolution_seconds:g} s resolution, rates over "
        f"{r.rate_window_seconds:g} s windows)"
    )
    nodes = ", ".join(r.nodes) or MISSING
    run = _section(
        "Run",
        [
            (
                "duration",
                f"{fmt.duration(r.duration_seconds)} (training {fmt.duration(r.training_seconds)}"
                f", start-up and the rest {fmt.duration(r.overhead_seconds)})",
            ),
            ("ranks", f"{fmt.count(r.world_size)} on {len(r.nodes)} node(s): {nodes}"),
            ("steps", steps),
            ("samples", fmt.count(r.samples)),
            ("tokens", fmt.count(r.tokens)),
        ],
    )
    throughput = _section(
        "Throughput",
        [
            (
                "tokens/s",
                f"mean {fmt.rate(r.tokens_per_second_mean)} while training, "
                f"peak {fmt.rate(r.tokens_per_second_peak)}",
            ),
            ("samples/s", f"mean {fmt.rate(r.samples_per_second_mean)} while training"),
            ("step time", f"mean {fmt.step_time(r.step_seconds_mean)}"),
        ],
    )
    firsts = ", ".join(
        f"rank {rank.rank} at step {fmt.count(rank.loss_initial_step)}"
        for rank in r.ranks
        if rank.loss_initial is not None
    )
    initial = fmt.loss(r.loss_initial) + (f" (first samples: {firsts})" if firsts else "")
    loss = _section(
        "Loss (mean of the ranks)",
        [
            ("initial", initial),
            ("final", fmt.loss(r.loss_final)),
            ("best", f"{fmt.loss(r.loss_best)} (lowest point of the loss curve)"),
            ("mean", f"{fmt.loss(r.loss_mean)} (every finite step)"),
            ("reduction", fmt.percent(r.loss_reduction_percent)),
        ],
    )  # fmt: skip
    if r.gpu_count == 0 and r.gpu_utilization_mean is None:
        gpus: RenderableType = Group(
            Text("GPUs", style="bold"), Text("  none reported (the ranks name no GPU)")
        )
    else:
        gpus = _section(
            "GPUs",
            [
                ("count", str(r.gpu_count)),
                ("utilisation", f"mean {fmt.share(r.gpu_utilization_mean)}"),
                ("SM active", f"mean {fmt.share(r.gpu_sm_active_mean)} (GPM)"),
                ("MFU", f"mean {fmt.share(r.mfu_mean)}"),
                ("memory used", f"peak {fmt.gibibytes(r.gpu_memory_used_peak_bytes)}"),
                (
                    "temperature",
                    f"mean {fmt.celsius(r.gpu_temperature_mean_celsius)}, "
                    f"peak {fmt.celsius(r.gpu_temperature_peak_celsius)}",
                ),
            ],
        )
    efficiency = Group(
        Text("Efficiency", style="bold"),
        Text("  " + efficiency_line(r)),
        Text("  (see `ugro report --help` for the factors)", style="dim"),
    )
    return Group(
        heading,
        where,
        Text(),
        run,
        Text(),
        throughput,
        Text(),
        loss,
        Text(),
        gpus,
        Text(),
        efficiency,
        Text(),
        _where_the_time_went(r),
        Text(),
        _checkpoints(r),
        Text(),
        Text("Ranks", style="bold"),
        _ranks_work(r),
        Text(),
        _ranks_loss_gpu(r),
        Text(),
        Text("Alerts fired", style="bold"),
        _alerts_table(r),
    )


def _where_the_time_went(r: JobReport) -> RenderableType:
    title = Text("Where the time went", style="bold")
    t = r.time_accounting
    if t is None:
        return Group(title, Text("  no phase series recorded (the ranks' telemetry reports none)"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(min_width=13)
    grid.add_column(justify="right")
    grid.add_column(justify="right")
    grid.add_column()
    seconds, shares = t.seconds, t.shares()
    for category in t.categories:
        grid.add_row(
            Text("  " + category),
            Text(fmt.share(shares[category])),
            Text(fmt.duration(seconds[category])),
            Text(_CATEGORY_NOTES.get(category, ""), style="dim"),
        )
    ranks = len(t.ranks)
    lead = Text(
        f"  wall time {fmt.duration(t.wall_seconds)} per rank (mean of {fmt.count(ranks)}), "
        "from the first process start to the last scrape"
    )
    table = _table("rank", "wall", *t.categories)
    for rank in t.ranks:
        rank_shares = rank.shares()
        table.add_row(
            str(rank.rank),
            fmt.duration(rank.wall_seconds),
            *(fmt.share(rank_shares[c]) for c in t.categories),
        )
    return Group(title, lead, grid, Text(), table)


def _checkpoints(r: JobReport) -> RenderableType:
    title = Text("Checkpoints", style="bold")
    c = r.checkpoints
    if c is None or c.count == 0:
        return Group(title, Text("  no checkpoints recorded"))
    every = (
        f", every {c.steps_between_mean:.1f} steps on average"
        if c.steps_between_mean is not None
        else ""
    )
    when = (
        "at the end of the run"
        if c.last_age_seconds == 0
        else f"{fmt.duration(c.last_age_seconds)} before the end of the run"
    )
    last = f"{fmt.timestamp(c.last_time)}, {when}, took {fmt.duration(c.last_duration_seconds)}"
    rows = [
        ("count", f"{fmt.count(c.count)}{every}"),
        ("last", last),
        ("time spent", f"{fmt.duration(c.seconds)} ({fmt.share(c.share)} of the wall time)"),
    ]
    if c.bytes is not None:
        rows.append(("written", _bytes(c.bytes)))
    return _section("Checkpoints", rows)


def _bytes(value: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _table(*columns: str, right_from: int = 1) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1))
    for i, column in enumerate(columns):
        table.add_column(column, justify="right" if i >= right_from else "left", no_wrap=True)
    return table


def _ranks_work(r: JobReport) -> Table:
    table = _table(
        "rank", "node", "steps", "tokens", "tokens/s", "step time", "data wait", "straggler",
        "restarts", right_from=2,
    )  # fmt: skip
    for rank in r.ranks:
        table.add_row(
            str(rank.rank),
            rank.node or MISSING,
            fmt.count(rank.steps),
            fmt.count(rank.tokens),
            fmt.rate(rank.tokens_per_second_mean),
            fmt.step_time(rank.step_seconds_mean),
            fmt.share(rank.data_wait_share),
            fmt.ratio(rank.straggler_score_mean),
            fmt.count(rank.restarts),
        )
    return table


def _ranks_loss_gpu(r: JobReport) -> Table:
    table = _table(
        "rank", "loss initial", "at step", "final", "mean", "GPU util", "GPU memory peak",
        "temp mean", "temp peak",
    )  # fmt: skip
    for rank in r.ranks:
        table.add_row(
            str(rank.rank),
            fmt.loss(rank.loss_initial),
            fmt.count(rank.loss_initial_step),
            fmt.loss(rank.loss_final),
            fmt.loss(rank.loss_mean),
            fmt.share(rank.gpu_utilization_mean),
            fmt.gibibytes(rank.gpu_memory_used_peak_bytes),
            fmt.celsius(rank.gpu_temperature_mean_celsius),
            fmt.celsius(rank.gpu_temperature_peak_celsius),
        )
    return table


def _since_start(r: JobReport, unix: float | None) -> str:
    """A moment as the time since the job started: ``+12.0 s``, ``-3.0 s`` (before it)."""
    if unix is None:
        return MISSING
    offset = unix - r.start_time
    return ("-" if offset < 0 else "+") + fmt.duration(abs(offset))


def _alerts_table(r: JobReport) -> RenderableType:
    if not r.alerts:
        return Text("  none")
    # Times since the job's start, at the curves' resolution; --json has them as Unix times.
    table = _table("alert", "severity", "where", "first seen", "last seen", right_from=3)
    for alert in r.alerts:
        where = []
        if alert.rank is not None:
            where.append(f"rank {alert.rank}")
        if alert.gpu_uuid:
            where.append(alert.gpu_uuid)
        if alert.node:
            where.append(f"on {alert.node}")
        table.add_row(
            alert.alertname,
            alert.severity or MISSING,
            " ".join(where) or f"job {r.job_id}",
            _since_start(r, alert.first_seen),
            _since_start(r, alert.last_seen),
        )
    return table


# -- the comparison --------------------------------------------------------------------------

_COMPARE_ROWS: list[tuple[str, Callable[[JobReport], str]]] = [
    ("status", lambda r: r.status),
    ("started", lambda r: fmt.timestamp(r.start_time)),
    ("duration", lambda r: fmt.duration(r.duration_seconds)),
    ("training time", lambda r: fmt.duration(r.training_seconds)),
    ("ranks", lambda r: fmt.count(r.world_size)),
    ("steps", lambda r: fmt.count(r.steps)),
    ("tokens", lambda r: fmt.count(r.tokens)),
    ("tokens/s mean", lambda r: fmt.rate(r.tokens_per_second_mean)),
    ("tokens/s peak", lambda r: fmt.rate(r.tokens_per_second_peak)),
    ("step time", lambda r: fmt.step_time(r.step_seconds_mean)),
    ("loss initial", lambda r: fmt.loss(r.loss_initial)),
    ("loss final", lambda r: fmt.loss(r.loss_final)),
    ("loss best", lambda r: fmt.loss(r.loss_best)),
    ("loss reduction", lambda r: fmt.percent(r.loss_reduction_percent)),
    ("GPU util mean", lambda r: fmt.share(r.gpu_utilization_mean)),
    ("GPU memory peak", lambda r: fmt.gibibytes(r.gpu_memory_used_peak_bytes)),
    ("GPU temp peak", lambda r: fmt.celsius(r.gpu_temperature_peak_celsius)),
    ("efficiency", lambda r: f"{r.efficiency.score:.1f}"),
    ("goodput", lambda r: _goodput(r)),
    ("alerts fired", lambda r: str(len(r.alerts))),
]


def _goodput(r: JobReport) -> str:
    """The productive share of the job's wall time (``Where the time went``)."""
    if r.time_accounting is None:
        return MISSING
    return fmt.share(r.time_accounting.shares()[GOODPUT])


def render_compare(reports: Sequence[JobReport], best: dict[str, str | None]) -> RenderableType:
    table = _table("", *(r.job_id for r in reports))
    for name, figure in _COMPARE_ROWS:
        table.add_row(name, *(figure(r) for r in reports))
    by_id = {r.job_id: r for r in reports}

    def named(criterion: str, title: str, figure: Callable[[JobReport], str]) -> Text:
        job = best.get(criterion)
        line = Text(f"{title:<16}")
        if job is None:
            return line.append(MISSING)
        return line.append(job, style="bold").append(f" ({figure(by_id[job])})")

    return Group(
        table,
        Text(),
        named("throughput", "best throughput", lambda r: f"{fmt.rate(r.tokens_per_second_mean)}"
              " tokens/s while training"),
        named("loss", "best loss", lambda r: f"final {fmt.loss(r.loss_final)}"),
        named("fastest", "fastest", lambda r: f"{fmt.step_time(r.step_seconds_mean)} per step"),
        named("efficiency", "most efficient", lambda r: f"{r.efficiency.score:.1f} / 100"),
    )  # fmt: skip
