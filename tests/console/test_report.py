"""``ugro report`` and ``ugro compare`` against a real Prometheus that watched real jobs.

Two short torchrun jobs run once for the whole module, against the real Prometheus and
Alertmanager of ``AlertStack`` (1 s scrapes) and a node exporter with two fake H100s:

* ``rep-a`` (GPU job): 60 deterministic steps (fixed seed) of 8 × 32 tokens per rank, each rank
  naming a fake GPU through ``UGRO_GPU_UUIDS``; rank 1's input pipeline is slow (so it waits
  for data and the steps are long enough for Prometheus to scrape mid-run) and its loss is
  NaN at step 10 (so an alert fires). Rank 0 logs its loss every step.
* ``rep-b`` (CPU job): 20 steps of 4 × 32 tokens, no GPU named.

What the ranks actually did is read from the ranks themselves, independently of Prometheus: a
poller scrapes their /metrics every few milliseconds while they run (the steps last tens of
milliseconds, so it sees nearly every step; on a loaded machine it can miss one), and
``--linger`` keeps them serving after the last step.
The exposition carries float64 values in full, so a value the report passes through
Prometheus must come back exactly; means over ranks are compared to 1e-9.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import math
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest
from rich.console import Console

from tests.support import Samples, sample, sample_values, scrape, wait_for
from tests.support.fake_gpu import FAKE_GPU_UUIDS, fake_gpu_exporter
from tests.support.net import free_port
from tests.support.stack import AlertStack
from tests.support.training import TrainingJob
from ugro.console import cli, report
from ugro.console.job_report import JobReport, parse_duration
from ugro.console.servers import Prometheus

GPU_JOB, CPU_JOB = "rep-a", "rep-b"
GPU_STEPS, GPU_BATCH, CONTEXT = 60, 8, 32
CPU_STEPS, CPU_BATCH = 20, 4
MODEL = ["--context", str(CONTEXT), "--width", "64", "--depth", "1", "--seed", "0"]
GPU_JOB_ARGS = [
    *MODEL,
    f"--steps={GPU_STEPS}",
    f"--batch-size={GPU_BATCH}",
    "--log-every=1",
    "--linger=3",
    "--fault-rank=1",
    "--slow-factor=6",
    "--nonfinite-loss-from=10",
    "--nonfinite-loss-steps=1",
]
# Long enough after its last step for Prometheus, which picks up new targets within ~5 s of
# their registration, to scrape its final values even when it starts up fast.
CPU_JOB_ARGS = [*MODEL, f"--steps={CPU_STEPS}", f"--batch-size={CPU_BATCH}", "--linger=5"]
# The fake NVML's GPU i (tests/exporter/fake_nvml.py: h100s): utilisation 90 - i %,
# memory used 20 + i GiB, temperature 60 + i °C.
GIB = 1024**3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class RankTruth:
    """What one rank reported on its own /metrics while it ran."""

    loss_at_step: dict[int, float] = field(default_factory=dict)
    final: Samples = field(default_factory=dict)

    def value(self, name: str) -> float:
        found = sample(self.final, name)
        assert found is not None, f"{name} missing from the rank's last scrape"
        return found


@dataclass
class Run:
    job: TrainingJob
    ranks: dict[int, RankTruth]
    rank0_logged_loss: dict[int, float]  # from the trainer's progress lines (4 decimals)


class RankPoller:
    """Scrapes every rank of a job as fast as it answers, from the moment it listens (its log
    says so) until it is gone.

    Never knocks on a port nobody listens on: repeated connects to one closed local port walk
    through the ephemeral ports until one connects to itself, and the rank that should bind
    that port then finds it taken.
    """

    def __init__(self, job: TrainingJob, processes: int = 2) -> None:
        self.job = job
        self.urls = {r: f"http://127.0.0.1:{job.base_port + r}/metrics" for r in range(processes)}
        self.truth = {r: RankTruth() for r in self.urls}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _listening(self) -> set[int]:
        log = self.job.log.read_text() if self.job.log.exists() else ""
        return {r for r in self.urls if f"rank {r}: metrics at " in log}

    def _run(self) -> None:
        listening: set[int] = set()
        gone: set[int] = set()
        while not self._stop.is_set() and len(gone) < len(self.urls):
            if len(listening) < len(self.urls):
                listening = self._listening()
            for rank in sorted(listening - gone):
                try:
                    samples = sample_values(scrape(self.urls[rank], timeout=2))
                except (OSError, http.client.HTTPException, ValueError) as error:
                    if isinstance(getattr(error, "reason", error), ConnectionRefusedError):
                        gone.add(rank)  # it listened before: it has ended
                    continue
                steps = sample(samples, "ugro_train_steps_total")
                if steps:
                    loss = sample(samples, "ugro_train_loss_last")
                    self.truth[rank].loss_at_step[int(steps)] = loss
                    self.truth[rank].final = samples
            time.sleep(0.002)

    def stop(self) -> dict[int, RankTruth]:
        self._stop.set()
        self._thread.join(10)
        return self.truth


def _prometheus_state(stack: AlertStack, job_id: str) -> dict[str, object]:
    """What Prometheus holds of a job: each rank's last steps value, and the ranks still up."""
    last = stack.query(f'last_over_time(ugro_train_steps_total{{job_id="{job_id}"}}[5m])')
    up = stack.query(f'up{{job_id="{job_id}"}} == 1')
    return {
        "steps": sorted((s["metric"]["rank"], float(s["value"][1])) for s in last),
        "up": sorted(s["metric"]["rank"] for s in up),
    }


