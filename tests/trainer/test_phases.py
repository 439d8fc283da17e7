"""Telemetry's phases and checkpoints: where a rank is now, and where its time went."""

from __future__ import annotations

import logging
import time

import psutil
import pytest
from prometheus_client import CollectorRegistry

from ugro.common.phases import PHASES
from ugro.trainer import Telemetry, TelemetryConfigError

IDENTITY = {"job_id": "job-1", "rank": 0, "local_rank": 0, "world_size": 1, "node": "node-a"}
PROCESS_START = 1_700_000_000.0


class FakeClock:
    """perf_counter and time.time, moved by hand; the process started 10 s before it."""

    def __init__(self) -> None:
        self.clock = 500.0  # perf_counter has an arbitrary origin
        self.wall = PROCESS_START + 10.0

    def advance(self, seconds: float) -> None:
        self.clock += seconds
        self.wall += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("ugro.trainer.telemetry.time.perf_counter", lambda: fake.clock)
    monkeypatch.setattr("ugro.trainer.telemetry.time.time", lambda: fake.wall)
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: PROCESS_START)
    return fake


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def offline(registry: CollectorRegistry, env: dict[str, str] | None = None) -> Telemetry:
    return Telemetry(**IDENTITY, registry=registry, serve=False, env=env or {})


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def phase_seconds(registry: CollectorRegistry) -> dict[str, float]:
    return {
        sample.labels["phase"]: sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "ugro_train_phase_seconds_total"
    }


def current_phase(registry: CollectorRegistry) -> list[str]:
    """Every phase label of ugro_train_phase: exactly one when all is well."""
    return [
        sample.labels["phase"]
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "ugro_train_phase"
    ]


def test_startup_counts_from_the_process_start_to_the_end_of_the_first_step(clock, registry):
    telemetry = offline(registry)
    assert current_phase(registry) == ["startup"]
    assert value(registry, "ugro_train_process_start_time_seconds") == PROCESS_START
    assert value(registry, "ugro_train_phase_start_time_seconds") == PROCESS_START
    assert phase_seconds(registry) == {"startup": 10.0}  # the process's age, before any step

    # The parts of the first step count as start-up: compilation, warm-up, the first
    # collective. They are shown as what they are, so a hang in the first step can be placed.
    with telemetry.data_wait():
        clock.advance(1.0)
        assert current_phase(registry) == ["data"]
        assert value(registry, "ugro_train_phase_start_time_seconds") == PROCESS_START + 10.0
        assert phase_seconds(registry) == {"startup": 11.0}
    with telemetry.phase("forward"):
        clock.advance(2.0)
    telemetry.step(loss=1.0)
    assert current_phase(registry) == ["step"]
    assert value(registry, "ugro_train_phase_start_time_seconds") == PROCESS_START + 13.0
    assert phase_seconds(registry) == {"startup": 13.0, "step": 0.0}


def test_each_phase_counts_its_own_time_and_the_sum_is_the_process_age(clock, registry):
    telemetry = offline(registry)
    telemetry.step()  # startup ends: 10 s
    for _ in range(3):
        with telemetry.data_wait():
            clock.advance(0.5)
        with telemetry.phase("forward"):
            clock.advance(0.25)
            assert current_phase(registry) == ["forward"]
        with telemetry.phase("backward"):
            clock.advance(0.75)
        with telemetry.phase("optimizer"):
            clock.advance(0.125)
        clock.advance(0.0625)  # unmarked work: the step phase
        telemetry.step()
    with telemetry.evaluation():
        clock.advance(4.0)
    telemetry.mark("data")
    clock.advance(2.0)
    # The current phase counts up to the scrape.
    assert current_phase(registry) == ["data"]
    assert value(registry, "ugro_train_phase_start_time_seconds") == clock.wall - 2.0
    seconds = phase_seconds(registry)
    assert seconds == {
        "startup": 10.0,
        "step": 3 * 0.0625,
        "data": 3 * 0.5 + 2.0,
        "forward": 3 * 0.25,
        "backward": 3 * 0.75,
        "optimizer": 3 * 0.125,
        "evaluation": 4.0,
    }
    assert sum(seconds.values()) == pytest.approx(clock.wall - PROCESS_START, abs=1e-9)
    clock.advance(3.0)
    assert phase_seconds(registry)["data"] == 6.5


def test_a_block_returns_to_the_phase_before_it_or_to_step_after_a_step(clock, registry):
    telemetry = offline(registry)
    telemetry.step()
    with telemetry.checkpoint():
        with telemetry.phase("data"):  # nested: back to the checkpoint after it
            assert current_phase(registry) == ["data"]
        assert current_phase(registry) == ["checkpoint"]
    assert current_phase(registry) == ["step"]

    telemetry.mark("backward")
    with telemetry.phase("optimizer"):
        telemetry.step()  # a step completed inside the block: the rank is in step after it
    assert current_phase(registry) == ["step"]

    with pytest.raises(StopIteration), telemetry.data_wait():
        next(iter([]))  # the loader's exception passes through, the phase still ends
    assert current_phase(registry) == ["step"]


def test_phases_with_real_time_add_up_to_the_process_lifetime(registry):
    telemetry = offline(registry)
    telemetry.step()
    with telemetry.data_wait():
        time.sleep(0.05)
    with telemetry.checkpoint():
        time.sleep(0.03)
    telemetry.step()
    before = time.time()
    seconds = phase_seconds(registry)
    after = time.time()
    process_start = value(registry, "ugro_train_process_start_time_seconds")
    assert process_start == psutil.Process().create_time()
    assert seconds["data"] >= 0.05 and seconds["checkpoint"] >= 0.03
    # psutil's start time has the kernel's clock-tick resolution (10 ms).
    assert before - process_start - 0.02 <= sum(seconds.values()) <= after - process_start + 0.02


