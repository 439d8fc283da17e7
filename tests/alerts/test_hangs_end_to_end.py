"""A hung rank is named: real 2-rank torchrun jobs, real Prometheus and Alertmanager, the Slack
recorder. A rank hung inside its forward pass or inside its input pipeline is the one
TrainingHungRank names, with its phase, and the job's TrainingStalled alerts are silenced by
it; a rank that never completes a first step raises TrainingRankNotStarted (for its job's
ranks, which wait for it inside their own first step); a healthy run with checkpoints and
evaluations raises nothing.

Timings: the test overlay of tests/support/stack.py (1 s intervals, 5 s `for:`), plus a
10 s stall floor and a 20 s not-started limit, so that a hang is caught within seconds.
"""

from __future__ import annotations

import pytest

from tests.alerts.test_end_to_end import ranks_up, slack_posts_for
from tests.support import wait_for
from tests.support.stack import TEST_THRESHOLDS, AlertStack

LONG_RUN = ["--steps", "1000000"]  # stopped by the test
HANG_THRESHOLDS = {
    **TEST_THRESHOLDS,
    "training.stall_min_seconds": 10,
    "training.not_started_seconds": 20,
    "training.not_started_for": "5s",
    # On, and far longer than any of these runs: a healthy run must not raise it.
    "training.checkpoint_max_age_seconds": 60,
    "training.checkpoint_overdue_for": "5s",
}


@pytest.fixture
def stack(tmp_path, request):
    stack = AlertStack(tmp_path, dict(HANG_THRESHOLDS))
    yield stack
    stack.close()
    report = getattr(request.node, "call_report", None)
    if report is not None and report.failed:
        print("Slack posts:", *stack.slack.texts(), sep="\n")
        for log in sorted(tmp_path.rglob("*.log")):
            print(f"--- {log.name}", log.read_text()[-3000:], sep="\n")


def firing(stack: AlertStack, alertname: str, job_id: str) -> list[dict[str, str]]:
    """The labels of each firing alert of that name and job, as Prometheus has them."""
    return [
        alert["labels"]
        for alert in stack.firing()
        if alert["labels"]["alertname"] == alertname and alert["labels"].get("job_id") == job_id
    ]


def inhibited_stalls(stack: AlertStack, job_id: str) -> list[list[str]]:
    """For each TrainingStalled alert of the job that Alertmanager holds, what inhibits it."""
    return [
        alert["status"]["inhibitedBy"]
        for alert in stack.alertmanager_alerts()
        if alert["labels"]["alertname"] == "TrainingStalled"
        and alert["labels"].get("job_id") == job_id
    ]


def assert_one_page_names_the_hung_rank(stack: AlertStack, job_id: str, phase: str) -> None:
    post = wait_for(
        lambda: slack_posts_for(stack, "TrainingHungRank", "firing"), 120, "a hung-rank page"
    )[0]
    assert f"Rank 1 of job {job_id} on node node-a is the rank its stalled job waits for" in post
    assert f"it is in phase {phase}" in post
    assert f"`ugro-launch stacks {job_id}`" in post
    assert "Rank 0" not in post
    assert "*CRITICAL*" in post and "runbook.md#traininghungrank" in post
    # Exactly rank 1, in that phase, and nothing else named.
    hung = firing(stack, "TrainingHungRank", job_id)
    assert [(a["rank"], a["phase"]) for a in hung] == [("1", phase)]
    # Every rank of the job stalled (they wait for rank 1); Alertmanager holds their stall
    # alerts, silenced by the hung-rank alert, and never sends them.
    wait_for(lambda: len(firing(stack, "TrainingStalled", job_id)) == 2, 30, "both ranks stalled")
    wait_for(
        lambda: (marks := inhibited_stalls(stack, job_id)) and all(marks),
        30,
        "the stall alerts inhibited",
    )
    assert slack_posts_for(stack, "TrainingStalled", "firing") == []
    assert set(stack.slack_alertnames()) == {"TrainingHungRank"}


