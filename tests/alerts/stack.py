"""A real alerting path on one machine, for the end-to-end tests and the latency benchmark.

Prometheus and Alertmanager run the project's own configuration with a test overlay: 1 s
scrape and evaluation intervals, shorter ``for:`` durations, a 1 s group wait, Slack's webhook
URL pointing at a local recorder and SMTP at a local server that demands the password from
the secret file. The overlay changes timings and addresses only, never a rule's logic.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.servers import ServerProcess, server
from ugro.alerts.__main__ import render
from ugro.console.localstack import alertmanager_config, free_port_block, prometheus_config
from ugro.launcher.targets import LocalTargets, RankEndpoint

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

# aiosmtpd warns on every connection that AUTH without TLS is unsafe: this server listens on
# loopback only, and Go's SMTP client sends PLAIN credentials in clear to localhost only.
warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS", UserWarning)
logging.getLogger("mail.log").setLevel(logging.ERROR)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_json(url: str, data: object | None = None, timeout: float = 5.0) -> object:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


@dataclass
class Received:
    at: float  # time.time() on arrival
    payload: object


class SlackWebhookRecorder:
    """Stands in for a Slack incoming webhook: records every JSON body posted to it."""

    def __init__(self) -> None:
        self.posts: list[Received] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(length))
                recorder.posts.append(Received(time.time(), payload))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")  # what Slack answers

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T0/B0/test"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def texts(self) -> list[str]:
        """Each post's title and text together, as a reader of the channel sees them."""
        out = []
        for post in self.posts:
            for attachment in post.payload.get("attachments", []):
                out.append(f"{attachment.get('title', '')}\n{attachment.get('text', '')}")
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class MailSink:
    """A local SMTP server that requires the password Alertmanager reads from its secret file."""

    def __init__(self, password: str) -> None:
        self.messages: list[Received] = []
        self.logins: list[str] = []
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope) -> str:
                message = email.message_from_bytes(envelope.content, policy=email.policy.default)
                sink.messages.append(Received(time.time(), message))
                return "250 OK"

        def authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:
            ok = isinstance(auth_data, LoginPassword) and auth_data.password == password.encode()
            if ok:
                sink.logins.append(auth_data.login.decode())
            return AuthResult(success=ok, handled=False)  # unhandled: the server answers 535

        self.port = free_port()
        # Go's PLAIN auth sends credentials in clear only to localhost; LOGIN is left out
        # because Alertmanager's LOGIN exchange does not match aiosmtpd's prompts.
        self.controller = Controller(
            Handler(),
            hostname="127.0.0.1",
            port=self.port,
            authenticator=authenticate,
            auth_required=True,
            auth_require_tls=False,
            auth_exclude_mechanism=["LOGIN"],
        )
        self.controller.start()

    def texts(self) -> list[str]:
        out = []
        for received in self.messages:
            message = received.payload
            body = message.get_body(preferencelist=("plain",))
            out.append(f"{message['Subject']}\n{body.get_content() if body else ''}")
        return out

    def close(self) -> None:
        self.controller.stop()


def _start(argv: list[str], log: pathlib.Path, env: dict[str, str] | None = None):
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=grace)