@pytest.fixture(scope="module", autouse=True)
def no_launcher_records(tmp_path_factory):
    """The report reads ugro-launch's job records when there are some: here there are none."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UGRO_STATE_DIR", str(tmp_path_factory.mktemp("no-launcher-records")))
        yield


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = AlertStack(tmp_path_factory.mktemp("report"))
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def exporter(stack):
    """The node's ugro-exporter with two fake H100s, whose UUIDs the ranks claim."""
    with fake_gpu_exporter(stack) as process:
        yield process


@pytest.fixture(scope="module")
def runs(stack, exporter, tmp_path_factory):
    """Both jobs, run to completion once; what their ranks did, keyed by job id."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UGRO_GPU_UUIDS", ",".join(FAKE_GPU_UUIDS[:2]))
        gpu_job = TrainingJob(stack, GPU_JOB, GPU_JOB_ARGS)
    started = [gpu_job]
    try:
        cpu_job = TrainingJob(stack, CPU_JOB, CPU_JOB_ARGS)
        started.append(cpu_job)
        # Both picked free ports before either listens: make sure they picked different ones.
        while abs(cpu_job.base_port - gpu_job.base_port) < 2:
            cpu_job.stop()
            cpu_job = TrainingJob(stack, CPU_JOB, CPU_JOB_ARGS)
            started.append(cpu_job)
        pollers = {GPU_JOB: RankPoller(gpu_job), CPU_JOB: RankPoller(cpu_job)}
        try:
            assert gpu_job.wait(timeout=180) == 0, gpu_job.log.read_text()[-3000:]
            assert cpu_job.wait(timeout=180) == 0, cpu_job.log.read_text()[-3000:]
        finally:
            truth = {job_id: poller.stop() for job_id, poller in pollers.items()}
    finally:
        for job in started:
            job.stop()
    expected = {
        job_id: {"steps": [("0", float(steps)), ("1", float(steps))], "up": []}
        for job_id, steps in ((GPU_JOB, GPU_STEPS), (CPU_JOB, CPU_STEPS))
    }

    def final_values_held() -> bool:
        return all(_prometheus_state(stack, job) == want for job, want in expected.items())

    try:
        wait_for(final_values_held, 30, "Prometheus to hold the final values, the jobs ended")
    except AssertionError as error:
        seen = {job: _prometheus_state(stack, job) for job in expected}
        scrapes = {
            (s["metric"]["job_id"], s["metric"]["rank"]): [v for _, v in s["values"]]
            for s in stack.query('up{job="ugro-ranks"}[5m]')
        }
        logs = {job.job_id: job.log.read_text()[:1500] for job in (gpu_job, cpu_job)}
        raise AssertionError(
            f"{error}: expected {expected}, Prometheus has {seen}; up: {scrapes}; logs: {logs}"
        ) from None
    logged = {
        int(m.group(1)): float(m.group(2))
        for m in re.finditer(r"^step (\d+)/\d+  loss (\S+)", gpu_job.log.read_text(), re.M)
    }
    return {
        GPU_JOB: Run(gpu_job, truth[GPU_JOB], logged),
        CPU_JOB: Run(cpu_job, truth[CPU_JOB], {}),
    }


def ugro(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def gpu_report(stack, runs) -> dict:
    """``ugro report rep-a --json``, parsed."""
    with contextlib.redirect_stdout(_Capture()) as captured:
        code = cli.main(["--prometheus", stack.prometheus_url, "report", GPU_JOB, "--json"])
    assert code == 0
    return json.loads(captured.text)


@pytest.fixture(scope="module")
def cpu_report(stack, runs) -> dict:
    with contextlib.redirect_stdout(_Capture()) as captured:
        code = cli.main(["--prometheus", stack.prometheus_url, "report", CPU_JOB, "--json"])
    assert code == 0
    return json.loads(captured.text)


class _Capture:
    """A stdout stand-in for module-scoped fixtures (capsys is per test); not a terminal."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    @property
    def text(self) -> str:
        return "".join(self.parts)


