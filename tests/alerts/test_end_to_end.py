"""Faults in a real 2-rank torchrun job reach Slack and email through the real Prometheus and
Alertmanager; a job that finishes normally reaches nobody.

Timings come from the test overlay in tests/support/stack.py (1 s intervals, short `for:`);
every rule, route, inhibition and template is the project's own.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.support import wait_for
from tests.support.fake_gpu import fake_gpu_exporter
from tests.support.models import SMALL_MODEL
from tests.support.net import http_json
from tests.support.stack import AlertStack
from tests.support.training import TrainingJob
from ugro.console.localstack import LOCAL_THRESHOLDS

LONG_RUN = ["--steps", "1000000"]  # stopped by the test


@pytest.fixture
def stack(tmp_path, request):
    stack = AlertStack(tmp_path)
    yield stack
    stack.close()
    report = getattr(request.node, "call_report", None)
    if report is not None and report.failed:
        # What the stack saw, for a failure that only a full picture explains.
        print("Slack posts:", *stack.slack.texts(), sep="\n")
        for log in sorted(tmp_path.rglob("*.log")):
            print(f"--- {log.name}", log.read_text()[-3000:], sep="\n")


@pytest.fixture
def exporter(stack):
    """The node's ugro-exporter, registered like ugro-launch registers it."""
    with fake_gpu_exporter(stack) as process:
        yield process


def ranks_up(stack: AlertStack, job_id: str) -> int:
    return len(stack.query(f'up{{job="ugro-ranks",job_id="{job_id}"}} == 1'))


def slack_posts_for(stack: AlertStack, alertname: str, status: str) -> list[str]:
    return [
        text
        for name, text in zip(stack.slack_alertnames(), stack.slack.texts(), strict=True)
        if name == alertname and text.startswith(f"[{status.upper()}")
    ]


def emails_for(stack: AlertStack, alertname: str, status: str) -> list[str]:
    return [t for t in stack.mail.texts() if t.startswith(f"[ugro {status}] {alertname}")]


def test_nonfinite_loss_notifies_slack_and_email_naming_the_rank_then_resolves(
    stack, exporter, jobs
):
    job = jobs(
        "e2e-nan",
        *LONG_RUN,
        "--fault-rank=1",
        "--nonfinite-loss-from=200",
        "--nonfinite-loss-steps=5",
    )
    # Under DDP the poisoned loss makes every rank's gradient norm non-finite too; the ranks'
    # alerts may reach Alertmanager one evaluation apart, so wait for the post naming rank 1.
    rank_1 = "Rank 1 of job e2e-nan on node node-a"
    firing = wait_for(
        lambda: [
            text
            for text in slack_posts_for(stack, "TrainingNonFiniteValues", "firing")
            if rank_1 in text
        ],
        90,
        "a Slack post naming rank 1",
    )[0]
    assert "job e2e-nan" in firing
    assert re.search(rf"{rank_1}: [0-9.]+ step\(s\) with a non-finite loss", firing)
    assert "*CRITICAL*" in firing
    assert "runbook.md#trainingnonfinitevalues" in firing

    mail = wait_for(
        lambda: [m for m in emails_for(stack, "TrainingNonFiniteValues", "firing") if rank_1 in m],
        30,
        "an email naming rank 1",
    )[0]
    assert mail.startswith("[ugro firing] TrainingNonFiniteValues job e2e-nan on node-a")
    assert "Where: job e2e-nan rank 1 node node-a" in mail
    assert stack.mail.logins == ["ugro-alerts@example.org"] * len(stack.mail.messages)

    # The fault lasts 5 steps; training goes on, so the alert clears and says so.
    wait_for(lambda: slack_posts_for(stack, "TrainingNonFiniteValues", "resolved"), 60, "resolved")
    wait_for(lambda: emails_for(stack, "TrainingNonFiniteValues", "resolved"), 30, "resolved mail")
    assert job.process.poll() is None, "training must survive the non-finite steps"
    assert set(stack.slack_alertnames()) == {"TrainingNonFiniteValues"}


