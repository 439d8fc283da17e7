"""Reference trainer: a small causal language model trained with DDP, monitored by ugro.

    torchrun --standalone --nproc-per-node 2 -m ugro.trainer.train --steps 200

It trains on the Python standard library's source (offline on any machine) with AdamW, a warm-up
plus cosine learning-rate schedule and gradient clipping, using gloo on CPU and NCCL on CUDA.
The lines marked ``ugro`` below are all the telemetry takes: one ``step()`` call per step, and
optionally the phases (data, forward, backward, optimizer, evaluation, checkpoint) each part of
the loop is in. ``--checkpoint-every`` and ``--eval-every`` add periodic checkpoints (rank 0
writes, the others wait in a barrier, as in real DDP jobs) and evaluations; the ``--*-delay``
flags inject known waits, for exact goodput tests. Fault flags make one rank diverge, straggle,
hang (before its first step, in its input pipeline, or in its forward pass) or crash, for demos
and alert tests.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .config import TelemetryConfigError
from .data import DEFAULT_CORPUS_BYTES, CorpusError, RandomWindows, stdlib_source_bytes
from .faults import FaultPlan
from .model import ModelConfig, TinyCausalLM, flops_per_token
from .server import MetricsServerError
from .telemetry import Telemetry

EXIT_USAGE = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ugro.trainer.train",
        description="Train a small causal LM with DDP and serve ugro telemetry on /metrics.",
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per rank and step")
    parser.add_argument("--context", type=int, default=64, help="bytes per sequence")
    parser.add_argument("--width", type=int, default=128, help="model width")
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus-bytes", type=int, default=DEFAULT_CORPUS_BYTES)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--log-every", type=int, default=20, help="progress line every N steps")
    parser.add_argument(
        "--linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep serving /metrics this long after the last step (not needed: closing the "
        "telemetry waits for the scrape that takes the final values)",
    )
    parser.add_argument(
        "--start-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long before telemetry starts, like a large model or a checkpoint "
        "that takes minutes to load",
    )
    parser.add_argument(
        "--peak-flops",
        type=float,
        metavar="FLOP/S",
        help="the device's peak FLOP/s for MFU, where ugro's table does not know it (a CPU, "
        "a GPU not listed); default UGRO_PEAK_FLOPS, else the table",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="write a checkpoint every N steps (0, the default: never); rank 0 writes model and "
        "optimizer with torch.save, the other ranks wait for it in a barrier",
    )
    parser.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="where rank 0 writes checkpoint.pt (default: a temporary directory, removed at the "
        "end)",
    )
    parser.add_argument(
        "--checkpoint-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="extra sleep inside every checkpoint, on every rank (for tests)",
    )
    parser.add_argument(
        "--eval-every", type=int, default=0, metavar="N", help="evaluate every N steps (0: never)"
    )
    parser.add_argument(
        "--eval-batches", type=int, default=2, metavar="K", help="batches per evaluation"
    )
    parser.add_argument(
        "--eval-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="extra sleep inside every evaluation, on every rank (for tests)",
    )
    parser.add_argument(
        "--data-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="extra sleep inside every wait for a batch, on every rank (for tests)",
    )
    faults = parser.add_argument_group("fault injection (one rank)")
    faults.add_argument("--fault-rank", type=int, default=0, help="the rank faults hit")
    faults.add_argument("--nonfinite-loss-from", type=int, metavar="STEP")
    faults.add_argument(
        "--nonfinite-loss-steps",
        type=int,
        metavar="N",
        help="poison the loss for N steps only, then recover (default: until the end)",
    )
    faults.add_argument(
        "--slow-factor",
        type=float,
        default=1.0,
        help="the rank's input pipeline stalls so that its step's work takes F× as long",
    )
    faults.add_argument("--slow-from", type=int, default=1, metavar="STEP")
    faults.add_argument(
        "--hang-at", type=int, metavar="STEP", help="hang inside the forward pass of STEP"
    )
    faults.add_argument(
        "--hang-in-data-at",
        type=int,
        metavar="STEP",
        help="hang inside the wait for STEP's batch (a stuck input pipeline)",
    )
    faults.add_argument(
        "--hang-before-first-step",
        action="store_true",
        help="serve metrics but never complete a step (a rank stuck starting up)",
    )
    faults.add_argument("--crash-at", type=int, metavar="STEP")
    faults.add_argument("--crash-exit-code", type=int, default=3)
    args = parser.parse_args(argv)

    for name in ("steps", "batch_size", "context", "width", "depth", "heads", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if min(args.linger, args.start_delay, args.warmup_steps) < 0 or args.lr <= 0 or args.clip <= 0:
        parser.error("--linger, --start-delay, --warmup-steps must be >= 0 and --lr, --clip > 0")
    for name in ("checkpoint_every", "eval_every"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 0")
    if args.eval_batches < 1:
        parser.error(f"--eval-batches {args.eval_batches}: expected >= 1")
    for name in ("checkpoint_delay", "eval_delay", "data_delay"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected seconds >= 0")
    try:
        args.faults = FaultPlan(
            rank=args.fault_rank,
            nonfinite_loss_from=args.nonfinite_loss_from,
            nonfinite_loss_steps=args.nonfinite_loss_steps,
            slow_factor=args.slow_factor,
            slow_from=args.slow_from,
            hang_at=args.hang_at,
            hang_in_data_at=args.hang_in_data_at,
            hang_before_first_step=args.hang_before_first_step,
            crash_at=args.crash_at,
            crash_exit_code=args.crash_exit_code,
        )
        args.model = ModelConfig(
            context=args.context, width=args.width, depth=args.depth, heads=args.heads
        )
    except ValueError as error:
        parser.error(str(error))
    return args


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate multiplier: linear warm-up, then cosine decay to 10 % of the peak."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def discard_nonfinite_gradients(model: torch.nn.Module) -> None:
    """Zero NaN/Inf gradients so one bad batch does not poison the weights.

    Under DDP the gradients are already averaged, so every rank zeroes the same entries and
    the replicas stay identical. Unlike skipping the optimizer step, this needs no host sync.
    """
    for parameter in model.parameters():
        if parameter.grad is not None:
            torch.nan_to_num_(parameter.grad, nan=0.0, posinf=0.0, neginf=0.0)


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but PyTorch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = pick_device(args.device, local_rank)
        corpus = stdlib_source_bytes(args.corpus_bytes)
        time.sleep(args.start_delay)
        # ugro: identity and port come from torchrun's and ugro-launch's environment; the
        # model's FLOPs per token and the device's peak (for the trainer's float32 matmuls:
        # TF32 when torch is allowed to use it) give MFU.
        telemetry = Telemetry(
            total_steps=args.steps,
            device=device,
            flops_per_token=flops_per_token(args.model),
            peak_flops=args.peak_flops,
            train_dtype="fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32",
        )
    except (RuntimeError, CorpusError, TelemetryConfigError, MetricsServerError) as error:
        print(f"ugro.trainer.train: {error}", file=sys.stderr)
        return EXIT_USAGE
    rank = telemetry.config.rank
    if telemetry.metrics_url:
        print(f"rank {rank}: metrics at {telemetry.metrics_url}", flush=True)

    with telemetry:  # ugro: closing it stops the endpoint, even if training raises
        if distributed:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        try:
            train(args, device, rank, corpus, telemetry, distributed)
        finally:
            if distributed:
                dist.destroy_process_group()
    return 0


def train(
    args: argparse.Namespace,
    device: torch.device,
    rank: int,
    corpus: bytes,
    telemetry: Telemetry,
    distributed: bool,
) -> None:
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = TinyCausalLM(args.model).to(device)
    trained = DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(args.warmup_steps, args.steps)
    )
    batches = RandomWindows(corpus, args.context, args.batch_size, seed=args.seed + 1000 * rank)
    eval_batches = RandomWindows(corpus, args.context, args.batch_size, seed=args.seed + 1 + rank)
    faults: FaultPlan = args.faults
    checkpoints = CheckpointWriter(args.checkpoint_dir, rank, distributed)

    started = time.perf_counter()
    compute_estimate = 0.0  # forward + backward of the previous step, from its forward time
    faults.before_training(rank)
    for step in range(1, args.steps + 1):
        faults.before_step(step, rank)
        with telemetry.data_wait():  # ugro (optional): what singles out a slow input pipeline
            faults.in_data_wait(step, rank)
            inputs, targets = batches.next()
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device)
            delay = args.data_delay + faults.delay_seconds(step, rank, compute_estimate)
            if delay:
                time.sleep(delay)  # a straggling input pipeline; the other ranks wait in DDP

        forward_started = time.perf_counter()
        with telemetry.phase("forward"):  # ugro (optional), as are the phases below
            faults.in_forward(step, rank)
            loss = trained(inputs, targets)
        compute_estimate = 3 * (time.perf_counter() - forward_started)
        if faults.poisons_loss(step, rank):
            if not faults.poisons_loss(step - 1, rank):
                # The alert-latency benchmark measures from this line's timestamp.
                print(
                    f"rank {rank}: injected non-finite loss at step {step} "
                    f"(unix time {time.time():.3f})",
                    file=sys.stderr,
                    flush=True,
                )
            loss = loss * float("nan")

        optimizer.zero_grad(set_to_none=True)
        with telemetry.phase("backward"):  # DDP's gradient all-reduce runs in here
            loss.backward()
        with telemetry.phase("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            discard_nonfinite_gradients(model)
            optimizer.step()
            schedule.step()
        # ugro: one call per optimizer step; tensors stay on the device, nothing syncs.
        telemetry.step(
            loss=loss.detach(),
            tokens=inputs.numel(),
            samples=inputs.shape[0],
            grad_norm=grad_norm,
            optimizer=optimizer,
        )

        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            elapsed = time.perf_counter() - started
            print(progress_line(step, args.steps, telemetry, elapsed), flush=True)
        if args.eval_every and step % args.eval_every == 0:
            with telemetry.evaluation():  # ugro (optional)
                eval_loss = evaluate(model, eval_batches, args.eval_batches, device)
                time.sleep(args.eval_delay)
            if rank == 0:
                print(f"step {step}: eval loss {eval_loss:.4f}", flush=True)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            with telemetry.checkpoint() as checkpoint:  # ugro (optional)
                time.sleep(args.checkpoint_delay)
                checkpoint.bytes_written = checkpoints.write(model, optimizer, step)
    checkpoints.close()
    if args.linger:
        time.sleep(args.linger)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: RandomWindows, count: int, device: torch.device
) -> float:
    """Mean loss over ``count`` held-out batches, on this rank alone (no collective)."""
    model.eval()
    try:
        total = torch.zeros((), device=device)
        for _ in range(count):
            inputs, targets = batches.next()
            total += model(inputs.to(device), targets.to(device))
        return total.item() / count
    finally:
        model.train()


class CheckpointWriter:
    """Rank 0 writes model and optimizer with ``torch.save``; every rank then meets the others
    in a barrier, so that no rank trains on while the checkpoint is incomplete (as DDP jobs do).
    """

    def __init__(self, directory: str | None, rank: int, distributed: bool) -> None:
        self.rank = rank
        self.distributed = distributed
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        self._directory = directory

    def _path(self) -> str:
        if self._directory is None:  # created on first use: only rank 0 writes
            self._temporary = tempfile.TemporaryDirectory(
                prefix=f"ugro-checkpoint-rank{self.rank}-"
            )
            self._directory = self._temporary.name
        return os.path.join(self._directory, "checkpoint.pt")

    def write(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int
    ) -> int | None:
        """The bytes written (None on the ranks that only wait)."""
        written = None
        if self.rank == 0:
            path = self._path()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            partial = f"{path}.partial"
            state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save(state, partial)
            os.replace(partial, path)  # a crash mid-write leaves the previous checkpoint whole
            written = os.path.getsize(path)
        if self.distributed:
            dist.barrier()
        return written

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None


def progress_line(step: int, steps: int, telemetry: Telemetry, elapsed: float) -> str:
    """From the values already on the host: printing progress must not sync with the device."""
    latest = telemetry.latest()

    def shown(name: str, spec: str) -> str:
        value = latest[name]
        return "pending" if value is None else format(value, spec)

    return (
        f"step {step}/{steps}  loss {shown('loss', '.4f')}  lr {shown('learning_rate', '.2e')}  "
        f"{latest['tokens'] / max(elapsed, 1e-9):,.0f} tokens/s on this rank"
    )


if __name__ == "__main__":
    sys.exit(main())
