"""What survives a restart of Alertmanager or Prometheus, with the real servers.

The alert is a real one: NodeExporterDown, for a node whose exporter is registered as
ugro-launch registers it but does not answer. Each server is stopped with SIGTERM and started
again on the same port with the same data directory, as an operator's restart would be:

* Alertmanager keeps its notification log and silences in ``--storage.path`` but not the
  alerts, which it learns again when Prometheus re-sends them (every
  ``--rules.alert.resend-delay``). A firing alert is then not notified again before its
  ``repeat_interval``; one that started firing while Alertmanager was down is notified once.
* Prometheus keeps its TSDB and restores each pending or firing alert's ``activeAt`` from the
  ``ALERTS_FOR_STATE`` series, for alerts whose ``for:`` is at least
  ``--rules.alert.for-grace-period`` (default 10m: shorter ones start their ``for:`` again).

Each test prints the notification counts it saw before and after each restart (``-s``).
"""

from __future__ import annotations

import datetime
import time

import pytest

from tests.support import sample, sample_values, scrape, wait_for
from tests.support.net import http_json
from tests.support.stack import TEST_THRESHOLDS, AlertStack
from ugro.common.ports import free_port

ALERT = "NodeExporterDown"
# Prometheus re-sends firing alerts this often: how soon a restarted Alertmanager knows them
# again (the default, 1m, would only make the test wait).
RESEND = "--rules.alert.resend-delay=2s"


@pytest.fixture
def stacks(tmp_path, request):
    """Starts AlertStacks under tmp_path; prints what they saw when the test failed."""
    started: list[AlertStack] = []

    def start(**options) -> AlertStack:
        stack = AlertStack(tmp_path / f"stack-{len(started)}", **options)
        started.append(stack)
        return stack

    yield start
    for stack in started:
        stack.close()
    report = getattr(request.node, "call_report", None)
    if report is not None and report.failed:
        for stack in started:
            print("Slack posts:", *stack.slack.texts(), sep="\n")
            for log in sorted(stack.workdir.rglob("*.log")):
                print(f"--- {log.relative_to(tmp_path)}", log.read_text()[-3000:], sep="\n")


def thresholds(down_for: str) -> dict[str, object]:
    return {**TEST_THRESHOLDS, "node.exporter_down_for": down_for}


def register_dead_node(stack: AlertStack, node: str) -> None:
    """A node exporter target on a loopback port where nothing listens: the node is down."""
    stack.targets.register_node(node, "127.0.0.1", free_port())


def posts(stack: AlertStack, node: str, status: str = "firing") -> list[float]:
    """Arrival times of the Slack posts about ALERT on ``node`` with ``status``."""
    prefix = f"[{status.upper()}"
    return [
        post.at
        for post in list(stack.slack.posts)
        for attachment in post.payload.get("attachments", [])
        if attachment.get("title", "").startswith(prefix)
        and attachment["title"].endswith(f"] {ALERT} · {node}")
    ]


def mails(stack: AlertStack, node: str) -> int:
    return sum(t.startswith(f"[ugro firing] {ALERT} on {node}\n") for t in stack.mail.texts())


def alertmanager_has(stack: AlertStack, node: str) -> bool:
    return any(
        a["labels"]["alertname"] == ALERT and a["labels"].get("node") == node
        for a in stack.alertmanager_alerts()
    )


def nflog_queries(stack: AlertStack) -> float:
    """How often Alertmanager's dedup stage has asked its notification log whether to send:
    once per integration (Slack, email) each time a group is flushed, every group_interval."""
    samples = sample_values(scrape(f"{stack.alertmanager_url}/metrics"))
    return sample(samples, "alertmanager_nflog_queries_total") or 0.0


def wait_for_flushes(stack: AlertStack, flushes: int = 3) -> None:
    """Until Alertmanager has flushed each of its groups about ``flushes`` more times (each a
    chance to notify again), rather than sleeping for group_wait + group_intervals. Every
    group here is critical: Slack and email, two notification-log queries per flush."""
    groups = len(http_json(f"{stack.alertmanager_url}/api/v2/alerts/groups"))
    start = nflog_queries(stack)
    wait_for(
        lambda: nflog_queries(stack) >= start + 2 * flushes * max(groups, 1),
        60,
        f"{flushes} flushes of each of {groups} group(s)",
    )


