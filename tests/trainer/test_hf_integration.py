"""``ugro.trainer.integrations.hf.UgroCallback`` in a real Hugging Face Trainer run.

examples/hf_tiny_gpt2.py (a GPT-2 of one layer with random weights, generated token ids with
padding, nothing downloaded) runs under ``torchrun --nproc-per-node 2`` on CPU (gloo), scraped by
the real Prometheus and Alertmanager of ``AlertStack`` (1 s intervals):

* ``hf-done``: 24 optimizer steps of 2 micro-batches of 4 sequences per rank, HF logging every
  4 steps, evaluating and saving a checkpoint every 8; what Prometheus holds, the recording rules
  and ``ugro report`` are checked against the generated data, the Trainer's own log lines and the
  checkpoints on disk.
* ``hf-nan``: rank 1's loss is NaN for three steps (its gradients stay finite); the
  non-finite alert reaches the Slack recorder naming rank 1.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.support import sample, sample_values, scrape, wait_for
from tests.support.stack import AlertStack
from ugro.common.ports import free_port, free_port_block
from ugro.common.processes import stop_process_group
from ugro.console import cli
from ugro.launcher.targets import RankEndpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hf_tiny_gpt2.py"
STEPS, GRAD_ACCUM, BATCH, LOG_EVERY, RANKS = 24, 2, 4, 4, 2
EVERY = 8  # steps between evaluations, and between checkpoints


def example_module():
    """The example script as a module, for its data generator (one source for the numbers)."""
    spec = importlib.util.spec_from_file_location("hf_tiny_gpt2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ExampleJob:
    """The example under torchrun, its ranks registered with Prometheus as ugro-launch does;
    a run that exits 0 is deregistered, so its end alerts nobody."""

    def __init__(self, stack: AlertStack, job_id: str, example_args: list[str]) -> None:
        self.stack, self.job_id = stack, job_id
        self.base_port = free_port_block(RANKS)
        self.log = stack.workdir / f"{job_id}.log"
        env = {
            **os.environ,
            "UGRO_JOB_ID": job_id,
            "UGRO_METRICS_PORT": str(self.base_port),
            "UGRO_METRICS_ADDR": "127.0.0.1",
            "UGRO_NODE": "node-a",
            "UGRO_REGISTERED_TARGET": "1",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "",  # CPU ranks, gloo, wherever the test runs
        }
        stack.targets.register_job(
            job_id,
            [RankEndpoint("127.0.0.1", self.base_port + r, r, "node-a") for r in range(RANKS)],
        )
        argv = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={RANKS}",
            "--master-port", str(free_port()), str(EXAMPLE),
            "--output-dir", str(stack.workdir / job_id), *example_args,
        ]  # fmt: skip
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        if code == 0:
            self.stack.targets.remove_job(self.job_id)
        return code

    def hf_logs(self) -> list[dict]:
        """The Trainer's log lines (rank 0's PrinterCallback: 4 significant digits)."""
        found = re.findall(r"^\{'(?:loss|train_runtime)'.*\}$", self.log.read_text(), re.M)
        return [{k: float(v) for k, v in ast.literal_eval(line).items()} for line in found]

    def stop(self) -> None:
        stop_process_group(self.process, grace=10.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = AlertStack(tmp_path_factory.mktemp("hf"))
    yield stack
    stack.close()


@pytest.fixture(scope="module", autouse=True)
def no_launcher_records(tmp_path_factory):
    """The report reads ugro-launch's job records when there are some: here there are none."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UGRO_STATE_DIR", str(tmp_path_factory.mktemp("no-launcher-records")))
        yield


def ranks_up(stack: AlertStack, job_id: str) -> int:
    return len(stack.query(f'up{{job="ugro-ranks",job_id="{job_id}"}} == 1'))


def per_rank(stack: AlertStack, promql: str) -> dict[int, float]:
    return {int(s["metric"]["rank"]): float(s["value"][1]) for s in stack.query(promql)}


@pytest.fixture(scope="module")
def finished(stack):
    """``hf-done`` run to its end; a scrape of rank 0 taken mid-run."""
    job = ExampleJob(
        stack,
        "hf-done",
        [
            f"--steps={STEPS}", f"--grad-accum={GRAD_ACCUM}", f"--batch-size={BATCH}",
            f"--log-every={LOG_EVERY}", "--pause=0.4", f"--eval-every={EVERY}",
            f"--save-every={EVERY}",
        ],
    )  # fmt: skip
    try:
        # Paced so that Prometheus, which finds new targets within ~5 s, sees it run.
        wait_for(lambda: ranks_up(stack, "hf-done") == RANKS, 90, "both ranks scraped")
        exposition = scrape(f"http://127.0.0.1:{job.base_port}/metrics", timeout=5)
        assert job.wait(timeout=120) == 0, job.log.read_text()[-3000:]
    finally:
        job.stop()
    steps = 'last_over_time(ugro_train_steps_total{job_id="hf-done"}[5m])'
    wait_for(lambda: per_rank(stack, steps) == {0: STEPS, 1: STEPS}, 30, "the final steps")
    return job, exposition


