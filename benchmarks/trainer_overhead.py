"""What ugro telemetry costs a training loop, against a bare loop and the common naive pattern.

One model, one optimizer and one fixed set of batches are trained in alternating blocks of
steps by three loops that differ only in their metrics:

* ``bare``  — no metrics at all;
* ``ugro``  — ``Telemetry.step()`` and ``data_wait()`` every step, its ``/metrics`` endpoint
  scraped every second;
* ``phases`` — as ``ugro``, and the forward pass, the backward pass and the optimizer step each
  in their own ``telemetry.phase()`` block (four phase blocks a step, as the reference trainer);
* ``naive`` — ``loss.item()`` / ``grad_norm.item()`` into prometheus_client gauges every step,
  its endpoint scraped the same way.

Each repetition runs the four blocks in a rotated order (so warm-up, clock ramps and thermal
drift do not favour one), and each variant's block time is compared with the bare block of the
same repetition (``phases`` also with the ``ugro`` block: what marking the phases adds). The
ratios reported are medians over repetitions. Two low-noise cross-checks time the calls alone:
``Telemetry.step()`` and one phase block (enter and leave). The last line printed is one JSON
object.

    python benchmarks/trainer_overhead.py                 # CPU (or --device cuda on a GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import threading
import time
import urllib.request

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ugro.trainer import Telemetry
from ugro.trainer.data import RandomWindows, stdlib_source_bytes
from ugro.trainer.model import ModelConfig, TinyCausalLM

PRESETS = {
    # About 40-70 ms a step on two CPU cores.
    "cpu": dict(width=128, depth=2, heads=4, context=64, batch_size=16),
    # A GPU-bound step of roughly 5-10 ms on an H100 (bf16 autocast).
    "cuda": dict(width=768, depth=6, heads=12, context=256, batch_size=16),
}
VARIANTS = ("bare", "ugro", "phases", "naive")


class Scraper:
    """Fetches one endpoint at a fixed interval from a background thread, like Prometheus."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.url: str | None = None
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            url = self.url
            if url is not None:
                with urllib.request.urlopen(url, timeout=5) as response:
                    response.read()
                self.scrapes += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class NaiveMetrics:
    """The pattern most training scripts start with: prometheus_client objects and ``.item()``."""

    def __init__(self) -> None:
        registry = CollectorRegistry()
        self.loss = Gauge("naive_loss", "loss", registry=registry)
        self.grad_norm = Gauge("naive_grad_norm", "grad norm", registry=registry)
        self.learning_rate = Gauge("naive_learning_rate", "lr", registry=registry)
        self.steps = Counter("naive_steps", "steps", registry=registry)
        self.tokens = Counter("naive_tokens", "tokens", registry=registry)
        self.samples = Counter("naive_samples", "samples", registry=registry)
        self.step_seconds = Histogram("naive_step_seconds", "step time", registry=registry)
        self.server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"
        self._previous = time.perf_counter()

    def step(self, loss, tokens, samples, grad_norm, optimizer) -> None:
        self.loss.set(loss.item())  # a host-device sync on CUDA
        self.grad_norm.set(grad_norm.item())
        self.learning_rate.set(optimizer.param_groups[0]["lr"])
        self.steps.inc()
        self.tokens.inc(tokens)
        self.samples.inc(samples)
        now = time.perf_counter()
        self.step_seconds.observe(now - self._previous)
        self._previous = now

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def telemetry_call_microseconds(
    telemetry: Telemetry, batch_size: int, tokens: int, optimizer, device: torch.device
) -> float:
    """Host time of one ``Telemetry.step()`` call with step-like tensor values, in microseconds.

    A low-noise cross-check of the block timings: this is the cost the loop pays per step.
    """
    loss = torch.tensor(2.5, device=device)
    grad_norm = torch.tensor(0.7, device=device)
    calls = 5000
    started = time.perf_counter()
    for _ in range(calls):
        telemetry.step(
            loss=loss, tokens=tokens, samples=batch_size, grad_norm=grad_norm, optimizer=optimizer
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls * 1e6


def phase_block_microseconds(telemetry: Telemetry) -> float:
    """Host time of one ``with telemetry.phase(...)`` block (a switch in and one back), in µs."""
    calls = 20000
    started = time.perf_counter()
    for _ in range(calls):
        with telemetry.phase("forward"):
            pass
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--reps", type=int, default=61, help="repetitions of the four blocks")
    parser.add_argument("--block-steps", type=int, default=15, help="steps per timed block")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--batches", type=int, default=16, help="distinct batches, cycled")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1, what torchrun gives each rank of a multi-process "
        "job; leaves a core for the HTTP server and the scraper rather than fighting over it)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    preset = PRESETS["cuda" if use_cuda else "cpu"]
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    batch_size = preset["batch_size"]
    config = ModelConfig(**{k: v for k, v in preset.items() if k != "batch_size"})

    torch.manual_seed(0)
    model = TinyCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    windows = RandomWindows(stdlib_source_bytes(), config.context, batch_size, seed=0)
    batches = [tuple(t.to(device) for t in windows.next()) for _ in range(args.batches)]
    tokens_per_step = batch_size * config.context

    telemetry = Telemetry(
        job_id="bench",
        rank=0,
        world_size=1,
        metrics_port=0,
        bind_address="127.0.0.1",
        registry=CollectorRegistry(),
        env={},
    )
    naive = NaiveMetrics()
    scraper = Scraper(args.scrape_interval)
    urls = {
        "bare": None,
        "ugro": telemetry.metrics_url,
        "phases": telemetry.metrics_url,
        "naive": naive.url,
    }
    position = 0

    def train_step(variant: str) -> None:
        nonlocal position
        with data_timers[variant]():
            inputs, targets = batches[position % len(batches)]
        position += 1
        phase = phase_blocks[variant]
        with phase("forward"), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
            loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        record = recorders[variant]
        if record is not None:
            record(
                loss=loss.detach(),
                tokens=tokens_per_step,
                samples=batch_size,
                grad_norm=grad_norm,
                optimizer=optimizer,
            )

    recorders = {
        "bare": None,
        "ugro": telemetry.step,
        "phases": telemetry.step,
        "naive": naive.step,
    }
    data_timers = {
        "bare": contextlib.nullcontext,
        "ugro": telemetry.data_wait,
        "phases": telemetry.data_wait,
        "naive": contextlib.nullcontext,
    }

    def unmarked(name: str) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    phase_blocks = {
        "bare": unmarked,
        "ugro": unmarked,
        "phases": telemetry.phase,
        "naive": unmarked,
    }

    def block(variant: str, steps: int) -> float:
        scraper.url = urls[variant]
        if use_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            train_step(variant)
        if use_cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / steps

    for variant in VARIANTS:  # warm-up: allocator, kernels, the endpoints' first scrapes
        block(variant, max(5, args.block_steps // 2))

    step_seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        shift = rep % len(VARIANTS)
        order = VARIANTS[shift:] + VARIANTS[:shift]
        for variant in order:
            step_seconds[variant].append(block(variant, args.block_steps))
        print(
            f"rep {rep + 1:2d}/{args.reps}  "
            + "  ".join(f"{v} {step_seconds[v][-1] * 1e3:7.2f} ms" for v in VARIANTS),
            flush=True,
        )

    scraper.stop()
    naive.close()
    call_us = telemetry_call_microseconds(telemetry, batch_size, tokens_per_step, optimizer, device)
    phase_us = phase_block_microseconds(telemetry)
    telemetry.close()

    def paired_ratios(variant: str, base: str = "bare") -> list[float]:
        return [t / b for t, b in zip(step_seconds[variant], step_seconds[base], strict=True)]

    def median_ratio(variant: str, base: str = "bare") -> float:
        return statistics.median(paired_ratios(variant, base))

    def quartiles(variant: str, base: str = "bare") -> list[float]:
        """How noisy the machine was: the middle half of the paired ratios."""
        q1, _, q3 = statistics.quantiles(paired_ratios(variant, base), n=4)
        return [round(q1, 4), round(q3, 4)]

    device_name = torch.cuda.get_device_name(device) if use_cuda else platform.processor() or "cpu"
    result = {
        "benchmark": "trainer_overhead",
        "device": f"{device.type}: {device_name}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": preset,
        "reps": args.reps,
        "block_steps": args.block_steps,
        "scrape_interval_s": args.scrape_interval,
        "scrapes": scraper.scrapes,
        "step_ms_median": {v: round(statistics.median(step_seconds[v]) * 1e3, 3) for v in VARIANTS},
        "overhead_ratio": round(median_ratio("ugro"), 4),
        "phases_ratio": round(median_ratio("phases"), 4),
        "phases_vs_ugro_ratio": round(median_ratio("phases", "ugro"), 4),
        "naive_ratio": round(median_ratio("naive"), 4),
        "overhead_ratio_quartiles": quartiles("ugro"),
        "phases_ratio_quartiles": quartiles("phases"),
        "phases_vs_ugro_ratio_quartiles": quartiles("phases", "ugro"),
        "naive_ratio_quartiles": quartiles("naive"),
        "telemetry_step_call_us": round(call_us, 2),
        "phase_block_us": round(phase_us, 3),
        "telemetry_errors": telemetry.registry.get_sample_value(
            "ugro_train_telemetry_errors_total"
        ),
    }
    print(
        f"ugro/bare {result['overhead_ratio']:.4f}   phases/bare {result['phases_ratio']:.4f}"
        f"   phases/ugro {result['phases_vs_ugro_ratio']:.4f}"
        f"   naive/bare {result['naive_ratio']:.4f}"
        f"   (median of {args.reps} paired blocks of {args.block_steps} steps)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