def prometheus_counter(stack: AlertStack, name: str) -> float:
    """A counter of the running Prometheus process (since it started), summed over labels:
    ``prometheus_notifications_sent_total`` counts alerts delivered to Alertmanager,
    ``prometheus_notifications_errors_total`` those it failed to deliver."""
    samples = sample_values(scrape(f"{stack.prometheus_url}/metrics"))
    return sum(value for (sample_name, _), value in samples.items() if sample_name == name)


def test_alertmanager_restart_keeps_its_notification_log_and_silences(stacks):
    stack = stacks(thresholds=thresholds("2s"), prometheus_flags=[RESEND])
    register_dead_node(stack, "node-a")
    wait_for(lambda: posts(stack, "node-a"), 60, "a Slack post for node-a")
    wait_for(lambda: mails(stack, "node-a"), 30, "an email for node-a")
    # A silence for another alert, as for planned maintenance of a GPU.
    silence_id = stack.create_silence({"alertname": "GpuXidError", "node": "node-b"})
    silenced = [s for s in stack.silences() if s["id"] == silence_id]
    assert [s["status"]["state"] for s in silenced] == ["active"]
    wait_for_flushes(stack)
    before = len(posts(stack, "node-a"))
    print(f"\nAlertmanager restart while {ALERT} fires: {before} Slack post(s) before")

    stack.restart_alertmanager()
    wait_for(lambda: alertmanager_has(stack, "node-a"), 60, "Prometheus to re-send the alert")
    wait_for_flushes(stack)
    after = len(posts(stack, "node-a"))
    print(f"... {after} Slack post(s) after (repeat_interval 4h, as alerts/alertmanager.yml)")
    assert (before, after) == (1, 1)
    assert mails(stack, "node-a") == 1
    kept = [s for s in stack.silences() if s["id"] == silence_id]
    assert [(s["status"]["state"], s["matchers"]) for s in kept] == [
        ("active", silenced[0]["matchers"])
    ]

    # An alert that starts firing while Alertmanager is down is delivered once it is back.
    stack.stop_alertmanager()
    register_dead_node(stack, "node-b")
    wait_for(
        lambda: any(a["labels"].get("node") == "node-b" for a in stack.firing()),
        60,
        "node-b's alert firing in Prometheus",
    )
    wait_for(
        lambda: prometheus_counter(stack, "prometheus_notifications_errors_total") > 0,
        60,
        "Prometheus to fail sending to the stopped Alertmanager",
    )
    stack.start_alertmanager()
    wait_for(lambda: posts(stack, "node-b"), 60, "a Slack post for node-b")
    wait_for_flushes(stack)
    counts = {node: len(posts(stack, node)) for node in ("node-a", "node-b")}
    print(f"{ALERT} that fired while Alertmanager was down: Slack posts per node {counts}")
    assert counts == {"node-a": 1, "node-b": 1}


def test_a_firing_alert_is_repeated_after_its_repeat_interval_not_after_a_restart(stacks):
    """With a short repeat_interval, the repeat comes when the notification log says so:
    counted from the first notification, not from the restart."""
    repeat = 30
    stack = stacks(
        thresholds=thresholds("2s"),
        prometheus_flags=[RESEND],
        alertmanager_route={"repeat_interval": f"{repeat}s"},
    )
    register_dead_node(stack, "node-a")
    first = wait_for(lambda: posts(stack, "node-a"), 60, "a Slack post")[0]
    print(f"\nrepeat_interval {repeat}s: 1 Slack post before the restart")
    stack.restart_alertmanager()
    wait_for(lambda: alertmanager_has(stack, "node-a"), 60, "Prometheus to re-send the alert")
    wait_for_flushes(stack)
    after_restart = posts(stack, "node-a")
    restarted_within = time.time() - first
    print(f"... {len(after_restart)} after the restart ({restarted_within:.1f}s after the first)")
    assert restarted_within < repeat, "too slow to tell a repeat from a restart: test invalid"
    assert len(after_restart) == 1
    second = wait_for(lambda: posts(stack, "node-a")[1:], repeat + 60, "the repeat")[0]
    print(f"... the repeat {second - first:.1f}s after the first post")
    assert second - first >= repeat - 1


def for_state(stack: AlertStack, node: str) -> list[tuple[float, float]]:
    """ALERTS_FOR_STATE samples of node's alert, (timestamp, activeAt) from the TSDB."""
    result = stack.query(f'ALERTS_FOR_STATE{{alertname="{ALERT}",node="{node}"}}[10m]')
    return [(float(t), float(v)) for t, v in result[0]["values"]] if result else []


