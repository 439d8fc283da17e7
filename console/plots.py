"""PNG plots for ``ugro report --plots DIR``: loss and throughput per rank over the job's life.

matplotlib is an optional dependency (``pip install 'ugro[plots]'``): this module is imported
only for ``--plots`` and imports matplotlib only inside its functions, with the Agg backend
and without pyplot's global state, so it works on a machine without a display.
"""

from __future__ import annotations

import pathlib

from .job_report import JobReport, Points


def unavailable() -> str | None:
    """Why the plots cannot be drawn here, or None when they can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        return f"needs matplotlib, which cannot be imported ({error}): pip install 'ugro[plots]'"
    return None


def _time_axis(report: JobReport) -> tuple[float, str]:
    """Divisor and label for the x axis: time since the job started."""
    if report.duration_seconds < 600:
        return 1.0, "seconds since start"
    if report.duration_seconds < 6 * 3600:
        return 60.0, "minutes since start"
    return 3600.0, "hours since start"


def _draw(
    report: JobReport,
    path: pathlib.Path,
    title: str,
    ylabel: str,
    per_rank: dict[int, Points],
    job: Points | None = None,
    job_label: str = "",
) -> pathlib.Path:
    from matplotlib.figure import Figure

    divisor, xlabel = _time_axis(report)
    figure = Figure(figsize=(9, 4.8), layout="constrained")
    axes = figure.add_subplot()
    drawn = False
    for rank in sorted(per_rank):
        points = per_rank[rank]
        if points:
            xs = [(t - report.start_time) / divisor for t, _ in points]
            axes.plot(xs, [v for _, v in points], linewidth=1.2, label=f"rank {rank}")
            drawn = True
    if job:
        xs = [(t - report.start_time) / divisor for t, _ in job]
        axes.plot(xs, [v for _, v in job], "k--", linewidth=1.6, label=job_label)
        drawn = True
    if drawn:
        axes.legend(loc="best", fontsize="small")
    else:
        axes.text(0.5, 0.5, "no samples in Prometheus", ha="center", va="center",
                  transform=axes.transAxes)  # fmt: skip
    axes.set_title(f"{report.job_id}: {title}")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    figure.savefig(path, format="png", dpi=100)
    return path


def write_plots(report: JobReport, directory: pathlib.Path) -> list[pathlib.Path]:
    """Write ``JOB-loss.png`` and ``JOB-throughput.png`` into ``directory``; their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    curves = report.curves
    return [
        _draw(
            report,
            directory / f"{report.job_id}-loss.png",
            "loss per rank (ugro_train_loss_last)",
            "loss",
            curves.loss,
            curves.loss_job,
            "mean of the ranks",
        ),
        _draw(
            report,
            directory / f"{report.job_id}-throughput.png",
            f"throughput per rank (tokens/s over {report.rate_window_seconds:g} s windows)",
            "tokens/s",
            curves.tokens_rate,
        ),
    ]
