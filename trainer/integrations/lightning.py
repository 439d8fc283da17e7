"""``UgroCallback``: ugro telemetry for a PyTorch Lightning ``Trainer``, served by every rank.

    from ugro.trainer.integrations.lightning import UgroCallback

    trainer = lightning.pytorch.Trainer(..., callbacks=[UgroCallback()])

Each rank creates its own ``Telemetry`` when training starts (identity and port from the same
environment as any ugro rank: ``UGRO_JOB_ID``, ``UGRO_METRICS_PORT`` + local rank, torchrun's
variables; rank and world size from the trainer, which agree with torchrun's) and closes it when
training ends. One step is one optimizer step: with ``accumulate_grad_batches=N`` the N
micro-batches are recorded with ``micro_step()`` and the step when ``trainer.global_step``
advances. Nothing here reads a tensor on the host: loss, token counts and the gradient norm stay
device tensors that ``Telemetry`` copies without a sync. The hooks also mark the rank's phase:
forward from ``on_train_batch_start``, backward between ``on_before_backward`` and
``on_after_backward``, optimizer from ``on_before_optimizer_step``, evaluation from
``on_validation_start`` to ``on_validation_end``, and a checkpoint from ``on_save_checkpoint`` to
the next thing the loop does that the callback sees. docs/metrics.md ("PyTorch Lightning")
says what each value is and where it comes from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

try:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        SingleDeviceStrategy,
        SingleDeviceXLAStrategy,
        XLAStrategy,
    )
except ModuleNotFoundError as error:
    if error.name is None or error.name.split(".")[0] not in ("lightning", "torch"):
        raise  # lightning is there but broken: its own error says more than ours would
    raise ImportError(
        "ugro.trainer.integrations.lightning needs lightning: pip install 'ugro[lightning]'"
    ) from None

from ugro.trainer.telemetry import CheckpointTimer, PhaseTimer, Telemetry

log = logging.getLogger("ugro.trainer")

# Lightning's training loop reports each fetch of a training batch to the trainer's profiler
# under this action ("[_TrainingEpochLoop].train_dataloader_next"): the one place the time spent
# waiting for the dataloader can be taken without timing anything else along with it.
_FETCH_ACTION_SUFFIX = ".train_dataloader_next"

BatchCounts = Callable[[Any], tuple[Any, Any]]


class UgroCallback(pl.Callback):
    """Per-rank ugro telemetry for ``lightning.pytorch.Trainer``; add it on every rank.

    ``grad_norm`` computes the total gradient norm (before clipping) on the device in
    ``on_before_optimizer_step``; it is skipped where a rank holds only a shard of the
    gradients (FSDP, DeepSpeed, model parallel) or under XLA. ``data_wait`` times the
    dataloader fetches that the trainer reports to its profiler. ``batch_counts(batch)`` returns
    a micro-batch's ``(tokens, samples)`` (either may be None) for batches that
    ``default_batch_counts`` does not understand. Any other keyword goes to ``Telemetry``
    (``job_id=``, ``metrics_port=``, …), winning over the environment as it does there.
    """

    def __init__(
        self,
        *,
        grad_norm: bool = True,
        data_wait: bool = True,
        batch_counts: BatchCounts | None = None,
        **telemetry_args: Any,
    ) -> None:
        super().__init__()
        self.grad_norm = grad_norm
        self.data_wait = data_wait
        self.batch_counts = batch_counts or default_batch_counts
        self.telemetry_args = telemetry_args
        self.telemetry: Telemetry | None = None
        self._fetch_timer: _FetchTimer | None = None
        self._loss_scale = 1
        self._with_grad_norm = False
        self._steps_before = 0
        self._grad_norm: Any = None
        self._learning_rate: Any = None
        self._validation: PhaseTimer | None = None
        self._checkpoint: CheckpointTimer | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()  # a previous fit() that ended without on_train_end
        device = trainer.strategy.root_device
        self.telemetry = Telemetry(
            **{
                "total_steps": _total_steps(trainer),
                "rank": trainer.global_rank,
                "local_rank": trainer.local_rank,
                "world_size": trainer.world_size,
                "device": device if device.type == "cuda" else None,
                **self.telemetry_args,
            }
        )
        # Lightning divides the loss it hands on_train_batch_end by accumulate_grad_batches
        # (automatic optimization only): multiplied back, each micro-batch's own loss.
        self._loss_scale = (
            trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        )
        self._with_grad_norm = self.grad_norm and _holds_full_gradients(trainer.strategy)
        if self.data_wait:
            self._fetch_timer = _FetchTimer(
                trainer.profiler, self.telemetry, before_fetch=self._end_checkpoint
            )
        if self.telemetry.metrics_url is not None:
            log.info(
                "ugro: rank %d serves /metrics at %s",
                self.telemetry.config.rank,
                self.telemetry.metrics_url,
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_checkpoint()
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Called inside Lightning's `except`: close() sees the exception and marks no normal end.
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        # A checkpoint or validation still open here did not finish: nothing to count.
        self._checkpoint = self._validation = None
        if self._fetch_timer is not None:
            self._fetch_timer.remove()
            self._fetch_timer = None
        if self.telemetry is not None:
            self.telemetry.close()
            self.telemetry = None

    # -- every batch -------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._steps_before = trainer.global_step
        self._end_checkpoint()
        self._mark("forward")  # training_step follows: the forward pass and the loss

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any
    ) -> None:
        self._mark("backward")

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark("step")

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        telemetry = self.telemetry
        if telemetry is None:
            return
        # Gradient clipping and the optimizer's step follow this hook.
        telemetry.mark("optimizer")
        try:
            # Read here, before the scheduler moves it on after the step: the rate this step uses.
            self._learning_rate = optimizer.param_groups[0]["lr"]
            if self._with_grad_norm:
                # Gradients are complete (and unscaled under AMP) here, before any clipping: the
                # norm clip_grad_norm_ would return. A device op; nothing waits for it.
                grads = [
                    p.grad
                    for group in optimizer.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
                if grads:
                    self._grad_norm = torch.nn.utils.get_total_norm(grads).detach()
        except Exception as error:  # the training loop must never see telemetry fail
            telemetry._record_error("lightning", error)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        telemetry = self.telemetry
        if telemetry is None:
            return
        try:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if not isinstance(loss, torch.Tensor):
                loss = None  # training_step returned nothing: a skipped batch
            elif self._loss_scale != 1:
                loss = loss * self._loss_scale
            tokens, samples = self.batch_counts(batch)
        except Exception as error:
            telemetry._record_error("lightning", error)
            loss = tokens = samples = None
        telemetry.micro_step(loss=loss, tokens=tokens, samples=samples)
        if trainer.global_step > self._steps_before:  # the optimizer stepped in this batch
            telemetry.step(grad_norm=self._grad_norm, learning_rate=self._learning_rate)
            self._grad_norm = self._learning_rate = None
        else:
            telemetry.mark("step")

    # -- validation and checkpoints ----------------------------------------------------------

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.telemetry is None:
            return  # the sanity check before training: no telemetry yet
        self._end_checkpoint()
        self._validation = self.telemetry.evaluation()
        self._validation.__enter__()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        validation, self._validation = self._validation, None
        if validation is not None:
            validation.__exit__(None, None, None)  # back to the phase before it

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Called while the checkpoint's state is gathered, before it is written (and before the
        # barrier that follows under DDP). No hook follows the write: the checkpoint ends at the
        # next thing the loop does that this callback sees (the next fetch, batch, validation,
        # or the end of training).
        if self.telemetry is None or self._checkpoint is not None:
            return
        self._checkpoint = self.telemetry.checkpoint()
        self._checkpoint.__enter__()

    def _end_checkpoint(self) -> None:
        checkpoint, self._checkpoint = self._checkpoint, None
        if checkpoint is not None:
            checkpoint.__exit__(None, None, None)  # counted

    def _mark(self, phase: str) -> None:
        if self.telemetry is not None:
            self.telemetry.mark(phase)


def default_batch_counts(batch: Any) -> tuple[Any, Any]:
    """A micro-batch's ``(tokens, samples)``, without a host sync; None where unknown.

    A mapping with ``attention_mask`` (Hugging Face style): its sum (a tensor) and its first
    dimension; with ``input_ids`` only: its element count and first dimension. Otherwise the
    batch itself if it is a tensor, else the first element of a tuple or list: samples are its
    first dimension and, when it holds integers (token ids), tokens its element count.
    """
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() > 0:
            return mask.sum(), mask.shape[0]
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() > 0:
            return ids.numel(), ids.shape[0]
        return None, None
    first = batch
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and batch:
        first = batch[0]
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        return None, None
    integral = not (first.is_floating_point() or first.is_complex() or first.dtype == torch.bool)
    return (first.numel() if integral else None), first.shape[0]


def _total_steps(trainer: pl.Trainer) -> int | None:
    """The optimizer steps fit() will take, as Lightning estimates them; None when unbounded."""
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # no length to estimate from (an iterable dataset without max_steps)
        return None
    if isinstance(steps, float) and not math.isfinite(steps):
        return None
    return int(steps) if steps >= 1 else None


def _holds_full_gradients(strategy: Any) -> bool:
    """Whether each rank holds every gradient after backward (one device, or DDP), so that a
    local norm is the model's norm rather than a shard's."""
    if isinstance(strategy, (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)):
        return False
    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy))


class _FetchTimer:
    """Times the fetches of training batches that Lightning reports to ``trainer.profiler``.

    Wraps the profiler's ``start``/``stop`` on the instance only (the profiler itself still
    sees every call) and unwraps them on ``remove()``.
    """

    def __init__(
        self, profiler: Any, telemetry: Telemetry, before_fetch: Callable[[], None]
    ) -> None:
        self._profiler = profiler
        self._telemetry = telemetry
        self._before_fetch = before_fetch
        self._own = {
            name: vars(profiler)[name] for name in ("start", "stop") if name in vars(profiler)
        }
        self._start, self._stop = profiler.start, profiler.stop
        self._timer: Any = None
        profiler.start = self.start
        profiler.stop = self.stop

    def start(self, action_name: str) -> None:
        self._start(action_name)
        if action_name.endswith(_FETCH_ACTION_SUFFIX):
            self._before_fetch()
            self._timer = self._telemetry.data_wait()
            self._timer.__enter__()

    def stop(self, action_name: str) -> None:
        if self._timer is not None and action_name.endswith(_FETCH_ACTION_SUFFIX):
            self._timer.__exit__(None, None, None)
            self._timer = None
        self._stop(action_name)

    def remove(self) -> None:
        for name in ("start", "stop"):
            if name in self._own:
                setattr(self._profiler, name, self._own[name])
            else:
                vars(self._profiler).pop(name, None)
