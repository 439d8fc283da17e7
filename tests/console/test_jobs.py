"""``ugro jobs`` against a real Prometheus that watched three real torchrun jobs at once:

* ``jobs-finished``: 2 ranks naming fake GPUs (``UGRO_GPU_UUIDS``), 60 steps, exits 0 (its
  targets are removed, as ugro-launch does); this machine also has ugro-launch's record of it,
  launched 20 s before its telemetry started;
* ``jobs-crashed``: 2 CPU ranks; rank 1 is killed once Prometheus scraped both, torchrun
  exits non-zero, the targets stay and ``TrainingRanksDown`` fires;
* ``jobs-running``: 1 rank naming a fake GPU, still stepping while the tests look.

Besides, ugro-launch records of a stopped job Prometheus never saw (within the lookback) and
of a job launched 30 days ago. Each job's figures are checked against ``ugro report --json`` of
the same job (another path through the same series) and against what the runs are known to
have done: the ranks, nodes, GPUs and tokens they were given.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support import wait_for
from tests.support.fake_gpu import FAKE_GPU_UUIDS
from tests.support.models import SMALL_MODEL
from tests.support.net import free_port
from tests.support.stack import AlertStack
from tests.support.training import TrainingJob
from ugro.console import cli, jobs
from ugro.launcher import records

FINISHED, CRASHED, RUNNING = "jobs-finished", "jobs-crashed", "jobs-running"
STOPPED, ANCIENT = "jobs-stopped", "jobs-ancient"
STEPS, BATCH, CONTEXT = 60, 8, 32
LAUNCH_BEFORE_TELEMETRY = 20.0
# Where to keep the table that test_the_table checks, when set (for a closing note or a README).
CAPTURE = os.environ.get("UGRO_JOBS_CAPTURE")


def ugro(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    """ugro-launch's records on "this machine": none until ``runs`` writes some."""
    directory = tmp_path_factory.mktemp("launcher-records")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UGRO_STATE_DIR", str(directory))
        yield directory


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = AlertStack(tmp_path_factory.mktemp("jobs"))
    yield stack
    stack.close()


def _start(stack: AlertStack, job_id: str, gpus: int, *args: str, processes: int = 2):
    with pytest.MonkeyPatch.context() as patch:
        if gpus:
            patch.setenv("UGRO_GPU_UUIDS", ",".join(FAKE_GPU_UUIDS[:gpus]))
        else:
            patch.delenv("UGRO_GPU_UUIDS", raising=False)
        return TrainingJob(stack, job_id, [*SMALL_MODEL, *args], processes=processes)


def _separate(jobs_: list[TrainingJob]) -> bool:
    """Whether no two jobs picked overlapping metrics ports (each picks before any listens)."""
    spans = sorted((j.base_port, j.base_port + 2) for j in jobs_)
    return all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def _record(job_id: str, started_at: float, state: str, **extra: object) -> None:
    records.JobRecord(
        job_id=job_id, inventory="/nonexistent/inventory.yml", nodes=["node-a"],
        nproc_per_node=2, command=["-m", "ugro.trainer.train"], rdzv_port=29500,
        started_at=started_at, state=state, **extra,
    ).save()  # fmt: skip