def test_killed_rank_raises_one_ranks_down_notification(stack, exporter, jobs):
    job = jobs("e2e-kill", *LONG_RUN)
    wait_for(lambda: ranks_up(stack, "e2e-kill") == 2, 60, "both ranks scraped")
    os.kill(job.rank_pid(1), signal.SIGKILL)
    assert job.wait(timeout=60) != 0  # torchrun tears the job down and fails

    firing = wait_for(
        lambda: slack_posts_for(stack, "TrainingRanksDown", "firing"), 60, "Slack post"
    )[0]
    assert "job e2e-kill" in firing
    assert "stopped answering before the job finished" in firing
    assert "rank 1 on node-a" in firing
    wait_for(lambda: emails_for(stack, "TrainingRanksDown", "firing"), 30, "email")

    # A crashed job raises exactly one clear alert: not one per rank, no stall or straggler.
    time.sleep(5)
    assert stack.slack_alertnames() == ["TrainingRanksDown"]
    assert len(stack.mail.messages) == 1
    down = [a for a in stack.firing() if a["labels"]["alertname"] == "TrainingRanksDown"]
    assert [a["labels"]["job_id"] for a in down] == ["e2e-kill"]


def test_slow_rank_raises_a_straggler_warning_naming_that_rank(stack, exporter, jobs):
    jobs("e2e-slow", *LONG_RUN, "--fault-rank=1", "--slow-factor=4")
    firing = wait_for(
        lambda: slack_posts_for(stack, "TrainingStragglerRank", "firing"), 120, "Slack post"
    )[0]
    assert "Rank 1 of job e2e-slow on node node-a" in firing
    assert "Rank 0" not in firing
    assert "*WARNING*" in firing
    stragglers = [a for a in stack.firing() if a["labels"]["alertname"] == "TrainingStragglerRank"]
    assert [a["labels"]["rank"] for a in stragglers] == ["1"]
    # Warnings go to Slack only.
    time.sleep(2)
    assert stack.mail.messages == []


def test_job_that_finishes_normally_notifies_nobody(stack, exporter, jobs):
    # About a second of training, right after Prometheus started: possibly over before its
    # first scrape of the ranks. Each rank waits at its end for the scrape that takes its final
    # values (UGRO_REGISTERED_TARGET), so the run is seen whole all the same.
    job = jobs("e2e-done", "--steps=150")
    assert job.wait(timeout=120) == 0
    # Longer than every test `for:` plus the group wait: anything pending would have fired.
    time.sleep(12)
    assert stack.slack.texts() == []
    assert stack.mail.messages == []
    assert stack.firing() == []
    # The run was watched: both ranks' final step counts and their ends reached Prometheus.
    steps = stack.query('max_over_time(ugro_train_steps_total{job_id="e2e-done"}[5m])')
    assert sorted((s["metric"]["rank"], float(s["value"][1])) for s in steps) == [
        ("0", 150.0),
        ("1", 150.0),
    ]
    ended = stack.query('last_over_time(ugro_train_end_time_seconds{job_id="e2e-done"}[5m])')
    assert sorted(s["metric"]["rank"] for s in ended) == ["0", "1"]
    assert stack.query('up{job_id="e2e-done"}') == []  # targets gone with the job


# The production `for:` windows (thresholds.yml as it is) and the demo's short ones.
WINDOWS = {
    "production": {},
    "demo": dict(LOCAL_THRESHOLDS),
}


