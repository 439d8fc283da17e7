"""``ugro watch JOB``: a live terminal view of one training job.

Every refresh gathers a ``JobSnapshot`` (``gather``: the queries, from the recording rules the
Grafana dashboard and the alerts read, and the job's alerts from Alertmanager) and draws it
with Rich (``render``, a pure function of a snapshot). What the statuses mean and how they are
decided: ``snapshot``. With ``--until-done`` the command exits with the snapshot's ``outcome``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ugro.common.identifiers import JOB_ID, JOB_ID_EXPECTED

from . import formatting as fmt
from .formatting import MISSING
from .gather import LOOKBACK, gather, recorded_end
from .servers import Alertmanager, Prometheus
from .snapshot import JobSnapshot, with_record

# One server round trip must not hold up a refresh (or Ctrl-C) for long.
QUERY_TIMEOUT_SECONDS = 5.0

STATUS_STYLES = {
    # ranks
    "ok": "green",
    "finished": "bold blue",
    "starting": "cyan",
    "straggler": "yellow",
    "non-finite": "bold red",
    "stalled": "bold red",
    "down": "bold red",
    "gone": "dim",
    # the job
    "running": "bold green",
    "waiting": "yellow",
    "ended": "blue",
    "failed": "bold red",
    "lost": "bold red",
    "stopped": "magenta",
}
SEVERITY_STYLES = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


# -- drawing ----------------------------------------------------------------------------------


def _loss(value: float | None) -> Text:
    """A loss; a non-finite one in red, as the rank's status will say."""
    text = fmt.loss(value, digits=3)
    return Text(text, style="" if value is None or math.isfinite(value) else "bold red")


def _header(snapshot: JobSnapshot) -> Text:
    status = snapshot.status
    line = Text()
    line.append(f" {status.upper()} ", style=f"reverse {STATUS_STYLES.get(status, '')}")
    line.append("   elapsed ")
    line.append(fmt.clock(snapshot.elapsed_seconds), style="bold")
    if snapshot.steps is not None:
        line.append("   step ")
        step = fmt.count(snapshot.steps)
        if snapshot.target_steps:
            step += f" / {fmt.count(snapshot.target_steps)}"
        line.append(step, style="bold")
    if snapshot.progress is not None and math.isfinite(snapshot.progress):
        line.append(f" ({fmt.share(snapshot.progress)})")
    if snapshot.target_steps and snapshot.status == "running":
        line.append("   ETA ")
        line.append(fmt.clock(snapshot.eta_seconds), style="bold")
    line.append("   world size ")
    line.append(str(snapshot.world_size) if snapshot.world_size else MISSING, style="bold")
    second = Text("job ")
    second.append(fmt.count(snapshot.tokens_per_second), style="bold")
    second.append(" tokens/s   mean loss (5 m) ")
    second.append(_loss(snapshot.loss_mean))
    if snapshot.mfu is not None:
        second.append("   MFU ")
        second.append(fmt.share(snapshot.mfu), style="bold")
    return Text("\n").join([line, second])


