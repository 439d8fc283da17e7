"""A tiny GPT-2 trained by PyTorch Lightning, monitored by ugro on every rank.

    python -m torch.distributed.run --nproc-per-node 2 examples/lightning_tiny_gpt.py --steps 30
    ugro-launch --inventory nodes.yml --nproc-per-node 2 -- examples/lightning_tiny_gpt.py

Random weights and token ids generated here (nothing is downloaded): it shows the wiring, not
learning. The ugro part is one line, ``callbacks=[UgroCallback()]``. Needs
``pip install 'ugro[lightning,hf]'`` (transformers for the GPT-2 model).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from transformers import GPT2Config, GPT2LMHeadModel

from ugro.trainer.integrations.lightning import UgroCallback

VOCAB, LEARNING_RATE = 256, 1e-3


def token_data(samples: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Random token ids, each row padded after a random length from seq_len/2 to seq_len."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (samples, 1), generator=generator)
    mask = (torch.arange(seq_len) < lengths).long()
    ids = torch.randint(0, VOCAB, (samples, seq_len), generator=generator) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, data: dict[str, torch.Tensor], delay: float) -> None:
        self.data, self.delay = data, delay

    def __len__(self) -> int:
        return len(self.data["input_ids"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        time.sleep(self.delay)  # --data-delay: a slow input pipeline, seen as data wait
        return {name: column[index] for name, column in self.data.items()}


class TinyGPT(pl.LightningModule):
    def __init__(self, steps: int) -> None:
        super().__init__()
        config = GPT2Config(
            n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64,
            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
        )  # fmt: skip
        self.model, self.steps = GPT2LMHeadModel(config), steps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss, sync_dist=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=LEARNING_RATE)
        # Linear warm-up to the full rate at the last step.
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: (k + 1) / self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--data-delay", type=float, default=0.0, help="seconds per sample")
    parser.add_argument("--log-dir", help="write Lightning's own logged values here (CSV)")
    parser.add_argument(
        "--val-every", type=int, default=0, help="validate every N optimizer steps (0: never)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: never)"
    )
    parser.add_argument("--checkpoint-dir", help="where checkpoints go (default: under --log-dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("ugro").setLevel(logging.INFO)  # "ugro: rank N serves /metrics at …"

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    samples = args.steps * args.accumulate * args.batch_size * world_size
    data = TokenDataset(token_data(samples, args.seq_len, args.seed), args.data_delay)
    pl.seed_everything(args.seed, verbose=False)
    validation: dict = {"limit_val_batches": 0}
    loaders: dict = {}
    if args.val_every:
        # Lightning counts its validation interval in training batches, not optimizer steps.
        validation = {
            "val_check_interval": args.val_every * args.accumulate,
            "limit_val_batches": 2,
            "num_sanity_val_steps": 0,
        }
        held_out = TokenDataset(token_data(4 * args.batch_size, args.seq_len, args.seed + 1), 0.0)
        loaders["val_dataloaders"] = torch.utils.data.DataLoader(held_out, args.batch_size)
    callbacks: list[pl.Callback] = [UgroCallback()]
    if args.checkpoint_every:
        directory = args.checkpoint_dir or os.path.join(args.log_dir or ".", "checkpoints")
        callbacks.append(
            ModelCheckpoint(directory, every_n_train_steps=args.checkpoint_every, save_top_k=-1)
        )
    trainer = pl.Trainer(
        accelerator="auto",
        devices=per_node,
        num_nodes=world_size // per_node,
        strategy="ddp" if world_size > 1 else "auto",
        max_epochs=1,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=1.0,
        callbacks=callbacks,
        logger=CSVLogger(args.log_dir, name="", version="") if args.log_dir else False,
        log_every_n_steps=1,
        enable_checkpointing=bool(args.checkpoint_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        **validation,
    )
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    trainer.fit(TinyGPT(args.steps), loader, **loaders)


if __name__ == "__main__":
    main()