# -- the numbers -----------------------------------------------------------------------------


def test_totals_are_exactly_what_the_ranks_did(gpu_report, runs):
    truth = runs[GPU_JOB].ranks
    tokens_per_rank = GPU_STEPS * GPU_BATCH * CONTEXT
    assert gpu_report["status"] == "finished"
    assert gpu_report["world_size"] == 2
    assert gpu_report["nodes"] == ["node-a"]
    assert gpu_report["work"] == {
        "steps": GPU_STEPS,
        "target_steps": GPU_STEPS,
        "samples": 2 * GPU_STEPS * GPU_BATCH,
        "tokens": 2 * tokens_per_rank,
    }
    for rank in gpu_report["ranks"]:
        own = truth[rank["rank"]]
        assert rank["steps"] == own.value("ugro_train_steps_total") == GPU_STEPS
        assert rank["tokens"] == own.value("ugro_train_tokens_total") == tokens_per_rank
        assert rank["samples"] == GPU_STEPS * GPU_BATCH
        assert rank["restarts"] == 0
        assert rank["gpu_uuid"] == FAKE_GPU_UUIDS[rank["rank"]]
    assert [r["rank"] for r in gpu_report["ranks"]] == [0, 1]


def _raw_samples(stack: AlertStack, series: str) -> dict[float, float]:
    """Every sample Prometheus holds of one series: timestamp -> value."""
    [found] = stack.query(f"{series}[1h]")
    return {float(t): float(v) for t, v in found["values"]}


def test_initial_loss_is_each_ranks_first_scraped_loss_and_its_step(stack, gpu_report, runs):
    run = runs[GPU_JOB]
    ranks = gpu_report["ranks"]
    for rank in ranks:
        step, loss = rank["loss_initial_step"], rank["loss_initial"]
        # Prometheus saw the job mid-run: the first sample is not the last step's.
        assert 1 <= step < GPU_STEPS
        # Exactly the first scrape's loss, and the step of that same scrape.
        selector = f'{{job_id="{GPU_JOB}",rank="{rank["rank"]}"}}'
        losses = _raw_samples(stack, f"ugro_train_loss_last{selector}")
        first = min(losses)
        assert loss == losses[first]
        assert step == _raw_samples(stack, f"ugro_train_steps_total{selector}")[first]
        # The value the rank served at that step, passed through Prometheus untouched. The
        # poller sees nearly every step; one it missed (descheduled on a loaded machine for
        # longer than a step) cannot be compared here, and the log check below still holds.
        seen = run.ranks[rank["rank"]].loss_at_step
        if step in seen:
            assert loss == seen[step]
        if rank["rank"] == 0:  # the trainer's own log agrees, to its 4 decimals
            assert loss == pytest.approx(run.rank0_logged_loss[step], abs=5e-5)
    assert gpu_report["loss"]["initial"] == pytest.approx(
        (ranks[0]["loss_initial"] + ranks[1]["loss_initial"]) / 2, rel=1e-9
    )
    # A byte-level model starts near ln(256) = 5.55 nats and learns within 60 steps.
    assert 3.0 < gpu_report["loss"]["initial"] < 6.0