def test_every_rank_reports_optimizer_steps_and_exact_tokens(stack, finished):
    last = 'last_over_time({name}{{job_id="hf-done"}}[5m])'
    assert per_rank(stack, last.format(name="ugro_train_steps_total")) == {0: STEPS, 1: STEPS}
    micro_batches = STEPS * GRAD_ACCUM
    samples = per_rank(stack, last.format(name="ugro_train_samples_total"))
    assert samples == {0: micro_batches * BATCH, 1: micro_batches * BATCH}
    # Padding is not counted: the attention mask's ones, summed over every generated sequence.
    tokens = per_rank(stack, last.format(name="ugro_train_tokens_total"))
    everything = example_module().real_tokens(RANKS * micro_batches * BATCH)
    assert sum(tokens.values()) == everything
    assert all(0 < count < micro_batches * BATCH * 32 for count in tokens.values())
    assert per_rank(stack, last.format(name="ugro_train_target_steps")) == {0: STEPS, 1: STEPS}
    ended = per_rank(stack, last.format(name="ugro_train_end_time_seconds"))
    assert sorted(ended) == [0, 1]


def test_loss_grad_norm_and_learning_rate_are_the_trainers(stack, finished):
    job, _ = finished
    logs = job.hf_logs()
    interval_logs = [entry for entry in logs if "loss" in entry]
    assert len(interval_logs) == STEPS // LOG_EVERY
    last = 'last_over_time({name}{{job_id="hf-done"}}[5m])'

    def values(name: str) -> dict[int, float]:
        return per_rank(stack, last.format(name=name))

    loss_sum, loss_count = values("ugro_train_loss_sum"), values("ugro_train_loss_count")
    assert loss_count == {0: STEPS, 1: STEPS}  # every step's loss, from the model's output
    # The Trainer logs the mean over ranks and steps since its last line, and at the end the
    # mean of the whole run: the ranks' step losses average to exactly those.
    job_mean = sum(loss_sum.values()) / sum(loss_count.values())
    logged = [entry["loss"] for entry in interval_logs]
    assert job_mean == pytest.approx(sum(logged) / len(logged), abs=2e-3)
    assert job_mean == pytest.approx(logs[-1]["train_loss"], abs=2e-3)
    for rank in range(RANKS):
        mean = loss_sum[rank] / loss_count[rank]
        assert min(logged) - 0.1 < mean < max(logged) + 0.1
    # The gradient norm reaches callbacks with the log lines only: one value per line, the
    # norm the Trainer clipped with (the same on every rank after DDP's all-reduce).
    assert values("ugro_train_grad_norm_count") == {0: STEPS // LOG_EVERY, 1: STEPS // LOG_EVERY}
    final = interval_logs[-1]
    for rank, norm in values("ugro_train_grad_norm_last").items():
        assert norm == pytest.approx(final["grad_norm"], rel=1e-3), rank
    # The rate the last step used, before the scheduler's step (the Trainer logs that one).
    for rank, rate in values("ugro_train_learning_rate").items():
        assert rate == pytest.approx(final["learning_rate"], rel=1e-3), rank
    nonfinite = 'sum by (rank) (last_over_time(ugro_train_nonfinite_total{job_id="hf-done"}[5m]))'
    assert per_rank(stack, nonfinite) == {0: 0, 1: 0}


def test_phases_evaluations_and_checkpoints_are_the_trainers(stack, finished):
    last = 'last_over_time({name}{{job_id="hf-done"}}[5m])'

    def values(name: str) -> dict[int, float]:
        return per_rank(stack, last.format(name=name))

    saves = STEPS // EVERY
    assert values("ugro_train_checkpoints_total") == {0: saves, 1: saves}
    assert all(v > 0 for v in values("ugro_train_last_checkpoint_duration_seconds").values())
    # Each rank counts what it wrote: rank 0 the model, optimizer, scheduler, trainer state and
    # its RNG state, rank 1 its own RNG state; together, every byte of the checkpoints on disk.
    folders = list((stack.workdir / "hf-done").glob("checkpoint-*"))
    assert {f.name for f in folders} == {f"checkpoint-{s}" for s in (8, 16, 24)}
    on_disk = sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())
    written = values("ugro_train_checkpoint_bytes_total")
    assert sum(written.values()) == on_disk
    assert 0 < written[1] < written[0]

    found = stack.query(last.format(name="ugro_train_phase_seconds_total"))
    seconds: dict[int, dict[str, float]] = {}
    for series in found:
        rank, phase = int(series["metric"]["rank"]), series["metric"]["phase"]
        seconds.setdefault(rank, {})[phase] = float(series["value"][1])
    ends = values("ugro_train_end_time_seconds")
    starts = values("ugro_train_process_start_time_seconds")
    for rank in range(RANKS):
        # No data phase: the Trainer fetches a step's batches where no callback sees it.
        assert set(seconds[rank]) == {
            "startup", "step", "forward", "backward", "optimizer", "evaluation", "checkpoint",
        }  # fmt: skip
        assert all(value > 0 for value in seconds[rank].values()), seconds[rank]
        # The example pauses 0.4 s in every on_step_end, after ugro's: in the step phase.
        assert seconds[rank]["step"] >= 0.4 * STEPS
        lifetime = ends[rank] - starts[rank]
        assert lifetime - 0.05 <= sum(seconds[rank].values()) <= lifetime + 15


