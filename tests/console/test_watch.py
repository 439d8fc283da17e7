"""``ugro watch``: the frame drawn from a hand-made snapshot, the statuses, the command's exit
codes, and the live view against a real 2-rank run (gathered in-process, and driven in tmux)."""

from __future__ import annotations

import contextlib
import io
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rich.console import Console

from tests.support import wait_for
from tests.support.fake_gpu import FAKE_GPU_UUIDS, fake_gpu_exporter
from tests.support.models import SMALL_MODEL
from tests.support.net import free_port
from tests.support.stack import AlertStack
from tests.support.training import TrainingJob
from ugro.console.gather import gather
from ugro.console.servers import Alertmanager, Prometheus
from ugro.console.snapshot import (
    AlertState,
    JobSnapshot,
    RankState,
    job_rates,
    job_status,
    rank_status,
    with_record,
)
from ugro.console.watch import render

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The fake NVML's GPUs (tests/exporter/fake_nvml.py), one per local rank.
NOW = 1_800_000_000.0
LOSS_SPIKE_SUMMARY = "A rank's loss jumped well above its own recent level"


def text_of(renderable, width: int = 140, color: bool = False) -> str:
    console = Console(
        width=width,
        record=True,
        file=io.StringIO(),
        force_terminal=color,
        color_system="standard" if color else None,
    )
    console.print(renderable)
    return console.export_text(styles=color)


def rank_state(rank: int, **overrides) -> RankState:
    values = dict(
        node="node-a",
        up=True,
        status="ok",
        steps=1200,
        target_steps=5000,
        seconds_since_step=0.2,
        gpu_utilization=0.875,
        loss_last=3.245,
        loss_mean=3.3125,
        learning_rate=2e-4,
        tokens_per_second=15234.0,
        step_seconds=0.0421,
        step_seconds_lifetime=0.04,
        steps_per_second=23.8,
        straggler_score=1.0,
        recent_nonfinite=0.0,
    )
    values.update(overrides)
    return RankState(rank=rank, **values)


def running_snapshot(**overrides) -> JobSnapshot:
    values = dict(
        prometheus_url="http://prom:9090",
        alertmanager_url="http://am:9093",
        status="running",
        ranks=[
            rank_state(0),
            rank_state(1, node="node-b", gpu_utilization=None, status="straggler"),
            rank_state(2, node="node-c", up=False, status="down", loss_last=None),
            rank_state(3, node="node-c", loss_last=math.nan, status="non-finite"),
        ],
        world_size=4,
        started_at=NOW - 3723,
        last_step_at=NOW - 0.2,
        steps=1200,
        target_steps=5000,
        progress=0.24,
        steps_per_second=20.0,
        tokens_per_second=60936.0,
        loss_mean=3.301,
        alerts=[
            AlertState(
                "TrainingStragglerRank",
                "warning",
                "One rank is holding its job back",
                since=NOW - 125,
                where="rank 1 on node-b",
            )
        ],
    )
    values.update(overrides)
    return JobSnapshot("job-42", NOW, **values)


# -- the frame, from hand-made snapshots ---------------------------------------------------------


def test_frame_shows_header_every_rank_and_the_alerts():
    text = text_of(render(running_snapshot(), interval=2))
    assert "job-42" in text
    header = next(line for line in text.splitlines() if "RUNNING" in line)
    assert "elapsed 1:02:03" in header
    assert "step 1,200 / 5,000 (24.0 %)" in header
    assert "ETA 0:03:10" in header  # (5000 - 1200) / 20 steps/s
    assert "world size 4" in header
    assert "60,936 tokens/s" in text and "mean loss (5 m) 3.301" in text

    rows = {cells[0]: cells for cells in table_rows(text)}
    assert rows["0"] == [
        "0", "node-a", "1,200", "88 %", "3.245", "3.312", "2.0e-04", "15,234", "42.1 ms", "ok",
    ]  # fmt: skip
    assert rows["1"][3] == "–"  # a rank without a GPU
    assert rows["1"][-1] == "straggler"
    assert rows["2"][4] == "–" and rows["2"][-1] == "down"
    assert rows["3"][4] == "NaN" and rows["3"][-1] == "non-finite"

    alert = next(line for line in text.splitlines() if "TrainingStragglerRank" in line)
    assert re.search(
        r"warning\s+TrainingStragglerRank\s+rank 1 on node-b\s+One rank is holding its job back"
        r"\s+2m ago",
        alert,
    )
    assert "Alerts (1 firing)" in text
    assert "refreshed every 2 s" in text and "Ctrl-C to quit" in text


