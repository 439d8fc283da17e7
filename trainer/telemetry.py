"""``Telemetry``: what a training loop calls, once per optimizer step.

    with Telemetry(total_steps=args.steps) as telemetry:   # identity and port from the environment
        for batch in loader:
            ...
            telemetry.step(loss=loss, tokens=batch.numel(), grad_norm=norm, optimizer=optimizer)

The step path never synchronises with the device and never raises: a failure inside telemetry
is logged, counted in ``ugro_train_telemetry_errors_total`` and swallowed. A value that is not
valid (a count that is not a whole number in range, a string, a bool) is dropped, logged once per
field and counted in ``ugro_train_telemetry_rejected_values_total`` as well; the step still counts.

A rank is always in one phase (``ugro.common.phases``): ``startup`` until the loop marks one,
``step`` after each ``step()``, unless the loop marks a finer one; every second until the first
``step()`` completes counts as start-up::

    with telemetry.data_wait():          # = telemetry.phase("data")
        batch = next(loader)
    with telemetry.phase("forward"):
        loss = model(batch)
    with telemetry.checkpoint() as checkpoint:
        checkpoint.bytes_written = save(model)

A phase switch costs a clock read and a few attribute updates; an unknown phase name is the one
mistake that raises (``ValueError``, at the call).
"""

from __future__ import annotations

import logging
import math
import operator
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from ugro.common.messages import shown
from ugro.common.phases import (
    BACKWARD,
    CHECKPOINT,
    DATA,
    EVALUATION,
    FORWARD,
    OPTIMIZER,
    PHASES,
    STARTUP,
    STEP,
)
from ugro.common.ports import host_port

from .config import TelemetryConfig
from .device_values import (
    CudaCopier,
    DeviceCopier,
    DeviceValueQueue,
    ValueTypeError,
    host_float,
    is_cuda_tensor,
)
from .flops import peak_flops_for
from .metrics import CudaMemory, RankMetricsCollector, RankSnapshot
from .server import MetricsServer, MetricsServerError, serve_metrics
from .stats import RankStats

log = logging.getLogger("ugro.trainer")

# After the first few, telemetry errors are logged once per this many, so a broken value fed
# every step cannot flood the training log.
_ERROR_LOG_EVERY = 1000
_ERROR_LOG_FIRST = 5
# At close, how long to wait for in-flight device copies before giving up on them.
_CLOSE_WAIT_SECONDS = 2.0

_COUNTER_FIELDS = ("tokens", "samples")
# The most a count may grow by in one step. No step processes 2**53 (9e15) tokens, and beyond it
# float64, which device copies and Prometheus hold counts in, no longer represents every integer:
# larger values are a bug in the loop, and summing them would end in an overflow at scrape time.
MAX_COUNT_PER_STEP = 2**53

# The parts of a step. Before the first step() completes they count as startup: the first step
# (lazy initialisation, compilation, the allocator's warm-up, the first collective) is start-up
# cost, not training progress.
_STEP_PARTS = frozenset((DATA, STEP, FORWARD, BACKWARD, OPTIMIZER))
_PHASE_NAMES = frozenset(PHASES)


