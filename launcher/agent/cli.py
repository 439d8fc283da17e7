"""The agent's command line: one verb, its options checked, its answer one JSON line.

See the package's docstring (:mod:`ugro.launcher.agent`) for the verbs and what they answer.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import jobfiles
from ..jobfiles import job_dir
from .base import EXIT_ERROR, EXIT_USAGE, PROG, describe_os_error
from .exporter import ensure_exporter, stop_exporter
from .logs import show_logs
from .preflight import preflight
from .stacks import job_stacks
from .start import start_job, supervise
from .status import job_status, stop_job

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def _name(what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        try:
            return jobfiles.check_name(value, what)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return check


def _port(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a port number 1..65535")
    return int(value)


def _ports(value: str) -> list[int]:
    ports: list[int] = []
    for part in filter(None, value.split(",")):
        port = _port(part.strip())
        if port not in ports:
            ports.append(port)
    return ports


def _non_negative_int(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole number >= 0")
    return int(value)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{value!r}: expected 0 to 3600 seconds")
    return seconds


def _dump_seconds(value: str) -> float:
    seconds = _seconds(value)
    if not 1 <= seconds <= 300:
        raise argparse.ArgumentTypeError(f"{value!r}: expected 1 to 300 seconds")
    return seconds


def _env_pair(value: str) -> tuple[str, str]:
    name, sep, text = value.partition("=")
    if not sep or not _ENV_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected NAME=VALUE with NAME made of letters, digits and '_'"
        )
    return name, text


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected an IP address") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG, description="The node side of ugro-launch: one action, one JSON line."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def job_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--job-id", required=True, type=_name("job id"))
        sub.add_argument("--node", required=True, type=_name("node name"))
        sub.add_argument("--workdir", required=True, help="job files go to WORKDIR/jobs/J/NODE")

    sub = verbs.add_parser("preflight", help="can this node run a job? (JSON report)")
    sub.add_argument("--workdir", required=True, help="created if missing; must be writable")
    sub.add_argument("--ports", type=_ports, default=[], metavar="P[,P...]")
    sub.add_argument("--gpus", type=_non_negative_int, help="GPUs NVML should see (checked)")
    sub.add_argument("--min-free-bytes", type=_non_negative_int, default=0, metavar="BYTES")
    sub.add_argument("--bind-address", type=_address, default="0.0.0.0")
    sub.add_argument("--chdir", help="the job's working directory: must exist")
    sub.add_argument("--web-config", help="the endpoints' web configuration file: checked")

    sub = verbs.add_parser("ensure-exporter", help="start ugro-exporter unless it runs")
    sub.add_argument("--port", required=True, type=_port)
    sub.add_argument("--node", required=True, type=_name("node name"))
    sub.add_argument("--workdir", required=True, help="its log goes to WORKDIR/exporter/NODE.log")
    sub.add_argument("--listen-address", type=_address, default="0.0.0.0")
    sub.add_argument("--web-config", help="started with --web.config.file WEB_CONFIG")

    sub = verbs.add_parser("stop-exporter", help="stop the exporter ensure-exporter started")
    sub.add_argument("--node", required=True, type=_name("node name"))
    sub.add_argument("--workdir", required=True)

    sub = verbs.add_parser("start", help="start -- ARGV... detached, under a supervisor")
    job_options(sub)
    sub.add_argument("--env", type=_env_pair, action="append", default=[], metavar="K=V")
    sub.add_argument("--cwd", help="working directory of ARGV (default: the agent's)")

    sub = verbs.add_parser("status", help="running, finished, failed, lost or unknown")
    job_options(sub)

    sub = verbs.add_parser("stop", help="SIGTERM the job's process group, SIGKILL after grace")
    job_options(sub)
    sub.add_argument("--grace", type=_seconds, default=10.0, metavar="SECONDS")

    sub = verbs.add_parser("stacks", help="py-spy dump of each of the job's ranks here")
    job_options(sub)
    sub.add_argument(
        "--timeout", type=_dump_seconds, default=10.0, metavar="SECONDS", help="per rank"
    )

    sub = verbs.add_parser("logs", help="print the tail of the job's output (raw text)")
    job_options(sub)
    sub.add_argument("--lines", type=_non_negative_int, default=100, metavar="N")
    sub.add_argument("--follow", action="store_true", help="until the job ends")

    sub = verbs.add_parser("supervise", help="internal: run a started job and record its exit")
    sub.add_argument("--dir", required=True, type=pathlib.Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if argv[:1] == ["start"]:
        # Everything after the first "--" is the job's argv, verbatim: argparse never sees it.
        if "--" not in argv:
            build_parser().parse_args(argv)  # to report other errors first
            _usage_error("start: expected -- ARGV... (the command to run)")
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
        if not command:
            _usage_error("start: expected a command after --")
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "logs":
            return show_logs(job_dir(args.workdir, args.job_id, args.node), args.lines, args.follow)
        if args.verb == "supervise":
            return supervise(args.dir)
        result = _run_verb(args, command)
    except OSError as error:
        print(f"{PROG} {args.verb}: {describe_os_error(error)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # the launcher needs one line, not a traceback over SSH
        print(f"{PROG} {args.verb}: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(result))
    return 0


def _usage_error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _run_verb(args: argparse.Namespace, command: list[str]) -> dict[str, Any]:
    if args.verb == "preflight":
        return preflight(
            args.workdir,
            ports=args.ports,
            gpus=args.gpus,
            min_free_bytes=args.min_free_bytes,
            bind_address=args.bind_address,
            chdir=args.chdir,
            web_config=args.web_config,
        )
    if args.verb == "ensure-exporter":
        return ensure_exporter(
            args.port, args.node, args.workdir, args.listen_address, args.web_config
        )
    if args.verb == "stop-exporter":
        return stop_exporter(args.node, args.workdir)
    directory = job_dir(args.workdir, args.job_id, args.node)
    if args.verb == "start":
        return start_job(
            directory,
            command,
            env=dict(args.env),
            cwd=args.cwd,
            job_id=args.job_id,
            node=args.node,
        )
    if args.verb == "status":
        return job_status(directory)
    if args.verb == "stop":
        return stop_job(directory, args.grace)
    if args.verb == "stacks":
        return job_stacks(directory, args.timeout)
    raise AssertionError(f"unhandled verb {args.verb}")