def test_statuses_are_coloured():
    text = text_of(render(running_snapshot(), interval=2), color=True)

    def style_before(word: str) -> str:
        match = re.search(r"\x1b\[([0-9;]*)m\s*" + re.escape(word) + r"\s*\x1b\[0m", text)
        assert match, f"{word!r} is not styled in {text!r}"
        return match.group(1).split(";")

    assert "32" in style_before("ok")  # green
    assert "33" in style_before("straggler")  # yellow
    assert "31" in style_before("down")  # red
    assert "31" in style_before("non-finite")
    assert "31" in style_before("NaN")


def test_finished_job_shows_no_eta_and_elapsed_up_to_its_last_step():
    snapshot = running_snapshot(
        status="finished",
        ranks=[rank_state(0, steps=5000, status="finished", up=None)],
        steps=5000,
        last_step_at=NOW - 600,
        progress=1.0,
    )
    text = text_of(render(snapshot))
    assert "FINISHED" in text and "ETA" not in text
    assert "elapsed 0:52:03" in text  # 3723 - 600 s
    assert "step 5,000 / 5,000 (100.0 %)" in text
    assert "refreshed every" not in text  # --once draws no refresh line


def test_unreachable_servers_are_a_message_with_the_retry_period():
    snapshot = JobSnapshot(
        "job-42",
        NOW,
        prometheus_url="http://127.0.0.1:1",
        prometheus_error="Prometheus at http://127.0.0.1:1 does not answer: Connection refused",
        alertmanager_error="Alertmanager at http://127.0.0.1:2 does not answer: timed out",
    )
    text = text_of(render(snapshot, interval=1.5), width=200)
    assert (
        "Prometheus at http://127.0.0.1:1 does not answer: Connection refused "
        "(retrying every 1.5 s)" in text
    )
    assert "Alertmanager at http://127.0.0.1:2 does not answer: timed out" in text


def test_a_job_without_series_says_so():
    snapshot = JobSnapshot("job-42", NOW, prometheus_url="http://prom:9090")
    text = text_of(render(snapshot, 2), width=200)
    assert "Prometheus at http://prom:9090 has no series for job job-42" in text
    assert not snapshot.complete and snapshot.outcome is None


def test_sm_activity_and_mfu_show_only_where_some_rank_has_them():
    plain = text_of(render(running_snapshot()), width=200)
    assert "MFU" not in plain and " SM " not in plain
    ranks = [rank_state(0, sm_active=0.42, mfu=0.385), rank_state(1, node="node-b")]
    text = text_of(render(running_snapshot(ranks=ranks, mfu=0.3)), width=200)
    header, *_ = [line for line in text.splitlines() if "Rank" in line]
    assert "SM" in header and "MFU" in header
    row = next(line for line in text.splitlines() if "node-a" in line)
    assert "42 %" in row and "38.5 %" in row
    assert "MFU 30.0 %" in text  # the job's, in the header