class Telemetry:
    """Per-rank training metrics served on ``/metrics``.

    Every argument is optional; each one given wins over its environment variable (see
    ``TelemetryConfig``). ``registry`` defaults to a private registry so the endpoint serves only
    this rank's series; ``serve=False`` skips the HTTP endpoint (the registry is still filled).
    ``device`` names the rank's CUDA device for ``gpu_uuid``; by default it is taken from the
    first CUDA tensor passed to ``step()``. ``gpu_uuid`` (or ``UGRO_GPU_UUIDS``) names the GPU
    as NVML does and wins over the device's: for setups where the two views differ.

    For MFU, ``flops_per_token`` (or ``flops_per_sample``) gives the model's training FLOPs per
    token (sample), from ``ugro.trainer.flops``' estimate or measurement: the rank then counts
    ``ugro_train_model_flops_total``. ``peak_flops`` gives the device's peak FLOP/s where the
    table there does not know the GPU (or to override it), ``train_dtype`` which of its peaks
    applies (bf16 by default). ``cuda_memory_stats`` replaces ``torch.cuda.memory_stats`` as the
    source of the allocator series (for tests). ``web_config`` (or ``UGRO_WEB_CONFIG``) names a
    web configuration file, as Prometheus's ``--web.config.file`` reads it, for TLS, client
    certificates and basic auth on ``/metrics``.
    """

    def __init__(
        self,
        *,
        job_id: str | None = None,
        rank: int | None = None,
        local_rank: int | None = None,
        world_size: int | None = None,
        node: str | None = None,
        metrics_port: int | None = None,
        bind_address: str | None = None,
        on_port_taken: str | None = None,
        total_steps: int | None = None,
        gpu_uuid: str | None = None,
        final_scrape_timeout: float | None = None,
        flops_per_token: float | None = None,
        flops_per_sample: float | None = None,
        peak_flops: float | None = None,
        train_dtype: Any = None,
        web_config: str | os.PathLike[str] | None = None,
        device: Any = None,
        registry: CollectorRegistry | None = None,
        serve: bool = True,
        env: Mapping[str, str] | None = None,
        device_copier: DeviceCopier | None = None,
        cuda_memory_stats: Callable[[int], Mapping[str, Any]] | None = None,
    ) -> None:
        self.config = TelemetryConfig.resolve(
            env,
            job_id=job_id,
            rank=rank,
            local_rank=local_rank,
            world_size=world_size,
            node=node,
            metrics_port=metrics_port,
            bind_address=bind_address,
            on_port_taken=on_port_taken,
            total_steps=total_steps,
            gpu_uuid=gpu_uuid,
            final_scrape_timeout=final_scrape_timeout,
            flops_per_token=flops_per_token,
            flops_per_sample=flops_per_sample,
            peak_flops=peak_flops,
            train_dtype=None if train_dtype is None else str(train_dtype),
            web_config=web_config,
        )
        self._lock = threading.Lock()
        # Scrapes served so far and when (monotonic): close() waits for one more.
        self._scraped = threading.Condition(self._lock)
        self._scrape_count = 0
        self._scrape_clocks: list[float] = []
        self._end_time: float | None = None
        # micro_step() values waiting for the next step(): loss sum (a float, or a tensor
        # kept on its CUDA device), micro-step count, and summed counts.
        self._micro_loss: Any = None
        self._micro_losses = 0
        self._micro_counts: dict[str, Any] = {}
        self._stats = RankStats()
        # Model FLOPs are counted where the tokens (or samples) they are per are added.
        self._flops_field: str | None = None
        self._flops_per_count = 0.0
        for field_name, per_count in (
            ("tokens", self.config.flops_per_token),
            ("samples", self.config.flops_per_sample),
        ):
            if per_count is not None:
                self._flops_field, self._flops_per_count = field_name, per_count
                self._stats.model_flops = 0.0
        self._peak_flops = self.config.peak_flops  # else looked up once the device is known
        self._cuda_memory_stats = cuda_memory_stats
        self._start_time = time.time()
        self._previous_step_clock: float | None = None
        self._init_phases()
        self._device_copier = device_copier
        self._device_queue: DeviceValueQueue | None = None
        self._cuda_device_index: int | None = None
        self._gpu_uuid = self.config.gpu_uuid or ""
        self._dropped_device_steps = 0
        self._warned_fields: set[str] = set()  # fields whose rejected values have been logged
        self._closed = False
        if device is not None:
            self._adopt_device(device)

        self.registry = registry if registry is not None else CollectorRegistry()
        self._collector = RankMetricsCollector(self._snapshot, on_error=self._scrape_error)
        self.registry.register(self._collector)

        self.server: MetricsServer | None = None
        if serve:
            self._start_server()

    # -- the training loop's side ------------------------------------------------------------

    def micro_step(self, *, loss: Any = None, tokens: Any = None, samples: Any = None) -> None:
        """Record one micro-batch of a step that accumulates gradients; never blocks, never raises.

        Give each micro-batch's own loss (before any division by the accumulation steps) and
        its tokens and samples. The next ``step()`` reports the mean of these losses and the
        sums of the counts (a loss given to ``step()`` itself wins; its counts add up). CUDA
        values are summed on their device, so nothing waits for the GPU.
        """
        # Each value on its own: one bad value is dropped, the others are still recorded.
        for name, given in (("loss", loss), ("tokens", tokens), ("samples", samples)):
            if given is None:
                continue
            try:
                if is_cuda_tensor(given):
                    value = _device_value(given).detach()
                    if name == "loss":
                        value = value.float()
                else:
                    value = _host_value(name, given)
                with self._lock:
                    if name == "loss":
                        previous = self._micro_loss
                        self._micro_loss = value if previous is None else previous + value
                        self._micro_losses += 1
                    else:
                        previous = self._micro_counts.get(name)
                        self._micro_counts[name] = value if previous is None else previous + value
            except (RejectedValue, ValueTypeError) as error:
                self._reject(name, given, error)
            except Exception as error:  # the training loop must never see telemetry fail
                self._record_error("micro_step", error)

    def _take_micro_steps(self) -> tuple[Any, dict[str, Any]]:
        """The accumulated mean loss (or None) and counts, emptied for the next step."""
        with self._lock:
            loss, losses, counts = self._micro_loss, self._micro_losses, self._micro_counts
            self._micro_loss, self._micro_losses, self._micro_counts = None, 0, {}
        return (loss / losses if losses else None), counts

    def step(
        self,
        *,
        loss: Any = None,
        tokens: Any = None,
        samples: Any = None,
        grad_norm: Any = None,
        learning_rate: Any = None,
        optimizer: Any = None,
    ) -> None:
        """Record one completed optimizer step. Never blocks on the device, never raises.

        Each value may be a Python number, a numpy scalar, or a one-element tensor on the CPU or
        a CUDA device. ``learning_rate`` defaults to ``optimizer.param_groups[0]["lr"]``.
        """
        now = time.perf_counter()
        wall = time.time()
        micro_loss, micro_counts = self._take_micro_steps()
        if loss is None:
            loss = micro_loss
        if learning_rate is None and optimizer is not None:
            try:
                learning_rate = optimizer.param_groups[0]["lr"]
            except Exception as error:
                self._record_error("step", error)
        # Each value on its own: one bad value is dropped, the others are still recorded.
        host: dict[str, Any] = {}
        device: dict[str, Any] = {}
        for name, value in (
            ("loss", loss),
            ("grad_norm", grad_norm),
            ("learning_rate", learning_rate),
            ("tokens", tokens),
            ("samples", samples),
        ):
            if value is None:
                continue
            try:
                if is_cuda_tensor(value):
                    device[name] = _device_value(value)
                else:
                    host[name] = _host_value(name, value)
            except (RejectedValue, ValueTypeError) as error:
                self._reject(name, value, error)
            except Exception as error:
                self._record_error("step", error)
        # The micro-steps' counts add to the step's own (checked again in _apply: the sum).
        for name, accumulated in micro_counts.items():
            try:
                own = device.pop(name, None)
                if own is None:
                    own = host.pop(name, None)
                total = accumulated if own is None else accumulated + own
                (device if is_cuda_tensor(total) else host)[name] = total
            except Exception as error:
                self._record_error("step", error)

        try:
            with self._lock:
                stats = self._stats
                stats.steps += 1
                self._show_locked(STEP, now)
                if self._previous_step_clock is not None:
                    stats.step_duration.observe(now - self._previous_step_clock)
                self._previous_step_clock = now
                stats.last_step_timestamp = wall
                self._apply(host)
                if device:
                    self._submit_device_values(device)
                self._fold_ready_device_values()
        except Exception as error:  # the training loop must never see telemetry fail
            self._record_error("step", error)

    def data_wait(self) -> PhaseTimer:
        """Time the wait for the next batch: ``with telemetry.data_wait(): batch = next(it)``.

        The same as ``phase("data")``. Under synchronous DDP every rank steps at the pace of the
        slowest, so step times and throughput look alike on all ranks; the time each rank spends
        waiting for its own input is what singles out a straggling input pipeline.
        """
        return PhaseTimer(self, DATA)

    def phase(self, name: str) -> PhaseTimer:
        """A ``with`` block in phase ``name``; leaving it returns to the phase it was in before.

        Exceptions from the block pass through unchanged. ``name`` must be one of
        ``ugro.common.phases.PHASES``: anything else raises ``ValueError`` here, at the call.
        """
        return PhaseTimer(self, _phase_name(name))

    def mark(self, name: str) -> None:
        """Enter phase ``name`` without a block, for hooks that only see where a phase begins.

        It lasts until the next mark, phase block or ``step()``. ``ValueError`` for an unknown
        name; never raises otherwise.
        """
        name = _phase_name(name)
        try:
            self._enter_phase(name)
        except Exception as error:  # the training loop must never see telemetry fail
            self._record_error("phase", error)

    def evaluation(self) -> PhaseTimer:
        """A ``with`` block in phase ``evaluation``."""
        return PhaseTimer(self, EVALUATION)

    def checkpoint(self, bytes_written: int | None = None) -> CheckpointTimer:
        """A ``with`` block that writes a checkpoint, in phase ``checkpoint``.

        When the block ends without an exception it counts one checkpoint, its duration, the
        time it completed and ``bytes_written`` (give it here, or set ``.bytes_written`` on the
        object ``with`` returns, once known). A block that raises counts its time in the phase
        but no checkpoint.
        """
        return CheckpointTimer(self, bytes_written)

    def record_checkpoint(self, seconds: float, bytes_written: int | None = None) -> None:
        """Count a checkpoint that has just completed and took ``seconds``; never raises.

        For frameworks that report a checkpoint only after the fact. The seconds move to the
        checkpoint phase from the phase the rank is in now, where they were counted; no phase's
        counter ever goes down, so time a scrape has already taken is moved out of the later
        growth of that phase instead.
        """
        try:
            duration = _seconds(seconds)
        except (RejectedValue, ValueTypeError) as error:
            self._reject("checkpoint_seconds", seconds, error)
            return
        except Exception as error:
            self._record_error("checkpoint", error)
            return
        now = time.perf_counter()
        try:
            with self._lock:
                current = self._phase
                spent = self._raw_phase_seconds(current, now) - self._phase_moved.get(current, 0.0)
                moved = min(duration, max(spent, 0.0))
                self._phase_moved[current] = self._phase_moved.get(current, 0.0) + moved
                self._phase_moved[CHECKPOINT] = self._phase_moved.get(CHECKPOINT, 0.0) - moved
                self._phase_seconds.setdefault(CHECKPOINT, 0.0)
                self._count_checkpoint_locked(duration, bytes_written)
        except Exception as error:
            self._record_error("checkpoint", error)

    # -- phases --------------------------------------------------------------------------------

    def _init_phases(self) -> None:
        """Startup began when the process did (else now); its clock is this process's own."""
        clock, wall = time.perf_counter(), time.time()
        started = wall
        try:
            import psutil

            started = min(psutil.Process().create_time(), wall)
        except Exception as error:  # no psutil, or no /proc: the rank's telemetry start, then
            log.info("ugro: process start time unknown (%s); startup counts from now", error)
        self._process_start_time = started
        # Unix time = perf_counter() + this: one clock read per switch, none for the wall time.
        self._wall_offset = wall - clock
        # The phase counted (its seconds) and the phase shown (ugro_train_phase): they differ
        # only before the first step, when every part of a step is counted as startup.
        self._phase = self._shown_phase = STARTUP
        self._phase_started = self._shown_started = started - self._wall_offset  # perf clock
        # Seconds of each phase's finished spells; a phase appears once entered.
        self._phase_seconds: dict[str, float] = {STARTUP: 0.0}
        # Seconds record_checkpoint() moved out of (positive) or into (negative) each phase.
        self._phase_moved: dict[str, float] = {}
        # What the last scrape exposed per phase: a counter never goes below it.
        self._phase_exposed: dict[str, float] = {}

    def _enter_phase(self, phase: str) -> tuple[str, int, float]:
        """Switch to ``phase``; the phase left (as shown), the steps so far, and the clock."""
        now = time.perf_counter()
        with self._lock:
            previous, steps = self._shown_phase, self._stats.steps
            self._show_locked(phase, now)
        return previous, steps, now

    def _leave_phase(self, previous: str, steps: int) -> float:
        """Back to ``previous`` after a block; to ``step`` if a step completed inside it."""
        now = time.perf_counter()
        with self._lock:
            if self._stats.steps != steps:
                previous = STEP
            self._show_locked(previous, now)
        return now

    def _show_locked(self, phase: str, now: float) -> None:
        """The rank is now doing ``phase``: shown as it is, counted as startup before the first
        step (the first step's parts are start-up cost). Showing it as it is lets a hang before
        the first step be placed: the healthy ranks wait in ``backward``, the hung one not."""
        if phase != self._shown_phase:
            self._shown_phase, self._shown_started = phase, now
        self._switch_locked(
            STARTUP if self._stats.steps == 0 and phase in _STEP_PARTS else phase, now
        )

    def _switch_locked(self, phase: str, now: float) -> None:
        """Count time in ``phase`` from ``now`` on."""
        current = self._phase
        if phase == current:
            return
        seconds = self._phase_seconds
        seconds[current] = seconds[current] + (now - self._phase_started)
        if phase not in seconds:
            seconds[phase] = 0.0
        self._phase = phase
        self._phase_started = now

    def _raw_phase_seconds(self, phase: str, now: float) -> float:
        spent = self._phase_seconds.get(phase, 0.0)
        if phase == self._phase:
            spent += now - self._phase_started
        return spent

    def _phase_snapshot_locked(self, now: float) -> dict[str, float]:
        """Seconds per phase as a scrape exposes them: monotonic, summing to the process's age
        (once time moved by record_checkpoint() has been taken out of later growth)."""
        exposed = {}
        for phase in self._phase_seconds:
            spent = self._raw_phase_seconds(phase, now) - self._phase_moved.get(phase, 0.0)
            exposed[phase] = max(spent, self._phase_exposed.get(phase, 0.0))
        self._phase_exposed = exposed
        return dict(exposed)

    def _count_checkpoint_locked(self, seconds: float, bytes_written: Any) -> None:
        stats = self._stats
        stats.checkpoints += 1
        stats.last_checkpoint_timestamp = time.time()
        stats.last_checkpoint_duration = seconds
        if bytes_written is not None:
            try:
                written = _count("bytes_written", bytes_written)
            except (RejectedValue, ValueTypeError) as error:
                self._reject_locked("bytes_written", bytes_written, error)
                return
            stats.checkpoint_bytes = (stats.checkpoint_bytes or 0) + written

    def close(self) -> None:
        """End the rank's telemetry; safe to repeat.

        Folds in what the device still owes (briefly). A rank that closes normally (no
        exception on its way out, also when called from a ``finally``) marks its end,
        ``ugro_train_end_time_seconds``, which tells the alerts that it finished rather than
        crashed; and if Prometheus has been scraping it, waits until one more scrape has taken
        the final values and the end (at most two scrape intervals, and never longer than
        ``UGRO_FINAL_SCRAPE_TIMEOUT``), so that a loop that exits at once loses nothing; with
        ``UGRO_REGISTERED_TARGET=1`` also when no scrape has come yet. Then the endpoint stops.
        """
        self._close(failed=sys.exc_info()[0] is not None)

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        failed = exc_type is not None
        if exc_type is SystemExit and exc_info[0] is not None:
            failed = exc_info[0].code not in (0, None)  # sys.exit(0) is a normal end
        self._close(failed=failed)

    def _close(self, failed: bool) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            if self._device_queue is not None:
                try:
                    for values in self._device_queue.wait(_CLOSE_WAIT_SECONDS):
                        self._apply(values)
                except Exception as error:
                    self._record_error_locked("close", error)
            if not failed:
                self._end_time = time.time()
        if self.server is not None:
            if not failed:
                self._wait_for_a_scrape()
            self.server.close()
            self.server = None

    def _wait_for_a_scrape(self) -> None:
        """Until a scrape after this moment has been served, within the bounds of close()."""
        with self._scraped:
            if self._scrape_count == 0 and not self.config.registered_target:
                return  # nobody scrapes this rank: nobody to wait for
            timeout = self.config.final_scrape_timeout
            clocks = self._scrape_clocks
            if len(clocks) >= 2:
                timeout = min(timeout, 2 * (clocks[-1] - clocks[-2]) + 1.0)
            seen = self._scrape_count
            deadline = time.monotonic() + timeout
            while self._scrape_count == seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.info("ugro: no scrape within %.1f s of close; final values unsent", timeout)
                    return
                self._scraped.wait(remaining)

    def latest(self) -> dict[str, float | None]:
        """The newest values that have reached the host, for progress lines; never waits."""
        with self._lock:
            self._fold_ready_device_values()
            stats = self._stats
            return {
                "steps": stats.steps,
                "tokens": stats.tokens,
                "loss": stats.loss.last,
                "grad_norm": stats.grad_norm.last,
                "learning_rate": stats.learning_rate,
            }

    @property
    def metrics_url(self) -> str | None:
        """Where this rank's ``/metrics`` is served, or None when it is not."""
        if self.server is None:
            return None
        host = self.server.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"{self.server.scheme}://{host_port(host, self.server.port)}/metrics"

    # -- internals ---------------------------------------------------------------------------

    def _start_server(self) -> None:
        config = self.config
        try:
            self.server = serve_metrics(
                self.registry,
                config.bind_address,
                config.metrics_port,
                config.rank,
                config.web_config,
            )
        except MetricsServerError as error:
            if config.on_port_taken == "fail":
                self.registry.unregister(self._collector)
                raise
            log.error(
                "ugro: %s; training continues without telemetry "
                "(set UGRO_METRICS_PORT to a free base port, or UGRO_METRICS_ON_PORT_TAKEN=fail "
                "to stop instead)",
                error,
            )

    def _apply(self, values: Mapping[str, float]) -> None:
        """Fold host-side values into the stats; the caller holds the lock."""
        stats = self._stats
        for name, value in values.items():
            if name == "loss":
                stats.loss.observe(value)
            elif name == "grad_norm":
                stats.grad_norm.observe(value)
            elif name == "learning_rate":
                stats.learning_rate = value
            elif name in _COUNTER_FIELDS:
                # Device counts are first seen here, as floats; host ones were checked already.
                try:
                    count = _count(name, value)
                except (RejectedValue, ValueTypeError) as error:
                    self._reject_locked(name, value, error)
                    continue
                setattr(stats, name, getattr(stats, name) + count)
                if name == self._flops_field:
                    stats.model_flops += count * self._flops_per_count  # type: ignore[operator]

    def _submit_device_values(self, device: Mapping[str, Any]) -> None:
        try:
            if self._device_queue is None:
                self._adopt_device(next(iter(device.values())).device)
                copier = self._device_copier if self._device_copier is not None else CudaCopier()
                self._device_queue = DeviceValueQueue(copier)
            if not self._device_queue.submit(device):
                self._dropped_device_steps += 1
                if self._dropped_device_steps == 1:
                    log.warning(
                        "ugro: the device is %d steps behind the host; dropping this step's "
                        "device values rather than queueing more",
                        len(self._device_queue),
                    )
        except Exception as error:
            self._record_error_locked("step", error)

    def _fold_ready_device_values(self) -> None:
        if self._device_queue is None:
            return
        try:
            for values in self._device_queue.ready():
                self._apply(values)
        except Exception as error:
            self._record_error_locked("fold", error)

    def _adopt_device(self, device: Any) -> None:
        """Learn the rank's CUDA device index and its GPU's UUID (as NVML spells it)."""
        if self._cuda_device_index is not None:
            return
        torch = sys.modules.get("torch")
        if torch is None:
            return
        device = torch.device(device)
        if device.type != "cuda":
            return
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            # NVML (and so the node exporter) names GPUs "GPU-<uuid>"; torch gives the bare uuid.
            if not self.config.gpu_uuid:
                self._gpu_uuid = f"GPU-{torch.cuda.get_device_properties(index).uuid}"
        except Exception as error:
            log.warning("ugro: cannot read the UUID of CUDA device %s: %s", device, error)
            return
        self._cuda_device_index = index
        if self._peak_flops is not None:
            return
        try:
            name = torch.cuda.get_device_name(index)
        except Exception as error:
            log.warning("ugro: cannot read the name of CUDA device %s: %s", device, error)
            return
        self._peak_flops = peak_flops_for(name, self.config.train_dtype)
        if self._peak_flops is None:
            log.info(
                "ugro: no %s peak FLOP/s known for %s; set UGRO_PEAK_FLOPS (or peak_flops=) "
                "for MFU",
                self.config.train_dtype,
                name,
            )

    def _snapshot(self) -> RankSnapshot:
        """A consistent copy for one scrape; runs on the HTTP server's thread."""
        with self._lock:
            self._fold_ready_device_values()
            stats = self._stats.copy()
            pending = len(self._device_queue) if self._device_queue is not None else 0
            gpu_uuid = self._gpu_uuid
            end_time = self._end_time
            peak_flops = self._peak_flops
            phase, phase_started = self._shown_phase, self._shown_started
            phase_seconds = self._phase_snapshot_locked(time.perf_counter())
            self._scrape_count += 1
            self._scrape_clocks = [*self._scrape_clocks[-1:], time.monotonic()]
            self._scraped.notify_all()
        config = self.config
        return RankSnapshot(
            stats=stats,
            identity={
                "job_id": config.job_id,
                "rank": str(config.rank),
                "local_rank": str(config.local_rank),
                "world_size": str(config.world_size),
                "node": config.node,
                "gpu_uuid": gpu_uuid,
            },
            start_time=self._start_time,
            end_time=end_time,
            target_steps=config.total_steps,
            pending_steps=pending,
            peak_flops=peak_flops,
            cuda_memory=self._cuda_memory(),
            phase=phase,
            phase_start_time=phase_started + self._wall_offset,
            phase_seconds=phase_seconds,
            process_start_time=self._process_start_time,
            restart_count=config.restart_count,
        )

    def _cuda_memory(self) -> CudaMemory | None:
        """The allocator's health at scrape time, on the server's thread; None on CPU ranks."""
        index = self._cuda_device_index
        if index is None:
            return None
        try:
            source = self._cuda_memory_stats
            if source is None:
                # memory_stats copies the caching allocator's host-side counters under its
                # mutex: no CUDA call, so no device sync (and {} before CUDA is initialised).
                source = sys.modules["torch"].cuda.memory_stats
            return CudaMemory.from_stats(source(index))
        except Exception as error:
            self._record_error("scrape", error)
            return None

    def _record_error(self, where: str, error: BaseException) -> None:
        with self._lock:
            self._record_error_locked(where, error)

    def _scrape_error(self, error: BaseException) -> None:
        """A value the collector could not expose as it was (it exposed NaN or +/-Inf)."""
        self._record_error("scrape", error)

    def _record_error_locked(self, where: str, error: BaseException) -> None:
        self._stats.telemetry_errors += 1
        # Rejected values are logged on their own terms; they must not use up this log's quota.
        count = self._stats.telemetry_errors - self._stats.rejected_values
        if count <= _ERROR_LOG_FIRST or count % _ERROR_LOG_EVERY == 0:
            log.warning(
                "ugro telemetry error #%d in %s (training continues): %s: %s",
                count,
                where,
                type(error).__name__,
                error,
                exc_info=count == 1,
            )

    def _reject(self, name: str, value: Any, error: Exception) -> None:
        with self._lock:
            self._reject_locked(name, value, error)

    def _reject_locked(self, name: str, value: Any, error: Exception) -> None:
        """Drop an invalid value: counted every time, logged once per field."""
        self._stats.telemetry_errors += 1
        self._stats.rejected_values += 1
        if name in self._warned_fields:
            return
        self._warned_fields.add(name)
        reason = str(error).removeprefix(f"{name}: ")
        log.warning(
            "ugro: dropped the step value %s=%s (training continues): %s; later invalid %s "
            "values are dropped without a log line and counted in "
            "ugro_train_telemetry_rejected_values_total",
            name,
            shown(value),
            reason,
            name,
        )


