"""A real alerting path on one machine, for the end-to-end tests and the latency benchmark.

Prometheus and Alertmanager run the project's own configuration with a test overlay: 1 s
scrape and evaluation intervals, shorter ``for:`` durations, a 1 s group wait, Slack's webhook
URL pointing at a local recorder and SMTP at a local server that demands the password from
the secret file. The overlay changes timings and addresses only, never a rule's logic.

Either server can be stopped and started again on the same port with the same data directory
(``restart_alertmanager``, ``restart_prometheus``), as an operator's restart would: the tests of
what survives a restart (the notification log, silences, the TSDB, alerts' ``for`` state) use it.
"""

from __future__ import annotations

import contextlib
import datetime
import pathlib
import re
import urllib.parse
from collections.abc import Iterator, Sequence
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
# Extra server flags may change timings only: `--flag=<Prometheus duration>`.
_TIMING_FLAG = re.compile(r"--[a-z][a-z0-9.-]*=([0-9]+(ms|s|m|h|d|w|y))+")
# The route timings a test may shorten (repeat_interval, to see a repeat within a test).
ROUTE_TIMINGS = ("group_wait", "group_interval", "repeat_interval")
# A graceful stop writes Alertmanager's notification log and silences and closes Prometheus's
# TSDB; a loaded machine may take a while, and a SIGKILL would defeat what is being tested.
STOP_GRACE_SECONDS = 30.0


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
    # Extra command-line flags, timing flags only, e.g. ``["--rules.alert.resend-delay=2s"]``.
    prometheus_flags: Sequence[str] = ()
    alertmanager_flags: Sequence[str] = ()
    # Route timings replacing the overlay's (ROUTE_TIMINGS), e.g. ``{"repeat_interval": "30s"}``.
    alertmanager_route: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for flag in [*self.prometheus_flags, *self.alertmanager_flags]:
            if not _TIMING_FLAG.fullmatch(flag):
                raise ValueError(f"server flag {flag!r}: expected a timing flag --NAME=DURATION")
        for key in self.alertmanager_route:
            if key not in ROUTE_TIMINGS:
                raise ValueError(f"alertmanager_route.{key}: expected one of {ROUTE_TIMINGS}")
        self.slack = SlackWebhookRecorder()
        self.mail = MailSink(SMTP_PASSWORD)
        self.targets = LocalTargets(self.workdir / "targets")
        self.prometheus_port, self.alertmanager_port = free_ports(2)
        self.running: dict[str, ServerProcess] = {}
        self._starts: dict[str, int] = {}
        try:
            self._configure_alertmanager()
            self.start_alertmanager()
            self._configure_prometheus()
            self.start_prometheus()
        except BaseException:
            self.close()
            raise

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    def _configure_alertmanager(self) -> None:
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
        config["route"].update(self.alertmanager_route)
        path = directory / "alertmanager.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))

    def start_alertmanager(self) -> None:
        """Starts Alertmanager on its port with its data directory, and waits until ready."""
        directory = self.workdir / "alertmanager"
        self._start(
            "alertmanager",
            [
                f"--config.file={directory / 'alertmanager.yml'}",
                f"--storage.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.alertmanager_port}",
                "--cluster.listen-address=",  # one instance, no gossip port
                "--log.level=debug",
                *self.alertmanager_flags,
            ],
            f"{self.alertmanager_url}/-/ready",
        )

    def stop_alertmanager(self) -> None:
        self._stop("alertmanager")

    def restart_alertmanager(self) -> None:
        """SIGTERM, wait for the exit, start again: same port, same data directory."""
        self.stop_alertmanager()
        self.start_alertmanager()

    def _configure_prometheus(self) -> None:
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

    def start_prometheus(self) -> None:
        """Starts Prometheus on its port with its TSDB directory, and waits until ready."""
        directory = self.workdir / "prometheus"
        self._start(
            "prometheus",
            [
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
                *self.prometheus_flags,
            ],
            f"{self.prometheus_url}/-/ready",
        )

    def stop_prometheus(self) -> None:
        self._stop("prometheus")

    def restart_prometheus(self) -> None:
        """SIGTERM, wait for the exit, start again: same port, same TSDB directory."""
        self.stop_prometheus()
        self.start_prometheus()

    def _start(self, name: str, flags: list[str], ready_url: str) -> None:
        if name in self.running:
            raise RuntimeError(f"{name} is already running")
        starts = self._starts[name] = self._starts.get(name, 0) + 1
        # A log per start: the first one's is still there to read after a restart.
        log = self.workdir / name / (f"{name}.log" if starts == 1 else f"{name}-{starts}.log")
        process = server(name).start(flags, log, writable=[self.workdir], readonly=[ROOT])
        self.running[name] = process
        _wait_ready(ready_url, process, log, name.capitalize())

    def _stop(self, name: str) -> None:
        process = self.running.pop(name)
        process.stop(grace=STOP_GRACE_SECONDS)
        if process.returncode != 0:
            # Killed, not stopped: what it should have written on the way out may be missing.
            raise RuntimeError(f"{name} did not exit cleanly on SIGTERM: {process.returncode}")

    # -- reading the stack -------------------------------------------------------------------

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """An instant query, evaluated now or at ``at`` (Unix seconds)."""
        parameters = {"query": promql} if at is None else {"query": promql, "time": f"{at:.3f}"}
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode(parameters)
        return http_json(url)["data"]["result"]

    def prometheus_alerts(self) -> list[dict]:
        """Alerts Prometheus has active now, pending or firing, with their ``activeAt``."""
        return http_json(f"{self.prometheus_url}/api/v1/alerts")["data"]["alerts"]

    def firing(self) -> list[dict]:
        """Alerts Prometheus has firing (not pending) now."""
        return [a for a in self.prometheus_alerts() if a["state"] == "firing"]

    def alertmanager_alerts(self) -> list[dict]:
        return http_json(f"{self.alertmanager_url}/api/v2/alerts")

    def post_alerts(self, alerts: list[dict]) -> None:
        http_json(f"{self.alertmanager_url}/api/v2/alerts", alerts)

    def create_silence(self, matchers: dict[str, str], hours: float = 1.0) -> str:
        """Silences alerts whose labels equal ``matchers`` for ``hours``; returns its id."""
        now = datetime.datetime.now(datetime.UTC)
        silence = {
            "matchers": [
                {"name": name, "value": value, "isRegex": False, "isEqual": True}
                for name, value in matchers.items()
            ],
            "startsAt": now.isoformat(),
            "endsAt": (now + datetime.timedelta(hours=hours)).isoformat(),
            "createdBy": "tests",
            "comment": "planned maintenance",
        }
        return http_json(f"{self.alertmanager_url}/api/v2/silences", silence)["silenceID"]

    def silences(self) -> list[dict]:
        return http_json(f"{self.alertmanager_url}/api/v2/silences")

    def slack_alertnames(self) -> list[str]:
        """The alert name in each Slack post's title, "[FIRING:2] Name · job ..."."""
        names = []
        for text in self.slack.texts():
            title = text.split("\n", 1)[0]
            names.append(title.split("] ", 1)[1].split(" ")[0] if "] " in title else title)
        return names

    def close(self) -> None:
        for name in reversed(list(self.running)):
            self.running.pop(name).stop()
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