# -- statuses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "status"),
    [
        ({}, "ok"),
        ({"steps": 5000}, "finished"),
        ({"steps": 5000, "up": False}, "finished"),  # the job ended after its last step
        ({"up": False}, "down"),
        # A loop without total_steps that closed its telemetry normally and exited.
        ({"target_steps": None, "ended": True, "up": False}, "finished"),
        ({"target_steps": None, "up": False}, "down"),
        ({"up": False, "answered": False, "steps": None}, "starting"),  # not serving yet
        ({"up": None}, "gone"),
        ({"stalled": True}, "stalled"),
        ({"loss_last": math.inf}, "non-finite"),
        ({"loss_last": math.nan}, "non-finite"),
        ({"recent_nonfinite": 2.0}, "non-finite"),
        ({"straggling": True}, "straggler"),
        ({"straggler_score": 0.5}, "ok"),  # only the condition decides, as for the alert
        ({"steps": 0, "seconds_since_step": None}, "starting"),
        ({"stalled": True, "straggling": True}, "stalled"),
        ({"stalled": True, "up": False}, "down"),
    ],
)
def test_rank_status(overrides, status):
    assert rank_status(rank_state(0, **overrides)) == status


def test_the_console_restates_no_threshold():
    """The views decide stalled, non-finite and straggler from the alerts' condition series:
    no threshold value or field of alerts/thresholds.yml appears in their code. (The demo's
    local stack, which configures its own Prometheus with shorter `for:`s, is not a view.)"""
    from ugro.catalogue.thresholds import FIELDS, load_thresholds

    console = ROOT / "console"
    views = sorted(set(console.glob("*.py")) - {console / "localstack.py", console / "demo.py"})
    code = "\n".join(path.read_text() for path in views)
    for section, names in FIELDS.items():
        for name in names:
            assert name not in code, f"console names the threshold {section}.{name}"
    # The values the view once kept as silent defaults of its own.
    training = load_thresholds().training
    for value in (training.straggler_ratio, training.stall_min_seconds):
        assert not re.search(rf"(?<![\w.]){re.escape(str(value))}(?![\w.])", code), value
    assert "thresholds" not in code.replace("alerts/thresholds.yml", "")


@pytest.mark.parametrize(
    ("statuses", "ranks_down_firing", "job", "outcome"),
    [
        ([], False, "waiting", None),
        (["starting", "starting"], False, "starting", None),
        (["ok", "straggler"], False, "running", None),
        (["ok", "stalled"], False, "stalled", None),
        (["ok", "down"], True, "down", None),  # not over while a rank runs
        (["down", "down"], False, "down", None),  # perhaps a normal end, targets not yet removed
        (["down", "down"], True, "down", 1),
        (["finished", "down"], True, "down", 1),
        (["finished", "finished"], False, "finished", 0),
        # Targets gone, a rank that did not say it finished, no record here: said apart.
        (["gone", "finished"], False, "ended", 4),
    ],
)
def test_job_status_and_when_until_done_stops(statuses, ranks_down_firing, job, outcome):
    ranks = [rank_state(i, status=s, answered=s != "starting") for i, s in enumerate(statuses)]
    assert job_status(ranks) == job
    snapshot = JobSnapshot("j", NOW, status=job, ranks=ranks, ranks_down_firing=ranks_down_firing)
    assert snapshot.outcome == outcome


@pytest.mark.parametrize(
    ("prometheus_status", "recorded", "shown", "outcome"),
    [
        # Long after the job: Prometheus has nothing within its lookback, the record remembers.
        ("waiting", "finished", "finished", 0),
        ("waiting", "stopped", "stopped", 3),
        ("waiting", "failed", "failed", 1),
        ("waiting", "lost", "lost", 1),
        # Stopped: its targets are gone; the record tells stopped from finished.
        ("ended", "stopped", "stopped", 3),
        ("ended", None, "ended", 4),
        # A job still running per Prometheus is not overruled.
        ("running", None, "running", None),
        ("waiting", None, "waiting", None),
    ],
)
def test_the_launchers_record_says_how_a_job_ended(prometheus_status, recorded, shown, outcome):
    frame = with_record(JobSnapshot("j", NOW, status=prometheus_status), recorded)
    assert (frame.status, frame.outcome) == (shown, outcome)