@pytest.mark.parametrize("windows", list(WINDOWS))
def test_a_slow_start_and_an_exit_without_linger_notify_nobody(tmp_path, windows):
    """A user's script builds its model for 35 s before Telemetry starts (its targets are
    registered at launch, so every scrape fails until then), trains, and exits at once without
    lingering; its targets are never removed (a lost watcher). Neither end is a crash."""
    start_delay = 35  # longer than the production 30 s TrainingRanksDown window
    stack = AlertStack(tmp_path, dict(WINDOWS[windows]))  # production: thresholds.yml as it is
    try:
        rules = http_json(f"{stack.prometheus_url}/api/v1/rules")["data"]["groups"]
        down_for = {30: "production", 10: "demo"}
        assert [
            down_for[rule["duration"]]
            for group in rules
            for rule in group["rules"]
            if rule["name"] == "TrainingRanksDown"
        ] == [windows]
        job = TrainingJob(
            stack,
            "e2e-slow-start",
            [*SMALL_MODEL, "--steps=60", f"--start-delay={start_delay}"],
            deregister=False,
        )
        try:
            wait_for(lambda: ranks_up(stack, "e2e-slow-start") == 2, 120, "both ranks up")
            # Every scrape failed for longer than the down window: the ranks were starting.
            failed = stack.query('count_over_time((up{job_id="e2e-slow-start"} == 0)[2m:1s])')
            assert min(float(s["value"][1]) for s in failed) > 30
            assert job.wait(timeout=120) == 0
            # The rank processes are gone; their targets stay and fail every scrape.
            time.sleep(35 + 3)  # past the longest `for:` and Alertmanager's group wait
            assert stack.query('up{job_id="e2e-slow-start"} == 0') != []
            ended = stack.query('job_rank:ugro_train_ended:latch{job_id="e2e-slow-start"}')
            assert sorted(s["metric"]["rank"] for s in ended) == ["0", "1"]
            assert stack.query('job_rank:ugro_train_down:bool{job_id="e2e-slow-start"}') == []
            assert stack.query("ALERTS") == [], "no alert, not even pending"
            assert stack.slack.texts() == []
            assert stack.mail.messages == []
            # The last step reached Prometheus without --linger.
            steps = stack.query(
                'max_over_time(ugro_train_steps_total{job_id="e2e-slow-start"}[5m])'
            )
            assert [float(s["value"][1]) for s in steps] == [60.0, 60.0]
        finally:
            job.stop()
    finally:
        stack.close()


def test_inhibitions_silence_what_a_bigger_failure_explains(stack):
    def alert(name: str, severity: str, **labels: str) -> dict:
        return {
            "labels": {"alertname": name, "severity": severity, **labels},
            "annotations": {"summary": name, "description": name, "runbook_url": "x"},
        }

    rank = {"job_id": "j1", "rank": "0", "node": "node-b"}
    gpu = {"node": "node-c", "gpu": "0", "gpu_uuid": "GPU-c0"}
    stack.post_alerts(
        [
            alert("NodeExporterDown", "critical", node="node-b", instance="node-b:9490"),
            alert("TrainingStalled", "critical", **rank),
            alert("GpuLost", "critical", node="node-b", gpu="1", gpu_uuid="GPU-b1"),
            alert("TrainingStalled", "critical", job_id="j3", rank="0", node="node-e"),
            alert("TrainingRanksDown", "critical", job_id="j2"),
            alert("TrainingStragglerRank", "warning", job_id="j2", rank="1", node="node-d"),
            alert("GpuTemperatureHigh", "warning", **gpu),
            alert("GpuTemperatureHigh", "critical", **gpu),
        ]
    )

    def states() -> dict[tuple, bool]:
        alerts = stack.alertmanager_alerts()
        if len(alerts) < 8:
            return {}
        return {
            (a["labels"]["alertname"], a["labels"]["severity"], a["labels"].get("node")): bool(
                a["status"]["inhibitedBy"]
            )
            for a in alerts
        }

    expected = {
        ("NodeExporterDown", "critical", "node-b"): False,
        ("TrainingStalled", "critical", "node-b"): True,  # its node is down
        ("GpuLost", "critical", "node-b"): True,  # its node is down
        ("TrainingStalled", "critical", "node-e"): False,  # another node: still news
        ("TrainingRanksDown", "critical", None): False,
        ("TrainingStragglerRank", "warning", "node-d"): True,  # its job failed
        ("GpuTemperatureHigh", "warning", "node-c"): True,  # the critical says it
        ("GpuTemperatureHigh", "critical", "node-c"): False,
    }
    # Alertmanager's inhibitor learns of new alerts in its own goroutine, which follows the
    # alert store: on a loaded machine the API can list all eight alerts before the source
    # alerts have reached the inhibitor, and shows nothing inhibited yet. Wait for the marks.
    seen: list[dict] = []

    def settled() -> bool:
        seen.append(states())
        return seen[-1] == expected

    try:
        wait_for(settled, 30, "Alertmanager to hold all alerts with their inhibitions")
    except AssertionError:
        assert seen[-1] == expected  # shows which marks differ
        raise
    # Only what is not inhibited is sent.
    wait_for(lambda: len(stack.slack.posts) >= 4, 30, "notifications")
    time.sleep(3)
    assert sorted(stack.slack_alertnames()) == [
        "GpuTemperatureHigh",
        "NodeExporterDown",
        "TrainingRanksDown",
        "TrainingStalled",
    ]
    assert "node-e" in next(t for t in stack.slack.texts() if "TrainingStalled" in t)
