"""``ugro.trainer.integrations.lightning.UgroCallback`` in a real Lightning job, seen by Prometheus.

One job runs for the whole module: ``examples/lightning_tiny_gpt.py`` (a tiny GPT-2 with random
weights on generated token ids) under ``torchrun --nproc-per-node 2`` on CPU (gloo), registered
with the real Prometheus of ``AlertStack`` (1 s scrapes) as ugro-launch would register it:
24 optimizer steps of 3 accumulated micro-batches of 4 padded sequences per rank, each sample
fetched with a 15 ms delay, so the job runs for seconds (Prometheus scrapes it mid-run) and its
ranks wait for data; every 8 steps it validates on 2 held-out batches and Lightning's
``ModelCheckpoint`` saves a checkpoint. Lightning's own per-rank loss is written by its CSVLogger.

Expected values come from the example's own data generator and the sampler Lightning puts on a
training loader under DDP (``DistributedSampler``, shuffled with the seed the example sets), so
each rank's token count (the ones of its attention masks) is known exactly.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import importlib.util
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from tests.support import sample_values, scrape, wait_for
from tests.support.stack import AlertStack
from ugro.common.ports import free_port, free_port_block
from ugro.common.processes import stop_process_group
from ugro.console import cli
from ugro.launcher.targets import RankEndpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lightning_tiny_gpt.py"
JOB = "lightning-a"
STEPS, ACCUMULATE, BATCH, SEQ_LEN, DATA_DELAY, WORLD = 24, 3, 4, 32, 0.015, 2
EVERY = 8  # steps between validations, and between checkpoints
MICRO_BATCHES = STEPS * ACCUMULATE  # per rank


def load_example():
    spec = importlib.util.spec_from_file_location("lightning_tiny_gpt", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LightningJob:
    """The example under torchrun, its ranks registered as ugro-launch registers them (and
    removed when it exits 0). Each rank's /metrics is scraped here once, mid-run, after its
    first step; no more, since a rank's close() waits for the next scrape of anyone's and the
    one that should carry the final values to Prometheus is Prometheus's."""

    def __init__(self, stack: AlertStack, job_id: str, args: list[str]) -> None:
        self.stack, self.job_id = stack, job_id
        self.base_port = free_port_block(WORLD)
        self.log = stack.workdir / f"{job_id}.log"
        self.log_dir = stack.workdir / f"{job_id}-lightning-logs"
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
            "PYTHONUNBUFFERED": "1",
        }
        stack.targets.register_job(
            job_id,
            [RankEndpoint("127.0.0.1", self.base_port + r, r, "node-a") for r in range(WORLD)],
        )
        argv = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}",
            "--master-port", str(free_port()), str(EXAMPLE), *args, "--log-dir", str(self.log_dir),
        ]  # fmt: skip
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.scraped: dict[int, str] = {}  # rank -> its exposition mid-run
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        urls = {r: f"http://127.0.0.1:{self.base_port + r}/metrics" for r in range(WORLD)}
        listening: set[int] = set()
        while not self._stop.is_set() and len(self.scraped) < WORLD:
            # Never knock on a port before its rank listens (see tests/console/test_report.py).
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            listening |= {r for r, url in urls.items() if f"serves /metrics at {url}" in text}
            for rank in sorted(listening - set(self.scraped)):
                with contextlib.suppress(OSError, http.client.HTTPException):
                    text = scrape(urls[rank], timeout=2)
                    if sample_values(text).get(("ugro_train_steps_total", ()), 0) >= 1:
                        self.scraped[rank] = text
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._stop.set()
        self._poller.join(10)
        if code == 0:
            self.stack.targets.remove_job(self.job_id)
        return code

    def stop(self) -> None:
        self._stop.set()
        stop_process_group(self.process, grace=10.0)

    def lightning_metrics(self) -> list[dict[str, str]]:
        with open(self.log_dir / "metrics.csv", newline="") as rows:
            return list(csv.DictReader(rows))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = AlertStack(tmp_path_factory.mktemp("lightning"))
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def expected_tokens() -> dict[int, int]:
    from torch.utils.data import DistributedSampler

    samples = MICRO_BATCHES * BATCH * WORLD
    mask = load_example().token_data(samples, SEQ_LEN, seed=0)["attention_mask"]
    return {
        rank: int(mask[list(DistributedSampler(range(samples), WORLD, rank, seed=0))].sum())
        for rank in range(WORLD)
    }


def _last(stack: AlertStack, name: str) -> dict[int, float]:
    found = stack.query(f'last_over_time({name}{{job_id="{JOB}"}}[5m])')
    return {int(s["metric"]["rank"]): float(s["value"][1]) for s in found}