def test_a_young_job_rates_its_totals_since_its_start():
    """Sixteen seconds in, a 1-minute rate counts 44 s before the job existed."""
    windowed = (0.53, 533.0)  # what the recorded 1-minute rates say 16 s in
    young = job_rates(windowed=windowed, totals=(32, 32_000.0), started_at=NOW - 16, taken_at=NOW)
    assert young == (2.0, 2000.0)  # 32 steps and 32,000 tokens in 16 s
    frame = JobSnapshot("j", NOW, status="running", steps=32, target_steps=1000,
                        steps_per_second=young[0])  # fmt: skip
    assert frame.eta_seconds == (1000 - 32) / 2.0
    # A minute in, the windowed rates hold; before any step, nothing to rate.
    assert job_rates(windowed=windowed, totals=(32, 1.0), started_at=NOW - 61, taken_at=NOW) == (
        windowed
    )
    assert job_rates(windowed=windowed, totals=(0, 0.0), started_at=NOW - 5, taken_at=NOW) == (
        windowed
    )


# -- the command without servers ------------------------------------------------------------------


def ugro(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ugro.console", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_bad_job_id_is_a_one_line_error_and_exit_2():
    result = ugro("watch", "no spaces/please", "--once")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ugro watch: job id 'no spaces/please': expected 1-128 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    ]


def test_interval_must_be_positive():
    result = ugro("watch", "job-1", "--interval", "0")
    assert result.returncode == 2
    assert "--interval: expected a number of seconds > 0, got '0'" in result.stderr


def test_once_against_closed_ports_prints_the_message_and_exits_1():
    prometheus, alertmanager = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    result = ugro(
        "--prometheus", prometheus, "--alertmanager", alertmanager, "watch", "j", "--once"
    )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stdout + result.stderr
    assert f"Prometheus at {prometheus} does not answer:" in result.stdout
    assert f"Alertmanager at {alertmanager} does not answer:" in result.stdout
    assert "retrying" not in result.stdout  # one frame: nothing is retried


@pytest.mark.parametrize(("state", "code"), [("stopped", 3), ("finished", 0), ("failed", 1)])
def test_until_done_for_a_long_gone_job_answers_from_its_record(tmp_path, state, code):
    """Hours later Prometheus has nothing within the lookback (here it does not even answer):
    the launcher's record on this machine says how the job ended, and the command exits."""
    from ugro.launcher import records

    env_state = {"UGRO_STATE_DIR": str(tmp_path)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UGRO_STATE_DIR", str(tmp_path))
        records.JobRecord(
            job_id="old-job", inventory="/nonexistent/inventory.yml", nodes=["node-a"],
            nproc_per_node=1, command=["train.py"], rdzv_port=29500,
            started_at=NOW - 86400, state=state, ended_at=NOW - 80000,
        ).save()  # fmt: skip
    closed = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "ugro.console", "--prometheus", closed, "--alertmanager", closed,
         "watch", "old-job", "--until-done"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", **env_state},
    )  # fmt: skip
    assert result.returncode == code, result
    assert state.upper() in result.stdout


# -- against a real run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = AlertStack(tmp_path_factory.mktemp("watch"))
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def exporter(stack):
    """The node's ugro-exporter with two fake H100s, whose UUIDs the ranks claim."""
    with fake_gpu_exporter(stack) as process:
        yield process


def start_job(stack: AlertStack, job_id: str, *trainer_args: str) -> TrainingJob:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UGRO_GPU_UUIDS", ",".join(FAKE_GPU_UUIDS[:2]))
        return TrainingJob(stack, job_id, [*SMALL_MODEL, *trainer_args])


