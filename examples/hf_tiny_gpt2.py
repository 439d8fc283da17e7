"""A tiny GPT-2 trained by the Hugging Face Trainer, every rank watched by ugro.

    python -m torch.distributed.run --nproc-per-node 2 examples/hf_tiny_gpt2.py --steps 40
    ugro-launch -i inventory.yml --nproc-per-node 2 -- examples/hf_tiny_gpt2.py --steps 40

The model is built from a config (random weights) and the data are generated token ids with some
padding, so nothing is downloaded. ugro takes the line marked ``ugro``. ``--pause`` slows the
steps down so that a short run can be watched; ``--nonfinite-rank R --nonfinite-steps A-B`` makes
rank R's loss NaN at steps A..B (its gradients stay finite), as a diverging rank would look.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from ugro.trainer.integrations.hf import UgroCallback

CONTEXT = 32  # tokens per sequence before padding
PADDING_CYCLE = 8  # sequence i has CONTEXT - i % PADDING_CYCLE real tokens, the rest padding


def sequences(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` random token sequences, right-padded; the padding is masked out of the loss."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for i in range(count):
        length = CONTEXT - i % PADDING_CYCLE
        ids = torch.randint(0, 256, (CONTEXT,), generator=generator)
        mask = (torch.arange(CONTEXT) < length).long()
        items.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return items


def real_tokens(count: int) -> int:
    """The tokens of ``sequences(count)`` that are not padding: what ugro counts."""
    return sum(CONTEXT - i % PADDING_CYCLE for i in range(count))


class DemoControls(TrainerCallback):
    """--pause and --nonfinite-*: a NaN loss that reaches the Trainer as the model's output."""

    def __init__(self, pause: float, rank: int | None, steps: range) -> None:
        self.pause, self.rank, self.steps, self.hook = pause, rank, steps, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if args.process_index == self.rank and state.global_step + 1 in self.steps:
            # First among the forward hooks, so everything downstream sees the NaN. A constant
            # is added: the value is NaN, the gradients are those of the real loss.
            self.hook = model.register_forward_hook(poison_loss, prepend=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        time.sleep(self.pause)


def poison_loss(module, args, output):
    if module.training:
        output.loss = output.loss + torch.full_like(output.loss, math.nan)
    return output


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--log-every", type=int, default=4, help="HF's logging_steps")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to sleep per step")
    parser.add_argument("--nonfinite-rank", type=int, default=None)
    parser.add_argument("--nonfinite-steps", default="0-0", help="A-B: steps A to B inclusive")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "hf_tiny_gpt2"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    first, last = (int(step) for step in args.nonfinite_steps.split("-"))
    torch.manual_seed(args.seed)
    # GPT-2's own bos/eos ids lie beyond this vocabulary.
    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=32, vocab_size=256, n_positions=64, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    # Exactly one epoch: every sequence is trained on once, so the tokens are known in advance.
    data = sequences(args.steps * args.grad_accum * args.batch_size * world_size, args.seed)
    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=1e-3,
        logging_steps=args.log_every,
        save_strategy="steps" if args.save_every else "no",
        save_steps=args.save_every or 500,
        eval_strategy="steps" if args.eval_every else "no",
        eval_steps=args.eval_every or None,
        per_device_eval_batch_size=args.batch_size,
        report_to="none",
        disable_tqdm=True,  # log lines instead of a progress bar
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),  # Accelerate runs DDP on CPUs only when told
        ddp_find_unused_parameters=False,  # every parameter is used: spare DDP the search
    )
    callbacks = [
        UgroCallback(),  # ugro: every rank serves its training metrics
        DemoControls(args.pause, args.nonfinite_rank, range(first, last + 1)),
    ]
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=data,
        # Held-out sequences of the same kind, two batches per rank.
        eval_dataset=sequences(2 * args.batch_size * world_size, args.seed + 1)
        if args.eval_every
        else None,
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    trainer.train()


if __name__ == "__main__":
    main()
