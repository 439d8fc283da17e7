from __future__ import annotations

import itertools
import logging
import math
import socket
import sys
import threading
import time

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from tests.support import wait_for
from ugro.trainer import MetricsServerError, Telemetry, TelemetryConfigError
from ugro.trainer.stats import STEP_DURATION_BUCKETS_SECONDS

IDENTITY = {"job_id": "job-1", "rank": 2, "local_rank": 0, "world_size": 4, "node": "node-a"}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def offline(registry: CollectorRegistry, **overrides) -> Telemetry:
    """Telemetry on a fresh registry, without an HTTP endpoint."""
    return Telemetry(**{**IDENTITY, **overrides}, registry=registry, serve=False, env={})


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_counters_and_last_values_after_steps(registry):
    telemetry = offline(registry, total_steps=100)
    for step in range(3):
        telemetry.step(loss=2.0 - step, tokens=512, samples=8, grad_norm=0.5, learning_rate=1e-3)

    assert value(registry, "ugro_train_steps_total") == 3
    assert value(registry, "ugro_train_tokens_total") == 3 * 512
    assert value(registry, "ugro_train_samples_total") == 24
    assert value(registry, "ugro_train_loss_last") == 0.0
    assert value(registry, "ugro_train_grad_norm_last") == 0.5
    assert value(registry, "ugro_train_learning_rate") == 1e-3
    assert value(registry, "ugro_train_target_steps") == 100
    assert value(registry, "ugro_train_telemetry_errors_total") == 0


def test_rank_info_carries_the_identity(registry):
    offline(registry)
    labels = dict(IDENTITY, rank="2", local_rank="0", world_size="4", gpu_uuid="")
    assert value(registry, "ugro_train_rank_info", **labels) == 1


def test_sum_and_count_give_exact_window_means(registry):
    telemetry = offline(registry)
    losses = [4.0, 3.5, 3.0, 2.25, 2.0, 1.75]
    for loss in losses[:2]:
        telemetry.step(loss=loss, grad_norm=loss / 2)
    sum_before = value(registry, "ugro_train_loss_sum")
    count_before = value(registry, "ugro_train_loss_count")
    grad_sum_before = value(registry, "ugro_train_grad_norm_sum")
    for loss in losses[2:]:
        telemetry.step(loss=loss, grad_norm=loss / 2)

    # What PromQL computes as rate(_sum[w]) / rate(_count[w]) over the window of the last 4 steps.
    window = losses[2:]
    mean = (value(registry, "ugro_train_loss_sum") - sum_before) / (
        value(registry, "ugro_train_loss_count") - count_before
    )
    assert mean == pytest.approx(sum(window) / len(window), abs=1e-12)
    grad_mean = (value(registry, "ugro_train_grad_norm_sum") - grad_sum_before) / len(window)
    assert grad_mean == pytest.approx(sum(window) / len(window) / 2, abs=1e-12)


def test_nonfinite_values_are_counted_exposed_and_kept_out_of_the_means(registry):
    telemetry = offline(registry)
    telemetry.step(loss=1.0, grad_norm=1.0)
    telemetry.step(loss=float("nan"), grad_norm=float("inf"))
    telemetry.step(loss=torch.tensor(float("nan")), grad_norm=2.0)

    assert value(registry, "ugro_train_nonfinite_total", quantity="loss") == 2
    assert value(registry, "ugro_train_nonfinite_total", quantity="grad_norm") == 1
    assert math.isnan(value(registry, "ugro_train_loss_last"))
    assert value(registry, "ugro_train_loss_sum") == 1.0
    assert value(registry, "ugro_train_loss_count") == 1
    assert value(registry, "ugro_train_grad_norm_sum") == 3.0
    assert value(registry, "ugro_train_steps_total") == 3
    assert value(registry, "ugro_train_telemetry_errors_total") == 0