def test_a_rank_hung_in_its_forward_pass_is_named_and_the_stall_pages_are_silenced(stack, jobs):
    jobs("e2e-hang", *LONG_RUN, "--fault-rank=1", "--hang-at=30")
    assert_one_page_names_the_hung_rank(stack, "e2e-hang", "forward")
    # The other rank waits in the gradient all-reduce of the same step.
    waiting = stack.query('ugro_train_phase{job_id="e2e-hang", rank="0"}')
    assert [s["metric"]["phase"] for s in waiting] == ["backward"]


def test_a_rank_hung_in_its_input_pipeline_is_named_with_phase_data(stack, jobs):
    jobs("e2e-data-hang", *LONG_RUN, "--fault-rank=1", "--hang-in-data-at=30")
    assert_one_page_names_the_hung_rank(stack, "e2e-data-hang", "data")
    waiting = stack.query('ugro_train_phase{job_id="e2e-data-hang", rank="0"}')
    assert [s["metric"]["phase"] for s in waiting] == ["backward"]


def test_a_rank_that_never_completes_a_first_step_raises_not_started(stack, jobs):
    jobs("e2e-no-start", *LONG_RUN, "--fault-rank=1", "--hang-before-first-step")
    wait_for(lambda: ranks_up(stack, "e2e-no-start") == 2, 90, "both ranks scraped")

    def posts_naming_both() -> list[str]:
        return [
            post
            for post in slack_posts_for(stack, "TrainingRankNotStarted", "firing")
            if "Rank 1 of job e2e-no-start on node node-a" in post
            and "Rank 0 of job e2e-no-start on node node-a" in post
        ]

    post = wait_for(posts_naming_both, 120, "a not-started post for both ranks")[0]
    # Rank 1 hangs before its first step; rank 0 waits for it in the gradient all-reduce of
    # its own first step. Neither has completed a step, so both are "not started"; rank 0 is
    # further along (backward), so the post names rank 1 as the one the job waits for.
    assert post.count("It is in phase startup.") == 1
    assert post.count("It is in phase backward.") == 1
    assert post.count("The job's least-progressed rank is rank 1 on node-a, in phase startup.") == 2
    assert "*WARNING*" in post and "runbook.md#trainingranknotstarted" in post
    alerts = firing(stack, "TrainingRankNotStarted", "e2e-no-start")
    assert sorted(a["rank"] for a in alerts) == ["0", "1"]
    # No step, so no stall: nothing else.
    assert set(stack.slack_alertnames()) == {"TrainingRankNotStarted"}
    assert stack.mail.messages == []  # a warning goes to Slack only


def test_a_healthy_run_with_checkpoints_and_evaluations_raises_nothing(stack, jobs):
    """Ranks in every phase at different scrapes, pauses of a second for checkpoints and
    evaluations, a start within the not-started limit: no alert is ever even pending."""
    job = jobs(
        "e2e-healthy",
        "--steps=400",
        "--data-delay=0.05",
        "--checkpoint-every=100",
        "--checkpoint-delay=1",
        "--eval-every=150",
        "--eval-delay=1",
    )
    assert job.wait(timeout=180) == 0
    # The run did pause: checkpoints every 100 steps and two evaluations, a second each.
    paused = stack.query(
        "max by (rank, phase) (max_over_time(ugro_train_phase_seconds_total"
        '{job_id="e2e-healthy", phase=~"checkpoint|evaluation"}[10m]))'
    )
    seconds = {(s["metric"]["rank"], s["metric"]["phase"]): float(s["value"][1]) for s in paused}
    assert sorted(seconds) == [
        ("0", "checkpoint"),
        ("0", "evaluation"),
        ("1", "checkpoint"),
        ("1", "evaluation"),
    ]
    assert min(seconds.values()) >= 2
    assert stack.query("count_over_time(ALERTS[10m])") == [], "no alert, not even pending"
    assert stack.slack.texts() == []