def test_final_and_mean_loss_are_what_the_ranks_ended_with(gpu_report, runs):
    truth = runs[GPU_JOB].ranks
    finals = {r: truth[r].value("ugro_train_loss_last") for r in truth}
    assert truth[0].value("ugro_train_steps_total") == GPU_STEPS  # the last scrape is the end
    for rank in gpu_report["ranks"]:
        assert rank["loss_final"] == finals[rank["rank"]]
        own = truth[rank["rank"]]
        expected = own.value("ugro_train_loss_sum") / own.value("ugro_train_loss_count")
        assert rank["loss_mean"] == pytest.approx(expected, rel=1e-9)
    loss = gpu_report["loss"]
    assert loss["final"] == pytest.approx((finals[0] + finals[1]) / 2, rel=1e-9)
    sums = sum(truth[r].value("ugro_train_loss_sum") for r in truth)
    counts = sum(truth[r].value("ugro_train_loss_count") for r in truth)
    assert counts == 2 * GPU_STEPS - 1  # rank 1's NaN step is left out
    assert loss["mean"] == pytest.approx(sums / counts, rel=1e-9)
    assert loss["reduction_percent"] == pytest.approx(
        100 * (loss["initial"] - loss["final"]) / loss["initial"], rel=1e-9
    )
    # Best: the lowest point of the mean-over-ranks curve, never above the ends, never below
    # what the ranks actually reached.
    lowest = min(v for r in truth for v in truth[r].loss_at_step.values() if math.isfinite(v))
    assert lowest <= loss["best"] <= min(loss["initial"], loss["final"])


def test_time_and_throughput_come_from_the_ranks_clocks(gpu_report, runs):
    truth = runs[GPU_JOB].ranks
    start = min(truth[r].value("ugro_train_start_time_seconds") for r in truth)
    end = max(truth[r].value("ugro_train_last_step_timestamp_seconds") for r in truth)
    time_ = gpu_report["time"]
    assert time_["start"] == pytest.approx(start, abs=1e-6)
    assert time_["end"] == pytest.approx(end, abs=1e-6)
    assert time_["duration_seconds"] == pytest.approx(end - start, abs=1e-6)

    def training(rank: int) -> float:
        own = truth[rank]
        mean_step = own.value("ugro_train_step_duration_seconds_sum") / own.value(
            "ugro_train_step_duration_seconds_count"
        )
        return GPU_STEPS * mean_step

    expected_training = max(training(r) for r in truth)
    assert time_["training_seconds"] == pytest.approx(expected_training, rel=1e-9)
    assert 0 < time_["training_seconds"] <= time_["duration_seconds"]
    throughput = gpu_report["throughput"]
    tokens = gpu_report["work"]["tokens"]
    assert throughput["tokens_per_second_mean"] == pytest.approx(
        tokens / expected_training, rel=1e-9
    )
    # The peak is a windowed rate of the same counters: the same order of magnitude.
    assert 0.3 * throughput["tokens_per_second_mean"] < throughput["tokens_per_second_peak"]
    assert throughput["tokens_per_second_peak"] < 3 * throughput["tokens_per_second_mean"]


def test_with_the_launchers_record_the_run_counts_from_the_launch(
    stack, gpu_report, tmp_path, monkeypatch, capsys
):
    """20 s of imports and model loading before the telemetry started are part of the run."""
    from ugro.launcher import records

    monkeypatch.setenv("UGRO_STATE_DIR", str(tmp_path))
    launched = gpu_report["time"]["start"] - 20
    records.JobRecord(
        job_id=GPU_JOB, inventory="/nonexistent/inventory.yml", nodes=["node-a"],
        nproc_per_node=2, command=["-m", "ugro.trainer.train"], rdzv_port=29500,
        started_at=launched, state=records.FINISHED,
    ).save()  # fmt: skip
    code, out, err = ugro(capsys, "--prometheus", stack.prometheus_url, "report", GPU_JOB, "--json")
    assert code == 0, err
    time_ = json.loads(out)["time"]
    assert time_["start"] == pytest.approx(launched, abs=1e-6)
    assert time_["duration_seconds"] == pytest.approx(
        gpu_report["time"]["duration_seconds"] + 20, abs=1e-6
    )
    assert time_["training_seconds"] == gpu_report["time"]["training_seconds"]
    assert time_["overhead_seconds"] == pytest.approx(
        gpu_report["time"]["overhead_seconds"] + 20, abs=1e-6
    )