def test_micro_steps_add_up_to_one_step_with_the_mean_loss(registry):
    telemetry = offline(registry)
    for micro_loss in (1.0, 2.0, torch.tensor(3.0), 4.0):  # four micro-batches of one step
        telemetry.micro_step(loss=micro_loss, tokens=256, samples=torch.tensor(4))
    telemetry.step(grad_norm=0.5, learning_rate=0.1)
    assert value(registry, "ugro_train_steps_total") == 1
    assert value(registry, "ugro_train_loss_last") == 2.5
    assert value(registry, "ugro_train_loss_count") == 1
    assert value(registry, "ugro_train_tokens_total") == 1024
    assert value(registry, "ugro_train_samples_total") == 16
    # The next step starts from nothing; a loss given to step() wins, counts add up.
    telemetry.micro_step(loss=9.0, tokens=100)
    telemetry.step(loss=1.5, tokens=28)
    assert value(registry, "ugro_train_loss_last") == 1.5
    assert value(registry, "ugro_train_tokens_total") == 1024 + 128
    # A bad micro-step value is an error counted, never raised; the others still count.
    telemetry.micro_step(loss="not a number", tokens=10)
    telemetry.micro_step(loss=float("nan"), tokens=10)
    telemetry.step()
    assert value(registry, "ugro_train_telemetry_errors_total") == 1
    assert value(registry, "ugro_train_nonfinite_total", quantity="loss") == 1
    assert value(registry, "ugro_train_tokens_total") == 1024 + 128 + 20


def test_cpu_tensors_and_numpy_scalars_are_accepted(registry):
    import numpy as np

    telemetry = offline(registry)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.25)
    loss = (weight * 2).sum()
    telemetry.step(
        loss=loss,  # still attached to the graph: telemetry must not need .detach()
        tokens=torch.tensor(64),
        samples=np.int64(2),
        grad_norm=torch.tensor(1.5, dtype=torch.bfloat16),
        optimizer=optimizer,
    )
    assert value(registry, "ugro_train_loss_last") == 6.0
    assert value(registry, "ugro_train_tokens_total") == 64
    assert value(registry, "ugro_train_samples_total") == 2
    assert value(registry, "ugro_train_grad_norm_last") == 1.5
    assert value(registry, "ugro_train_learning_rate") == 0.25


def test_step_duration_histogram_measures_time_between_steps(registry, monkeypatch):
    # The first reading is Telemetry's creation; scrapes read the clock too.
    clock = itertools.chain([9.0, 10.0, 10.004, 10.5, 12.0], itertools.repeat(12.0))
    monkeypatch.setattr("ugro.trainer.telemetry.time.perf_counter", lambda: next(clock))
    telemetry = offline(registry)
    for _ in range(4):
        telemetry.step(loss=1.0)

    # The first step has no predecessor: three durations, 4 ms, 496 ms and 1.5 s.
    assert value(registry, "ugro_train_step_duration_seconds_count") == 3
    assert value(registry, "ugro_train_step_duration_seconds_sum") == pytest.approx(2.0)
    bucket = lambda le: value(registry, "ugro_train_step_duration_seconds_bucket", le=le)  # noqa: E731
    assert bucket("0.003") == 0
    assert bucket("0.01") == 1
    assert bucket("0.3") == 1
    assert bucket("1.0") == 2
    assert bucket("3.0") == 3
    assert bucket("+Inf") == 3
    assert STEP_DURATION_BUCKETS_SECONDS[0] == 0.003 and STEP_DURATION_BUCKETS_SECONDS[-1] == 60.0


def test_last_step_timestamp_is_wall_clock(registry, monkeypatch):
    monkeypatch.setattr("ugro.trainer.telemetry.time.time", lambda: 1_700_000_000.5)
    telemetry = offline(registry)
    assert value(registry, "ugro_train_last_step_timestamp_seconds") is None  # no step yet
    telemetry.step(loss=1.0)
    assert value(registry, "ugro_train_last_step_timestamp_seconds") == 1_700_000_000.5


class ExplodingNumber:
    def __float__(self) -> float:
        raise RuntimeError("boom")


