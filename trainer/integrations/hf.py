"""``UgroCallback``: ugro telemetry for the Hugging Face ``Trainer``, served by every rank.

    from ugro.trainer.integrations.hf import UgroCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[UgroCallback()])

Each rank creates its own ``Telemetry`` when training starts (identity and port from the same
environment as any ugro rank: ``UGRO_JOB_ID``, ``UGRO_METRICS_PORT`` + local rank, torchrun's
variables) and closes it when training ends. One step is one optimizer step. A callback never
sees the batch or the loss, so the callback also hooks the model's ``forward`` while training:
the hook sees each micro-batch's inputs (tokens, samples) and its output's ``loss``, all kept as
device tensors; nothing here reads a tensor on the host. The gradient norm HF clips with reaches
callbacks only in the logs, at ``logging_steps``. The callbacks and the hooks also mark the
rank's phase: forward from the model's forward pre-hook, backward from its forward hook (the
loss's backward follows), optimizer from ``on_pre_optimizer_step``, evaluation while the Trainer
evaluates, and a checkpoint from the moment the Trainer's flags say it saves until ``on_save``.
docs/metrics.md ("Hugging Face Trainer") says what each value is and where it comes from.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

try:
    import accelerate  # noqa: F401  (the Trainer runs on it: missing, it fails later and less clearly)
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ModuleNotFoundError as error:
    if error.name is None or error.name.split(".")[0] not in (
        "transformers",
        "accelerate",
        "torch",
    ):
        raise  # the framework is there but broken: its own error says more than ours would
    raise ImportError(
        "ugro.trainer.integrations.hf needs transformers and accelerate: pip install 'ugro[hf]'"
    ) from None

from ..telemetry import CheckpointTimer, Telemetry

log = logging.getLogger("ugro.trainer")

__all__ = ["UgroCallback"]


class UgroCallback(TrainerCallback):
    """Per-rank ugro telemetry for ``transformers.Trainer``: ``callbacks=[UgroCallback()]``.

    Every keyword argument is passed to ``Telemetry`` (``job_id``, ``metrics_port``, ...) and
    wins over its environment variable. ``telemetry`` is the rank's ``Telemetry`` while training
    runs (``None`` before and after).
    """

    def __init__(self, **telemetry_options: Any) -> None:
        self._telemetry_options = telemetry_options
        self.telemetry: Telemetry | None = None
        self._hooks: list[Any] = []
        self._loss_scale = 1
        self._reset_step()

    def _reset_step(self) -> None:
        # The step being recorded: the micro-batches' summed loss (a device tensor), how many
        # there were, whether HF normalised them over the whole step, and the learning rate.
        self._loss_sum: Any = None
        self._losses = 0
        self._loss_normalised = False
        self._learning_rate: Any = None
        # A step whose gradient norm comes with HF's log line (on_log, right after on_step_end).
        self._waiting_for_log: dict[str, Any] | None = None
        # What the Trainer does after this step, as its flags said at on_step_end: evaluate,
        # then save (Trainer._maybe_log_save_evaluate, after the log line).
        self._evaluates_next = False
        self._saves_next = False
        self._checkpoint: CheckpointTimer | None = None
        self._last_event = time.perf_counter()  # the last Trainer event seen, on that clock

    # -- the Trainer's events ----------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._close()  # a second train() on the same Trainer starts a fresh run
        self._reset_step()
        # A resumed run makes the steps from global_step on: that many step() calls.
        remaining = state.max_steps - state.global_step if state.max_steps else 0
        self.telemetry = Telemetry(
            **{"total_steps": remaining if remaining > 0 else None, **self._telemetry_options}
        )
        config = self.telemetry.config
        if (config.rank, config.world_size) != (args.process_index, args.world_size):
            log.warning(
                "ugro: the environment says rank %d of %d, the Trainer rank %d of %d; "
                "ugro's series are labelled with the environment's",
                config.rank,
                config.world_size,
                args.process_index,
                args.world_size,
            )
        # With average_tokens_across_devices the Trainer multiplies each rank's loss by the
        # number of processes after the model divided it by the whole job's token count
        # (Trainer.compute_loss); the hooks see the model's loss, before that factor.
        self._loss_scale = args.world_size if args.average_tokens_across_devices else 1
        if model is not None:
            self._hooks = [
                model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                model.register_forward_hook(self._after_forward),
            ]
        else:
            log.warning("ugro: the Trainer passed no model; tokens, samples and loss unrecorded")

    def on_step_begin(self, args, state, control, **kwargs):
        self._finish_waiting_step()  # its log line never came (another callback stopped it)
        self._end_unfinished_checkpoint()
        self._mark("step")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # After the backward passes and gradient clipping, before optimizer.step().
        self._mark("optimizer")

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # After optimizer.step(), before lr_scheduler.step(): the rate this step used, as the
        # Trainer logs it.
        try:
            self._learning_rate = optimizer.param_groups[0]["lr"]
        except (AttributeError, IndexError, KeyError, TypeError):
            self._learning_rate = None
        self._mark("step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.telemetry is None:
            return
        values = {"loss": self._take_loss(), "learning_rate": self._learning_rate}
        self._learning_rate = None
        # DefaultFlowCallback, first in the list, has decided by now whether this step is logged,
        # evaluated and saved; if it is logged, on_log follows before anything else and brings
        # the gradient norm the Trainer clipped with.
        self._evaluates_next = bool(control.should_evaluate)
        self._saves_next = bool(control.should_save)
        if control.should_log:
            self._waiting_for_log = values
        else:
            self.telemetry.step(**values)
            self._after_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = self._waiting_for_log
        if values is None or self.telemetry is None or not isinstance(logs, Mapping):
            return
        if "loss" not in logs and "grad_norm" not in logs:
            return  # not the training log line (an evaluation's, or one a callback added)
        self._waiting_for_log = None
        if values["loss"] is None:
            # No loss from the model (a custom compute_loss): the Trainer's, which is the mean
            # over the ranks and the steps since the last log line, NaN/Inf filtered by default.
            values["loss"] = logs.get("loss")
        self.telemetry.step(**values, grad_norm=logs.get("grad_norm"))
        self._after_step()

    def on_prediction_step(self, args, state, control, **kwargs):
        # Each evaluation batch; also an evaluation the flags did not announce.
        if self._checkpoint is None:
            self._mark("evaluation")

    def on_evaluate(self, args, state, control, **kwargs):
        self._evaluates_next = False
        self._last_event = time.perf_counter()
        self._mark("step")
        if self._saves_next:
            self._begin_checkpoint()

    def on_save(self, args, state, control, **kwargs):
        self._saves_next = False
        telemetry = self.telemetry
        if telemetry is None:
            return
        written = _checkpoint_bytes(args, state)
        checkpoint, self._checkpoint = self._checkpoint, None
        if checkpoint is not None:
            checkpoint.bytes_written = written
            checkpoint.__exit__(None, None, None)
        else:
            # A save the flags did not announce: since the last event the Trainer only saved.
            telemetry.record_checkpoint(time.perf_counter() - self._last_event, written)
        self._last_event = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self._finish_waiting_step()
        self._close()

    # -- phases ------------------------------------------------------------------------------

    def _after_step(self) -> None:
        """The step is recorded: what the Trainer does next, as its flags said."""
        self._last_event = time.perf_counter()
        if self._evaluates_next:
            self._mark("evaluation")
        elif self._saves_next:
            self._begin_checkpoint()

    def _begin_checkpoint(self) -> None:
        if self.telemetry is not None and self._checkpoint is None:
            self._checkpoint = self.telemetry.checkpoint()
            self._checkpoint.__enter__()

    def _end_unfinished_checkpoint(self) -> None:
        """A save announced but never reported (another callback changed the flags)."""
        checkpoint, self._checkpoint = self._checkpoint, None
        if checkpoint is not None:
            checkpoint.__exit__(RuntimeError, None, None)  # its time counted, no checkpoint

    def _mark(self, phase: str) -> None:
        if self.telemetry is not None:
            self.telemetry.mark(phase)

    # -- the model's forward, while training -------------------------------------------------

    def _before_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        """A micro-batch's tokens and samples, counted on its device."""
        if not module.training or self.telemetry is None:
            return  # evaluation, or generation in a callback: not a training micro-batch
        self.telemetry.mark("forward")
        try:
            name = getattr(module, "main_input_name", "input_ids")
            inputs = kwargs.get(name, args[0] if args else None)
            if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
                return
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.shape[:2] == inputs.shape[:2]:
                tokens: Any = mask.sum()  # padding left out; a device tensor, no sync
            elif not inputs.is_floating_point() and inputs.dim() >= 2:
                tokens = inputs.numel()  # token ids without a mask: every position counts
            else:
                tokens = None  # pixels or features: no tokens to count
            # num_items_in_batch: the model divides its loss by the whole step's label count.
            self._loss_normalised = kwargs.get("num_items_in_batch") is not None
            self.telemetry.micro_step(tokens=tokens, samples=inputs.shape[0])
        except Exception as error:  # the training loop must never see telemetry fail
            log.warning("ugro: a micro-batch's inputs were not recorded: %s", error)

    def _after_forward(self, module: Any, args: tuple, output: Any) -> None:
        """A micro-batch's loss, summed on its device."""
        if not module.training or self.telemetry is None:
            return
        self.telemetry.mark("backward")  # what follows the forward pass in a training step
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return  # no labels, or a loss the Trainer computes itself: on_log's is used
        # A copy: Trainer.compute_loss scales the model's loss in place (``loss *= ...``).
        loss = loss.detach().to(torch.float32, copy=True).reshape(())
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._losses += 1

    def _take_loss(self) -> Any:
        """The step's loss as the Trainer adds it to its logged loss (``training_step``)."""
        total, count = self._loss_sum, self._losses
        self._loss_sum, self._losses = None, 0
        if total is None:
            return None
        if self._loss_normalised:
            # Each micro-batch's loss is its share of the step's (label-weighted) mean already.
            return total * self._loss_scale
        return total / count  # per-micro-batch means: the Trainer divides each by their number

    # -- ending ------------------------------------------------------------------------------

    def _finish_waiting_step(self) -> None:
        values, self._waiting_for_log = self._waiting_for_log, None
        if values is not None and self.telemetry is not None:
            self.telemetry.step(**values)

    def _close(self) -> None:
        self._checkpoint = None  # still open: the save did not finish, nothing to count
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.telemetry is not None:
            self.telemetry.close()
            self.telemetry = None


def _checkpoint_bytes(args: Any, state: Any) -> int | None:
    """The bytes this process wrote into the step's checkpoint folder: all of it on the process
    that saves, except the other processes' RNG states, which each writes for itself."""
    folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
    if not os.path.isdir(folder):
        return None  # saved elsewhere (a hyperparameter search's trial folder): unknown
    own_rng = f"rng_state_{args.process_index}.pth" if args.world_size > 1 else "rng_state.pth"
    total = 0
    try:
        for directory, _, names in os.walk(folder):
            for name in names:
                own = name == own_rng if name.startswith("rng_state") else args.should_save
                if own:
                    total += os.path.getsize(os.path.join(directory, name))
    except OSError as error:
        log.info("ugro: cannot size the checkpoint in %s: %s", folder, error)
        return None
    return total if total or args.should_save else None
