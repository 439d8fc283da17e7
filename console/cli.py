"""``ugro``: the terminal commands. ``ugro watch JOB`` shows a job live; ``ugro report JOB``
sums a job up over its lifetime; ``ugro compare JOB JOB...`` puts jobs side by side; ``ugro jobs``
lists every job of the last days; ``ugro demo`` runs a monitored job on this machine from end to
end."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .servers import default_alertmanager_url, default_prometheus_url, url_problem

EXIT_USAGE = 2
# The commands that query the servers (the demo starts its own), and the server flags each
# reads, with the environment variable that stands in for each flag.
_SERVER_FLAGS = {
    "watch": ("prometheus", "alertmanager"),
    "report": ("prometheus",),
    "compare": ("prometheus",),
    "jobs": ("prometheus",),
}
_ENVIRONMENT = {"prometheus": "UGRO_PROMETHEUS_URL", "alertmanager": "UGRO_ALERTMANAGER_URL"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ugro", description=__doc__)
    # No argparse default: main() must know whether a bad URL came from the flag or from
    # the environment, to name the one to fix.
    parser.add_argument(
        "--prometheus",
        metavar="URL",
        help=f"Prometheus to query (default $UGRO_PROMETHEUS_URL or {default_prometheus_url()})",
    )
    parser.add_argument(
        "--alertmanager",
        metavar="URL",
        help="Alertmanager to ask for firing alerts "
        f"(default $UGRO_ALERTMANAGER_URL or {default_alertmanager_url()})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from . import demo, jobs, report, watch

    watch.add_parser(commands)
    report.add_parsers(commands)
    jobs.add_parser(commands)
    demo.add_parser(commands)
    return parser


def _server_problem(args: argparse.Namespace, server: str) -> str | None:
    """What is wrong with the URL of ``server`` ("prometheus"), naming the flag or the
    environment variable it came from; None when it can be used."""
    url, named = getattr(args, server), f"--{server}"
    if url is None:
        variable = _ENVIRONMENT[server]
        url, named = os.environ.get(variable), f"${variable}"
        if url is None:  # the built-in default
            return None
    problem = url_problem(url)
    return f"{named} {url!r}: {problem}" if problem else None


def main(argv: list[str] | None = None) -> int:
    # Python raises KeyboardInterrupt on Ctrl-C only if SIGINT was at its default when it
    # started; a background job of a non-interactive shell (`cmd &`, nohup, some CI runners)
    # inherits it ignored, and Ctrl-C would then be dropped silently. Always listen.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    args = parser.parse_args(argv)
    for server in _SERVER_FLAGS.get(args.command, ()):
        problem = _server_problem(args, server)
        if problem:
            print(f"ugro {args.command}: {problem}", file=sys.stderr)
            return EXIT_USAGE
    if args.prometheus is None:
        args.prometheus = default_prometheus_url()
    if args.alertmanager is None:
        args.alertmanager = default_alertmanager_url()
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