class BrokenOptimizer:
    @property
    def param_groups(self):
        raise RuntimeError("no groups")


def test_errors_inside_telemetry_never_reach_the_training_loop(registry, caplog):
    telemetry = offline(registry)
    with caplog.at_level(logging.WARNING, logger="ugro.trainer"):
        telemetry.step(loss=ExplodingNumber(), tokens=100, grad_norm=1.0)
        telemetry.step(loss=1.0, tokens="many", optimizer=BrokenOptimizer())
        telemetry.step(loss=torch.ones(3), samples=-4)

    # Every step is counted, every good value recorded, every bad one counted as an error.
    assert value(registry, "ugro_train_steps_total") == 3
    assert value(registry, "ugro_train_tokens_total") == 100
    assert value(registry, "ugro_train_loss_last") == 1.0
    assert value(registry, "ugro_train_grad_norm_last") == 1.0
    assert value(registry, "ugro_train_telemetry_errors_total") == 5
    assert "RuntimeError: boom" in caplog.text
    assert "expected a scalar, got a tensor of 3 elements" in caplog.text
    assert "samples=-4" in caplog.text and "expected a whole number of samples" in caplog.text
    assert value(registry, "ugro_train_telemetry_rejected_values_total") == 3


def test_error_logging_is_rate_limited(registry, caplog):
    telemetry = offline(registry)
    with caplog.at_level(logging.WARNING, logger="ugro.trainer"):
        for _ in range(50):
            telemetry.step(loss=ExplodingNumber())
            telemetry.step(loss="not a number")  # a rejected value uses none of the quota
    assert value(registry, "ugro_train_telemetry_errors_total") == 100
    assert value(registry, "ugro_train_telemetry_rejected_values_total") == 50
    assert len(caplog.records) == 5 + 1


def test_latest_reports_what_reached_the_host(registry):
    telemetry = offline(registry)
    assert telemetry.latest()["loss"] is None
    telemetry.step(loss=3.0, tokens=10, learning_rate=0.1)
    assert telemetry.latest() == {
        "steps": 1,
        "tokens": 10,
        "loss": 3.0,
        "grad_norm": None,
        "learning_rate": 0.1,
    }


def test_one_rank_exposes_at_most_55_series(registry):
    telemetry = offline(registry, total_steps=10)
    telemetry.step(loss=1.0)
    for _ in range(2):
        for phase in ("data", "forward", "backward", "optimizer", "evaluation"):
            with telemetry.phase(phase):
                pass
        with telemetry.checkpoint(bytes_written=10):
            pass
        telemetry.step(loss=1.0, tokens=1, samples=1, grad_norm=1.0, learning_rate=0.1)
    series = [s for family in registry.collect() for s in family.samples]
    # Every phase has its counter now; a CUDA rank adds four allocator series, a rank with
    # known FLOPs two, a closed rank its end time: keep headroom for them.
    assert len(series) + 4 + 2 + 1 <= 55, [s.name for s in series]


def served(registry: CollectorRegistry, **overrides) -> Telemetry:
    """Telemetry serving /metrics on a free loopback port."""
    return Telemetry(
        **{**IDENTITY, **overrides}, metrics_port=0, bind_address="127.0.0.1", registry=registry
    )


def test_serves_metrics_over_http_and_close_frees_the_port(registry, scrape_metrics):
    telemetry = served(registry, final_scrape_timeout=0)
    telemetry.step(loss=1.25)
    port = telemetry.server.port
    body = scrape_metrics(f"http://127.0.0.1:{port}/metrics")
    assert "ugro_train_loss_last 1.25" in body
    assert telemetry.metrics_url == f"http://127.0.0.1:{port}/metrics"

    telemetry.close()
    telemetry.close()  # safe to repeat
    assert telemetry.metrics_url is None
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))  # would raise if the endpoint still held it


