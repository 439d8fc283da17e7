"""What ugro's framework callbacks cost a training loop: Hugging Face Trainer and Lightning.

For each framework, one model and one fixed set of batches are trained in alternating blocks of
optimizer steps by the framework's own loop, with and without ugro's ``UgroCallback``:

* ``hf``        — ``transformers.Trainer`` (``ugro.trainer.integrations.hf``);
* ``lightning`` — ``lightning.pytorch.Trainer`` (``ugro.trainer.integrations.lightning``).

A block is one ``train()``/``fit()`` of ``--block-steps`` optimizer steps (gradient accumulation
2); its step time is taken between the first and the last optimizer step by a clock callback
that runs after ugro's, so the framework's set-up and ugro's start and close are outside it and
ugro's work at every step is inside it. While a ugro block runs, its ``/metrics`` is scraped
every second by a thread, as Prometheus would. Each repetition runs the four blocks in a rotated
order, and each ugro block is compared with the bare block of the same framework and repetition;
the ratios reported are medians over repetitions. The last line printed is one JSON object.

    python benchmarks/integration_overhead.py            # CPU, under 2 minutes
    python benchmarks/integration_overhead.py --quick    # a smoke run
    python benchmarks/integration_overhead.py --device cuda   # bf16 on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import platform
import statistics
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning.pytorch as pl
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ugro.trainer.integrations.lightning import UgroCallback as LightningUgro

try:
    from ugro.trainer.integrations.hf import UgroCallback as HfUgro
except ImportError as error:  # the module is optional for this benchmark, not for ugro[hf]
    HfUgro = None
    HF_MISSING = str(error)

PRESETS = {
    # About 40-70 ms an optimizer step on two CPU cores.
    "cpu": dict(n_layer=2, n_embd=128, n_head=4, seq_len=64, micro_batch=8),
    # A GPU-bound step of a few milliseconds on an H100 (bf16).
    "cuda": dict(n_layer=6, n_embd=768, n_head=12, seq_len=256, micro_batch=8),
}
ACCUMULATE = 2
VOCAB = 256
VARIANTS = ("hf-bare", "hf-ugro", "lightning-bare", "lightning-ugro")


class Scraper:
    """Fetches the current endpoint every ``interval`` seconds from a thread, like Prometheus."""

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
            if url is None:
                continue
            with contextlib.suppress(OSError):  # the block ended and its endpoint closed
                with urllib.request.urlopen(url, timeout=5) as response:
                    response.read()
                self.scrapes += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def token_data(samples: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Random token ids with some padding, as a list of samples (both frameworks' collators
    stack a list of dicts)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (samples, 1), generator=generator)
    mask = (torch.arange(seq_len) < lengths).long()
    ids = torch.randint(0, VOCAB, (samples, seq_len), generator=generator) * mask
    labels = ids.masked_fill(mask == 0, -100)
    return [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}
        for i in range(samples)
    ]


def make_model(preset: dict[str, int]) -> GPT2LMHeadModel:
    config = GPT2Config(
        n_layer=preset["n_layer"],
        n_embd=preset["n_embd"],
        n_head=preset["n_head"],
        n_positions=preset["seq_len"],
        vocab_size=VOCAB,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


class StepClock:
    """perf_counter at each optimizer step's end, taken after ugro's callback has run."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def step_seconds(self) -> float:
        stamps = self.stamps
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def ugro_options() -> dict[str, Any]:
    # A private endpoint on a free port; close() does not wait for a last scrape (a benchmark
    # block is not a job whose final values Prometheus must see).
    return dict(job_id="bench", metrics_port=0, bind_address="127.0.0.1", final_scrape_timeout=0.0)


# -- Hugging Face ---------------------------------------------------------------------------


def hf_runner(preset, data, device, block_steps, scraper, workdir) -> Callable[[bool], float]:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    class HfClock(StepClock, TrainerCallback):
        def __init__(self, ugro: Any) -> None:
            super().__init__()
            self.ugro = ugro

        def on_step_end(self, args, state, control, **kwargs):
            if not self.stamps and self.ugro is not None:
                scraper.url = self.ugro.telemetry.metrics_url
            self.stamps.append(time.perf_counter())

    model = make_model(preset).to(device)
    args = TrainingArguments(
        output_dir=str(workdir / "hf"),
        max_steps=block_steps,
        per_device_train_batch_size=preset["micro_batch"],
        gradient_accumulation_steps=ACCUMULATE,
        learning_rate=1e-4,
        max_grad_norm=1.0,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda",
        dataloader_num_workers=0,
    )

    def block(with_ugro: bool) -> float:
        ugro = HfUgro(**ugro_options()) if with_ugro else None
        clock = HfClock(ugro)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=data,
            callbacks=[c for c in (ugro, clock) if c is not None],
        )
        trainer.remove_callback(PrinterCallback)  # its log lines, every 5 steps
        try:
            trainer.train()
        finally:
            scraper.url = None
        return clock.step_seconds()

    return block


# -- Lightning ------------------------------------------------------------------------------


