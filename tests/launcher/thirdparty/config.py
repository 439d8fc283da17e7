"""The training script's own configuration module, imported as `from config import ...`: the
script only runs from its own directory (ugro-launch --chdir)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    max_iters: int = 600  # the loop runs iterations 0..max_iters: max_iters + 1 optimizer steps
    grad_accum: int = 4  # micro-batches per optimizer step
    batch_size: int = 4  # sequences per micro-batch
    block_size: int = 16  # tokens per sequence
    vocab: int = 64
    width: int = 32
    learning_rate: float = 1e-3
    grad_clip: float = 1.0
    log_interval: int = 100