def test_unknown_phase_raises_at_the_call_and_nothing_else_does(registry, caplog, monkeypatch):
    telemetry = offline(registry)
    for bad in ("Forward", "warmup", None, 3):
        with pytest.raises(ValueError, match="unknown phase"):
            telemetry.phase(bad)
        with pytest.raises(ValueError, match="unknown phase"):
            telemetry.mark(bad)
    assert set(PHASES) == {
        "startup",
        "data",
        "step",
        "forward",
        "backward",
        "optimizer",
        "checkpoint",
        "evaluation",
    }
    # A failure inside telemetry is counted and logged, never raised into the loop.
    telemetry.step()

    def broken(*args):
        raise RuntimeError("broken inside")

    monkeypatch.setattr(telemetry, "_switch_locked", broken)
    monkeypatch.setattr(telemetry, "_raw_phase_seconds", broken)
    with caplog.at_level(logging.WARNING, logger="ugro.trainer"):
        telemetry.mark("data")
        with telemetry.phase("forward"), telemetry.checkpoint() as checkpoint:
            checkpoint.bytes_written = 5
        telemetry.record_checkpoint(1.0)
    monkeypatch.undo()
    assert value(registry, "ugro_train_telemetry_errors_total") == 4
    assert "RuntimeError: broken inside" in caplog.text
    # Bad arguments to record_checkpoint are dropped and counted, not raised.
    telemetry.record_checkpoint(-1.0)
    telemetry.record_checkpoint("slow")
    telemetry.record_checkpoint(float("nan"))
    assert value(registry, "ugro_train_telemetry_rejected_values_total") == 3
    assert value(registry, "ugro_train_checkpoints_total") is None


def test_checkpoint_context_counts_duration_time_and_bytes(clock, registry):
    telemetry = offline(registry)
    telemetry.step()
    assert value(registry, "ugro_train_checkpoints_total") is None  # absent until the first
    with telemetry.checkpoint(bytes_written=1000):
        assert current_phase(registry) == ["checkpoint"]
        clock.advance(3.0)
    clock.advance(1.0)
    with telemetry.checkpoint() as checkpoint:
        clock.advance(2.5)
        checkpoint.bytes_written = 24
    assert value(registry, "ugro_train_checkpoints_total") == 2
    assert value(registry, "ugro_train_last_checkpoint_duration_seconds") == 2.5
    assert value(registry, "ugro_train_last_checkpoint_timestamp_seconds") == clock.wall
    assert value(registry, "ugro_train_checkpoint_bytes_total") == 1024
    assert phase_seconds(registry)["checkpoint"] == 5.5

    # A checkpoint that fails counts its time in the phase, but no checkpoint.
    with pytest.raises(OSError), telemetry.checkpoint():
        clock.advance(1.0)
        raise OSError("disk full")
    assert value(registry, "ugro_train_checkpoints_total") == 2
    assert phase_seconds(registry)["checkpoint"] == 6.5
    assert current_phase(registry) == ["step"]


def test_checkpoint_bytes_appear_only_once_a_checkpoint_gave_them(clock, registry):
    telemetry = offline(registry)
    with telemetry.checkpoint():  # before the first step: a checkpoint all the same
        clock.advance(1.0)
    assert value(registry, "ugro_train_checkpoints_total") == 1
    assert value(registry, "ugro_train_checkpoint_bytes_total") is None
    assert phase_seconds(registry) == {"startup": 10.0, "checkpoint": 1.0}


def test_record_checkpoint_moves_time_out_of_the_current_phase_never_backwards(clock, registry):
    telemetry = offline(registry)
    telemetry.step()
    clock.advance(10.0)  # 10 s in step, of which the last 4 were a checkpoint HF reports later
    assert phase_seconds(registry) == {"startup": 10.0, "step": 10.0}  # a scrape saw them
    telemetry.record_checkpoint(4.0, bytes_written=300)
    assert value(registry, "ugro_train_checkpoints_total") == 1
    assert value(registry, "ugro_train_last_checkpoint_duration_seconds") == 4.0
    assert value(registry, "ugro_train_checkpoint_bytes_total") == 300
    # The step counter has been scraped at 10: it stays there until it has grown past the 4 s.
    assert phase_seconds(registry) == {"startup": 10.0, "step": 10.0, "checkpoint": 4.0}
    clock.advance(3.0)
    assert phase_seconds(registry)["step"] == 10.0
    clock.advance(2.0)
    seconds = phase_seconds(registry)
    assert seconds == {"startup": 10.0, "step": 11.0, "checkpoint": 4.0}
    assert sum(seconds.values()) == clock.wall - PROCESS_START


def test_restart_count_comes_from_torchrun(registry):
    offline(registry)
    assert value(registry, "ugro_train_restarts") == 0
    restarted = CollectorRegistry()
    offline(restarted, env={"TORCHELASTIC_RESTART_COUNT": "3"})
    assert value(restarted, "ugro_train_restarts") == 3
    with pytest.raises(TelemetryConfigError, match="TORCHELASTIC_RESTART_COUNT='x'"):
        offline(CollectorRegistry(), env={"TORCHELASTIC_RESTART_COUNT": "x"})


def test_without_psutil_startup_counts_from_telemetry_creation(clock, registry, monkeypatch):
    def unavailable(self):
        raise psutil.AccessDenied()

    monkeypatch.setattr(psutil.Process, "create_time", unavailable)
    offline(registry)
    assert value(registry, "ugro_train_process_start_time_seconds") == clock.wall
    assert phase_seconds(registry) == {"startup": 0.0}