def test_a_normal_close_marks_the_end_and_a_failing_one_does_not():
    finished = CollectorRegistry()
    with offline(finished) as telemetry:
        telemetry.step(loss=1.0)
    assert value(finished, "ugro_train_end_time_seconds") == pytest.approx(time.time(), abs=5)

    crashed = CollectorRegistry()
    with pytest.raises(RuntimeError), offline(crashed):
        raise RuntimeError("out of memory")
    assert value(crashed, "ugro_train_end_time_seconds") is None

    # close() in a `finally` while an exception propagates: a crash, not an end.
    in_finally = CollectorRegistry()
    telemetry = offline(in_finally)
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("a data loader died")
        finally:
            telemetry.close()
    assert value(in_finally, "ugro_train_end_time_seconds") is None

    # sys.exit(0) inside the block is a normal end; sys.exit(3) is not.
    for code, ended in ((0, True), (3, False)):
        exiting = CollectorRegistry()
        with pytest.raises(SystemExit), offline(exiting):
            sys.exit(code)
        assert (value(exiting, "ugro_train_end_time_seconds") is not None) is ended


def test_close_waits_for_the_scrape_that_carries_the_end_and_the_last_step(
    registry, scrape_metrics
):
    telemetry = served(registry)
    url = telemetry.metrics_url
    scrape_metrics(url)
    time.sleep(2)
    scrape_metrics(url)  # scraped every 2 s: close() would wait at most 5 s
    telemetry.step(loss=2.5)
    closer = threading.Thread(target=telemetry.close)
    closer.start()
    # Scrapes that come before close() has marked the end do not end its wait.
    body = wait_for(
        lambda: (text := scrape_metrics(url)) and "ugro_train_end_time_seconds" in text and text,
        10,
        "a scrape with the end marker",
    )
    closer.join(timeout=4)
    assert not closer.is_alive(), "close() went on waiting after the final scrape"
    assert "ugro_train_loss_last 2.5" in body
    assert "ugro_train_steps_total 1.0" in body
    assert telemetry.server is None


def test_close_gives_up_after_two_scrape_intervals(registry, scrape_metrics, caplog):
    telemetry = served(registry)
    scrape_metrics(telemetry.metrics_url)
    time.sleep(0.5)
    scrape_metrics(telemetry.metrics_url)  # about 2 × 0.5 s + 1 s = 2 s of patience
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="ugro.trainer"):
        telemetry.close()
    assert 1.9 <= time.monotonic() - started < 10
    assert "no scrape within" in caplog.text


def test_close_does_not_wait_for_a_rank_nobody_scrapes(registry):
    telemetry = served(registry)
    started = time.monotonic()
    telemetry.close()
    assert time.monotonic() - started < 5  # the server's own shutdown only


def test_a_registered_target_waits_for_its_first_scrape_too(registry, scrape_metrics):
    """A job over before Prometheus's first scrape (it discovers targets every few seconds)."""
    telemetry = Telemetry(
        **IDENTITY, metrics_port=0, bind_address="127.0.0.1", registry=registry,
        env={"UGRO_REGISTERED_TARGET": "1"},
    )  # fmt: skip
    url = telemetry.metrics_url
    telemetry.step(loss=0.5)
    closer = threading.Thread(target=telemetry.close)
    closer.start()
    time.sleep(1)
    assert closer.is_alive(), "close() did not wait for the scrape it was registered for"
    body = wait_for(
        lambda: (text := scrape_metrics(url)) and "ugro_train_end_time_seconds" in text and text,
        10,
        "a scrape with the end marker",
    )
    closer.join(timeout=5)
    assert not closer.is_alive()
    assert "ugro_train_steps_total 1.0" in body
    with pytest.raises(TelemetryConfigError, match="UGRO_REGISTERED_TARGET='yes'"):
        Telemetry(**IDENTITY, serve=False, env={"UGRO_REGISTERED_TARGET": "yes"})


