"""Prometheus and Alertmanager on this machine, without Docker, for the demo and for exploring.

They run the repository's own configuration (prometheus/prometheus.yml, the recording rules,
the alert rules generated from alerts/thresholds.yml, alerts/alertmanager.yml and its
templates) with a local overlay that changes addresses, timings and files only: data and
target files under a state directory, a shorter scrape interval and ``for:`` windows so a fault
shows within seconds, and Slack's webhook pointed at a receiver on loopback that prints each
notification. Email is left out: there is no mail server to send to.
"""

from __future__ import annotations

import importlib.resources
import json
import pathlib
import shutil
import subprocess
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

from ugro.alerts.rules_file import render as render_alert_rules
from ugro.common.ports import DEFAULT_ALERTMANAGER_PORT, DEFAULT_PROMETHEUS_PORT, free_port
from ugro.common.processes import NotReady, ProcessExited, stop_process_group, wait_until_ready

# The shipped configuration, found through the installed packages: the checkout's files in an
# editable install (make setup), the package data of a wheel. Plain files either way, as
# Prometheus and Alertmanager read them by path.
PROMETHEUS_DIR = pathlib.Path(str(importlib.resources.files("ugro.prometheus")))
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RECORDING_RULES = PROMETHEUS_DIR / "rules" / "recording.yml"
ALERTS_DIR = pathlib.Path(str(importlib.resources.files("ugro.alerts")))
ALERTMANAGER_CONFIG = ALERTS_DIR / "alertmanager.yml"

# A fault should reach the terminal within seconds: scrape and evaluate every 2 s, and keep
# the windows an alert waits short. Thresholds themselves stay as configured.
LOCAL_INTERVAL = "2s"
LOCAL_THRESHOLDS = {
    "training.nonfinite_window": "15s",
    "training.straggler_for": "15s",
    "training.ranks_down_for": "10s",
    "training.stall_for": "15s",
}
READY_TIMEOUT_SECONDS = 30.0
STOP_GRACE_SECONDS = 10.0


class StackError(RuntimeError):
    """Something the local stack needs is missing or did not start; the message says what to do."""


def find_binary(*names: str, package: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise StackError(
        f"{names[0]} is not installed (looked for {', '.join(names)} on PATH): "
        f"run `make setup`, or `apt-get install {package}`"
    )


class NotificationReceiver:
    """A Slack-compatible incoming webhook on loopback: each post's attachments go to
    ``on_notification(title, text)``, and it answers as Slack does."""

    def __init__(self, on_notification: Callable[[str, str], None]) -> None:
        receiver = self
        self.on_notification = on_notification
        self.count = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                try:
                    payload = json.loads(self.rfile.read(length))
                    for attachment in payload.get("attachments", []):
                        receiver.count += 1
                        receiver.on_notification(
                            attachment.get("title", ""), attachment.get("text", "")
                        )
                except Exception as error:  # a bad post must not take the receiver down
                    receiver.on_notification("unreadable notification", str(error))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/local/ugro"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def prometheus_config(
    *,
    targets_dir: pathlib.Path,
    alert_rules: pathlib.Path,
    alertmanager: str,
    own: str,
    interval: str = LOCAL_INTERVAL,
) -> dict:
    """prometheus.yml with absolute rule and target paths, local addresses and ``interval`` for
    scraping, evaluating and rereading target files."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(
        scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval
    )
    config["rule_files"] = [str(RECORDING_RULES), str(alert_rules)]
    config["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [alertmanager]}]}]
    for job in config["scrape_configs"]:
        for file_sd in job.get("file_sd_configs", []):
            # "targets/ranks/*.json" -> TARGETS_DIR/ranks/*.json
            file_sd["files"] = [
                str(targets_dir / pathlib.Path(pattern).relative_to("targets"))
                for pattern in file_sd["files"]
            ]
            file_sd["refresh_interval"] = interval
        for static in job.get("static_configs", []):
            static["targets"] = [own]
    return config


def alertmanager_config(
    *,
    slack_url_file: pathlib.Path,
    group_interval: str = "2s",
    smtp: dict[str, object] | None = None,
) -> dict:
    """alertmanager.yml with Slack posting to ``slack_url_file``'s URL, notifications a second
    after an alert fires and within ``group_interval`` of a change, and email through ``smtp``
    (``smtp_*`` global fields) or, without it, no email at all."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    config["templates"] = [str(ALERTMANAGER_CONFIG.parent / t) for t in config["templates"]]
    if smtp is None:
        for key in [k for k in config["global"] if k.startswith("smtp_")]:
            del config["global"][key]
        for receiver in config["receivers"]:
            receiver.pop("email_configs", None)
    else:
        config["global"].update(smtp)
    config["route"].update(group_wait="1s", group_interval=group_interval)
    for receiver in config["receivers"]:
        for slack in receiver.get("slack_configs", []):
            slack["api_url_file"] = str(slack_url_file)
    return config