def restarted_for_state(stack: AlertStack, node: str) -> tuple[float, float, float, float]:
    """(activeAt, last sample) before the restart's gap, (activeAt, first sample) after it."""
    samples = for_state(stack, node)
    gap = max(range(1, len(samples)), key=lambda i: samples[i][0] - samples[i - 1][0])
    (down_at, before), (up_at, after) = samples[gap - 1], samples[gap]
    return before, down_at, after, up_at


def scraped_before(stack: AlertStack, at: float) -> list[dict]:
    return stack.query('count_over_time(up{job="ugro-nodes"}[20s])', at)


def test_prometheus_restart_restores_for_state_and_keeps_its_tsdb(stacks):
    """(i) restarted while the alert is pending, (ii) while it fires."""
    down_for = 30
    stack = stacks(
        thresholds=thresholds(f"{down_for}s"),
        prometheus_flags=[
            # for: must not be shorter than the grace period, or its state is not restored.
            "--rules.alert.for-grace-period=5s",
            # A restarted Prometheus evaluates before it has discovered Alertmanager: the first
            # send of a restored firing alert is dropped, and the next comes a resend delay
            # later. Alertmanager holds a firing alert 4 resend delays after the last send, so
            # the restart must stay well within that (1m and 4m by default: 15s and 60s here).
            "--rules.alert.resend-delay=15s",
        ],
    )
    register_dead_node(stack, "node-a")

    def pending_for() -> float:
        alerts = [a for a in stack.prometheus_alerts() if a["labels"]["alertname"] == ALERT]
        if not alerts or alerts[0]["state"] != "pending":
            return 0.0
        active_at = datetime.datetime.fromisoformat(alerts[0]["activeAt"].replace("Z", "+00:00"))
        return time.time() - active_at.timestamp()

    # (i) Pending for about a third of its for:, then restarted.
    wait_for(lambda: pending_for() >= down_for / 3, 60, "the alert pending for 10 s")
    assert for_state(stack, "node-a"), "ALERTS_FOR_STATE recorded"
    # Seconds back, so that no scrape of that window is still being written.
    checked_at = time.time() - 5
    scraped = scraped_before(stack, checked_at)
    assert scraped and float(scraped[0]["value"][1]) > 0
    stack.restart_prometheus()
    wait_for(lambda: len(set(v for _, v in for_state(stack, "node-a"))) == 2, 60, "restored")
    before, down_at, after, up_at = restarted_for_state(stack, "node-a")
    pending_then, pending_now = down_at - before, up_at - after
    print(
        f"\nPrometheus restart while pending: pending {pending_then:.0f}s at the stop, "
        f"{pending_now:.0f}s at the first evaluation after the restore; Slack posts "
        f"{len(posts(stack, 'node-a'))}"
    )
    # The time it had spent pending counts: activeAt moved on by the downtime only. (A fresh
    # activeAt would make it pending for ~1 s here, and fire a whole for: after the restart.)
    assert pending_then >= 9
    assert abs(pending_now - pending_then) <= 5

    wait_for(lambda: posts(stack, "node-a"), down_for + 60, "a Slack post")
    wait_for(lambda: mails(stack, "node-a"), 30, "an email")
    firing_active_at = for_state(stack, "node-a")[-1][1]

    # (ii) Restarted while it fires.
    before_posts = len(posts(stack, "node-a"))
    stack.restart_prometheus()
    wait_for(
        lambda: prometheus_counter(stack, "prometheus_notifications_sent_total") > 0,
        60,
        "the restarted Prometheus to send it",
    )
    firing = [a for a in stack.firing() if a["labels"]["alertname"] == ALERT]
    assert len(firing) == 1
    wait_for_flushes(stack)
    after_posts = len(posts(stack, "node-a"))
    restored = for_state(stack, "node-a")[-1]
    print(
        f"Prometheus restart while firing: Slack posts {before_posts} before, {after_posts} "
        f"after; activeAt {firing_active_at:.0f} before, {restored[1]:.0f} after"
    )
    assert restored[1] == firing_active_at
    assert (before_posts, after_posts) == (1, 1)
    assert posts(stack, "node-a", "resolved") == []
    assert mails(stack, "node-a") == 1
    # The samples scraped before the first restart are still there.
    assert scraped_before(stack, checked_at) == scraped
