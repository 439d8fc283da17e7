"""``python -m ugro.alerts build|check``: write alerts/rules.yml and
prometheus/rules/recording.yml from the catalogue, or check that both are up to date.

``check`` also checks the secret files alertmanager.yml names (alerts/secrets/README.md): a
missing or empty one passes ``amtool check-config`` and lets Alertmanager start, and would
fail only the first notification. A development checkout has none, so they are warnings
(exit code unchanged) unless ``--require-secrets`` is given, as on a head node before
``docker compose up``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from ugro.catalogue.thresholds import THRESHOLDS_FILE, ThresholdsError
from ugro.common.config_files import ConfigFileError

from . import secret_files
from .rules_file import RECORDING_FILE, RULES_FILE, render, render_recording


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ugro.alerts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("build", "check"))
    parser.add_argument(
        "--thresholds",
        type=pathlib.Path,
        default=THRESHOLDS_FILE,
        metavar="FILE",
        help="the thresholds file (default: alerts/thresholds.yml)",
    )
    parser.add_argument(
        "--alertmanager-config",
        type=pathlib.Path,
        default=secret_files.ALERTMANAGER_CONFIG,
        metavar="FILE",
        help="check: the Alertmanager config whose secret files to check "
        "(default: alerts/alertmanager.yml)",
    )
    parser.add_argument(
        "--require-secrets",
        action="store_true",
        help="check: a missing, empty or malformed secret file is an error (exit 1)",
    )
    args = parser.parse_args(argv)
    try:
        text = render(args.thresholds)
    except ThresholdsError as error:
        print(f"ugro.alerts: {error}", file=sys.stderr)
        return 2
    generated = {RULES_FILE: text, RECORDING_FILE: render_recording()}
    if args.command == "build":
        for path, content in generated.items():
            path.write_text(content)
            print(f"wrote {path}")
        return 0
    status = 0
    for path, content in generated.items():
        if not path.exists() or path.read_text() != content:
            print(
                f"ugro.alerts: {path} is out of date with {args.thresholds.name} and the "
                "catalogue: run `python -m ugro.alerts build`",
                file=sys.stderr,
            )
            status = 1
    try:
        problems = secret_files.problems(args.alertmanager_config)
    except ConfigFileError as error:
        print(f"ugro.alerts: {error}", file=sys.stderr)
        return 2
    level = "error" if args.require_secrets else "warning"
    for problem in problems:
        print(f"ugro.alerts: {level}: {problem}", file=sys.stderr)
    if problems and args.require_secrets:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