def _rank_table(snapshot: JobSnapshot) -> Table:
    table = Table(header_style="bold", box=None, pad_edge=False)
    # SM activity and MFU only when some rank has them (GPM GPUs; a loop that declared FLOPs).
    sm = any(rank.sm_active is not None for rank in snapshot.ranks)
    mfu = any(rank.mfu is not None for rank in snapshot.ranks)
    names = ["Rank", "Node", "Step", "GPU", *(["SM"] if sm else []), *(["MFU"] if mfu else [])]
    for name in (*names, "Loss", "Loss 1m", "LR", "Tok/s", "Step time"):
        table.add_column(name, justify="left" if name == "Node" else "right", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    for rank in snapshot.ranks:
        gpu = rank.gpu_utilization
        efficiency = [
            *([fmt.share(rank.sm_active, digits=0)] if sm else []),
            *([fmt.share(rank.mfu, digits=1)] if mfu else []),
        ]
        table.add_row(
            str(rank.rank),
            rank.node or MISSING,
            fmt.count(rank.steps),
            fmt.share(gpu, digits=0),
            *efficiency,
            _loss(rank.loss_last),
            _loss(rank.loss_mean),
            fmt.learning_rate(rank.learning_rate),
            fmt.count(rank.tokens_per_second),
            fmt.step_time(rank.step_seconds),
            Text(rank.status, style=STATUS_STYLES.get(rank.status, "")),
        )
    return table


def _alerts_panel(snapshot: JobSnapshot, retry: str) -> Panel:
    if snapshot.alertmanager_error:
        body = Text(snapshot.alertmanager_error + retry, style="bold red")
    elif not snapshot.alerts:
        body = Text("none firing", style="dim")
    else:
        body = Table.grid(padding=(0, 2))
        for alert in snapshot.alerts:
            since = fmt.ago(snapshot.taken_at - alert.since) if alert.since is not None else ""
            body.add_row(
                Text(alert.severity or "?", style=SEVERITY_STYLES.get(alert.severity, "")),
                Text(alert.name, style="bold"),
                alert.where,
                alert.summary,
                Text(since, style="dim"),
            )
    title = f"Alerts ({len(snapshot.alerts)} firing)" if snapshot.alerts else "Alerts"
    return Panel(body, title=title, title_align="left", border_style="dim")


def render(snapshot: JobSnapshot, interval: float | None = None) -> RenderableType:
    """The frame for ``snapshot``; ``interval`` (live mode) adds the retry period to errors."""
    retry = f" (retrying every {interval:g} s)" if interval else ""
    ended = None
    if snapshot.recorded_end is not None:
        ended = Text.assemble(
            (
                f" {snapshot.recorded_end.upper()} ",
                f"reverse {STATUS_STYLES.get(snapshot.status, '')}",
            ),
            "  as ugro-launch's record of the job on this machine says",
        )
    if snapshot.prometheus_error:
        body: RenderableType = Text(snapshot.prometheus_error + retry, style="bold red")
        if ended is not None:
            body = Group(ended, body)
    elif not snapshot.ranks and ended is not None:
        body = ended
    elif not snapshot.ranks:
        body = Text(
            f"Prometheus at {snapshot.prometheus_url} has no series for job "
            f"{snapshot.job_id} (in the last {LOOKBACK}): not started yet, or not registered "
            "as a Prometheus target?",
            style="yellow",
        )
    else:
        body = Group(_header(snapshot), Text(), _rank_table(snapshot))
    clock = fmt.time_of_day(snapshot.taken_at)
    footer = f"as of {clock}"
    if interval:
        footer += f" · refreshed every {interval:g} s · Ctrl-C to quit"
    return Group(
        Panel(
            body,
            title=f"[bold]ugro watch[/] · job [bold]{snapshot.job_id}[/]",
            title_align="left",
        ),
        _alerts_panel(snapshot, retry),
        Text(footer, style="dim"),
    )


# -- the command ------------------------------------------------------------------------------


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "watch",
        help="a live view of a training job: its ranks and its firing alerts",
        description="A live view of one training job, from Prometheus and Alertmanager. "
        "Ctrl-C quits.",
    )
    parser.add_argument("job", metavar="JOB", help="the job id (the job_id label)")
    parser.add_argument(
        "--interval",
        type=_interval,
        default=2.0,
        metavar="SECONDS",
        help="seconds between refreshes (default %(default)g)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--once",
        action="store_true",
        help="print one frame and exit: 0 when both servers answered and the job has series, "
        "else 1",
    )
    mode.add_argument(
        "--until-done",
        action="store_true",
        help="exit when the job is over: 0 when it finished (every rank reached its target "
        "steps or closed its telemetry normally), 1 when it failed (ranks down, a failed or "
        "lost job), 3 when it was stopped (ugro-launch stop), 4 when its targets are gone "
        "without saying how it ended. Where ugro-launch's record of the job is on this machine "
        "($UGRO_STATE_DIR), it says how the job ended, however long ago",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not JOB_ID.fullmatch(args.job):
        print(f"ugro watch: job id {args.job!r}: expected {JOB_ID_EXPECTED}", file=sys.stderr)
        return 2
    prometheus = Prometheus(args.prometheus, timeout=QUERY_TIMEOUT_SECONDS)
    alertmanager = Alertmanager(args.alertmanager, timeout=QUERY_TIMEOUT_SECONDS)

    def snapshot() -> JobSnapshot:
        return with_record(gather(args.job, prometheus, alertmanager), recorded_end(args.job))

    console = Console()
    try:
        if args.once:
            frame = snapshot()
            console.print(render(frame))
            return 0 if frame.complete else 1
        return watch(snapshot, console, args.interval, args.until_done)
    except KeyboardInterrupt:
        return 0


def watch(
    snapshot: Callable[[], JobSnapshot],
    console: Console,
    interval: float,
    until_done: bool = False,
) -> int:
    """Redraw every ``interval`` seconds until Ctrl-C (exit 0) or, with ``until_done``, until
    the job is over (its ``outcome``). On a terminal the frame is redrawn in place; elsewhere
    (a pipe, a file) only the last frame is written, when the command ends."""
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            started = time.monotonic()
            frame = snapshot()
            live.update(render(frame, interval), refresh=True)
            if until_done and frame.outcome is not None:
                return frame.outcome
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