def test_a_bad_final_scrape_timeout_is_named():
    with pytest.raises(TelemetryConfigError, match="UGRO_FINAL_SCRAPE_TIMEOUT='soon'"):
        Telemetry(**IDENTITY, serve=False, env={"UGRO_FINAL_SCRAPE_TIMEOUT": "soon"})


def test_context_manager_closes_the_endpoint(registry):
    with Telemetry(**IDENTITY, metrics_port=0, bind_address="127.0.0.1", registry=registry) as t:
        assert t.server is not None
    assert t.server is None


@pytest.fixture
def taken_port():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_port_taken_continues_without_telemetry_by_default(registry, taken_port, caplog):
    with caplog.at_level(logging.ERROR, logger="ugro.trainer"):
        telemetry = Telemetry(
            **IDENTITY, metrics_port=taken_port, bind_address="127.0.0.1", registry=registry
        )
    assert telemetry.server is None
    [record] = caplog.records
    message = record.getMessage()
    assert f"rank 2 cannot serve /metrics on 127.0.0.1:{taken_port}" in message
    assert "address already in use" in message
    assert "\n" not in message
    telemetry.step(loss=1.0)  # training goes on; values still land in the registry
    assert value(registry, "ugro_train_steps_total") == 1


def test_port_taken_with_fail_policy_stops_before_the_first_step(registry, taken_port):
    with pytest.raises(MetricsServerError, match=f"rank 2 cannot serve /metrics.*:{taken_port}"):
        Telemetry(
            **IDENTITY,
            metrics_port=taken_port,
            bind_address="127.0.0.1",
            on_port_taken="fail",
            registry=registry,
        )
    assert list(registry.collect()) == []  # nothing half-registered


def test_exposition_is_clean_under_promtool(registry, promtool):
    telemetry = offline(registry, total_steps=5)
    telemetry.step(loss=1.0, tokens=8, samples=1, grad_norm=0.1, learning_rate=0.01)
    telemetry.step(loss=float("nan"), tokens=8, samples=1, grad_norm=0.1, learning_rate=0.01)
    result = promtool(generate_latest(registry).decode())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


# Values a training loop must never be able to break telemetry with (issue 14, point 6): each is
# dropped at the door and counted; the step itself still counts.
HOSTILE_STEPS = [
    {"tokens": 1e308},
    {"tokens": 1e308},  # twice: the sum used to overflow and break every later scrape
    {"tokens": "5"},
    {"tokens": True},
    {"tokens": 2.9},
    {"samples": -1},
    {"tokens": float("nan")},
    {"samples": float("inf")},
    {"tokens": 2**53 + 2},
    {"samples": torch.tensor(True)},
    {"loss": "2.5"},
    {"grad_norm": False},
    {"learning_rate": "1e-3"},
]


