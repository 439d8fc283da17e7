"""A killed ``ugro-exporter`` restarted on its port: the real Prometheus scrapes it again, the
recorded rates never go negative, and a kill shorter than NodeExporterDown's ``for:`` alerts
nobody.

The exporter reads the scripted GPUs of tests/exporter/fake_nvml.py; Prometheus and
Alertmanager run the project's configuration with the test overlay (tests/support/stack.py),
NodeExporterDown with its production ``for:`` (thresholds.yml).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import yaml

from tests.support import wait_for
from tests.support.stack import AlertStack
from ugro.catalogue.thresholds import load_thresholds
from ugro.common.ports import free_port
from ugro.console.localstack import RECORDING_RULES

ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE = "node-a"
# A recording rule that takes rate() or increase() of a counter.
COUNTER_RATE = re.compile(r"\b(?:rate|increase)\((\w+_total)\b")


def start_exporter(workdir: pathlib.Path, port: int, log_name: str) -> subprocess.Popen:
    """The node's ugro-exporter over two scripted H100s, as tests/support/fake_gpu.py runs it,
    on a port the test chooses (a restart reuses it)."""
    with open(workdir / log_name, "wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ugro.exporter",
                f"--listen=127.0.0.1:{port}",
                f"--node={NODE}",
                "--poll-interval=1",
                "--nvml-module=tests.exporter.fake_nvml:from_environment",
            ],
            env={**os.environ, "UGRO_FAKE_NVML_GPUS": "2"},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


@contextlib.contextmanager
def diagnostics(workdir: pathlib.Path) -> Iterator[None]:
    """On a failure, the servers' and exporters' logs, for a picture that only they give."""
    try:
        yield
    except BaseException:
        for log in sorted(workdir.rglob("*.log")):
            print(f"--- {log.relative_to(workdir)}", log.read_text()[-3000:], sep="\n")
        raise


def counter_rate_records() -> dict[str, set[str]]:
    """Each recording rule of prometheus/rules/recording.yml that takes rate() or increase()
    of counters, with those counters."""
    records = {}
    for group in yaml.safe_load(RECORDING_RULES.read_text())["groups"]:
        for rule in group["rules"]:
            counters = set(COUNTER_RATE.findall(rule["expr"]))
            if counters:
                records[rule["record"]] = counters
    return records


def scrapes_since(stack: AlertStack, since: float, value: int) -> int:
    """How many scrapes of the node's exporter since ``since`` set up to ``value``."""
    result = stack.query(f'up{{job="ugro-nodes",node="{NODE}"}}[5m]')
    if not result:
        return 0
    return sum(1 for t, v in result[0]["values"] if float(t) > since and float(v) == value)


@pytest.fixture
def stack(tmp_path):
    # The production for: of NodeExporterDown, as thresholds.yml sets it.
    stack = AlertStack(tmp_path)
    yield stack
    stack.close()


def test_killed_exporter_resumes_on_restart_without_negative_rates_or_alerts(stack, tmp_path):
    down_for = load_thresholds().node.exporter_down_for
    port = free_port()
    exporter = start_exporter(tmp_path, port, "exporter.log")
    try:
        with diagnostics(tmp_path):
            stack.targets.register_node(NODE, "127.0.0.1", port)
            started = time.time()
            # Rates need two samples; a few more make the windows span the restart.
            wait_for(lambda: scrapes_since(stack, started, 1) >= 5, 60, "five scrapes")

            exporter.send_signal(signal.SIGKILL)
            exporter.wait(timeout=10)
            killed = time.time()
            # Prometheus saw it down, and NodeExporterDown started its for:.
            pending = f'ALERTS{{alertname="NodeExporterDown",alertstate="pending",node="{NODE}"}}'
            wait_for(lambda: stack.query(pending), 30, "NodeExporterDown pending")

            exporter = start_exporter(tmp_path, port, "exporter-2.log")
            wait_for(lambda: scrapes_since(stack, killed, 1) >= 5, 60, "five scrapes again")
            outage = time.time() - killed
            print(f"\nexporter killed and restarted: {outage:.1f}s of outage (for: {down_for})")

            # Host and GPU series resume from the restarted process.
            for series in ("ugro_node_memory_total_bytes", "ugro_gpu_temperature_celsius"):
                resumed = stack.query(f'timestamp({series}{{node="{NODE}"}}) > {killed}')
                assert resumed, f"{series} resumed"
            assert len(stack.query(f'ugro_gpu_up{{node="{NODE}"}} == 1')) == 2

            window = f"{int(time.time() - started) + 5}s"
            # Every counter rate the recording rules keep for this node: none ever negative.
            checked, reset = {}, set()
            for record, counters in counter_rate_records().items():
                if not stack.query(f'{record}{{node="{NODE}"}}'):
                    continue  # a rank's series: no training job here
                lowest = stack.query(f'min(min_over_time({record}{{node="{NODE}"}}[{window}]))')
                checked[record] = float(lowest[0]["value"][1])
                for counter in counters:
                    if stack.query(f'resets({counter}{{node="{NODE}"}}[{window}]) > 0'):
                        reset.add(counter)
            print("lowest recorded rates over the restart:", checked)
            # The exporter passes on the kernel's and the driver's counters, which its restart
            # does not reset (a device or interface re-created by someone else on this shared
            # machine could, so only the CPU's are asserted).
            print("counters with a reset in the window:", sorted(reset) or "none")
            assert "ugro_node_cpu_seconds_total" not in reset
            assert {
                "node:ugro_node_cpu_utilization:ratio5m",
                "node:ugro_node_network_receive_bytes:rate1m",
                "gpu:ugro_gpu_pcie_replays:rate1m",
            } <= set(checked)
            assert all(value >= 0 for value in checked.values()), checked

            # The outage was shorter than NodeExporterDown's for:, so nobody was alerted.
            firing = stack.query(f'ALERTS{{alertstate="firing",node="{NODE}"}}[{window}]')
            assert firing == []
            assert stack.query(pending) == [], "the pending alert cleared"
            assert stack.slack.posts == []
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)