@pytest.fixture(scope="module")
def runs(stack, state_dir):
    """The three jobs, the crashed one crashed and the finished one finished, and the records."""
    started: list[TrainingJob] = []
    try:
        while True:
            trio = [
                _start(stack, FINISHED, 2, f"--steps={STEPS}", "--linger=5", "--seed=0"),
                _start(stack, CRASHED, 0, "--steps=100000"),
                # Its input pipeline sleeps (4× its compute): it keeps stepping while taking
                # little of the two cores from the other jobs.
                _start(
                    stack,
                    RUNNING,
                    1,
                    "--steps=1000000",
                    "--fault-rank=0",
                    "--slow-factor=5",
                    processes=1,
                ),
            ]
            started += trio
            if _separate(trio):
                break
            for job in trio:
                job.stop()
        finished, crashed, running = trio
        # The crash comes once Prometheus has scraped both ranks some steps in: a rank that
        # dies before its first scrape never answered, and is not "down".
        wait_for(
            lambda: len(stack.query(f'ugro_train_steps_total{{job_id="{CRASHED}"}} >= 20')) == 2,
            120,
            "both ranks of the job to crash stepping",
        )
        os.kill(crashed.rank_pid(1), signal.SIGKILL)
        assert crashed.wait(timeout=120) != 0
        assert finished.wait(timeout=180) == 0, finished.log.read_text()[-3000:]
        wait_for(
            lambda: stack.query(
                f'ALERTS{{alertname="TrainingRanksDown",alertstate="firing",job_id="{CRASHED}"}}'
            ),
            90,
            "TrainingRanksDown for the crashed job",
        )
        wait_for(
            lambda: (
                sorted(
                    float(s["value"][1])
                    for s in stack.query(
                        f'last_over_time(ugro_train_steps_total{{job_id="{FINISHED}"}}[5m])'
                    )
                )
                == [STEPS, STEPS]
                and not stack.query(f'up{{job_id="{FINISHED}"}}')
            ),
            30,
            "Prometheus to hold the finished job's final steps, its targets removed",
        )
        wait_for(
            lambda: stack.query(
                f'ugro_train_step_duration_seconds_count{{job_id="{RUNNING}"}} > 0'
            ),
            60,
            "the running job to step",
        )
        first = stack.query(
            f'min(min_over_time(ugro_train_start_time_seconds{{job_id="{FINISHED}"}}[10m]))'
        )
        telemetry_start = float(first[0]["value"][1])
        now = time.time()
        _record(FINISHED, telemetry_start - LAUNCH_BEFORE_TELEMETRY, records.FINISHED,
                ended_at=now)  # fmt: skip
        records.JobRecord(
            job_id=STOPPED, inventory="/nonexistent/inventory.yml", nodes=["node-b", "node-c"],
            nproc_per_node=4, command=["-m", "ugro.trainer.train"], rdzv_port=29500,
            started_at=now - 3600, ended_at=now - 3000, state=records.STOPPED,
        ).save()  # fmt: skip
        _record(ANCIENT, now - 30 * 86400, records.FINISHED, ended_at=now - 30 * 86400 + 60)
        yield {FINISHED: finished, CRASHED: crashed, RUNNING: running}
    finally:
        for job in started:
            job.stop()


@pytest.fixture(scope="module")
def reports(stack, runs) -> dict[str, dict]:
    """``ugro report --json`` of each job that Prometheus saw."""
    out = {}
    for job_id in (FINISHED, CRASHED, RUNNING):
        with contextlib.redirect_stdout(io.StringIO()) as captured:
            code = cli.main(["--prometheus", stack.prometheus_url, "report", job_id, "--json"])
        assert code == 0
        out[job_id] = json.loads(captured.getvalue())
    return out


@pytest.fixture(scope="module")
def listed(stack, runs, reports) -> dict:
    """``ugro jobs --json --top 2``, parsed, and when it ran (this machine's clock)."""
    before = time.time()
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        code = cli.main(["jobs", "--prometheus", stack.prometheus_url, "--json", "--top", "2"])
    after = time.time()
    assert code == 0
    return {"document": json.loads(captured.getvalue()), "before": before, "after": after}


def _by_id(document: dict) -> dict[str, dict]:
    return {job["job_id"]: job for job in document["jobs"]}


# -- the figures ----------------------------------------------------------------------------


def test_every_job_of_the_lookback_is_listed_newest_first(listed):
    document = listed["document"]
    ids = [job["job_id"] for job in document["jobs"]]
    # The ancient record lies outside the 7 days; the others are all there, newest first.
    assert sorted(ids) == sorted([FINISHED, CRASHED, RUNNING, STOPPED])
    starts = [job["time"]["start"] for job in document["jobs"]]
    assert starts == sorted(starts, reverse=True)
    assert ids[-1] == STOPPED  # launched an hour ago
    assert document["lookback_seconds"] == 7 * 86400
    assert document["local_only"] is False and document["prometheus_error"] is None


