"""``ugro jobs``: every training job of a lookback window (default 7 days), one row each, with
totals by status, the GPU-hours, the top jobs by throughput and the alerts that fired.

Prometheus has the jobs' figures; ugro-launch's records on this machine add how a job ended and
when it was launched, and stand alone for a job Prometheus has no series of. How each figure is
made: ``jobs_queries``; the text: ``jobs_text``.
"""

from __future__ import annotations

import argparse
import sys

from ugro.launcher import records

from . import formatting as fmt
from .job_report import DEFAULT_LOOKBACK, parse_duration
from .jobs_queries import JobsOverview, overview
from .jobs_text import render_jobs
from .report import print_json, print_renderable
from .servers import Prometheus

EXIT_USAGE = 2  # a bad option
EXIT_UNAVAILABLE = 3  # Prometheus did not answer or refused a query: local records only

QUERY_TIMEOUT_SECONDS = 30.0
DEFAULT_TOP = 5

_EXIT_CODES = f"""\
exit codes: 0 done (also when the lookback holds no job); {EXIT_USAGE} a bad option;
{EXIT_UNAVAILABLE} Prometheus did not answer or refused a query (ugro-launch's records on this
machine are listed all the same)."""


def _lookback(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _top(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "jobs",
        help="every job of the last days: status, duration, GPU-hours, throughput, alerts",
        description="Every training job Prometheus knows over the lookback, merged with\n"
        "ugro-launch's records on this machine: status (running, finished, failed, stopped,\n"
        "lost, as `ugro report` decides it), start, duration, ranks and nodes, GPU-hours,\n"
        "mean tokens/s, final loss and alerts fired; totals by status, the total GPU-hours\n"
        "and the top jobs by throughput. How each figure is made: console/jobs_queries.py.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Also after the command, as `ugro jobs --prometheus URL`; SUPPRESS leaves the top-level
    # flag's value alone when this one is not given.
    parser.add_argument(
        "--prometheus",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="Prometheus to query (as `ugro --prometheus URL jobs`)",
    )
    parser.add_argument(
        "--lookback",
        type=_lookback,
        default=parse_duration(DEFAULT_LOOKBACK),
        metavar="DURATION",
        help=f"how far back to look for jobs, e.g. 36h, 30d (default {DEFAULT_LOOKBACK})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--top",
        type=_top,
        default=DEFAULT_TOP,
        metavar="N",
        help="how many jobs the throughput ranking names (default %(default)s)",
    )
    parser.set_defaults(run=run)


def to_json(jobs: JobsOverview, top: int) -> dict:
    """One JSON object with stable keys: numbers as numbers, null where unknown."""
    return {
        "prometheus": jobs.prometheus,
        "prometheus_error": jobs.prometheus_error,
        "local_only": jobs.local_only,
        "lookback_seconds": jobs.lookback_seconds,
        "as_of": jobs.as_of,
        "jobs": [row.to_json() for row in jobs.jobs],
        "totals": {
            "jobs": len(jobs.jobs),
            "by_status": jobs.by_status(),
            "gpu_hours": None if jobs.local_only else jobs.gpu_hours,
        },
        "top_by_throughput": [
            {"job_id": row.job_id, "tokens_per_second_mean": row.tokens_per_second_mean}
            for row in jobs.top_by_throughput(top)
        ],
    }


def run(args: argparse.Namespace) -> int:
    prometheus = Prometheus(args.prometheus, timeout=QUERY_TIMEOUT_SECONDS)
    jobs = overview(prometheus, args.lookback)
    for problem in jobs.record_errors:
        print(f"ugro jobs: {problem}", file=sys.stderr)
    if jobs.local_only:
        hint = "(--prometheus or $UGRO_PROMETHEUS_URL names another)"
        print(
            f"ugro jobs: {jobs.prometheus_error} {hint}; listing ugro-launch's records on this "
            "machine only",
            file=sys.stderr,
        )
    code = EXIT_UNAVAILABLE if jobs.local_only else 0
    if args.json:
        print_json(to_json(jobs, args.top))
    elif not jobs.jobs:
        where = f"ugro-launch's records in {records.state_dir()}"
        if not jobs.local_only:
            where = f"Prometheus at {jobs.prometheus} nor in {where}"
        print(f"no jobs in the last {fmt.span(args.lookback)}: none in {where}")
    else:
        print_renderable(render_jobs(jobs, args.top))
    return code