class LightningGpt(pl.LightningModule):
    def __init__(self, model: GPT2LMHeadModel) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def lightning_runner(preset, data, device, block_steps, scraper) -> Callable[[bool], float]:
    class LightningClock(StepClock, pl.Callback):
        def __init__(self, ugro: Any) -> None:
            super().__init__()
            self.ugro = ugro

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % ACCUMULATE:
                return
            if not self.stamps and self.ugro is not None:
                scraper.url = self.ugro.telemetry.metrics_url
            self.stamps.append(time.perf_counter())

    module = LightningGpt(make_model(preset))
    loader = torch.utils.data.DataLoader(data, batch_size=preset["micro_batch"])

    def block(with_ugro: bool) -> float:
        ugro = LightningUgro(**ugro_options()) if with_ugro else None
        clock = LightningClock(ugro)
        trainer = pl.Trainer(
            accelerator=device.type,
            devices=1,
            precision="bf16-mixed" if device.type == "cuda" else "32-true",
            max_steps=block_steps,
            accumulate_grad_batches=ACCUMULATE,
            gradient_clip_val=1.0,
            callbacks=[c for c in (ugro, clock) if c is not None],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        try:
            trainer.fit(module, loader)
        finally:
            scraper.url = None
        return clock.step_seconds()

    return block


def quiet_frameworks() -> None:
    """The frameworks' start-up banners and tips, once per block, would bury the results."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--reps", type=int, default=12, help="repetitions of the four blocks")
    parser.add_argument("--block-steps", type=int, default=12, help="optimizer steps per block")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 6-step blocks")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1, as torchrun gives each rank; leaves a core for the "
        "HTTP server and the scraper)",
    )
    args = parser.parse_args()
    if args.quick:
        args.reps, args.block_steps = 3, 6
    torch.set_num_threads(args.threads)
    quiet_frameworks()

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    preset = PRESETS["cuda" if use_cuda else "cpu"]
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    data = token_data(args.block_steps * ACCUMULATE * preset["micro_batch"], preset["seq_len"])
    scraper = Scraper(args.scrape_interval)

    with tempfile.TemporaryDirectory(prefix="ugro-bench-") as tmp:
        blocks: dict[str, Callable[[bool], float]] = {}
        if HfUgro is not None:
            hf = hf_runner(preset, data, device, args.block_steps, scraper, pathlib.Path(tmp))
            blocks["hf-bare"], blocks["hf-ugro"] = (lambda: hf(False)), (lambda: hf(True))
        else:
            print(f"skipping the Hugging Face part: {HF_MISSING}", flush=True)
        pl_block = lightning_runner(preset, data, device, args.block_steps, scraper)
        blocks["lightning-bare"] = lambda: pl_block(False)
        blocks["lightning-ugro"] = lambda: pl_block(True)
        variants = [v for v in VARIANTS if v in blocks]

        for variant in variants:  # warm-up: allocator, kernels, the frameworks' first runs
            blocks[variant]()

        step_seconds: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(args.reps):
            shift = rep % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                step_seconds[variant].append(blocks[variant]())
            print(
                f"rep {rep + 1:2d}/{args.reps}  "
                + "  ".join(f"{v} {step_seconds[v][-1] * 1e3:7.2f} ms" for v in variants),
                flush=True,
            )
    scraper.stop()

    def paired_ratios(framework: str) -> list[float]:
        ours, bare = step_seconds[f"{framework}-ugro"], step_seconds[f"{framework}-bare"]
        return [o / b for o, b in zip(ours, bare, strict=True)]

    def ratio(framework: str) -> float | None:
        if f"{framework}-ugro" not in step_seconds:
            return None
        return round(statistics.median(paired_ratios(framework)), 4)

    def quartiles(framework: str) -> list[float] | None:
        """How noisy the machine was: the middle half of the paired ratios."""
        if f"{framework}-ugro" not in step_seconds or args.reps < 2:
            return None
        q1, _, q3 = statistics.quantiles(paired_ratios(framework), n=4)
        return [round(q1, 4), round(q3, 4)]

    device_name = torch.cuda.get_device_name(device) if use_cuda else platform.processor() or "cpu"
    result = {
        "benchmark": "integration_overhead",
        "device": f"{device.type}: {device_name}",
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "threads": torch.get_num_threads(),
        "model": preset,
        "accumulate": ACCUMULATE,
        "reps": args.reps,
        "block_steps": args.block_steps,
        "scrape_interval_s": args.scrape_interval,
        "scrapes": scraper.scrapes,
        "step_ms_median": {v: round(statistics.median(step_seconds[v]) * 1e3, 3) for v in variants},
        "hf_overhead_ratio": ratio("hf"),
        "lightning_overhead_ratio": ratio("lightning"),
        "hf_overhead_ratio_quartiles": quartiles("hf"),
        "lightning_overhead_ratio_quartiles": quartiles("lightning"),
    }
    if HfUgro is None:
        result["hf_skipped"] = HF_MISSING
    print(
        f"hf ugro/bare {result['hf_overhead_ratio']}   "
        f"lightning ugro/bare {result['lightning_overhead_ratio']}   "
        f"(median of {args.reps} paired blocks of {args.block_steps} steps)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