class RejectedValue(ValueError):
    """A step value that is not valid: the training loop's mistake, dropped and counted."""


def _is_bool(value: Any) -> bool:
    # Python's, numpy's and torch's bools all convert to 0 or 1: passed by mistake, each would
    # count as one token (or a loss of 1.0) without a word.
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def _device_value(value: Any) -> Any:
    """A CUDA value as it is; only what its metadata shows can be checked without a sync."""
    if _is_bool(value):
        raise RejectedValue(f"expected a number, got a {value.dtype} tensor")
    return value


def _host_value(name: str, value: Any) -> Any:
    """A host-side step value, checked: a count as an int, any other value as a float.

    Loss, gradient norm and learning rate may be NaN or infinite: those are signals, counted in
    ``ugro_train_nonfinite_total``; only values that are not numbers at all are rejected.
    """
    if name in _COUNTER_FIELDS:
        return _count(name, value)
    if type(value) is float:  # the common case, checked first: this runs every step
        return value
    if isinstance(value, (str, bytes, bytearray)) or _is_bool(value):
        # float("5") would succeed: a string is a mistake in the loop, not a number.
        raise RejectedValue("expected a number or a one-element tensor")
    try:
        return host_float(name, value)
    except OverflowError as error:  # an int beyond float range
        raise RejectedValue("expected a number within float range") from error


