"""A training script written the way a well-known public GPT trainer is, not for ugro: gradient
accumulation over micro-batches with the next batch prefetched before backward, its own
`loss.item()` logging every few iterations, gradient clipping, a local config module, a loop of
`max_iters + 1` iterations, and no linger at the end. The lines marked `ugro:` are the whole
instrumentation, as the README's gradient-accumulation example shows.

Run from this directory: `torchrun --nproc-per-node 2 train.py`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from config import TrainConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ugro.trainer import Telemetry  # ugro

cfg = TrainConfig()
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    dist.init_process_group(backend="gloo")
rank = dist.get_rank() if ddp else 0
master = rank == 0
torch.manual_seed(1337)
generator = torch.Generator().manual_seed(1337 + rank)

model = nn.Sequential(nn.Embedding(cfg.vocab, cfg.width), nn.Linear(cfg.width, cfg.vocab))
optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
trained = DistributedDataParallel(model) if ddp else model


def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(cfg.vocab, (cfg.batch_size, cfg.block_size + 1), generator=generator)
    return data[:, :-1], data[:, 1:]


telemetry = Telemetry(total_steps=cfg.max_iters + 1)  # ugro: iterations 0..max_iters
X, Y = get_batch()
for iter_num in range(cfg.max_iters + 1):
    for micro_step in range(cfg.grad_accum):
        if ddp:
            trained.require_backward_grad_sync = micro_step == cfg.grad_accum - 1
        logits = trained(X)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), Y.reshape(-1))
        # ugro: this micro-batch's own loss and size, before the scaling and the prefetch.
        telemetry.micro_step(loss=loss.detach(), tokens=X.numel(), samples=X.shape[0])
        loss = loss / cfg.grad_accum
        X, Y = get_batch()  # the next micro-batch, prefetched while this one runs backward
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    telemetry.step(grad_norm=grad_norm, optimizer=optimizer)  # ugro: one optimizer step
    if iter_num % cfg.log_interval == 0 and master:
        print(f"iter {iter_num}: loss {loss.item() * cfg.grad_accum:.4f}")

telemetry.close()  # ugro: marks the end and lets the final values be scraped
if ddp:
    dist.destroy_process_group()