def test_statuses_follow_the_reports(listed, reports):
    jobs_ = _by_id(listed["document"])
    assert {job: jobs_[job]["status"] for job in jobs_} == {
        FINISHED: "finished",
        CRASHED: "failed",
        RUNNING: "running",
        STOPPED: "stopped",
    }
    for job_id, report in reports.items():
        assert jobs_[job_id]["status"] == report["status"]
    assert jobs_[FINISHED]["source"] == {"prometheus": True, "local_record": True}
    assert jobs_[CRASHED]["source"] == {"prometheus": True, "local_record": False}
    assert jobs_[STOPPED]["source"] == {"prometheus": False, "local_record": True}


def test_durations_ranks_and_gpu_hours(listed, reports):
    jobs_ = _by_id(listed["document"])
    finished, crashed, running = jobs_[FINISHED], jobs_[CRASHED], jobs_[RUNNING]
    # The finished job counts from its launch (the record), 20 s before its telemetry.
    assert finished["time"]["start"] == reports[FINISHED]["time"]["start"]
    assert finished["time"]["duration_seconds"] == reports[FINISHED]["time"]["duration_seconds"]
    assert finished["time"]["end"] == reports[FINISHED]["time"]["end"]
    assert finished["time"]["duration_seconds"] > LAUNCH_BEFORE_TELEMETRY
    # The crashed job ends at its last step.
    assert crashed["time"]["end"] == reports[CRASHED]["time"]["end"]
    assert crashed["time"]["duration_seconds"] == reports[CRASHED]["time"]["duration_seconds"]
    # The running one lasts until the query.
    lasted = running["time"]["duration_seconds"]
    start = running["time"]["start"]
    assert listed["before"] - start - 1 <= lasted <= listed["after"] - start + 1

    assert (finished["ranks"], finished["nodes"]) == (2, ["node-a"])
    assert (crashed["ranks"], crashed["nodes"]) == (2, ["node-a"])
    assert (running["ranks"], running["nodes"]) == (1, ["node-a"])
    assert finished["gpu"] == {
        "ranks": 2,
        "cpu_ranks": 0,
        "hours": 2 * finished["time"]["duration_seconds"] / 3600,
    }
    assert crashed["gpu"] == {"ranks": 0, "cpu_ranks": 2, "hours": 0.0}  # CPU ranks count 0
    assert running["gpu"] == {
        "ranks": 1,
        "cpu_ranks": 0,
        "hours": running["time"]["duration_seconds"] / 3600,
    }
    # Known only from the record: its nodes × ranks per node, its own start and end.
    stopped = jobs_[STOPPED]
    assert (stopped["ranks"], stopped["nodes"]) == (8, ["node-b", "node-c"])
    assert stopped["time"]["duration_seconds"] == pytest.approx(600)
    assert stopped["gpu"] == {"ranks": None, "cpu_ranks": None, "hours": None}
    assert stopped["tokens_per_second_mean"] is None and stopped["alerts"] == []


def test_throughput_loss_and_alerts_are_the_reports(listed, reports):
    jobs_ = _by_id(listed["document"])
    assert jobs_[FINISHED]["tokens"] == 2 * STEPS * BATCH * CONTEXT
    for job_id, report in reports.items():
        job = jobs_[job_id]
        if job_id != RUNNING:  # the running job moved on between the two commands
            assert job["tokens"] == report["work"]["tokens"]
            assert job["tokens_per_second_mean"] == pytest.approx(
                report["throughput"]["tokens_per_second_mean"], rel=1e-9
            )
            assert job["loss_final"] == pytest.approx(report["loss"]["final"], rel=1e-9)
        assert job["tokens_per_second_mean"] > 0
        assert 0 < job["loss_final"] < 10
        fired = {a["alertname"] for a in job["alerts"]}
        assert fired <= {a["alertname"] for a in report["alerts"]}
        assert all(a["series"] >= 1 for a in job["alerts"])
    down = [a for a in jobs_[CRASHED]["alerts"] if a["alertname"] == "TrainingRanksDown"]
    assert down == [{"alertname": "TrainingRanksDown", "severity": "critical", "series": 1}]