def live_snapshot(stack: AlertStack, job_id: str) -> JobSnapshot | None:
    """A snapshot once every per-rank quantity has a value for both ranks (rates need two
    scrapes, GPU readings the exporter's) and both are "ok" (in the first seconds one rank can
    be a transient straggler: the alert waits 5 minutes before it says so, the view does not)."""
    snapshot = gather(
        job_id,
        Prometheus(stack.prometheus_url),
        Alertmanager(stack.alertmanager_url),
    )
    ranks = snapshot.ranks
    fields = ("tokens_per_second", "loss_mean", "step_seconds", "gpu_utilization", "loss_last",
              "straggler_score")  # fmt: skip
    if len(ranks) == 2 and all(
        getattr(r, f) is not None and r.steps_per_second > 0 and r.status == "ok"
        for r in ranks
        for f in fields
    ):
        return snapshot
    return None


class Proxy:
    """Forwards GETs to ``upstream`` from a port that ``close()`` shuts and ``open()`` reopens:
    a Prometheus that goes away and comes back at the same address."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: ThreadingHTTPServer | None = None
        self.open()

    def open(self) -> None:
        upstream = self.upstream

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    with urllib.request.urlopen(upstream + self.path, timeout=10) as response:
                        status, body = response.status, response.read()
                except urllib.error.HTTPError as error:
                    status, body = error.code, error.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class Tmux:
    """One tmux session on a private server socket, so a user's tmux is never touched."""

    def __init__(self, name: str) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed: apt-get install tmux")
        self.socket = f"ugro-test-{name}-{os.getpid()}"
        self.session = name

    def tmux(self, *args: str) -> str:
        # The server inherits the first client's environment: a COLUMNS or LINES from the test
        # run's own terminal would override the pane's size for everything inside it.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10, env=env
        ).stdout

    def start(self, command: str) -> None:
        # remain-on-exit keeps the last screen after the command ended, to look for tracebacks.
        # No user configuration: a user's ~/.tmux.conf must not change what the test sees.
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", self.session, "-x", "160",
                  "-y", "40", command, ";", "set-option", "-t", self.session,
                  "remain-on-exit", "on")  # fmt: skip

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def kill(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            socket_path = self.tmux("display-message", "-p", "#{socket_path}").strip()
            self.tmux("kill-server")
            if socket_path:  # tmux leaves the socket file behind
                pathlib.Path(socket_path).unlink(missing_ok=True)


# Columns shown only where some rank has a value (GPM GPUs, a loop that declared FLOPs).
OPTIONAL_COLUMNS = {"SM", "MFU"}


def table_rows(screen: str) -> list[list[str]]:
    """The per-rank table's rows, as cell texts (cells are at least two spaces apart), without
    the optional columns, so that every row has the same ten cells."""
    rows, keep = [], None
    for line in screen.splitlines():
        cells = re.split(r"\s{2,}", line.strip("│ \t"))
        if cells[0] == "Rank":
            keep = [i for i, name in enumerate(cells) if name not in OPTIONAL_COLUMNS]
        elif keep and cells[0].isdigit():
            kept = [cells[i] for i in keep if i < len(cells)]
            if len(kept) == 10:
                rows.append(kept)
    return rows


def live_rows(screen: str) -> dict[str, list[str]]:
    """Rows whose loss, tokens/s and step time are numbers, and whose rank is "ok"."""
    number = re.compile(r"^[0-9][0-9,]*(\.[0-9]+)?( ms| s)?$")
    return {
        cells[0]: cells
        for cells in table_rows(screen)
        if all(number.match(cells[i]) for i in (2, 4, 5, 7, 8)) and cells[-1] == "ok"
    }


@pytest.fixture
def tmux(request):
    session = Tmux(request.node.name[:40].replace("[", "-").replace("]", ""))
    yield session
    session.kill()


# Records the command's exit code where the test can read it. Its own SIGINT handler lets the
# Ctrl-C that tmux delivers to the foreground process group reach only the watched command.
RECORD_EXIT = textwrap.dedent(
    """
    import pathlib, signal, subprocess, sys
    signal.signal(signal.SIGINT, lambda *_: None)
    code = subprocess.call(sys.argv[2:])
    pathlib.Path(sys.argv[1]).write_text(f"{code}\\n")
    """
)


@pytest.fixture(scope="class")
def running(stack, exporter):
    """A 2-rank job that runs while the tests of one class look at it."""
    job = start_job(stack, "watch-live", "--steps", "1000000")
    yield job
    job.stop()


class TestARunningJob:
    """Against one long 2-rank run, stopped before the tests that run their own jobs."""

    def test_gather_reads_every_rank_of_a_running_job(self, stack, running):
        stack.post_alerts(
            [
                {
                    "labels": {
                        "alertname": "TrainingLossSpike",
                        "severity": "warning",
                        "job_id": "watch-live",
                        "rank": "1",
                        "node": "node-a",
                    },
                    "annotations": {"summary": LOSS_SPIKE_SUMMARY},
                }
            ]
        )
        snapshot = wait_for(lambda: live_snapshot(stack, "watch-live"), 90, "both ranks' values")
        assert snapshot.prometheus_error is None and snapshot.alertmanager_error is None
        assert snapshot.status == "running"
        assert snapshot.world_size == 2
        assert snapshot.target_steps == 1_000_000
        assert 0 < snapshot.steps < 1_000_000
        assert 0 < snapshot.progress < 1
        assert snapshot.tokens_per_second > 0 and snapshot.steps_per_second > 0
        assert snapshot.eta_seconds > 0
        assert 0 < snapshot.elapsed_seconds < 300
        assert [r.rank for r in snapshot.ranks] == [0, 1]
        for rank in snapshot.ranks:
            assert rank.node == "node-a" and rank.up is True
            assert rank.status == "ok", rank
            assert rank.steps > 0 and rank.target_steps == 1_000_000
            assert 0 < rank.loss_last < 10 and 0 < rank.loss_mean < 10
            assert 0 < rank.learning_rate < 1
            assert rank.tokens_per_second > 0 and 0 < rank.step_seconds < 5
            assert 0 <= rank.seconds_since_step < 30
            assert rank.recent_nonfinite == 0
            assert rank.straggler_score == pytest.approx(1, abs=0.2)
            assert 0 < rank.gpu_utilization <= 1  # the fake GPU the rank claims, joined by UUID

        def the_alert():
            prometheus = Prometheus(stack.prometheus_url)
            alerts = gather("watch-live", prometheus, Alertmanager(stack.alertmanager_url))
            return alerts.alerts and alerts.alerts[0]

        alert = wait_for(the_alert, 30, "the posted alert")
        assert (alert.name, alert.severity, alert.where) == (
            "TrainingLossSpike",
            "warning",
            "rank 1 on node-a",
        )
        assert alert.summary == LOSS_SPIKE_SUMMARY
        assert abs(time.time() - alert.since) < 60

    def test_watch_in_tmux_shows_live_ranks_survives_an_outage_and_exits_0_on_ctrl_c(
        self, stack, running, tmux, tmp_path
    ):
        proxy = Proxy(stack.prometheus_url)
        exit_file = tmp_path / "exit-code"
        wrapper = tmp_path / "record_exit.py"
        wrapper.write_text(RECORD_EXIT)
        python = sys.executable
        tmux.start(
            f"cd {ROOT} && {python} {wrapper} {exit_file} {python} -m ugro.console "
            f"--prometheus {proxy.url} --alertmanager {stack.alertmanager_url} "
            "watch watch-live --interval 1"
        )
        try:
            # Both ranks with live numbers, and still moving a refresh later.
            def both_live() -> str | None:
                screen = tmux.screen()
                return screen if len(live_rows(screen)) == 2 else None

            first = wait_for(both_live, 90, "both ranks' rows with live values")
            rows = live_rows(first)
            assert sorted(rows) == ["0", "1"]
            assert all(row[1] == "node-a" and row[-1] == "ok" for row in rows.values()), first
            assert "RUNNING" in first and "world size 2" in first
            steps = {rank: int(row[2].replace(",", "")) for rank, row in rows.items()}

            def moved() -> bool:
                now = live_rows(tmux.screen())
                return len(now) == 2 and all(
                    int(row[2].replace(",", "")) > steps[rank] for rank, row in now.items()
                )

            wait_for(moved, 30, "the step counts to move")
            print(tmux.screen())  # shown with -s: what a user sees

            # Prometheus goes away: a message, no traceback, and the view keeps retrying...
            proxy.close()
            gone = wait_for(
                lambda: "does not answer" in (s := tmux.screen()) and s, 30, "the outage message"
            )
            assert f"Prometheus at {proxy.url} does not answer" in gone
            assert "retrying every 1 s" in gone
            assert "Traceback" not in gone and not exit_file.exists()
            # ...and shows the ranks again once it is back.
            proxy.open()
            wait_for(both_live, 30, "both ranks' rows after the outage")

            tmux.tmux("send-keys", "-t", tmux.session, "C-c")
            wait_for(exit_file.exists, 15, "the command to exit")
            assert exit_file.read_text().strip() == "0"
            final = tmux.screen()
            assert "Traceback" not in final and "KeyboardInterrupt" not in final
            assert len(table_rows(final)) == 2  # the last frame stays on the screen
        finally:
            proxy.close()


def test_until_done_exits_0_when_the_job_finishes_and_1_when_it_crashes(stack, exporter):
    """Both jobs at once, each with its own watch, to pay torch's start-up once."""
    cases = {  # job id: (trainer arguments, exit code, the job's final status)
        "watch-finishes": (["--steps", "120", "--linger", "2"], 0, "FINISHED"),
        "watch-crashes": (["--steps=100000"], 1, "DOWN"),
    }
    watches, jobs = {}, {}
    try:
        for job_id, (trainer_args, _, _) in cases.items():
            # Started before the job: it waits for the job's series rather than ending at once.
            watches[job_id] = subprocess.Popen(
                [sys.executable, "-m", "ugro.console", "--prometheus", stack.prometheus_url,
                 "--alertmanager", stack.alertmanager_url, "watch", job_id, "--until-done",
                 "--interval", "1"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                env={**os.environ, "COLUMNS": "160"},
            )  # fmt: skip
            jobs[job_id] = start_job(stack, job_id, *trainer_args)
        # The crash comes once Prometheus has seen both ranks: a rank that dies before its
        # first scrape never answered, so it is "starting", not down, and the watch waits (a
        # self-timed crash at some step raced the first scrape on a loaded machine).
        wait_for(
            lambda: len(stack.query('up{job_id="watch-crashes"} == 1')) == 2, 120, "both ranks up"
        )
        os.kill(jobs["watch-crashes"].rank_pid(1), signal.SIGKILL)
        outputs = {job_id: watch.communicate(timeout=150) for job_id, watch in watches.items()}
    finally:
        for watch in watches.values():
            if watch.poll() is None:
                watch.kill()
                watch.communicate()
        for job in jobs.values():
            job.stop()

    for job_id, (_, exit_code, status) in cases.items():
        out, err = outputs[job_id]
        assert watches[job_id].returncode == exit_code, out + err
        assert err == ""
        # Not a terminal: the last frame only, written when the command ends.
        assert out.count(f"ugro watch · job {job_id}") == 1
        assert f" {status} " in out, out
        rows = table_rows(out)
        assert [row[0] for row in rows] == ["0", "1"], out
        if status == "FINISHED":
            assert "step 120 / 120 (100.0 %)" in out, out
            assert {row[-1] for row in rows} == {"finished"}, out
        else:
            assert {row[-1] for row in rows} == {"down"}, out