@pytest.fixture(scope="module")
def job(stack, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        # ugro report reads ugro-launch's job records when there are some: here there are none.
        patch.setenv("UGRO_STATE_DIR", str(tmp_path_factory.mktemp("no-launcher-records")))
        job = LightningJob(
            stack,
            JOB,
            [
                f"--steps={STEPS}", f"--accumulate={ACCUMULATE}", f"--batch-size={BATCH}",
                f"--seq-len={SEQ_LEN}", f"--data-delay={DATA_DELAY}", f"--val-every={EVERY}",
                f"--checkpoint-every={EVERY}",
                f"--checkpoint-dir={tmp_path_factory.mktemp('lightning-checkpoints')}",
            ],
        )  # fmt: skip
        try:
            assert job.wait(timeout=180) == 0, job.log.read_text()[-4000:]
        finally:
            job.stop()
        want = {0: float(STEPS), 1: float(STEPS)}
        try:
            wait_for(lambda: _last(stack, "ugro_train_steps_total") == want, 30, "final steps")
        except AssertionError as error:
            up = stack.query(f'up{{job_id="{JOB}"}}[5m]')
            raise AssertionError(
                f"{error}: Prometheus has {_last(stack, 'ugro_train_steps_total')}, up {up}; "
                f"log: {job.log.read_text()[-2000:]}"
            ) from None
        yield job


def test_every_rank_counts_optimizer_steps_and_exact_tokens(stack, job, expected_tokens):
    assert _last(stack, "ugro_train_steps_total") == {0: STEPS, 1: STEPS}
    assert _last(stack, "ugro_train_target_steps") == {0: STEPS, 1: STEPS}
    assert _last(stack, "ugro_train_tokens_total") == expected_tokens
    assert _last(stack, "ugro_train_samples_total") == {0: MICRO_BATCHES * BATCH} | {
        1: MICRO_BATCHES * BATCH
    }
    info = stack.query(f'ugro_train_rank_info{{job_id="{JOB}"}}[5m]')
    assert sorted((s["metric"]["rank"], s["metric"]["world_size"]) for s in info) == [
        ("0", "2"),
        ("1", "2"),
    ]
    assert _last(stack, "ugro_train_telemetry_errors_total") == {0: 0, 1: 0}
    # Closed normally: the end time reached Prometheus before the ranks went away.
    assert set(_last(stack, "ugro_train_end_time_seconds")) == {0, 1}


def test_loss_is_each_micro_batch_loss_unscaled_as_lightning_logged_it(stack, job):
    # Lightning hands callbacks the loss divided by accumulate_grad_batches; the callback
    # multiplies it back, so rank 0's mean over all its steps is Lightning's own epoch mean of
    # the loss training_step logged (rank 0's, in float32).
    rows = job.lightning_metrics()
    epoch_mean = [float(r["train_loss_epoch"]) for r in rows if r["train_loss_epoch"]]
    step_losses = [float(r["train_loss_step"]) for r in rows if r["train_loss_step"]]
    assert len(epoch_mean) == 1 and len(step_losses) == STEPS
    sums, counts = _last(stack, "ugro_train_loss_sum"), _last(stack, "ugro_train_loss_count")
    assert counts == {0: STEPS, 1: STEPS}
    assert sums[0] / counts[0] == pytest.approx(epoch_mean[0], rel=1e-5)
    assert min(step_losses) - 0.1 < sums[1] / counts[1] < max(step_losses) + 0.1
    last = _last(stack, "ugro_train_loss_last")
    assert all(min(step_losses) - 0.1 < value < max(step_losses) + 0.1 for value in last.values())


def test_gradient_norm_and_learning_rate_are_the_steps_own(stack, job):
    norms = _last(stack, "ugro_train_grad_norm_count")
    assert norms == {0: STEPS, 1: STEPS}
    assert all(
        math.isfinite(v) and v > 0 for v in _last(stack, "ugro_train_grad_norm_last").values()
    )
    # The example's warm-up reaches the full rate at the last step; read after the scheduler
    # moved on, it would be 25/24 of it.
    learning_rate = load_example().LEARNING_RATE
    assert _last(stack, "ugro_train_learning_rate") == {0: learning_rate, 1: learning_rate}


def _phase_seconds(stack: AlertStack) -> dict[int, dict[str, float]]:
    found = stack.query(f'last_over_time(ugro_train_phase_seconds_total{{job_id="{JOB}"}}[5m])')
    seconds: dict[int, dict[str, float]] = {}
    for s in found:
        rank, phase = int(s["metric"]["rank"]), s["metric"]["phase"]
        seconds.setdefault(rank, {})[phase] = float(s["value"][1])
    return seconds


def test_data_wait_is_the_dataloader_fetch_time(stack, job):
    waits = {rank: phases["data"] for rank, phases in _phase_seconds(stack).items()}
    durations = _last(stack, "ugro_train_step_duration_seconds_sum")
    # Every sample sleeps this long in the fetch; the first step's fetches are start-up.
    least = (MICRO_BATCHES - ACCUMULATE) * BATCH * DATA_DELAY
    for rank in (0, 1):
        assert least <= waits[rank] < least + durations[rank], (waits, durations)


def test_validation_and_checkpoints_are_phases_and_checkpoints_are_counted(stack, job):
    assert _last(stack, "ugro_train_checkpoints_total") == {0: STEPS // EVERY, 1: STEPS // EVERY}
    assert all(v > 0 for v in _last(stack, "ugro_train_last_checkpoint_duration_seconds").values())
    ends = _last(stack, "ugro_train_end_time_seconds")
    starts = _last(stack, "ugro_train_process_start_time_seconds")
    for rank, seconds in _phase_seconds(stack).items():
        assert set(seconds) == {
            "startup", "data", "step", "forward", "backward", "optimizer", "evaluation",
            "checkpoint",
        }  # fmt: skip
        assert all(value > 0 for value in seconds.values()), seconds
        # Every second of the process is in one phase; the last scrape came after the end.
        lifetime = ends[rank] - starts[rank]
        assert lifetime - 0.05 <= sum(seconds.values()) <= lifetime + 15, (seconds, lifetime)


def test_a_scrape_is_clean_under_promtool(job, promtool):
    assert set(job.scraped) == {0, 1}
    for rank, text in job.scraped.items():
        assert sample_values(text)[("ugro_train_steps_total", ())] >= 1
        result = promtool(text)
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
            rank,
            result.stdout + result.stderr,
        )


def test_recording_rules_see_the_job(stack, job):
    tokens = stack.query(f'max_over_time(job:ugro_train_tokens:rate1m{{job_id="{JOB}"}}[5m])')
    assert len(tokens) == 1 and float(tokens[0]["value"][1]) > 0
    loss = stack.query(f'job_rank:ugro_train_loss:mean1m{{job_id="{JOB}"}}[5m]')
    finite = {
        s["metric"]["rank"] for s in loss if any(math.isfinite(float(v)) for _, v in s["values"])
    }
    assert finite == {"0", "1"}


def test_ugro_report_has_the_jobs_figures(stack, job, expected_tokens):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["--prometheus", stack.prometheus_url, "report", JOB, "--json"])
    assert code == 0
    report = json.loads(out.getvalue())
    assert report["status"] == "finished"
    assert report["world_size"] == WORLD
    assert report["work"] == {
        "steps": STEPS,
        "target_steps": STEPS,
        "samples": WORLD * MICRO_BATCHES * BATCH,
        "tokens": sum(expected_tokens.values()),
    }
    assert [(r["rank"], r["steps"], r["tokens"]) for r in report["ranks"]] == [
        (r, STEPS, expected_tokens[r]) for r in range(WORLD)
    ]