def test_totals_and_the_top_list(listed):
    document = listed["document"]
    jobs_ = _by_id(document)
    assert document["totals"] == {
        "jobs": 4,
        "by_status": {"failed": 1, "finished": 1, "running": 1, "stopped": 1},
        "gpu_hours": pytest.approx(sum(j["gpu"]["hours"] or 0 for j in jobs_.values()), rel=1e-12),
    }
    ranked = sorted(
        (j for j in jobs_.values() if j["tokens_per_second_mean"] is not None),
        key=lambda j: -j["tokens_per_second_mean"],
    )
    assert len(ranked) == 3
    assert document["top_by_throughput"] == [
        {"job_id": j["job_id"], "tokens_per_second_mean": j["tokens_per_second_mean"]}
        for j in ranked[:2]
    ]


def test_json_shape(listed):
    document = listed["document"]
    assert list(document) == [
        "prometheus", "prometheus_error", "local_only", "lookback_seconds", "as_of", "jobs",
        "totals", "top_by_throughput",
    ]  # fmt: skip
    for job in document["jobs"]:
        assert list(job) == [
            "job_id", "status", "source", "time", "ranks", "nodes", "gpu", "tokens",
            "tokens_per_second_mean", "loss_final", "alerts",
        ]  # fmt: skip
        assert list(job["time"]) == ["start", "end", "duration_seconds", "training_seconds"]
        assert isinstance(job["time"]["start"], float)
        if job["source"]["prometheus"]:
            assert isinstance(job["tokens"], int) and isinstance(job["ranks"], int)
            assert isinstance(job["gpu"]["hours"], float)


def test_the_table(stack, listed, capsys):
    code, out, err = ugro(capsys, "--prometheus", stack.prometheus_url, "jobs", "--top", "2")
    assert code == 0, err
    assert err == ""
    if CAPTURE:
        with open(CAPTURE, "w") as file:
            file.write(f"$ ugro jobs --top 2\n{out}")
    assert "\x1b[" not in out
    lines = out.splitlines()
    assert all(len(line) <= 100 for line in lines)
    assert lines[0].startswith("Jobs in the last 7d, as of ")
    assert lines[1].startswith(f"from Prometheus at {stack.prometheus_url} and ugro-launch's")
    header = lines[3].split()
    assert header == ["job", "status", "started", "duration", "ranks", "nodes", "GPU-h",
                      "tokens/s", "loss", "alerts"]  # fmt: skip
    jobs_ = _by_id(listed["document"])

    def row(job_id: str) -> str:
        return next(line for line in lines if line.startswith(job_id))

    day_time = r"\d\d-\d\d \d\d:\d\d"
    assert re.match(rf"{FINISHED} +finished +{day_time} +\S.* +2 +1 +[\d.]+ +[\d,]+ ",
                    row(FINISHED))  # fmt: skip
    assert re.search(rf" {jobs_[FINISHED]['loss_final']:.4f} +0$", row(FINISHED))
    assert re.search(r" failed .* 2 +1 +0 \(CPU\) +[\d,]+ +[\d.]+ +1$", row(CRASHED))
    assert " running " in row(RUNNING)
    assert re.search(rf"^{STOPPED} \* +stopped +{day_time} +0:10:00 +8 +2 +– +– +– +–$",
                     row(STOPPED))  # fmt: skip
    assert "* known only from ugro-launch's record" in out
    assert re.search(
        r"^Totals: 4 jobs: 1 failed, 1 finished, 1 running, 1 stopped\n"
        rf"GPU-hours: [\d.]+ \(CPU ranks count 0: {CRASHED}\)$",
        out,
        re.M,
    )
    top = listed["document"]["top_by_throughput"]
    assert "Top 2 by throughput (mean tokens/s while training)" in out
    assert re.search(rf"^  1\. {top[0]['job_id']} +[\d,.]+$", out, re.M)
    assert re.search(rf"^  2\. {top[1]['job_id']} +[\d,.]+$", out, re.M)
    assert re.search(rf"^  {CRASHED}: .*TrainingRanksDown \(critical, 1 series\)", out, re.M)


