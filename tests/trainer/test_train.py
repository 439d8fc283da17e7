"""The reference trainer for real: torchrun, gloo, HTTP scrapes and promtool."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from tests.support import sample, sample_values, scrape
from tests.support.net import http_json
from tests.support.stack import AlertStack
from tests.support.training import TrainingJob
from ugro.trainer.faults import FaultPlan

from ..support import wait_for

BATCH, CONTEXT = 8, 32
SMALL_MODEL = ["--batch-size", str(BATCH), "--context", str(CONTEXT), "--width", "64"]


def trainer_env(base_port: int, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TORCHELASTIC_", "UGRO_")) and k not in ("RANK", "LOCAL_RANK")
    }
    env.update(
        UGRO_JOB_ID="itest-1",
        UGRO_METRICS_PORT=str(base_port),
        UGRO_METRICS_ADDR="127.0.0.1",
        UGRO_NODE="node-x",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_trainer(args: list[str], env: dict[str, str], timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "ugro.trainer.train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_two_rank_torchrun_serves_contract_metrics_on_both_ranks(
    start_process, free_port_block, scrape_metrics, parse_samples, promtool, tmp_path
):
    steps = 150
    base = free_port_block(2)
    torchrun = start_process(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "ugro.trainer.train",
            "--steps",
            str(steps),
            "--linger",
            "15",
            "--log-every",
            "50",
            # rank 1's input pipeline straggles for the last 40 steps
            "--fault-rank",
            "1",
            "--slow-factor",
            "3",
            "--slow-from",
            str(steps - 40),
            # rank 0 writes a checkpoint at steps 40, 80 and 120; rank 1 waits in a barrier
            "--checkpoint-every",
            "40",
            "--checkpoint-dir",
            str(tmp_path),
            *SMALL_MODEL,
        ],
        trainer_env(base),
    )
    urls = [f"http://127.0.0.1:{base + rank}/metrics" for rank in (0, 1)]

    def steps_done(url: str) -> float:
        return parse_samples(scrape_metrics(url)).get(("ugro_train_steps_total", ()), 0)

    early = [
        wait_for(lambda u=u: steps_done(u) >= 10 and parse_samples(scrape_metrics(u)), 120, u)
        for u in urls
    ]
    late_texts = [
        wait_for(lambda u=u: steps_done(u) == steps and scrape_metrics(u), 120, f"{u} at the end")
        for u in urls
    ]
    late = [parse_samples(text) for text in late_texts]

    for rank in (0, 1):
        before, after = early[rank], late[rank]
        info = {
            dict(labels)["rank"]: dict(labels)
            for (name, labels), _ in after.items()
            if name == "ugro_train_rank_info"
        }
        assert info == {
            str(rank): {
                "job_id": "itest-1",
                "rank": str(rank),
                "local_rank": str(rank),
                "world_size": "2",
                "node": "node-x",
                "gpu_uuid": "",
            }
        }
        get = lambda samples, name, **labels: samples.get((name, tuple(sorted(labels.items()))))  # noqa: E731
        assert get(after, "ugro_train_steps_total") == steps
        assert get(after, "ugro_train_steps_total") > get(before, "ugro_train_steps_total")
        assert get(after, "ugro_train_tokens_total") == steps * BATCH * CONTEXT
        assert get(after, "ugro_train_samples_total") == steps * BATCH
        assert get(after, "ugro_train_target_steps") == steps
        assert get(after, "ugro_train_step_duration_seconds_count") == steps - 1
        assert get(after, "ugro_train_nonfinite_total", quantity="loss") == 0
        assert 0 < get(after, "ugro_train_learning_rate") < 3e-3
        assert math.isfinite(get(after, "ugro_train_grad_norm_last"))
        assert get(after, "ugro_train_last_step_timestamp_seconds") > time.time() - 120
        assert get(after, "ugro_train_telemetry_errors_total") == 0
        assert get(after, "ugro_train_checkpoints_total") == 3
        assert get(after, "ugro_train_last_checkpoint_duration_seconds") > 0
        assert get(after, "ugro_train_phase_seconds_total", phase="checkpoint") > 0

        # The loss falls: the exact mean of the later window is well below the early one's,
        # and the early one starts near ln(256), a uniform guess over bytes.
        early_mean = get(before, "ugro_train_loss_sum") / get(before, "ugro_train_loss_count")
        later_mean = (get(after, "ugro_train_loss_sum") - get(before, "ugro_train_loss_sum")) / (
            get(after, "ugro_train_loss_count") - get(before, "ugro_train_loss_count")
        )
        assert early_mean > 4.0
        assert later_mean < early_mean - 1.0, (early_mean, later_mean)

        result = promtool(late_texts[rank])
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
            result.stdout + result.stderr
        )

    # DDP keeps the ranks in lockstep, so both took every step; rank 1 alone spent the time
    # waiting for its batches.
    # Only rank 0 wrote: three times the one checkpoint file it keeps replacing.
    written = [s.get(("ugro_train_checkpoint_bytes_total", ())) for s in late]
    assert written == [3 * (tmp_path / "checkpoint.pt").stat().st_size, None]
    waits = [s[("ugro_train_phase_seconds_total", (("phase", "data"),))] for s in late]
    assert waits[1] > 10 * waits[0], waits

    out, err = torchrun.communicate(timeout=60)
    assert torchrun.returncode == 0, err
    assert f"rank 0: metrics at http://127.0.0.1:{base}/metrics" in out
    assert f"step {steps}/{steps}" in out


def test_bad_arguments_and_environment_fail_before_training(free_port_block):
    env = trainer_env(free_port_block(1))
    result = run_trainer(["--steps", "0"], env)
    assert result.returncode == 2 and "--steps 0: expected >= 1" in result.stderr

    result = run_trainer(["--steps", "3", "--crash-at", "0"], env)
    assert result.returncode == 2 and "--crash-at 0: expected a step >= 1" in result.stderr

    result = run_trainer(["--hang-in-data-at", "0"], env)
    assert result.returncode == 2 and "--hang-in-data-at 0: expected a step >= 1" in result.stderr

    result = run_trainer(["--checkpoint-delay", "-1"], env)
    assert result.returncode == 2 and "--checkpoint-delay -1.0: expected seconds >= 0" in (
        result.stderr
    )

    result = run_trainer(["--steps", "3"], {**env, "UGRO_METRICS_PORT": "abc"})
    assert result.returncode == 2
    assert "UGRO_METRICS_PORT='abc': expected an integer" in result.stderr
    assert "Traceback" not in result.stderr

    torchrun_without_rank = {
        **env,
        "TORCHELASTIC_RUN_ID": "x",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
    }
    result = run_trainer(["--steps", "3"], torchrun_without_rank)
    assert result.returncode == 2 and "RANK is not set" in result.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_port_taken_trains_on_by_default_and_stops_first_when_asked(taken_port):
    env = trainer_env(taken_port)
    result = run_trainer(["--steps", "3", "--log-every", "1", *SMALL_MODEL], env)
    assert result.returncode == 0, result.stderr
    assert f"rank 0 cannot serve /metrics on 127.0.0.1:{taken_port}: address already in use" in (
        result.stderr
    )
    assert "step 3/3" in result.stdout

    result = run_trainer(
        ["--steps", "3", "--log-every", "1", *SMALL_MODEL],
        {**env, "UGRO_METRICS_ON_PORT_TAKEN": "fail"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"ugro.trainer.train: rank 0 cannot serve /metrics on 127.0.0.1:{taken_port}: "
        "address already in use"
    ]
    assert "step 1/" not in result.stdout


def test_injected_crash_exits_with_the_given_code(free_port_block):
    result = run_trainer(
        ["--steps", "10", "--crash-at", "3", "--crash-exit-code", "7", *SMALL_MODEL],
        trainer_env(free_port_block(1)),
    )
    assert result.returncode == 7
    assert "injected crash at step 3" in result.stderr


def test_injected_nonfinite_loss_is_counted_not_fatal(
    start_process, free_port_block, scrape_metrics, parse_samples
):
    base = free_port_block(1)
    start_process(
        [
            sys.executable,
            "-m",
            "ugro.trainer.train",
            "--steps",
            "8",
            "--nonfinite-loss-from",
            "5",
            "--linger",
            "60",
            *SMALL_MODEL,
        ],
        trainer_env(base),
    )
    url = f"http://127.0.0.1:{base}/metrics"
    samples = wait_for(
        lambda: (
            (s := parse_samples(scrape_metrics(url))).get(("ugro_train_steps_total", ())) == 8 and s
        ),
        60,
        "8 steps",
    )
    assert samples[("ugro_train_nonfinite_total", (("quantity", "loss"),))] == 4
    assert samples[("ugro_train_nonfinite_total", (("quantity", "grad_norm"),))] == 4
    assert math.isnan(samples[("ugro_train_loss_last", ())])
    assert samples[("ugro_train_loss_count", ())] == 4  # steps 1-4 only


def test_injected_hang_stops_steps_while_metrics_stay_up(
    start_process, free_port_block, scrape_metrics, parse_samples
):
    base = free_port_block(1)
    process = start_process(
        [
            sys.executable,
            "-m",
            "ugro.trainer.train",
            "--steps",
            "50",
            "--hang-at",
            "4",
            *SMALL_MODEL,
        ],
        trainer_env(base),
    )
    url = f"http://127.0.0.1:{base}/metrics"
    steps = lambda: parse_samples(scrape_metrics(url)).get(("ugro_train_steps_total", ()))  # noqa: E731
    wait_for(lambda: steps() == 3, 60, "3 steps")
    time.sleep(1.5)
    assert steps() == 3
    assert process.poll() is None
    # It hangs inside the forward pass of step 4.
    assert phases(parse_samples(scrape_metrics(url))) == ["forward"]


def test_slow_factor_stretches_only_the_chosen_rank():
    plan = FaultPlan(rank=1, slow_factor=2.5, slow_from=10)
    assert plan.delay_seconds(step=12, rank=1, compute_seconds=0.2) == pytest.approx(0.3)
    assert plan.delay_seconds(step=12, rank=0, compute_seconds=0.2) == 0
    assert plan.delay_seconds(step=9, rank=1, compute_seconds=0.2) == 0
    with pytest.raises(ValueError, match=r"--slow-factor 0\.5"):
        FaultPlan(slow_factor=0.5)


def test_bounded_nonfinite_fault_poisons_only_its_steps_on_its_rank():
    plan = FaultPlan(rank=1, nonfinite_loss_from=5, nonfinite_loss_steps=3)
    assert [step for step in range(1, 12) if plan.poisons_loss(step, rank=1)] == [5, 6, 7]
    assert not any(plan.poisons_loss(step, rank=0) for step in range(1, 12))
    unbounded = FaultPlan(rank=0, nonfinite_loss_from=5)
    assert all(unbounded.poisons_loss(step, rank=0) for step in range(5, 500))
    with pytest.raises(ValueError, match=r"--nonfinite-loss-steps 0: expected a count >= 1"):
        FaultPlan(nonfinite_loss_from=5, nonfinite_loss_steps=0)


def test_training_recovers_after_a_bounded_nonfinite_fault(
    start_process, free_port_block, scrape_metrics, parse_samples
):
    # Non-finite gradients are zeroed, so the weights stay finite and later losses are too.
    base = free_port_block(1)
    start_process(
        [
            sys.executable,
            "-m",
            "ugro.trainer.train",
            "--steps",
            "12",
            "--nonfinite-loss-from",
            "3",
            "--nonfinite-loss-steps",
            "2",
            "--linger",
            "60",
            *SMALL_MODEL,
        ],
        trainer_env(base),
    )
    url = f"http://127.0.0.1:{base}/metrics"
    samples = wait_for(
        lambda: (
            (s := parse_samples(scrape_metrics(url)))[("ugro_train_steps_total", ())] == 12 and s
        ),
        60,
        "12 steps",
    )
    assert samples[("ugro_train_nonfinite_total", (("quantity", "loss"),))] == 2
    assert samples[("ugro_train_loss_count", ())] == 10
    assert math.isfinite(samples[("ugro_train_loss_last", ())])
    assert math.isfinite(samples[("ugro_train_grad_norm_last", ())])


def phases(samples: dict) -> list[str]:
    """The phase labels of ugro_train_phase: exactly one while the rank is healthy."""
    return [dict(labels)["phase"] for name, labels in samples if name == "ugro_train_phase"]


def test_checkpoints_evaluations_and_injected_waits_are_counted_exactly(
    start_process, free_port_block, scrape_metrics, parse_samples, tmp_path
):
    base = free_port_block(1)
    start_process(
        [
            sys.executable,
            "-m",
            "ugro.trainer.train",
            "--steps",
            "6",
            "--checkpoint-every",
            "2",
            "--checkpoint-delay",
            "0.3",
            "--checkpoint-dir",
            str(tmp_path),
            "--eval-every",
            "3",
            "--eval-batches",
            "1",
            "--eval-delay",
            "0.2",
            "--data-delay",
            "0.05",
            "--linger",
            "60",
            *SMALL_MODEL,
        ],
        trainer_env(base),
    )
    url = f"http://127.0.0.1:{base}/metrics"

    def finished() -> dict | None:
        samples = parse_samples(scrape_metrics(url))
        done = samples.get(("ugro_train_steps_total", ())) == 6 and phases(samples) == ["step"]
        return samples if done and samples.get(("ugro_train_checkpoints_total", ())) == 3 else None

    wait_for(finished, 120, "6 steps and 3 checkpoints")
    before = time.time()
    samples = parse_samples(scrape_metrics(url))
    after = time.time()
    get = lambda name, **labels: sample(samples, name, **labels)  # noqa: E731

    # Steps 2, 4 and 6 wrote the same state (model, AdamW moments, step) to one file.
    assert get("ugro_train_checkpoints_total") == 3
    assert (
        get("ugro_train_checkpoint_bytes_total") == 3 * (tmp_path / "checkpoint.pt").stat().st_size
    )
    assert get("ugro_train_last_checkpoint_duration_seconds") >= 0.3
    assert before - 60 < get("ugro_train_last_checkpoint_timestamp_seconds") <= before
    assert get("ugro_train_phase_seconds_total", phase="checkpoint") >= 3 * 0.3
    assert get("ugro_train_phase_seconds_total", phase="evaluation") >= 2 * 0.2
    # The first step's wait is start-up: five data waits of the injected 50 ms at least.
    assert get("ugro_train_phase_seconds_total", phase="data") >= 5 * 0.05
    for phase in ("forward", "backward", "optimizer", "step"):
        assert get("ugro_train_phase_seconds_total", phase=phase) > 0
    assert get("ugro_train_restarts") == 0

    # Every second of the process is in exactly one phase.
    started = get("ugro_train_process_start_time_seconds")
    total = sum(v for (name, _), v in samples.items() if name == "ugro_train_phase_seconds_total")
    assert before - started - 0.05 <= total <= after - started + 0.05
    assert get("ugro_train_phase_start_time_seconds") <= before


def test_a_rank_that_never_completes_a_step_stays_in_startup(
    start_process, free_port_block, scrape_metrics, parse_samples
):
    base = free_port_block(1)
    start_process(
        [sys.executable, "-m", "ugro.trainer.train", "--hang-before-first-step", *SMALL_MODEL],
        trainer_env(base),
    )
    url = f"http://127.0.0.1:{base}/metrics"
    # Its metrics are served and its start-up time grows, but no step ever completes.
    samples = wait_for(
        lambda: (
            (s := parse_samples(scrape_metrics(url))).get(
                ("ugro_train_phase_seconds_total", (("phase", "startup"),)), 0
            )
            > 3
            and s
        ),
        60,
        "3 s of start-up",
    )
    assert samples[("ugro_train_steps_total", ())] == 0
    assert phases(samples) == ["startup"]
    assert (
        samples[("ugro_train_phase_start_time_seconds", ())]
        == samples[("ugro_train_process_start_time_seconds", ())]
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[AlertStack]:
    stack = AlertStack(tmp_path_factory.mktemp("train-hangs"))
    yield stack
    stack.close()


@pytest.mark.parametrize(
    ("fault", "hung_phase"), [("--hang-in-data-at", "data"), ("--hang-at", "forward")]
)
def test_a_hung_rank_shows_where_it_hangs_while_the_others_wait_in_backward(
    stack, fault, hung_phase
):
    job = TrainingJob(
        stack,
        f"hang-in-{hung_phase}",
        ["--steps", "50", "--fault-rank", "1", fault, "4", *SMALL_MODEL],
    )
    try:
        urls = [f"http://127.0.0.1:{job.base_port + rank}/metrics" for rank in (0, 1)]

        def where() -> list[tuple[float | None, list[str]]]:
            samples = [sample_values(scrape(url)) for url in urls]
            return [(s.get(("ugro_train_steps_total", ())), phases(s)) for s in samples]

        # Rank 1 hangs in step 4; rank 0 runs on into step 4's gradient all-reduce and waits.
        expected = [(3, ["backward"]), (3, [hung_phase])]
        wait_for(lambda: where() == expected, 120, f"rank 1 hung in {hung_phase}")

        # Prometheus sees the same: one phase series per rank, the odd one out named.
        query = f'ugro_train_phase{{job_id="{job.job_id}"}}'

        def seen() -> dict[str, str]:
            url = f"{stack.prometheus_url}/api/v1/query?query={urllib.parse.quote(query)}"
            answer = http_json(url)
            return {r["metric"]["rank"]: r["metric"]["phase"] for r in answer["data"]["result"]}

        wait_for(lambda: seen() == {"0": "backward", "1": hung_phase}, 60, "Prometheus")
        assert "injected hang at step 4" in job.log.read_text()
    finally:
        job.stop()
