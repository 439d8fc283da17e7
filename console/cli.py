"""``ugro``: the terminal commands. ``ugro watch JOB`` shows a job live; ``ugro report JOB``
sums a job up over its lifetime; ``ugro compare JOB JOB...`` puts jobs side by side; ``ugro demo``
runs a monitored job on this machine from end to end."""

from __future__ import annotations

import argparse
import signal
import sys

from .servers import default_alertmanager_url, default_prometheus_url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ugro", description=__doc__)
    parser.add_argument(
        "--prometheus",
        default=default_prometheus_url(),
        metavar="URL",
        help="Prometheus to query (default $UGRO_PROMETHEUS_URL or %(default)s)",
    )
    parser.add_argument(
        "--alertmanager",
        default=default_alertmanager_url(),
        metavar="URL",
        help="Alertmanager to ask for firing alerts "
        "(default $UGRO_ALERTMANAGER_URL or %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from . import demo, report, watch

    watch.add_parser(commands)
    report.add_parsers(commands)
    demo.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Python raises KeyboardInterrupt on Ctrl-C only if SIGINT was at its default when it
    # started; a background job of a non-interactive shell (`cmd &`, nohup, some CI runners)
    # inherits it ignored, and Ctrl-C would then be dropped silently. Always listen.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