class LocalStack:
    """Prometheus and Alertmanager as child processes, everything under ``state_dir``."""

    def __init__(
        self,
        state_dir: pathlib.Path,
        slack_url: str,
        *,
        prometheus_port: int = DEFAULT_PROMETHEUS_PORT,
        alertmanager_port: int = DEFAULT_ALERTMANAGER_PORT,
        on_started: Callable[[str, int], None] = lambda name, pid: None,
    ) -> None:
        self.state_dir = state_dir
        self.slack_url = slack_url
        # Told each server's name and pid the moment it exists, before it is ready.
        self.on_started = on_started
        self.targets_dir = state_dir / "targets"
        self.prometheus_port = free_port(prometheus_port)
        self.alertmanager_port = free_port(alertmanager_port)
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    def start(self) -> None:
        prometheus = find_binary("prometheus", package="prometheus")
        alertmanager = find_binary(
            "prometheus-alertmanager", "alertmanager", package="prometheus-alertmanager"
        )
        for folder in ("ranks", "nodes"):
            (self.targets_dir / folder).mkdir(parents=True, exist_ok=True)
        try:
            self._start_alertmanager(alertmanager)
            self._start_prometheus(prometheus)
        except BaseException:
            self.stop()
            raise

    def _start_alertmanager(self, binary: str) -> None:
        directory = self.state_dir / "alertmanager"
        directory.mkdir(parents=True, exist_ok=True)
        url_file = directory / "slack_webhook_url"
        url_file.write_text(self.slack_url + "\n")
        config = directory / "alertmanager.yml"
        config.write_text(yaml.safe_dump(alertmanager_config(slack_url_file=url_file)))
        self._run(
            "Alertmanager",
            [
                binary,
                f"--config.file={config}",
                f"--storage.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.alertmanager_port}",
                "--cluster.listen-address=",  # one instance: no gossip port
            ],
            directory / "alertmanager.log",
            f"{self.alertmanager_url}/-/ready",
        )

    def _start_prometheus(self, binary: str) -> None:
        directory = self.state_dir / "prometheus"
        directory.mkdir(parents=True, exist_ok=True)
        rules = directory / "alert-rules.yml"
        rules.write_text(render_alert_rules(**LOCAL_THRESHOLDS))
        config = directory / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                prometheus_config(
                    targets_dir=self.targets_dir,
                    alert_rules=rules,
                    alertmanager=f"127.0.0.1:{self.alertmanager_port}",
                    own=f"127.0.0.1:{self.prometheus_port}",
                ),
                sort_keys=False,
            )
        )
        self._run(
            "Prometheus",
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
                "--web.enable-lifecycle",
                # A restarted Prometheus resumes alerts' `for:` (docker-compose.yml says why);
                # the demo's shortest `for:` is 10 s.
                "--rules.alert.for-grace-period=10s",
            ],
            directory / "prometheus.log",
            f"{self.prometheus_url}/-/ready",
        )

    def _run(self, name: str, argv: list[str], log: pathlib.Path, ready_url: str) -> None:
        with open(log, "wb") as output:
            # A session of its own: Ctrl-C in the terminal reaches the demo, which stops these
            # in order, and --keep can leave them running after it exits.
            process = subprocess.Popen(
                argv,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes[name] = process
        self.on_started(name, process.pid)
        try:
            wait_until_ready(ready_url, READY_TIMEOUT_SECONDS, process=process, what=name)
        except ProcessExited:
            tail = log.read_text(errors="replace")[-1500:]
            raise StackError(
                f"{name} exited with code {process.returncode}; {log}:\n{tail}"
            ) from None
        except NotReady:
            raise StackError(
                f"{name} did not become ready within {READY_TIMEOUT_SECONDS:g} s; see {log}"
            ) from None

    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.processes.items()}

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            stop_process_group(process, STOP_GRACE_SECONDS)  # SIGTERM, SIGKILL after grace
        self.processes.clear()