def test_importing_ugro_trainer_loads_no_framework_and_a_missing_one_is_named():
    program = (
        "import sys, ugro.trainer, ugro.trainer.integrations\n"
        "assert 'transformers' not in sys.modules, 'transformers loaded'\n"
        "sys.modules['transformers'] = None  # as if it were not installed\n"
        "import ugro.trainer.integrations.hf\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: ugro.trainer.integrations.hf needs transformers and accelerate: "
        "pip install 'ugro[hf]'"
    )


def test_a_rank_scrape_passes_promtool(finished, promtool):
    _, exposition = finished
    result = promtool(exposition)
    assert result.returncode == 0, result.stdout + result.stderr
    samples = sample_values(exposition)
    assert sample(samples, "ugro_train_steps_total") >= 1
    info = [key for key in samples if key[0] == "ugro_train_rank_info"]
    assert info and dict(info[0][1])["world_size"] == "2"


def test_recording_rules_and_the_report_see_the_job(stack, finished):
    tokens_rate = stack.query('last_over_time(job:ugro_train_tokens:rate1m{job_id="hf-done"}[5m])')
    assert len(tokens_rate) == 1 and float(tokens_rate[0]["value"][1]) > 0
    loss = per_rank(stack, 'last_over_time(job_rank:ugro_train_loss:mean1m{job_id="hf-done"}[5m])')
    assert sorted(loss) == [0, 1] and all(math.isfinite(v) and v > 0 for v in loss.values())

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = cli.main(["--prometheus", stack.prometheus_url, "report", "hf-done", "--json"])
    assert code == 0
    report = json.loads(captured.getvalue())
    assert report["status"] == "finished"
    assert report["world_size"] == RANKS
    assert report["work"] == {
        "steps": STEPS,
        "target_steps": STEPS,
        "samples": RANKS * STEPS * GRAD_ACCUM * BATCH,
        "tokens": example_module().real_tokens(RANKS * STEPS * GRAD_ACCUM * BATCH),
    }
    assert [r["steps"] for r in report["ranks"]] == [STEPS, STEPS]


def test_a_nan_loss_on_one_rank_reaches_slack_naming_that_rank(stack):
    job = ExampleJob(
        stack,
        "hf-nan",
        ["--steps=400", "--pause=0.1", "--nonfinite-rank=1", "--nonfinite-steps=10-12"],
    )
    try:
        rank_1 = "Rank 1 of job hf-nan on node node-a"

        def posts() -> list[str]:
            return [
                text
                for name, text in zip(stack.slack_alertnames(), stack.slack.texts(), strict=True)
                if name == "TrainingNonFiniteValues"
                and text.startswith("[FIRING")
                and rank_1 in text
            ]

        firing = wait_for(posts, 120, "a Slack post naming rank 1")[0]
        assert re.search(rf"{rank_1}: [0-9.]+ step\(s\) with a non-finite loss", firing)
        assert "*CRITICAL*" in firing
        # Only the loss was poisoned: rank 0's values and both gradient norms stayed finite.
        nonfinite = stack.query('ugro_train_nonfinite_total{job_id="hf-nan"} > 0')
        assert [(s["metric"]["rank"], s["metric"]["quantity"]) for s in nonfinite] == [
            ("1", "loss")
        ]
        assert float(nonfinite[0]["value"][1]) == 3
        assert job.process.poll() is None, "training goes on through the NaN steps"
    finally:
        job.stop()
