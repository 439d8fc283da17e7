"""Faults the reference trainer can inject on one rank, for demos and alert tests.

Steps are numbered from 1 (the first optimizer step), like ``ugro_train_steps_total``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class FaultPlan:
    rank: int = 0
    nonfinite_loss_from: int | None = None
    nonfinite_loss_steps: int | None = None  # None: every step from then on
    slow_factor: float = 1.0
    slow_from: int = 1
    hang_at: int | None = None  # inside the forward pass of that step
    hang_in_data_at: int | None = None  # inside the wait for that step's batch
    hang_before_first_step: bool = False  # serves metrics, never completes a step
    crash_at: int | None = None
    crash_exit_code: int = 3

    def __post_init__(self) -> None:
        for name in ("nonfinite_loss_from", "hang_at", "hang_in_data_at", "crash_at"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value}: expected a step >= 1")
        if self.nonfinite_loss_steps is not None and self.nonfinite_loss_steps < 1:
            raise ValueError(
                f"--nonfinite-loss-steps {self.nonfinite_loss_steps}: expected a count >= 1"
            )
        if self.slow_factor < 1.0:
            raise ValueError(f"--slow-factor {self.slow_factor}: expected a factor >= 1")
        if self.slow_from < 1:
            raise ValueError(f"--slow-from {self.slow_from}: expected a step >= 1")
        if not 1 <= self.crash_exit_code <= 255:
            raise ValueError(f"--crash-exit-code {self.crash_exit_code}: expected 1..255")
        if self.rank < 0:
            raise ValueError(f"--fault-rank {self.rank}: expected a rank >= 0")

    def before_step(self, step: int, rank: int) -> None:
        """Crash here when this step and rank are the chosen ones."""
        if rank != self.rank:
            return
        if self.crash_at is not None and step >= self.crash_at:
            print(
                f"rank {rank}: injected crash at step {step} (exit code {self.crash_exit_code})",
                file=sys.stderr,
                flush=True,
            )
            os._exit(self.crash_exit_code)  # abrupt, like a segfault or an OOM kill: no clean-up

    def before_training(self, rank: int) -> None:
        """Hang before the first step: a rank stuck loading its model or its first shard."""
        if rank == self.rank and self.hang_before_first_step:
            _hang(f"rank {rank}: injected hang before the first step")

    def in_data_wait(self, step: int, rank: int) -> None:
        """Hang while fetching this step's batch: a dead data worker, a stuck filesystem."""
        if rank == self.rank and self.hang_in_data_at is not None and step >= self.hang_in_data_at:
            _hang(f"rank {rank}: injected hang at step {step} (in the input pipeline)")

    def in_forward(self, step: int, rank: int) -> None:
        """Hang inside this step's forward pass: a deadlock in the model's own code."""
        if rank == self.rank and self.hang_at is not None and step >= self.hang_at:
            _hang(f"rank {rank}: injected hang at step {step} (in the forward pass)")

    def poisons_loss(self, step: int, rank: int) -> bool:
        return (
            rank == self.rank
            and self.nonfinite_loss_from is not None
            and step >= self.nonfinite_loss_from
            and (
                self.nonfinite_loss_steps is None
                or step < self.nonfinite_loss_from + self.nonfinite_loss_steps
            )
        )

    def delay_seconds(self, step: int, rank: int, compute_seconds: float) -> float:
        """Extra time that makes this rank's work take ``slow_factor`` times as long.

        The trainer sleeps it while fetching the batch: a straggling input pipeline, which the
        other ranks wait for in DDP's all-reduce.
        """
        if rank != self.rank or step < self.slow_from:
            return 0.0
        return (self.slow_factor - 1.0) * compute_seconds


def _hang(message: str) -> None:
    """Block forever, the rank's /metrics still served (its server runs on another thread)."""
    print(message, file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)
