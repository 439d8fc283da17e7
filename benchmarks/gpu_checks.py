"""On a machine with an NVIDIA GPU (H100/H200): ugro's GPU-side figures checked in one command.

Runs, in order, each part guarded so that a failure is reported and the later parts still run:

1. ``nvml_vs_nvidia_smi.py``: every exporter GPU reading against nvidia-smi (a subprocess).
2. ``trainer_overhead.py --device cuda``: ugro's step-time ratio and the naive ``.item()``
   pattern's, each against a bare loop (a subprocess).
3. GPM: a ``ugro-exporter`` polling every second is scraped while the GPU idles and then while a
   bf16 matmul loop runs; ``ugro_gpu_tensor_active_ratio`` should read near 0 idle and high
   under the loop (sm and dram active are reported beside it).
4. MFU: a matmul loop whose FLOPs are known exactly (n×n @ n×n is 2·n³) counted by
   ``Telemetry(flops_per_sample=2·n³)``; the MFU its ``/metrics`` gives (model FLOPs counter rate
   over its peak) against the FLOP/s CUDA events measure over the same interval.

    python benchmarks/gpu_checks.py                  # 2-3 minutes on an H100/H200
    python benchmarks/gpu_checks.py --skip trainer   # leave out a part

The last line printed is one JSON object. Exits 0 when every part ran and every check held,
1 otherwise, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ugro.common.ports import free_port
from ugro.common.processes import stop_process_group, wait_until_ready
from ugro.trainer import Telemetry
from ugro.trainer.flops import peak_flops_for

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PARTS = ("nvml", "trainer", "gpm", "mfu")
# Sub-benchmark limits: together with parts 3 and 4 (about a minute) the run stays under the
# ~8 minutes it is meant to take even when a sub-benchmark hangs and has to be stopped.
NVML_TIMEOUT_S = 150
TRAINER_TIMEOUT_S = 300
# The brief's expectations for GPM's tensor-pipe figure.
IDLE_TENSOR_BELOW = 0.05
MATMUL_TENSOR_ABOVE = 0.5
MFU_TOLERANCE = 0.10
GPM_SERIES = {
    "sm_active_ratio": "ugro_gpu_sm_active_ratio",
    "tensor_active_ratio": "ugro_gpu_tensor_active_ratio",
    "dram_active_ratio": "ugro_gpu_dram_active_ratio",
    # Not GPM: NVML's "a kernel ran" figure, for contrast with sm_active under the same load.
    "utilization_ratio": "ugro_gpu_utilization_ratio",
}
# Local endpoints only: never through an http_proxy the environment may set.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(message: str) -> None:
    print(message, flush=True)


def scrape(url: str) -> list[Sample]:
    with _NO_PROXY.open(url, timeout=10) as response:
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value_of(samples: list[Sample], name: str, **labels: str) -> float | None:
    for sample in samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


class Sampler:
    """Scrapes one endpoint every ``interval`` seconds from a thread, as Prometheus would.

    Keeps (time, values) pairs; the time is the midpoint of the request, since the server
    reads its values somewhere between sending and answering.
    """

    def __init__(
        self, url: str, read: Callable[[list[Sample]], dict[str, float]], interval: float
    ) -> None:
        self.url, self.read, self.interval = url, read, interval
        self.readings: list[tuple[float, dict[str, float]]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            before = time.monotonic()
            try:
                values = self.read(scrape(self.url))
            except Exception as error:  # one failed scrape must not end the sampling
                self.errors.append(f"{type(error).__name__}: {error}")
                continue
            self.readings.append(((before + time.monotonic()) / 2, values))

    def between(self, start: float, end: float) -> list[tuple[float, dict[str, float]]]:
        return [(t, v) for t, v in self.readings if start <= t <= end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


# -- parts 1 and 2: the existing benchmarks, as subprocesses ---------------------------------


def run_benchmark(script: str, arguments: list[str], timeout: float) -> tuple[int, dict | None]:
    """Runs a benchmark, echoing its output as it comes; (exit code, its last JSON line)."""
    command = [sys.executable, str(HERE / script), *arguments]
    log(f"$ {' '.join(command[1:])}")
    # Unbuffered, so that its progress lines arrive while it runs, not all at its end.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout stops what it started too
    )
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        stop_process_group(process, 5)

    timer = threading.Timer(timeout, stop)
    timer.start()
    result = None
    try:
        assert process.stdout is not None
        for line in process.stdout:
            print(f"  | {line}", end="", flush=True)
            text = line.strip()
            if text.startswith("{"):
                try:
                    parsed = json.loads(text)
                except ValueError:
                    continue
                if isinstance(parsed, dict):
                    result = parsed
        returncode = process.wait()
    finally:
        timer.cancel()
    if timed_out.is_set():
        raise TimeoutError(f"{script} did not finish within {timeout:g} s (stopped)")
    return returncode, result


def part_nvml(errors: list[str]) -> dict | None:
    # No options to shorten it: one --once scrape, one nvidia-smi call, 300 timed scrapes.
    returncode, result = run_benchmark("nvml_vs_nvidia_smi.py", [], NVML_TIMEOUT_S)
    if result is None:
        errors.append(f"nvml_vs_nvidia_smi: exited {returncode} without a JSON line")
        return None
    result["exit_code"] = returncode
    if returncode == 1:  # the benchmark's own verdict: a reading disagrees with nvidia-smi
        errors.append(f"nvml_vs_nvidia_smi: mismatches: {result.get('mismatches')}")
    elif returncode != 0:
        errors.append(f"nvml_vs_nvidia_smi: exited {returncode}")
    return result


def part_trainer(errors: list[str], reps: int) -> dict | None:
    returncode, result = run_benchmark(
        "trainer_overhead.py", ["--device", "cuda", "--reps", str(reps)], TRAINER_TIMEOUT_S
    )
    if result is None:
        errors.append(f"trainer_overhead: exited {returncode} without a JSON line")
        return None
    result["exit_code"] = returncode
    if returncode != 0:
        errors.append(f"trainer_overhead: exited {returncode}")
    log(
        f"trainer_overhead: ugro/bare {result.get('overhead_ratio')}  "
        f"naive (.item())/bare {result.get('naive_ratio')}"
    )
    return result


# -- parts 3 and 4: matmul loops -----------------------------------------------------------


def matmul_operands(n: int) -> tuple[Any, Any, Any]:
    import torch

    generator = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=generator)
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    # Warm-up: cuBLAS handle, workspace and kernel choice, outside every timed interval.
    for _ in range(10):
        torch.matmul(a, b, out=out)
    torch.cuda.synchronize()
    return a, b, out


def matmul_loop(
    operands: tuple[Any, Any, Any],
    seconds: float,
    block: int,
    after_each: Callable[[], None] | None = None,
) -> tuple[int, float]:
    """Blocks of ``block`` matmuls until ``seconds`` have passed: (matmuls, GPU seconds).

    The only synchronisation is at the end of each block, so the GPU never waits for the host
    within a block; and the host runs at most one block ahead of the GPU, so a counter the
    host bumps per matmul (Telemetry's) tracks the work the GPU has done.
    """
    import torch

    a, b, out = operands
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    started = time.perf_counter()
    start.record()
    count = 0
    while True:
        for _ in range(block):
            torch.matmul(a, b, out=out)
            if after_each is not None:
                after_each()
        count += block
        torch.cuda.synchronize()
        if time.perf_counter() - started >= seconds:
            break
    end.record()
    end.synchronize()
    return count, start.elapsed_time(end) / 1e3


# -- part 3: GPM ---------------------------------------------------------------------------


def exporter_gpu_label(samples: list[Sample], uuid: str) -> str:
    """The exporter's ``gpu`` label (NVML index) of the GPU torch calls device 0.

    Matched by UUID: CUDA's device order (and CUDA_VISIBLE_DEVICES) need not be NVML's.
    """
    infos = [s.labels for s in samples if s.name == "ugro_gpu_info"]
    for labels in infos:
        if labels.get("gpu_uuid", "").lower() == uuid.lower():
            return labels["gpu"]
    if not infos:
        reasons = [
            f"{s.labels.get('collector')}: {s.labels.get('reason')}"
            for s in samples
            if s.name == "ugro_exporter_collector_down_reason"
        ]
        raise RuntimeError(f"the exporter reports no GPU (collector down: {reasons or '?'})")
    raise RuntimeError(f"none of the exporter's {len(infos)} GPUs has torch's UUID {uuid}")


def summarise(readings: list[tuple[float, dict[str, float]]]) -> dict[str, Any]:
    """Median of each series over the readings (robust to one poll straddling a change)."""
    summary: dict[str, Any] = {}
    for key in GPM_SERIES:
        values = [v[key] for _, v in readings if key in v]
        summary[key] = round(statistics.median(values), 4) if values else None
    summary["samples"] = len(readings)
    return summary


def part_gpm(
    args: argparse.Namespace, uuid: str, errors: list[str]
) -> tuple[dict | None, dict | None, dict[str, bool]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    command = [
        sys.executable, "-m", "ugro.exporter", "--listen", f"127.0.0.1:{port}",
        "--poll-interval", str(args.poll_interval), "--log-level", "warning",
    ]  # fmt: skip
    log(f"$ {' '.join(command[1:])}")
    # A file rather than a pipe for its log: nobody reads a pipe while it runs, and a full pipe
    # would block the exporter.
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
        try:
            return gpm_readings(args, url, uuid, process, errors)
        except Exception:
            stderr.seek(0)
            tail = stderr.read()[-2000:]
            if tail:
                print(f"ugro-exporter's log:\n{tail}", file=sys.stderr)
            raise
        finally:
            stop_process_group(process, 5)


def gpm_readings(
    args: argparse.Namespace, url: str, uuid: str, process: subprocess.Popen, errors: list[str]
) -> tuple[dict | None, dict | None, dict[str, bool]]:
    wait_until_ready(url, 30, process=process, what="ugro-exporter", interval=0.1)
    first = scrape(url)
    gpu = exporter_gpu_label(first, uuid)
    if value_of(first, "ugro_gpu_gpm_supported", gpu=gpu) != 1:
        errors.append(
            f"gpm: the exporter reports ugro_gpu_gpm_supported "
            f"{value_of(first, 'ugro_gpu_gpm_supported', gpu=gpu)} for GPU {gpu}: no GPM "
            "profiling series on this GPU/driver (its log says why), nothing to check"
        )
        log(errors[-1])
        return {"gpm_supported": 0}, None, {}

    def read(samples: list[Sample]) -> dict[str, float]:
        return {
            key: value
            for key, name in GPM_SERIES.items()
            if (value := value_of(samples, name, gpu=gpu)) is not None
        }

    # A GPM reading is the average over the poll interval before it: readings taken within two
    # intervals of a change mix the two states, so each window starts that much after it.
    settle = 2 * args.poll_interval + 0.5
    sampler = Sampler(url, read, min(1.0, args.poll_interval))
    try:
        log(f"GPM idle: {args.idle_seconds:g} s with nothing running on GPU {gpu}")
        idle_start = time.monotonic()
        time.sleep(args.idle_seconds)
        idle = summarise(sampler.between(idle_start + settle, time.monotonic()))
        log(f"GPM idle: {idle}")

        operands = matmul_operands(args.n)
        log(f"GPM under load: bf16 {args.n}x{args.n} matmuls for {args.load_seconds:g} s")
        load_start = time.monotonic()
        count, gpu_seconds = matmul_loop(operands, args.load_seconds, args.block)
        matmul = summarise(sampler.between(load_start + settle, time.monotonic()))
        matmul["matmul_tflops"] = round(count * 2 * args.n**3 / gpu_seconds / 1e12, 1)
        log(f"GPM under load: {matmul}")
        del operands
    finally:
        sampler.stop()
    if sampler.errors:
        errors.append(f"gpm: {len(sampler.errors)} failed scrapes, first: {sampler.errors[0]}")

    idle_tensor, load_tensor = idle["tensor_active_ratio"], matmul["tensor_active_ratio"]
    expectations = {
        f"idle_tensor_below_{IDLE_TENSOR_BELOW}": idle_tensor is not None
        and idle_tensor < IDLE_TENSOR_BELOW,
        f"matmul_tensor_above_{MATMUL_TENSOR_ABOVE}": load_tensor is not None
        and load_tensor > MATMUL_TENSOR_ABOVE,
    }
    for name, held in expectations.items():
        log(f"GPM expectation {name}: {'held' if held else 'NOT HELD'}")
    return idle, matmul, expectations


# -- part 4: MFU ---------------------------------------------------------------------------


def part_mfu(args: argparse.Namespace, name: str, errors: list[str]) -> dict[str, Any]:
    import torch

    flops_per_matmul = 2 * args.n**3
    operands = matmul_operands(args.n)
    telemetry = Telemetry(
        job_id="gpu-checks",
        rank=0,
        local_rank=0,
        world_size=1,
        metrics_port=0,  # any free port
        bind_address="127.0.0.1",
        on_port_taken="fail",
        # One "sample" is one matmul: the counter's increments are known exactly.
        flops_per_sample=float(flops_per_matmul),
        peak_flops=args.peak_flops,
        # The peak is looked up from the device's name once Telemetry knows the device; the
        # step values here are host ints, so it is told the device rather than learning it.
        device=torch.device("cuda", 0),
        final_scrape_timeout=0,  # close() need not wait for a Prometheus that is not there
        env={},  # this run's settings only, whatever UGRO_* variables the shell has
    )
    try:
        url = telemetry.metrics_url
        assert url is not None

        def read(samples: list[Sample]) -> dict[str, float]:
            flops = value_of(samples, "ugro_train_model_flops_total")
            return {} if flops is None else {"flops": flops}

        def step() -> None:
            telemetry.step(samples=1)

        before = scrape(url)
        peak = value_of(before, "ugro_train_peak_flops_per_second")
        counted_before = value_of(before, "ugro_train_model_flops_total") or 0.0
        sampler = Sampler(url, read, 1.0)
        log(f"MFU: bf16 {args.n}x{args.n} matmuls for {args.mfu_seconds:g} s, Telemetry counting")
        started = time.perf_counter()
        in_run_start = time.monotonic()
        try:
            count, gpu_seconds = matmul_loop(operands, args.mfu_seconds, args.block, step)
        finally:
            host_seconds = time.perf_counter() - started
            in_run_end = time.monotonic()
            sampler.stop()
        after = scrape(url)
        counted = (value_of(after, "ugro_train_model_flops_total") or 0.0) - counted_before
        telemetry_errors = value_of(after, "ugro_train_telemetry_errors_total")
    finally:
        telemetry.close()

    measured_flops = count * flops_per_matmul / gpu_seconds
    # Telemetry's view: the counter's increase between the scrapes before and after the loop,
    # over the time between them (the loop ends synchronised, so all of it has run).
    telemetry_flops = counted / host_seconds
    # Prometheus's view: rate() over the scrapes taken while the loop ran, after the first
    # second (the host's head start of one block).
    in_run = sampler.between(in_run_start + 1.0, in_run_end)
    scraped_flops = None
    if len(in_run) >= 2 and in_run[-1][0] - in_run[0][0] >= 3:
        (t0, v0), (t1, v1) = in_run[0], in_run[-1]
        scraped_flops = (v1["flops"] - v0["flops"]) / (t1 - t0)
    table_peak = peak_flops_for(name, "bf16")
    result: dict[str, Any] = {
        "n": args.n,
        "matmuls": count,
        "gpu_seconds": round(gpu_seconds, 3),
        "host_seconds": round(host_seconds, 3),
        "measured_tflops": round(measured_flops / 1e12, 1),
        "telemetry_tflops": round(telemetry_flops / 1e12, 1),
        "scraped_in_run_tflops": None if scraped_flops is None else round(scraped_flops / 1e12, 1),
        "peak_flops_metrics": peak,
        "peak_flops_table": table_peak,
        "counted_exactly": abs(counted - count * flops_per_matmul) <= 1e-9 * counted,
        "telemetry_errors": telemetry_errors,
    }
    if peak is None:
        errors.append(
            f"mfu: no ugro_train_peak_flops_per_second on the rank's /metrics ({name!r} is not "
            "in ugro.trainer.flops' table): pass --peak-flops"
        )
        return result
    result["mfu_telemetry"] = round(telemetry_flops / peak, 4)
    result["mfu_measured"] = round(measured_flops / peak, 4)
    result["mfu_scraped_in_run"] = None if scraped_flops is None else round(scraped_flops / peak, 4)
    result["agree_within_10pct"] = abs(telemetry_flops - measured_flops) <= MFU_TOLERANCE * (
        measured_flops
    )
    if not result["counted_exactly"]:
        errors.append(
            f"mfu: ugro_train_model_flops_total rose by {counted:.6g}, "
            f"expected {count} x {flops_per_matmul} = {count * flops_per_matmul:.6g}"
        )
    if telemetry_errors:
        errors.append(f"mfu: ugro_train_telemetry_errors_total {telemetry_errors}")
    log(
        f"MFU: Telemetry {result['mfu_telemetry']}  measured {result['mfu_measured']}  "
        f"in-run scrapes {result['mfu_scraped_in_run']}  (peak {peak / 1e12:g} TFLOP/s, "
        f"achieved {result['measured_tflops']} TFLOP/s)"
    )
    return result


# -- the run -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8192, help="matmul size n (n×n @ n×n, bf16)")
    parser.add_argument(
        "--block", type=int, default=50, help="matmuls between synchronisations (default 50)"
    )
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="GPM idle window")
    parser.add_argument("--load-seconds", type=float, default=15.0, help="GPM matmul window")
    parser.add_argument("--mfu-seconds", type=float, default=15.0, help="MFU matmul window")
    parser.add_argument(
        "--poll-interval", type=float, default=1.0, help="the exporter's --poll-interval (s)"
    )
    parser.add_argument(
        "--trainer-reps",
        type=int,
        default=61,
        help="trainer_overhead.py --reps (default 61, its own: under a minute on an H100)",
    )
    parser.add_argument(
        "--peak-flops",
        type=float,
        default=None,
        help="the GPU's dense bf16 peak FLOP/s, for a GPU ugro.trainer.flops does not know",
    )
    parser.add_argument(
        "--skip", action="append", choices=PARTS, default=[], help="leave out a part (repeatable)"
    )
    return parser.parse_args()


def guarded(part: str, errors: list[str], function: Callable[[], Any]) -> Any:
    """Runs one part; an exception is reported (and its traceback shown) and the run goes on."""
    log(f"\n=== {part} ===")
    try:
        return function()
    except Exception as error:
        traceback.print_exc()
        errors.append(f"{part}: {type(error).__name__}: {error}")
        return None


def main() -> int:
    args = parse_args()
    try:
        import torch
    except ImportError:
        print("gpu_checks: PyTorch is not installed: pip install -e '.[train]'", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0)
    # NVML (and so the exporter) names the GPU "GPU-<uuid>"; torch gives the bare uuid.
    # (Telemetry labels the rank's gpu_uuid the same way, from the same property.)
    uuid = f"GPU-{getattr(torch.cuda.get_device_properties(0), 'uuid', '?')}"
    log(f"GPU 0: {name} ({uuid}), torch {torch.__version__}")
    errors: list[str] = []
    result: dict[str, Any] = {
        "benchmark": "gpu_checks",
        "gpu": name,
        "nvml_vs_nvidia_smi": None,
        "trainer_overhead": None,
        "gpm_idle": None,
        "gpm_matmul": None,
        "gpm_expectations": None,
        "gpm_expectations_held": None,
        "mfu": None,
        "mfu_telemetry": None,
        "mfu_measured": None,
        "mfu_agree_within_10pct": None,
        "skipped": sorted(set(args.skip)),
        "errors": errors,
    }
    started = time.monotonic()

    if "nvml" not in args.skip:
        result["nvml_vs_nvidia_smi"] = guarded(
            "nvml_vs_nvidia_smi", errors, lambda: part_nvml(errors)
        )
    if "trainer" not in args.skip:
        result["trainer_overhead"] = guarded(
            "trainer_overhead", errors, lambda: part_trainer(errors, args.trainer_reps)
        )
    if "gpm" not in args.skip:
        gpm = guarded("gpm", errors, lambda: part_gpm(args, uuid, errors))
        if gpm is not None:
            idle, matmul, expectations = gpm
            result["gpm_idle"], result["gpm_matmul"] = idle, matmul
            result["gpm_expectations"] = expectations
            result["gpm_expectations_held"] = bool(expectations) and all(expectations.values())
        else:
            result["gpm_expectations_held"] = False
    if "mfu" not in args.skip:
        mfu = guarded("mfu", errors, lambda: part_mfu(args, name, errors))
        result["mfu"] = mfu
        if mfu is not None:
            result["mfu_telemetry"] = mfu.get("mfu_telemetry")
            result["mfu_measured"] = mfu.get("mfu_measured")
            result["mfu_agree_within_10pct"] = mfu.get("agree_within_10pct", False)
        else:
            result["mfu_agree_within_10pct"] = False

    result["seconds"] = round(time.monotonic() - started, 1)
    log("\n=== summary ===")
    trainer = result["trainer_overhead"] or {}
    log(
        f"trainer overhead: ugro {trainer.get('overhead_ratio')}  "
        f"naive {trainer.get('naive_ratio')}\n"
        f"GPM expectations held: {result['gpm_expectations_held']}\n"
        f"MFU Telemetry {result['mfu_telemetry']}  measured {result['mfu_measured']}  "
        f"agree within 10 %: {result['mfu_agree_within_10pct']}\n"
        f"errors: {len(errors)}"
    )
    for error in errors:
        log(f"  - {error}")
    print(json.dumps(result))
    checks = [result["gpm_expectations_held"], result["mfu_agree_within_10pct"]]
    return 1 if errors or any(check is False for check in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
