"""``python -m ugro.grafana build|check``: write the dashboards' JSON, or check it is current.

``build`` writes ``grafana/dashboards/<uid>.json``: the bare dashboard model that Grafana's
file provisioning reads (grafana/provisioning/dashboards/ugro.yml). ``check`` exits 1 when a
committed file differs from what the code generates, so a dashboard edited in the JSON (or in
the code without rebuilding) is caught by ``make test``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import warnings

from ugro.catalogue.thresholds import ThresholdsError, load_thresholds

DASHBOARDS_DIR = pathlib.Path(__file__).resolve().parent / "dashboards"


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    with warnings.catch_warnings():
        # The SDK warns at import about its own packaging; nothing for our users to act on.
        warnings.simplefilter("ignore", DeprecationWarning)
        from grafana_foundation_sdk.cog.encoder import JSONEncoder

        from . import cluster, training

    thresholds = load_thresholds()
    files = {}
    for module in (training, cluster):
        model = module.dashboard(thresholds).build()
        text = json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False)
        files[f"{module.UID}.json"] = text + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ugro.grafana", description=__doc__)
    parser.add_argument("command", choices=("build", "check"))
    args = parser.parse_args(argv)
    try:
        files = render()
    except ThresholdsError as error:
        print(f"ugro.grafana: {error}", file=sys.stderr)
        return 2
    if args.command == "build":
        DASHBOARDS_DIR.mkdir(exist_ok=True)
        for name, text in files.items():
            (DASHBOARDS_DIR / name).write_text(text)
            print(f"wrote grafana/dashboards/{name}")
        return 0
    stale = [
        name
        for name, text in files.items()
        if not (DASHBOARDS_DIR / name).exists() or (DASHBOARDS_DIR / name).read_text() != text
    ]
    for name in stale:
        print(
            f"ugro.grafana: grafana/dashboards/{name} differs from what grafana/*.py generates: "
            "run `python -m ugro.grafana build`",
            file=sys.stderr,
        )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