def _count(name: str, value: Any) -> int:
    """A count as an int: a whole number in 0..MAX_COUNT_PER_STEP (8 and 8.0 alike)."""
    if type(value) is int and 0 <= value <= MAX_COUNT_PER_STEP:  # the common case, every step
        return value
    expected = f"expected a whole number of {name} in 0..2**53"
    if isinstance(value, (str, bytes, bytearray)) or _is_bool(value):
        raise RejectedValue(expected)
    try:
        count = operator.index(value)  # ints of every kind, exactly: Python, numpy, torch
    except TypeError:
        try:
            number = host_float(name, value)
        except OverflowError as error:
            raise RejectedValue(expected) from error
        if not number.is_integer():  # 2.9, NaN and inf alike
            raise RejectedValue(expected) from None
        count = int(number)
    if not 0 <= count <= MAX_COUNT_PER_STEP:
        raise RejectedValue(expected)
    return count


def _phase_name(name: Any) -> str:
    """``name`` if it is a phase; ``ValueError`` otherwise: a mistake in the loop's code, which
    would otherwise go unseen (and leave the rank's time unaccounted for) for the whole run."""
    if not isinstance(name, str) or name not in _PHASE_NAMES:
        raise ValueError(f"unknown phase {name!r}: expected one of {', '.join(PHASES)}")
    return name