def _wait_ready(url: str, process: ServerProcess, log: pathlib.Path, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after 30 s:\n{log.read_text()}")


@dataclass
class AlertStack:
    """Prometheus, Alertmanager, a Slack recorder and an SMTP sink, under ``workdir``."""

    workdir: pathlib.Path
    thresholds: dict[str, object] = field(default_factory=lambda: dict(TEST_THRESHOLDS))

    def __post_init__(self) -> None:
        self.slack = SlackWebhookRecorder()
        self.mail = MailSink(SMTP_PASSWORD)
        self.targets = LocalTargets(self.workdir / "targets")
        self.prometheus_port = free_port()
        self.alertmanager_port = free_port()
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


class TrainingJob:
    """The reference trainer under torchrun on this machine, registered with Prometheus.

    It does what ugro-launch does for a job's targets: registers every rank's endpoint when
    the job starts and, when torchrun exits 0, removes them, so a normal finish leaves
    nothing behind to alert on. A failed job keeps its targets, so its dead ranks alert.
    """

    def __init__(
        self,
        stack: AlertStack,
        job_id: str,
        trainer_args: list[str],
        *,
        processes: int = 2,
        node: str = "node-a",
        deregister: bool = True,
    ) -> None:
        self.stack = stack
        self.deregister = deregister  # False: its targets outlive it, as with a lost watcher
        self.job_id = job_id
        self.node = node
        self.base_port = free_port_block(processes)
        self.log = stack.workdir / f"{job_id}.log"
        env = {
            **os.environ,
            "UGRO_JOB_ID": job_id,
            "UGRO_METRICS_PORT": str(self.base_port),
            "UGRO_METRICS_ADDR": "127.0.0.1",
            "UGRO_NODE": node,
            "UGRO_REGISTERED_TARGET": "1",  # registered below, as ugro-launch does
            "OMP_NUM_THREADS": "1",
        }
        stack.targets.register_job(
            job_id,
            [RankEndpoint("127.0.0.1", self.base_port + r, r, node) for r in range(processes)],
        )
        self.process = _start(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc-per-node={processes}",
                "--master-port",
                str(free_port()),
                "-m",
                "ugro.trainer.train",
                "--log-every",
                "1000000",
                *trainer_args,
            ],
            self.log,
            env,
        )
        self._exit_code: int | None = None
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        code = self.process.wait()
        if code == 0 and self.deregister:
            self.stack.targets.remove_job(self.job_id)
        self._exit_code = code

    def wait(self, timeout: float) -> int:
        self._watcher.join(timeout)
        if self._watcher.is_alive():
            raise AssertionError(f"job {self.job_id} still running after {timeout}s")
        return self._exit_code

    def rank_pid(self, rank: int) -> int:
        """The process id of a rank, found among torchrun's children by its RANK variable."""
        import psutil

        for child in psutil.Process(self.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.environ().get("RANK") == str(rank) and "ugro.trainer.train" in " ".join(
                    child.cmdline()
                ):
                    return child.pid
        raise LookupError(f"rank {rank} of job {self.job_id} not found")

    def stop(self) -> None:
        _stop(self.process)
        self._watcher.join(5)


@contextlib.contextmanager
def alert_stack(workdir: pathlib.Path, **thresholds: object) -> Iterator[AlertStack]:
    stack = AlertStack(workdir, {**TEST_THRESHOLDS, **thresholds})
    try:
        yield stack
    finally:
        stack.close()


# The scripted NVML double's GPUs, by index: what a rank names in UGRO_GPU_UUIDS to be joined
# with the exporter's readings of that GPU.
FAKE_GPU_UUIDS = [f"GPU-{i:08x}-1111-2222-3333-444455556666" for i in range(8)]


@contextlib.contextmanager
def fake_gpu_exporter(
    stack: AlertStack,
    node: str = "node-a",
    gpus: int = 2,
    control_dir: pathlib.Path | None = None,
) -> Iterator[subprocess.Popen]:
    """The node's ugro-exporter with ``gpus`` scripted H100s, registered as ugro-launch
    registers it. ``control_dir`` lets a test inject XIDs or lost GPUs (fake_nvml.py)."""
    port = free_port()
    env = {**os.environ, "UGRO_FAKE_NVML_GPUS": str(gpus)}
    if control_dir is not None:
        env["UGRO_FAKE_NVML_CONTROL"] = str(control_dir)
    with open(stack.workdir / f"exporter-{node}.log", "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ugro.exporter",
                f"--listen=127.0.0.1:{port}",
                f"--node={node}",
                "--poll-interval=1",
                "--nvml-module=tests.exporter.fake_nvml:from_environment",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            stack.targets.register_node(node, "127.0.0.1", port)
            yield process
        finally:
            process.terminate()
            process.wait(timeout=10)
