"""benchmarks/scale.py runs end to end at its smallest size and reports every figure.

One short run (8 ranks and their node's exporter, a real Prometheus and Alertmanager, 20 s of
warm-up, one round of dashboard queries): the figures' values are the benchmark's business,
here only that each is there and that Prometheus ingested the simulated job's series.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIGURES = (
    "series",
    "prometheus_rss_mb",
    "prometheus_cpu_cores",
    "rule_eval_s",
    "panel_p95_s",
    "watch_frame_s",
    "report_s",
)


def test_the_smallest_run_reports_every_figure():
    for binary in ("prometheus", "prometheus-alertmanager"):
        if shutil.which(binary) is None and shutil.which(binary.split("-")[-1]) is None:
            pytest.fail(f"{binary} is not on PATH: run `make setup` (Debian packages)")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "scale.py"),
            *("--sizes", "8", "--warmup-seconds", "20", "--quiet-seconds", "10"),
            *("--repeats", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    for figure in FIGURES:
        assert isinstance(summary[f"{figure}_8"], (int, float)), (figure, summary)
        assert summary[f"{figure}_8"] >= 0, (figure, summary)
    assert summary["series_8"] > 0
    assert summary["targets_up_8"] == "9/9"  # 8 ranks and their node's exporter
    assert "Slowest five queries at 8 ranks" in done.stdout
