"""``ugro report JOB`` and ``ugro compare JOB JOB...``: a job's figures over its lifetime.

Text by default (plain and stable when the output is not a terminal), ``--json`` for one JSON
object, ``--plots DIR`` for PNG plots of loss and throughput per rank (needs matplotlib).
How each figure is computed is documented in ``lifetime.py``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from ugro.launcher.records import JOB_ID, JOB_ID_EXPECTED

from .lifetime import (
    DEFAULT_LOOKBACK,
    EFFICIENCY_HELP,
    JobNotFound,
    JobReport,
    collect,
    parse_duration,
)
from .servers import Prometheus, QueryError, Unreachable

EXIT_NO_JOB = 1  # no such job in Prometheus (or the plots could not be written)
EXIT_USAGE = 2  # a bad job id or option
EXIT_UNAVAILABLE = 3  # Prometheus did not answer, or answered with an error

QUERY_TIMEOUT_SECONDS = 30.0
MISSING = "-"
PLAIN_WIDTH = 100  # the width of text written to a file or a pipe, for stable output

_EXIT_CODES = f"""\
exit codes: 0 done; {EXIT_NO_JOB} no such job in Prometheus (or the plots could not be
written); {EXIT_USAGE} a bad job id or option; {EXIT_UNAVAILABLE} Prometheus did not answer or
refused a query."""


# -- command line ---------------------------------------------------------------------------


def _lookback(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_parsers(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report",
        help="a job's figures over its lifetime: time, work, throughput, loss, GPUs, alerts",
        description="Sum a training job up over its lifetime, from Prometheus: duration, steps,\n"
        "samples and tokens, mean and peak throughput, initial/final/best loss, per-rank\n"
        "figures, GPU utilisation, memory and temperature, an efficiency score and the\n"
        "alerts that fired. How each figure is computed: console/lifetime.py.",
        epilog=f"{EFFICIENCY_HELP}\n\n{_EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("job", metavar="JOB", help="the job id (the job_id label)")
    _common_options(report)
    report.add_argument(
        "--plots",
        type=pathlib.Path,
        metavar="DIR",
        help="also write JOB-loss.png and JOB-throughput.png (per rank) into DIR; "
        "needs matplotlib (pip install 'ugro[plots]')",
    )
    report.set_defaults(run=run_report)

    compare = commands.add_parser(
        "compare",
        help="jobs side by side, naming the best throughput, the best loss and the fastest",
        description="Put jobs side by side (the figures of `ugro report`) and name the one\n"
        "with the best mean throughput (tokens/s while training), the best loss (lowest\n"
        "final loss), the fastest (shortest mean step time: like with like, whatever each\n"
        "run's length or whether it finished) and the most efficient. On a tie the job\n"
        "named first wins.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("jobs", nargs="+", metavar="JOB", help="two or more job ids")
    _common_options(compare)
    compare.set_defaults(run=run_compare)


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--lookback",
        type=_lookback,
        default=DEFAULT_LOOKBACK,
        metavar="DURATION",
        help="how far back to look for the job, e.g. 36h, 30d (default %(default)s)",
    )


def _fail(command: str, message: str, code: int) -> int:
    print(f"ugro {command}: {message}", file=sys.stderr)
    return code


def _gather(
    command: str, args: argparse.Namespace, job_ids: Sequence[str]
) -> list[JobReport] | int:
    """The reports of ``job_ids``, or the exit code after printing why not."""
    bad = [job for job in job_ids if not JOB_ID.fullmatch(job)]
    if bad:
        return _fail(command, f"job id {bad[0]!r}: expected {JOB_ID_EXPECTED}", EXIT_USAGE)
    prometheus = Prometheus(args.prometheus, timeout=QUERY_TIMEOUT_SECONDS)
    reports, missing = [], []
    try:
        for job in job_ids:
            try:
                reports.append(collect(prometheus, job, args.lookback))
            except JobNotFound as error:
                missing.append(str(error))
    except Unreachable as error:
        hint = "(--prometheus or $UGRO_PROMETHEUS_URL names another)"
        return _fail(command, f"{error} {hint}", EXIT_UNAVAILABLE)
    except QueryError as error:
        return _fail(command, str(error), EXIT_UNAVAILABLE)
    if missing:
        for message in missing:
            print(f"ugro {command}: {message}", file=sys.stderr)
        return EXIT_NO_JOB
    return reports


def run_report(args: argparse.Namespace) -> int:
    if args.plots is not None:
        from . import plots  # matplotlib only when asked for

        problem = plots.unavailable()
        if problem:
            return _fail("report", f"--plots: {problem}", EXIT_USAGE)
    reports = _gather("report", args, [args.job])
    if isinstance(reports, int):
        return reports
    report = reports[0]
    if args.json:
        _print_json(report.to_json())
    else:
        print_renderable(render_report(report))
    if args.plots is not None:
        try:
            written = plots.write_plots(report, args.plots)
        except OSError as error:
            return _fail("report", f"--plots {args.plots}: {error}", EXIT_NO_JOB)
        out = sys.stderr if args.json else sys.stdout
        print("plots: " + ", ".join(str(path) for path in written), file=out)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    if len(args.jobs) < 2:
        return _fail("compare", "expected two or more job ids", EXIT_USAGE)
    reports = _gather("compare", args, args.jobs)
    if isinstance(reports, int):
        return reports
    best = winners(reports)
    if args.json:
        _print_json({"jobs": [r.to_json() for r in reports], "best": best})
    else:
        print_renderable(render_compare(reports, best))
    return 0


def print_report(
    job_id: str, prometheus: Prometheus, console: Console, lookback: float | None = None
) -> bool:
    """The text report of ``job_id`` on ``console`` (for ``ugro demo``); when there is none,
    one line saying why. Returns whether the report was printed."""
    try:
        console.print(render_report(collect(prometheus, job_id, lookback)))
    except (JobNotFound, Unreachable, QueryError) as error:
        console.print(Text(f"ugro report: {error}"))
        return False
    return True


def _print_json(document: dict[str, Any]) -> None:
    print(json.dumps(_json_safe(document), indent=2, allow_nan=False))


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def print_renderable(renderable: RenderableType, file: IO[str] | None = None) -> None:
    """Colour on a terminal; elsewhere plain text of a fixed width without trailing blanks,
    so that the output of a pipe or a file is stable."""
    file = file or sys.stdout
    options: dict[str, Any] = {"highlight": False, "markup": False, "emoji": False}
    if file.isatty():
        Console(file=file, **options).print(renderable)
        return
    buffer = io.StringIO()
    Console(file=buffer, width=PLAIN_WIDTH, color_system=None, **options).print(renderable)
    file.write("".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines()))


# -- choosing winners ------------------------------------------------------------------------

# figure → (how to read it off a report, whether higher is better)
_CRITERIA: dict[str, tuple[Callable[[JobReport], float | None], bool]] = {
    "throughput": (lambda r: r.tokens_per_second_mean, True),
    "loss": (lambda r: r.loss_final, False),
    # Time per step, not duration: a finished 300-step run and a stopped 3,000-step one
    # compare fairly.
    "fastest": (lambda r: r.step_seconds_mean, False),
    "efficiency": (lambda r: r.efficiency.score, True),
}


def winners(reports: Sequence[JobReport]) -> dict[str, str | None]:
    """The job id that wins each criterion (the first given on a tie; None if none is known)."""
    out: dict[str, str | None] = {}
    for name, (figure, higher) in _CRITERIA.items():
        known = [(figure(r), i, r.job_id) for i, r in enumerate(reports)]
        known = [(v, i, job) for v, i, job in known if v is not None and math.isfinite(v)]
        if not known:
            out[name] = None
            continue
        pick = max if higher else min
        best = pick(v for v, _, _ in known)
        out[name] = next(job for v, _, job in known if v == best)
    return out


# -- formatting ------------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600:02d} h"


def fmt_time(unix: float | None) -> str:
    if unix is None:
        return MISSING
    moment = datetime.datetime.fromtimestamp(unix, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_count(value: float | None) -> str:
    return MISSING if value is None else f"{value:,.0f}"


def fmt_rate(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def fmt_loss(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def fmt_share(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f} %"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def fmt_step_time(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_bytes(value: float | None) -> str:
    return MISSING if value is None else f"{value / 1024**3:.1f} GiB"


def fmt_celsius(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f} °C"


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
        f"{e.score:.1f} / 100 = 100 × progress {fmt_ratio(e.progress)} × input "
        f"{fmt_ratio(e.input)} × gpu {fmt_ratio(e.gpu)}"
    )


def render_report(report: JobReport) -> RenderableType:
    r = report
    steps = fmt_count(r.steps)
    if r.target_steps is not None:
        steps += f" of {fmt_count(r.target_steps)}"
    heading = Text(f"Job {r.job_id}: {r.status}, {steps} steps", style="bold")
    where = Text(
        f"{fmt_time(r.start_time)} to {fmt_time(r.end_time)}, from Prometheus at {r.prometheus}\n"
        f"(curves at {r.resolution_seconds:g} s resolution, rates over "
        f"{r.rate_window_seconds:g} s windows)"
    )
    nodes = ", ".join(r.nodes) or MISSING
    run = _section(
        "Run",
        [
            (
                "duration",
                f"{fmt_duration(r.duration_seconds)} (training {fmt_duration(r.training_seconds)}"
                f", start-up and the rest {fmt_duration(r.overhead_seconds)})",
            ),
            ("ranks", f"{fmt_count(r.world_size)} on {len(r.nodes)} node(s): {nodes}"),
            ("steps", steps),
            ("samples", fmt_count(r.samples)),
            ("tokens", fmt_count(r.tokens)),
        ],
    )
    throughput = _section(
        "Throughput",
        [
            (
                "tokens/s",
                f"mean {fmt_rate(r.tokens_per_second_mean)} while training, "
                f"peak {fmt_rate(r.tokens_per_second_peak)}",
            ),
            ("samples/s", f"mean {fmt_rate(r.samples_per_second_mean)} while training"),
            ("step time", f"mean {fmt_step_time(r.step_seconds_mean)}"),
        ],
    )
    firsts = ", ".join(
        f"rank {rank.rank} at step {fmt_count(rank.loss_initial_step)}"
        for rank in r.ranks
        if rank.loss_initial is not None
    )
    reduction = r.loss_reduction_percent
    initial = fmt_loss(r.loss_initial) + (f" (first samples: {firsts})" if firsts else "")
    loss = _section(
        "Loss (mean of the ranks)",
        [
            ("initial", initial),
            ("final", fmt_loss(r.loss_final)),
            ("best", f"{fmt_loss(r.loss_best)} (lowest point of the loss curve)"),
            ("mean", f"{fmt_loss(r.loss_mean)} (every finite step)"),
            ("reduction", MISSING if reduction is None else f"{reduction:.1f} %"),
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
                ("utilisation", f"mean {fmt_share(r.gpu_utilization_mean)}"),
                ("memory used", f"peak {fmt_bytes(r.gpu_memory_used_peak_bytes)}"),
                (
                    "temperature",
                    f"mean {fmt_celsius(r.gpu_temperature_mean_celsius)}, "
                    f"peak {fmt_celsius(r.gpu_temperature_peak_celsius)}",
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
        Text("Ranks", style="bold"),
        _ranks_work(r),
        Text(),
        _ranks_loss_gpu(r),
        Text(),
        Text("Alerts fired", style="bold"),
        _alerts_table(r),
    )


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
            fmt_count(rank.steps),
            fmt_count(rank.tokens),
            fmt_rate(rank.tokens_per_second_mean),
            fmt_step_time(rank.step_seconds_mean),
            fmt_share(rank.data_wait_share),
            MISSING if rank.straggler_score_mean is None else f"{rank.straggler_score_mean:.2f}",
            fmt_count(rank.restarts),
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
            fmt_loss(rank.loss_initial),
            fmt_count(rank.loss_initial_step),
            fmt_loss(rank.loss_final),
            fmt_loss(rank.loss_mean),
            fmt_share(rank.gpu_utilization_mean),
            fmt_bytes(rank.gpu_memory_used_peak_bytes),
            fmt_celsius(rank.gpu_temperature_mean_celsius),
            fmt_celsius(rank.gpu_temperature_peak_celsius),
        )
    return table


def _since_start(r: JobReport, unix: float | None) -> str:
    """A moment as the time since the job started: ``+12.0 s``, ``-3.0 s`` (before it)."""
    if unix is None:
        return MISSING
    offset = unix - r.start_time
    return ("-" if offset < 0 else "+") + fmt_duration(abs(offset))


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
    ("started", lambda r: fmt_time(r.start_time)),
    ("duration", lambda r: fmt_duration(r.duration_seconds)),
    ("training time", lambda r: fmt_duration(r.training_seconds)),
    ("ranks", lambda r: fmt_count(r.world_size)),
    ("steps", lambda r: fmt_count(r.steps)),
    ("tokens", lambda r: fmt_count(r.tokens)),
    ("tokens/s mean", lambda r: fmt_rate(r.tokens_per_second_mean)),
    ("tokens/s peak", lambda r: fmt_rate(r.tokens_per_second_peak)),
    ("step time", lambda r: fmt_step_time(r.step_seconds_mean)),
    ("loss initial", lambda r: fmt_loss(r.loss_initial)),
    ("loss final", lambda r: fmt_loss(r.loss_final)),
    ("loss best", lambda r: fmt_loss(r.loss_best)),
    ("loss reduction", lambda r: _percent(r.loss_reduction_percent)),
    ("GPU util mean", lambda r: fmt_share(r.gpu_utilization_mean)),
    ("GPU memory peak", lambda r: fmt_bytes(r.gpu_memory_used_peak_bytes)),
    ("GPU temp peak", lambda r: fmt_celsius(r.gpu_temperature_peak_celsius)),
    ("efficiency", lambda r: f"{r.efficiency.score:.1f}"),
    ("alerts fired", lambda r: str(len(r.alerts))),
]


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f} %"


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
        named("throughput", "best throughput", lambda r: f"{fmt_rate(r.tokens_per_second_mean)}"
              " tokens/s while training"),
        named("loss", "best loss", lambda r: f"final {fmt_loss(r.loss_final)}"),
        named("fastest", "fastest", lambda r: f"{fmt_step_time(r.step_seconds_mean)} per step"),
        named("efficiency", "most efficient", lambda r: f"{r.efficiency.score:.1f} / 100"),
    )  # fmt: skip
