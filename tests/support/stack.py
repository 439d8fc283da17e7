"""A real alerting path on one machine, for the end-to-end tests and the latency benchmark.

Prometheus and Alertmanager run the project's own configuration with a test overlay: 1 s
scrape and evaluation intervals, shorter ``for:`` durations, a 1 s group wait, Slack's webhook
URL pointing at a local recorder and SMTP at a local server that demands the password from
the secret file. The overlay changes timings and addresses only, never a rule's logic.
"""

from __future__ import annotations

import contextlib
import pathlib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

import yaml

from tests.support.net import http_json
from tests.support.receivers import MailSink, SlackWebhookRecorder
from tests.support.servers import ServerProcess, server
from ugro.alerts.rules_file import render
from ugro.common.ports import free_ports
from ugro.common.processes import NotReady, ProcessExited, wait_until_ready
from ugro.console.localstack import alertmanager_config, prometheus_config
from ugro.launcher.targets import LocalTargets

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Shorter `for:` durations for a test run; thresholds themselves stay as configured.
TEST_THRESHOLDS = {
    "training.nonfinite_window": "5s",
    "training.straggler_for": "5s",
    # Ranks stop answering ~2 s before torchrun exits and the job is deregistered (measured
    # on 2 cores); the `for:` must outlast that gap, as the production 30 s does.
    "training.ranks_down_for": "10s",
    "training.stall_for": "5s",
}
SMTP_PASSWORD = "smtp-secret-for-tests"


def _wait_ready(url: str, process: ServerProcess, log: pathlib.Path, what: str) -> None:
    try:
        wait_until_ready(url, 30, process=process, what=what, probe_timeout=2)
    except ProcessExited:
        raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()}") from None
    except NotReady:
        raise RuntimeError(f"{what} not ready after 30 s:\n{log.read_text()}") from None


@dataclass
class AlertStack:
    """Prometheus, Alertmanager, a Slack recorder and an SMTP sink, under ``workdir``."""

    workdir: pathlib.Path
    thresholds: dict[str, object] = field(default_factory=lambda: dict(TEST_THRESHOLDS))
    # Top-level prometheus.yml sections added to (or replacing) the overlay's, e.g.
    # ``{"remote_write": [...]}`` to forward everything to a distributed store.
    prometheus_extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.slack = SlackWebhookRecorder()
        self.mail = MailSink(SMTP_PASSWORD)
        self.targets = LocalTargets(self.workdir / "targets")
        self.prometheus_port, self.alertmanager_port = free_ports(2)
        self.processes: list[ServerProcess] = []
        try:
            self._start_alertmanager()
            self._start_prometheus()
        except BaseException:
            self.close()
            raise

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    def _start_alertmanager(self) -> None:
        directory = self.workdir / "alertmanager"
        secrets = directory / "secrets"
        secrets.mkdir(parents=True)
        (secrets / "slack_webhook_url").write_text(self.slack.url + "\n")
        # Alertmanager uses the file's whole content as the password: no trailing newline.
        (secrets / "smtp_password").write_text(SMTP_PASSWORD)
        config = alertmanager_config(
            slack_url_file=secrets / "slack_webhook_url",
            group_interval="1s",
            smtp={
                "smtp_smarthost": f"localhost:{self.mail.port}",
                "smtp_require_tls": False,
                "smtp_auth_password_file": str(secrets / "smtp_password"),
            },
        )
        path = directory / "alertmanager.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        log = directory / "alertmanager.log"
        process = server("alertmanager").start(
            [
                f"--config.file={path}",
                f"--storage.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.alertmanager_port}",
                "--cluster.listen-address=",  # one instance, no gossip port
                "--log.level=debug",
            ],
            log,
            writable=[self.workdir],
            readonly=[ROOT],
        )
        self.processes.append(process)
        _wait_ready(f"{self.alertmanager_url}/-/ready", process, log, "Alertmanager")

    def _start_prometheus(self) -> None:
        directory = self.workdir / "prometheus"
        directory.mkdir(parents=True)
        rules = directory / "alert-rules.yml"
        rules.write_text(render(**self.thresholds))
        config = prometheus_config(
            targets_dir=self.targets.directory,
            alert_rules=rules,
            alertmanager=f"127.0.0.1:{self.alertmanager_port}",
            own=f"127.0.0.1:{self.prometheus_port}",
            interval="1s",
        )
        config.update(self.prometheus_extra)
        path = directory / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        log = directory / "prometheus.log"
        process = server("prometheus").start(
            [
                f"--config.file={path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
            ],
            log,
            writable=[self.workdir],
            readonly=[ROOT],
        )
        self.processes.append(process)
        _wait_ready(f"{self.prometheus_url}/-/ready", process, log, "Prometheus")

    # -- reading the stack -------------------------------------------------------------------

    def query(self, promql: str) -> list[dict]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        return http_json(url)["data"]["result"]

    def firing(self) -> list[dict]:
        """Alerts Prometheus has firing (not pending) now."""
        alerts = http_json(f"{self.prometheus_url}/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if a["state"] == "firing"]

    def alertmanager_alerts(self) -> list[dict]:
        return http_json(f"{self.alertmanager_url}/api/v2/alerts")

    def post_alerts(self, alerts: list[dict]) -> None:
        http_json(f"{self.alertmanager_url}/api/v2/alerts", alerts)

    def slack_alertnames(self) -> list[str]:
        """The alert name in each Slack post's title, "[FIRING:2] Name · job ..."."""
        names = []
        for text in self.slack.texts():
            title = text.split("\n", 1)[0]
            names.append(title.split("] ", 1)[1].split(" ")[0] if "] " in title else title)
        return names

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.slack.close()
        self.mail.close()


@contextlib.contextmanager
def alert_stack(
    workdir: pathlib.Path,
    *,
    prometheus_extra: dict[str, object] | None = None,
    **thresholds: object,
) -> Iterator[AlertStack]:
    stack = AlertStack(workdir, {**TEST_THRESHOLDS, **thresholds}, prometheus_extra or {})
    try:
        yield stack
    finally:
        stack.close()