def test_gpu_figures_are_the_fake_gpus_readings(gpu_report):
    gpu = gpu_report["gpu"]
    assert gpu["count"] == 2
    # The job average is over the GPUs joined at each evaluation: for a moment at the start
    # only one rank's info series may be there, so it lies between the two GPUs' 0.89 and 0.90.
    assert 0.89 <= gpu["utilization_mean"] <= 0.90
    assert gpu["memory_used_peak_bytes"] == 21 * GIB
    assert gpu["temperature_mean_celsius"] == pytest.approx(60.5)
    assert gpu["temperature_peak_celsius"] == 61
    for rank in gpu_report["ranks"]:
        i = rank["rank"]
        assert rank["gpu_utilization_mean"] == pytest.approx((90 - i) / 100)
        assert rank["gpu_memory_used_peak_bytes"] == (20 + i) * GIB
        assert rank["gpu_temperature_mean_celsius"] == 60 + i
        assert rank["gpu_temperature_peak_celsius"] == 60 + i


def test_slow_input_shows_as_data_wait_and_lowers_efficiency(gpu_report, runs):
    truth = runs[GPU_JOB].ranks
    ranks = {r["rank"]: r for r in gpu_report["ranks"]}
    for rank, own in truth.items():
        expected = sample(own.final, "ugro_train_phase_seconds_total", phase="data") / own.value(
            "ugro_train_step_duration_seconds_sum"
        )
        assert ranks[rank]["data_wait_share"] == pytest.approx(expected, rel=1e-9)
    # --slow-factor=6 stretches rank 1's input to 5 times its compute: it waits most of the time.
    assert ranks[1]["data_wait_share"] > 0.3
    assert ranks[0]["data_wait_share"] < ranks[1]["data_wait_share"] / 2
    efficiency = gpu_report["efficiency"]
    assert efficiency["input"] == pytest.approx(1 - ranks[1]["data_wait_share"])
    # SM activity where the GPUs report it (the fake H100s do, through GPM), else utilisation.
    gpu = gpu_report["gpu"]
    busy = gpu["sm_active_mean"] if gpu["sm_active_mean"] is not None else gpu["utilization_mean"]
    assert efficiency["gpu"] == busy
    assert 0 < efficiency["progress"] <= 1
    product = 100 * efficiency["progress"] * efficiency["input"] * efficiency["gpu"]
    assert efficiency["score"] == pytest.approx(product, abs=0.051)
    assert efficiency["formula"] == "efficiency = 100 × progress × input × gpu"


def test_the_nonfinite_loss_alert_is_listed_with_its_rank(gpu_report):
    fired = [a for a in gpu_report["alerts"] if a["alertname"] == "TrainingNonFiniteValues"]
    assert "1" in {a["rank"] for a in fired}
    for alert in fired:
        assert alert["severity"] == "critical"
        assert alert["node"] == "node-a"
        assert gpu_report["time"]["start"] <= alert["first_seen"] <= alert["last_seen"]
        assert alert["last_seen"] <= gpu_report["time"]["end"] + 30


def test_json_is_one_object_with_stable_keys_and_typed_values(gpu_report, cpu_report):
    for document in (gpu_report, cpu_report):
        assert list(document) == [
            "job_id", "prometheus", "status", "time", "world_size", "nodes", "work",
            "throughput", "loss", "gpu", "efficiency", "goodput", "checkpoints", "ranks",
            "alerts",
        ]  # fmt: skip
        assert list(document["loss"]) == ["initial", "final", "best", "mean", "reduction_percent"]
        for group in ("time", "work", "throughput", "loss"):
            for key, value in document[group].items():
                assert isinstance(value, int | float), (group, key, value)
        assert isinstance(document["work"]["steps"], int)
        assert isinstance(document["efficiency"]["score"], float)
        for rank in document["ranks"]:
            assert isinstance(rank["rank"], int)
            assert isinstance(rank["tokens"], int)
            assert isinstance(rank["loss_final"], float)
    assert gpu_report["job_id"] == GPU_JOB
    assert all(
        isinstance(v, int | float) for k, v in gpu_report["gpu"].items() if k != "mfu_mean"
    )  # the GPU job runs on CPU ranks with no declared peak: no MFU