def test_hostile_values_are_dropped_and_counted_and_the_scrape_stays_valid(
    registry, scrape_metrics, parse_samples, promtool, caplog
):
    import urllib.request

    import numpy as np

    telemetry = served(registry, final_scrape_timeout=0)
    with caplog.at_level(logging.WARNING, logger="ugro.trainer"):
        for values in HOSTILE_STEPS:
            telemetry.step(**values)
        # Finite but huge: the loss has exploded. Counted as non-finite and kept out of the sum,
        # which would otherwise stay +Inf for the rest of the run.
        telemetry.step(loss=1.7e308, grad_norm=-1.7e308)
        telemetry.step(loss=1.7e308)
        # Integral counts of any numeric kind are accepted.
        telemetry.step(loss=2.0, tokens=8.0, samples=np.int64(2), grad_norm=1.0)
        telemetry.step(tokens=torch.tensor(3), samples=np.float32(1.0), learning_rate=0.5)

    with urllib.request.urlopen(telemetry.metrics_url, timeout=5) as response:
        assert response.status == 200
        body = response.read().decode()
    assert scrape_metrics(telemetry.metrics_url)  # and the next scrape too
    samples = parse_samples(body)
    get = lambda name, **labels: samples.get((name, tuple(sorted(labels.items()))))  # noqa: E731
    assert get("ugro_train_steps_total") == len(HOSTILE_STEPS) + 4
    assert get("ugro_train_tokens_total") == 8 + 3
    assert get("ugro_train_samples_total") == 2 + 1
    assert get("ugro_train_telemetry_rejected_values_total") == len(HOSTILE_STEPS)
    assert get("ugro_train_telemetry_errors_total") == len(HOSTILE_STEPS)
    assert get("ugro_train_loss_sum") == 2.0 and get("ugro_train_loss_count") == 1
    assert get("ugro_train_grad_norm_sum") == 1.0 and get("ugro_train_grad_norm_count") == 1
    assert get("ugro_train_nonfinite_total", quantity="loss") == 2
    assert get("ugro_train_nonfinite_total", quantity="grad_norm") == 1
    assert get("ugro_train_learning_rate") == 0.5
    assert all(math.isfinite(v) for (name, _), v in samples.items() if not name.endswith("_last"))
    result = promtool(body)
    assert result.returncode == 0, result.stdout + result.stderr

    # One warning per field, naming the field and the value, however often it is repeated.
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 5, warnings
    assert any("tokens=1e+308" in w and "a whole number" in w for w in warnings), warnings
    assert any("samples=-1" in w for w in warnings), warnings
    assert any("loss='2.5'" in w for w in warnings), warnings
    assert all("\n" not in w for w in warnings)
    telemetry.close()


def test_micro_step_counts_are_validated_too(registry):
    telemetry = offline(registry)
    telemetry.micro_step(loss=1.0, tokens=1e308)
    telemetry.micro_step(loss=3.0, tokens=1e308, samples=True)
    telemetry.micro_step(tokens=6, samples=2.0)
    telemetry.step(tokens=10)
    assert value(registry, "ugro_train_tokens_total") == 16
    assert value(registry, "ugro_train_samples_total") == 2
    assert value(registry, "ugro_train_loss_last") == 2.0
    assert value(registry, "ugro_train_telemetry_rejected_values_total") == 3


def test_device_counts_are_validated_once_they_reach_the_host(registry):
    from tests.trainer.test_device_values import FakeCudaCopies, FakeCudaScalar

    copies = FakeCudaCopies()
    telemetry = offline(registry, device_copier=copies)
    telemetry.step(tokens=FakeCudaScalar(2.9), samples=FakeCudaScalar(4.0))
    telemetry.step(tokens=FakeCudaScalar(float(2**60)), loss=FakeCudaScalar(1.7e308))
    copies.complete()
    assert value(registry, "ugro_train_tokens_total") == 0
    assert value(registry, "ugro_train_samples_total") == 4
    assert value(registry, "ugro_train_telemetry_rejected_values_total") == 2
    assert value(registry, "ugro_train_nonfinite_total", quantity="loss") == 1
    assert value(registry, "ugro_train_loss_sum") == 0


def test_a_value_the_scrape_cannot_convert_is_exposed_as_inf_and_counted():
    from ugro.trainer.metrics import RankMetricsCollector, RankSnapshot
    from ugro.trainer.stats import RankStats

    stats = RankStats(tokens=10**400, samples=-(10**400))  # state no valid step can reach
    stats.loss.total = "not a float"
    snapshot = RankSnapshot(
        stats=stats,
        identity={"job_id": "j", "rank": "0", "local_rank": "0", "world_size": "1", "node": "n",
                  "gpu_uuid": ""},
        start_time=0.0,
        end_time=None,
        target_steps=None,
        pending_steps=0,
    )  # fmt: skip
    errors: list[BaseException] = []
    registry = CollectorRegistry()
    registry.register(RankMetricsCollector(lambda: snapshot, on_error=errors.append))
    body = generate_latest(registry).decode()
    assert "ugro_train_tokens_total +Inf" in body
    assert "ugro_train_samples_total -Inf" in body
    assert "ugro_train_loss_sum NaN" in body
    assert "ugro_train_steps_total 0.0" in body
    assert len(errors) == 3