def _seconds(value: Any) -> float:
    """A duration in seconds: a finite number >= 0."""
    if isinstance(value, (str, bytes, bytearray)) or _is_bool(value):
        raise RejectedValue("expected seconds as a number")
    seconds = host_float("seconds", value)
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise RejectedValue("expected a finite number of seconds >= 0")
    return seconds


class PhaseTimer:
    """A ``with`` block in one phase; leaving it returns to the phase the rank was in before
    (to ``step`` when a step completed inside it). Exceptions from the block pass through."""

    __slots__ = ("_phase", "_previous", "_steps", "_telemetry")

    def __init__(self, telemetry: Telemetry, phase: str) -> None:
        self._telemetry = telemetry
        self._phase = phase
        self._previous: str | None = None
        self._steps = 0

    def __enter__(self) -> PhaseTimer:
        try:
            self._previous, self._steps, _ = self._telemetry._enter_phase(self._phase)
        except Exception as error:  # the training loop must never see telemetry fail
            self._telemetry._record_error("phase", error)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is None:
            return
        try:
            self._telemetry._leave_phase(self._previous, self._steps)
        except Exception as error:
            self._telemetry._record_error("phase", error)


class CheckpointTimer:
    """A ``with`` block in phase ``checkpoint`` that counts one checkpoint when it ends normally.

    Set ``bytes_written`` inside the block once the size is known.
    """

    __slots__ = ("_previous", "_started", "_steps", "_telemetry", "bytes_written")

    def __init__(self, telemetry: Telemetry, bytes_written: int | None = None) -> None:
        self._telemetry = telemetry
        self.bytes_written = bytes_written
        self._previous: str | None = None
        self._steps = 0
        self._started = 0.0

    def __enter__(self) -> CheckpointTimer:
        try:
            self._previous, self._steps, self._started = self._telemetry._enter_phase(CHECKPOINT)
        except Exception as error:  # the training loop must never see telemetry fail
            self._telemetry._record_error("checkpoint", error)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if self._previous is None:
            return
        telemetry = self._telemetry
        try:
            ended = telemetry._leave_phase(self._previous, self._steps)
            if exc_type is None:
                with telemetry._lock:
                    telemetry._count_checkpoint_locked(ended - self._started, self.bytes_written)
        except Exception as error:
            telemetry._record_error("checkpoint", error)
