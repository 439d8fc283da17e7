"""The one set of value formatters that ``ugro watch``, ``ugro report`` and ``ugro compare``
share: one missing mark, and a value written the same way by each command."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from ugro.console import formatting as fmt
from ugro.console.job_report import Efficiency, JobReport, RankFigures
from ugro.console.report_text import render_compare, render_report
from ugro.console.snapshot import JobSnapshot, RankState
from ugro.console.watch import render

UNKNOWN = (None, math.nan, math.inf, -math.inf)


def text_of(renderable) -> str:
    console = Console(width=140, record=True, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize(
    "formatter",
    [
        fmt.clock,
        fmt.duration,
        fmt.timestamp,
        fmt.count,
        fmt.rate,
        fmt.step_time,
        fmt.share,
        fmt.percent,
        fmt.ratio,
        fmt.learning_rate,
        fmt.gibibytes,
        fmt.celsius,
    ],
)
def test_an_unknown_value_is_the_missing_mark_never_a_number(formatter):
    for value in UNKNOWN:
        assert formatter(value) == fmt.MISSING


def test_the_missing_mark_is_not_a_minus_sign():
    # The report writes an alert seen before the job's start as "-3.0 s".
    assert fmt.MISSING == "–" and fmt.MISSING != "-"


def test_a_non_finite_loss_is_news_not_a_missing_value():
    assert fmt.loss(None) == fmt.MISSING
    assert [fmt.loss(v) for v in (math.nan, math.inf, -math.inf)] == ["NaN", "+Inf", "-Inf"]
    assert fmt.loss(2.5) == "2.5000" and fmt.loss(2.5, digits=3) == "2.500"


def test_values():
    assert fmt.clock(3723) == "1:02:03" and fmt.clock(2 * 86400 + 3723) == "2d 01:02:03"
    assert fmt.duration(12.34) == "12.3 s" and fmt.duration(245) == "4 min 05 s"
    assert fmt.duration(7380) == "2 h 03 min" and fmt.duration(93600) == "1 d 02 h"
    assert fmt.span(7 * 86400) == "7d" and fmt.span(36 * 3600) == "36h" and fmt.span(90) == "90s"
    assert fmt.ago(42) == "42s ago" and fmt.ago(300) == "5m ago" and fmt.ago(5400) == "1.5h ago"
    assert fmt.timestamp(0) == "1970-01-01 00:00:00 UTC"
    assert fmt.count(12345.4) == "12,345"
    assert fmt.rate(12345.4) == "12,345" and fmt.rate(45.678) == "45.7"
    assert fmt.step_time(0.04) == "40.0 ms" and fmt.step_time(1.25) == "1.25 s"
    assert fmt.share(0.875) == "87.5 %" and fmt.share(0.875, digits=0) == "88 %"
    assert fmt.percent(12.5) == "12.5 %" and fmt.ratio(0.974) == "0.97"
    assert fmt.factor(None) == "n/a" and fmt.factor(0.5) == "0.50"
    assert fmt.learning_rate(3e-4) == "3.0e-04"
    assert fmt.gibibytes(3 * 1024**3) == "3.0 GiB" and fmt.celsius(61.25) == "61.2 °C"


def _unknown_job(job_id: str) -> JobReport:
    """A report in which every figure that can be unknown is."""
    nothing = dict.fromkeys(
        (
            "training_seconds", "world_size", "steps", "target_steps", "samples", "tokens",
            "tokens_per_second_mean", "tokens_per_second_peak", "samples_per_second_mean",
            "step_seconds_mean", "loss_initial", "loss_final", "loss_best", "loss_mean",
            "gpu_utilization_mean", "gpu_memory_used_peak_bytes", "gpu_temperature_mean_celsius",
            "gpu_temperature_peak_celsius",
        )
    )  # fmt: skip
    return JobReport(
        job_id=job_id, prometheus="http://prometheus", status="ended", start_time=0.0,
        end_time=10.0, duration_seconds=10.0, resolution_seconds=1.0, rate_window_seconds=3.0,
        nodes=[], gpu_count=1, efficiency=Efficiency(100.0, None, None, None),
        ranks=[RankFigures(rank=0)], alerts=[], **nothing,
    )  # fmt: skip


def test_watch_report_and_compare_mark_a_missing_value_alike():
    watched = text_of(
        render(
            JobSnapshot(
                "job", 1_800_000_000.0, status="running", ranks=[RankState(rank=0, steps=3)]
            )
        )
    )
    reported = text_of(render_report(_unknown_job("a")))
    compared = text_of(render_compare([_unknown_job("a"), _unknown_job("b")], {"loss": None}))
    for text in (watched, reported, compared):
        assert fmt.MISSING in text
    # No figure is written as a lone hyphen, the report's old mark.
    for text in (reported, compared):
        assert not any(cell == "-" for line in text.splitlines() for cell in line.split())