def test_cpu_job_has_null_gpu_figures_and_its_own_totals(cpu_report, runs):
    assert cpu_report["status"] == "finished"
    assert cpu_report["work"]["tokens"] == 2 * CPU_STEPS * CPU_BATCH * CONTEXT
    assert cpu_report["gpu"] == {
        "count": 0,
        "utilization_mean": None,
        "sm_active_mean": None,
        "mfu_mean": None,
        "memory_used_peak_bytes": None,
        "temperature_mean_celsius": None,
        "temperature_peak_celsius": None,
    }
    assert cpu_report["efficiency"]["gpu"] is None  # not measured: not held against the job
    for rank in cpu_report["ranks"]:
        assert rank["gpu_uuid"] is None and rank["gpu_utilization_mean"] is None
        final = runs[CPU_JOB].ranks[rank["rank"]].value("ugro_train_loss_last")
        assert rank["loss_final"] == final


def test_text_report_is_plain_and_names_the_figures(stack, runs, gpu_report, capsys):
    code, out, err = ugro(capsys, "--prometheus", stack.prometheus_url, "report", GPU_JOB)
    assert code == 0, err
    assert "\x1b[" not in out  # no colour codes when not a terminal
    assert all(len(line) <= report.PLAIN_WIDTH for line in out.splitlines())
    assert out.startswith(f"Job {GPU_JOB}: finished, {GPU_STEPS} of {GPU_STEPS} steps\n")
    for heading in ("Run", "Throughput", "Loss (mean of the ranks)", "GPUs", "Efficiency",
                    "Where the time went", "Checkpoints", "Ranks", "Alerts fired"):  # fmt: skip
        assert f"\n{heading}\n" in out
    loss = gpu_report["loss"]
    assert re.search(rf"tokens +{2 * GPU_STEPS * GPU_BATCH * CONTEXT:,}\n", out)
    assert re.search(rf"initial +{loss['initial']:.4f} \(first samples: rank 0 at step", out)
    assert re.search(rf"final +{loss['final']:.4f}\n", out)
    assert f"{gpu_report['efficiency']['score']:.1f} / 100 = 100 × progress" in out
    assert re.search(r"TrainingNonFiniteValues +critical +rank 1 on node-a +\+", out)


def test_print_report_writes_to_a_given_console(stack, runs):
    """What ``ugro demo`` calls once its job has ended."""
    out = io.StringIO()
    console = Console(file=out, width=report.PLAIN_WIDTH, color_system=None)
    prometheus = Prometheus(stack.prometheus_url)
    assert report.print_report(GPU_JOB, prometheus, console)
    assert out.getvalue().startswith(f"Job {GPU_JOB}: finished, {GPU_STEPS} of {GPU_STEPS} steps")
    out.truncate(0)
    out.seek(0)
    assert not report.print_report("never-ran", prometheus, console)
    assert out.getvalue().startswith("ugro report: no job 'never-ran' in Prometheus at ")