def test_a_longer_lookback_reaches_older_records(stack, listed, capsys):
    code, out, err = ugro(capsys, "jobs", "--prometheus", stack.prometheus_url, "--lookback",
                          "60d", "--json")  # fmt: skip
    assert code == 0, err
    ancient = _by_id(json.loads(out))[ANCIENT]
    assert ancient["status"] == "finished"
    assert ancient["time"]["duration_seconds"] == pytest.approx(60)


# -- without Prometheus, without jobs, with bad options --------------------------------------


def test_prometheus_down_lists_the_local_records_and_exits_3(runs, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = ugro(capsys, "--prometheus", dead, "jobs")
    assert code == jobs.EXIT_UNAVAILABLE
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"ugro jobs: Prometheus at {dead} does not answer")
    assert err.endswith("listing ugro-launch's records on this machine only\n")
    assert out.startswith("Jobs in the last 7d: ugro-launch's records on this machine only")
    assert re.search(rf"^{FINISHED} +finished ", out, re.M)
    assert re.search(rf"^{STOPPED} +stopped ", out, re.M)
    assert CRASHED not in out and ANCIENT not in out  # no record of it; too old
    assert "Totals: 2 jobs: 1 finished, 1 stopped\nGPU-hours: unknown without Prometheus" in out

    code, out, err = ugro(capsys, "--prometheus", dead, "jobs", "--json")
    assert code == jobs.EXIT_UNAVAILABLE
    document = json.loads(out)
    assert document["local_only"] is True
    assert document["prometheus_error"].startswith(f"Prometheus at {dead} does not answer")
    assert sorted(_by_id(document)) == [FINISHED, STOPPED]
    assert all(not j["source"]["prometheus"] for j in document["jobs"])
    assert document["totals"]["gpu_hours"] is None


class _WrongShape(BaseHTTPRequestHandler):
    """Answers every query with JSON that is not Prometheus's API."""

    def do_GET(self) -> None:
        body = json.dumps({"status": "success", "data": {"result": "x"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_prometheus_that_answers_wrongly_counts_as_down(runs, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WrongShape)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, out, err = ugro(capsys, "--prometheus", url, "jobs", "--json")
    finally:
        server.shutdown()
        server.server_close()
    assert code == jobs.EXIT_UNAVAILABLE
    [line] = err.splitlines()
    assert line.startswith(f"ugro jobs: Prometheus at {url} answered /api/v1/query not as")
    document = json.loads(out)
    assert document["local_only"] is True
    assert sorted(_by_id(document)) == [FINISHED, STOPPED]


def test_an_empty_lookback_says_so_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UGRO_STATE_DIR", str(tmp_path / "no-records"))
    empty = AlertStack(tmp_path / "empty")
    try:
        code, out, err = ugro(capsys, "--prometheus", empty.prometheus_url, "jobs")
        assert (code, err) == (0, "")
        assert out == (
            f"no jobs in the last 7d: none in Prometheus at {empty.prometheus_url} nor in "
            f"ugro-launch's records in {tmp_path / 'no-records'}\n"
        )
        code, out, err = ugro(capsys, "--prometheus", empty.prometheus_url, "jobs",
                              "--lookback", "36h", "--json")  # fmt: skip
        assert code == 0, err
        document = json.loads(out)
        assert document["jobs"] == [] and document["top_by_throughput"] == []
        assert document["totals"] == {"jobs": 0, "by_status": {}, "gpu_hours": 0}
        assert document["lookback_seconds"] == 36 * 3600
    finally:
        empty.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lookback", "7x"], "argument --lookback: '7x': expected a positive whole number"),
        (["--lookback", "0d"], "argument --lookback: '0d': expected a positive whole number"),
        (["--top", "0"], "argument --top: expected a whole number >= 1, got '0'"),
        (["--prometheus", "localhost:9090"], "--prometheus 'localhost:9090': expected an http"),
    ],
)
def test_bad_options_are_a_clear_error_and_exit_2(argv, message, capsys):
    try:
        code = cli.main(["jobs", *argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert message in err
    assert "Traceback" not in err
