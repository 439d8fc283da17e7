"""docs/metrics.md and the trainer's collector describe the same metrics."""

from __future__ import annotations

import pathlib
import re

from prometheus_client import CollectorRegistry, generate_latest

from ugro.common.phases import PHASES
from ugro.trainer.metrics import RANK_INFO_LABELS, CudaMemory, RankMetricsCollector, RankSnapshot
from ugro.trainer.stats import RankStats

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def documented_trainer_metrics() -> dict[str, str]:
    """{metric name: type} from the trainer table of docs/metrics.md."""
    section = DOC.read_text().split("## Trainer", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(ugro_[a-z0-9_]+)` \| (\w+)", section, flags=re.MULTILINE)
    return dict(rows)


def full_snapshot(*, optional: bool) -> RankSnapshot:
    """A snapshot after some steps; ``optional`` adds every phase, checkpoints, and the MFU and
    CUDA-only values."""
    stats = RankStats(learning_rate=0.1, last_step_timestamp=1.0)
    stats.loss.observe(1.0)
    stats.grad_norm.observe(1.0)
    phase_seconds = {"startup": 1.0}
    if optional:
        stats.model_flops = 6e12
        stats.checkpoints = 2
        stats.last_checkpoint_timestamp = 1.5
        stats.last_checkpoint_duration = 0.25
        stats.checkpoint_bytes = 4096
        phase_seconds = dict.fromkeys(PHASES, 1.0)
    return RankSnapshot(
        stats=stats,
        identity={label: "x" for label in RANK_INFO_LABELS},
        start_time=0.0,
        end_time=2.0 if optional else None,
        target_steps=10,
        pending_steps=0,
        peak_flops=989e12 if optional else None,
        cuda_memory=CudaMemory(1024.0, 2048.0, 1.0, 0.0) if optional else None,
        phase="step",
        phase_start_time=1.0,
        phase_seconds=phase_seconds,
        process_start_time=0.0,
        restart_count=1,
    )


def exposed(*, optional: bool) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RankMetricsCollector(lambda: full_snapshot(optional=optional)))
    return registry


def test_every_exposed_metric_is_documented_with_its_type_and_nothing_else():
    families = {
        (f.name + "_total" if f.type == "counter" else f.name): f.type
        for f in exposed(optional=True).collect()
    }
    assert documented_trainer_metrics() == families


def test_documented_series_counts_match(promtool):
    text = DOC.read_text().replace("\n", " ")
    always, most = re.search(r"always exposes (\d+) series.*?at most (\d+)\.", text).groups()
    actual = [sum(len(f.samples) for f in exposed(optional=o).collect()) for o in (False, True)]
    assert actual == [int(always), int(most)]
    assert actual[1] <= 55

    result = promtool(generate_latest(exposed(optional=True)).decode())
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip()
