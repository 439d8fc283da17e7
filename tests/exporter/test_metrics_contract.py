"""docs/metrics.md and the exporter's collectors describe the same metrics."""

from __future__ import annotations

import pathlib
import re
import time

from prometheus_client import generate_latest

from ugro.exporter.cli import Exporter
from ugro.exporter.gpu import GpuCollector
from ugro.exporter.host import HostCollector
from ugro.exporter.nvml import Nvml

from ..support import wait_for
from .fake_nvml import FakeNvml, h100s

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def documented_exporter_metrics() -> dict[str, str]:
    section = DOC.read_text().split("## Node exporter", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(ugro_[a-z0-9_]+)` \| (\w+)", section, flags=re.MULTILINE))


def test_every_exposed_metric_is_documented_with_its_type_and_nothing_else(promtool):
    fake = FakeNvml(h100s(2))
    # The opt-in series too, so that every documented family shows.
    gpu = GpuCollector(Nvml(fake), nvlink_per_link=True, tensor_pipes=True)
    exporter = Exporter(node="n", gpu=gpu, host=HostCollector(), poll_interval=60)
    try:
        exporter.poll_once()
        time.sleep(0.1)  # CPU utilisation (and GPM) need two polls some CPU ticks apart
        exporter.poll_once()
        fake.inject_xid(0, 79)
        wait_for(lambda: "xid=" in generate_latest(exporter.registry).decode(), 5, "an XID")
        families = {
            (f.name + "_total" if f.type == "counter" else f.name): f.type
            for f in exporter.registry.collect()
        }
        # Only a down collector has a reason: see it on an exporter without NVML.
        down = Exporter(
            node="n",
            gpu=GpuCollector(Nvml(FakeNvml(library_missing=True))),
            host=HostCollector(),
            poll_interval=60,
        )
        assert "ugro_exporter_collector_down_reason" in {
            f.name for f in down.registry.collect() if f.samples
        }
        down.close()
        result = promtool(generate_latest(exporter.registry).decode())
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip()
    finally:
        exporter.close()
    assert documented_exporter_metrics() == families
