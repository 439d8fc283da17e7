"""``ugro report JOB`` and ``ugro compare JOB JOB...``: a job's figures over its lifetime.

Text by default (plain and stable when the output is not a terminal), ``--json`` for one JSON
object, ``--plots DIR`` for PNG plots of loss and throughput per rank (needs matplotlib).
How each figure is computed is documented in ``collect.py``; the text is ``report_text``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from rich.console import Console, RenderableType
from rich.text import Text

from ugro.common.identifiers import JOB_ID, JOB_ID_EXPECTED

from .collect import collect
from .goodput import add_time_accounting
from .job_report import DEFAULT_LOOKBACK, EFFICIENCY_HELP, JobNotFound, JobReport, parse_duration
from .report_text import render_compare, render_report
from .servers import Prometheus, QueryError, Unreachable

EXIT_NO_JOB = 1  # no such job in Prometheus (or the plots could not be written)
EXIT_USAGE = 2  # a bad job id or option
EXIT_UNAVAILABLE = 3  # Prometheus did not answer, or answered with an error

QUERY_TIMEOUT_SECONDS = 30.0
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
        help="a job's figures over its lifetime: time, work, throughput, loss, GPUs, goodput, "
        "checkpoints, alerts",
        description="Sum a training job up over its lifetime, from Prometheus: duration, steps,\n"
        "samples and tokens, mean and peak throughput, initial/final/best loss, per-rank\n"
        "figures, GPU utilisation, memory and temperature, an efficiency score, where the\n"
        "time went (productive, data, checkpoint, evaluation, startup, stalled, restarts),\n"
        "the checkpoints and the alerts that fired. How each figure is computed:\n"
        "console/collect.py and console/goodput.py.",
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
                reports.append(full_report(prometheus, job, args.lookback))
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
        print_json(report.to_json())
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
        print_json({"jobs": [r.to_json() for r in reports], "best": best})
    else:
        print_renderable(render_compare(reports, best))
    return 0


def print_report(
    job_id: str, prometheus: Prometheus, console: Console, lookback: float | None = None
) -> bool:
    """The text report of ``job_id`` on ``console`` (for ``ugro demo``); when there is none,
    one line saying why. Returns whether the report was printed."""
    try:
        console.print(render_report(full_report(prometheus, job_id, lookback)))
    except (JobNotFound, Unreachable, QueryError) as error:
        console.print(Text(f"ugro report: {error}"))
        return False
    return True


def full_report(prometheus: Prometheus, job_id: str, lookback: float | None) -> JobReport:
    """``collect``'s figures and where the time went (``goodput``)."""
    return add_time_accounting(prometheus, collect(prometheus, job_id, lookback))


def print_json(document: dict[str, Any]) -> None:
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