def test_plots_are_written_as_non_empty_png_files(stack, runs, tmp_path, capsys):
    directory = tmp_path / "plots"
    code, out, err = ugro(
        capsys, "--prometheus", stack.prometheus_url, "report", GPU_JOB, "--plots", str(directory)
    )
    assert code == 0, err
    written = sorted(p.name for p in directory.iterdir())
    assert written == [f"{GPU_JOB}-loss.png", f"{GPU_JOB}-throughput.png"]
    for name in written:
        data = (directory / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert data[12:16] == b"IHDR"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert (width, height) == (900, 480)
        assert len(data) > 10_000  # axes, labels and lines, not a blank image
    assert f"plots: {directory / written[0]}" in out


def test_plots_need_matplotlib_and_say_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = ugro(capsys, "--prometheus", dead, "report", GPU_JOB, "--plots", "x")
    assert code == report.EXIT_USAGE
    assert out == ""
    assert err.count("\n") == 1
    assert "ugro report: --plots: needs matplotlib" in err
    assert "pip install 'ugro[plots]'" in err


# -- compare ---------------------------------------------------------------------------------


def test_compare_names_the_best_throughput_loss_and_fastest(stack, gpu_report, cpu_report,
                                                            capsys):  # fmt: skip
    code, out, err = ugro(
        capsys, "--prometheus", stack.prometheus_url, "compare", GPU_JOB, CPU_JOB, "--json"
    )
    assert code == 0, err
    document = json.loads(out)
    assert [job["job_id"] for job in document["jobs"]] == [GPU_JOB, CPU_JOB]
    jobs = {job["job_id"]: job for job in document["jobs"]}

    def best(figure, pick):
        return pick(jobs, key=figure)

    assert document["best"] == {
        "throughput": best(lambda j: jobs[j]["throughput"]["tokens_per_second_mean"], max),
        "loss": best(lambda j: jobs[j]["loss"]["final"], min),
        "fastest": best(lambda j: jobs[j]["throughput"]["step_seconds_mean"], min),
        "efficiency": best(lambda j: jobs[j]["efficiency"]["score"], max),
    }
    # Same figures as `ugro report` (the curves' timing aside).
    assert jobs[GPU_JOB]["work"] == gpu_report["work"]
    assert jobs[CPU_JOB]["loss"]["final"] == cpu_report["loss"]["final"]
    # 60 steps of 8 sequences learn more than 20 steps of 4, deterministically.
    assert document["best"]["loss"] == GPU_JOB

    code, out, err = ugro(capsys, "--prometheus", stack.prometheus_url, "compare", GPU_JOB,
                          CPU_JOB)  # fmt: skip
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header == [GPU_JOB, CPU_JOB]
    assert re.search(r"^tokens +30,720 +5,120$", out, re.M)
    assert re.search(rf"^best loss +{GPU_JOB} \(final {gpu_report['loss']['final']:.4f}\)$",
                     out, re.M)  # fmt: skip
    for title, key in (("best throughput", "throughput"), ("fastest", "fastest")):
        assert re.search(rf"^{title} +{document['best'][key]} \(", out, re.M)


def test_compare_needs_two_jobs(capsys):
    code, _, err = ugro(capsys, "compare", GPU_JOB)
    assert code == report.EXIT_USAGE
    assert err == "ugro compare: expected two or more job ids\n"


# -- failures --------------------------------------------------------------------------------


def test_unknown_job_is_one_line_naming_it_and_the_server(stack, runs, capsys):
    code, out, err = ugro(capsys, "--prometheus", stack.prometheus_url, "report", "never-ran")
    assert code == report.EXIT_NO_JOB
    assert out == ""
    assert err.count("\n") == 1
    url = stack.prometheus_url
    assert err.startswith(f"ugro report: no job 'never-ran' in Prometheus at {url}")
    assert "in the last 7d" in err

    code, out, err = ugro(
        capsys, "--prometheus", stack.prometheus_url, "compare", GPU_JOB, "never-ran"
    )
    assert code == report.EXIT_NO_JOB
    assert out == ""
    assert err.startswith("ugro compare: no job 'never-ran'")


def test_bad_job_id_is_a_usage_error(capsys):
    code, out, err = ugro(capsys, "report", "no/such job")
    assert code == report.EXIT_USAGE
    assert out == ""
    assert err == (
        "ugro report: job id 'no/such job': expected 1-128 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit\n"
    )


def test_prometheus_down_is_one_line_without_traceback():
    dead = f"http://127.0.0.1:{free_port()}"
    for command in (["report", GPU_JOB], ["compare", GPU_JOB, CPU_JOB, "--json"]):
        result = subprocess.run(
            [sys.executable, "-m", "ugro.console", "--prometheus", dead, *command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == report.EXIT_UNAVAILABLE
        assert result.stdout == ""
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"ugro {command[0]}: Prometheus at {dead} does not answer")


# -- pieces without a server -----------------------------------------------------------------


def test_lookback_durations():
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("90m") == 5400
    for bad in ("", "7", "0d", "1.5h", "-1d", "7x"):
        with pytest.raises(ValueError, match="expected a positive whole number and a unit"):
            parse_duration(bad)


def test_winners_skip_unknown_figures_and_keep_the_first_on_a_tie():
    def job(job_id, tokens_per_second, final_loss, step_seconds, score):
        stub = JobReport.__new__(JobReport)
        stub.job_id, stub.tokens_per_second_mean = job_id, tokens_per_second
        stub.loss_final, stub.step_seconds_mean = final_loss, step_seconds
        stub.efficiency = type("E", (), {"score": score})()
        return stub

    jobs = [job("a", None, 2.0, 10.0, 50.0), job("b", 100.0, float("nan"), 10.0, 50.0)]
    assert report.winners(jobs) == {
        "throughput": "b",
        "loss": "a",
        "fastest": "a",
        "efficiency": "a",
    }
    assert report.winners([job("a", None, None, 1.0, 1.0)])["loss"] is None


def test_json_has_no_nan():
    assert report._json_safe({"a": [float("nan"), 1.0, {"b": float("inf")}]}) == {
        "a": [None, 1.0, {"b": None}]
    }