# -- without a job ---------------------------------------------------------------------------


def test_importing_ugro_trainer_loads_no_framework():
    program = (
        "import sys, ugro.trainer, ugro.trainer.integrations\n"
        "print([m for m in ('lightning', 'transformers') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_without_lightning_the_import_error_names_the_extra():
    program = (
        "import sys\n"
        "sys.modules['lightning'] = None  # as if it were not installed\n"
        "import ugro.trainer.integrations.lightning\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: ugro.trainer.integrations.lightning needs lightning: "
        "pip install 'ugro[lightning]'"
    )


def test_batch_counts_read_no_value_from_the_device():
    import torch

    from ugro.trainer.integrations.lightning import default_batch_counts

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    tokens, samples = default_batch_counts({"input_ids": mask, "attention_mask": mask})
    assert isinstance(tokens, torch.Tensor) and int(tokens) == 3 and samples == 2
    assert default_batch_counts({"input_ids": torch.zeros(2, 5, dtype=torch.long)}) == (10, 2)
    assert default_batch_counts((torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 8))) == (32, 4)
    assert default_batch_counts([torch.zeros(3, 3, 32, 32)]) == (None, 3)  # images: no tokens
    assert default_batch_counts({"pixels": torch.zeros(2, 3)}) == (None, None)
    assert default_batch_counts(None) == (None, None)
