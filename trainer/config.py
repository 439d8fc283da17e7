"""Where a rank's telemetry identity and endpoint come from: arguments, else the environment.

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; ``ugro-launch`` (or the user) sets
``UGRO_JOB_ID``, ``UGRO_METRICS_PORT`` (the base port: a rank serves on base + ``LOCAL_RANK``),
``UGRO_METRICS_ADDR`` and ``UGRO_NODE``. ``UGRO_GPU_UUIDS`` (optional) names the GPU each local
rank uses, for setups where torch's view of the device is not NVML's.
``UGRO_FINAL_SCRAPE_TIMEOUT`` bounds how long ``close()`` waits for the scrape that carries the
rank's final values (seconds; 0 does not wait). ``UGRO_REGISTERED_TARGET=1`` (ugro-launch sets
it) says Prometheus has the rank as a target, so ``close()`` waits for that scrape even when none
has come yet: a job shorter than Prometheus's first scrape is still seen whole.
For MFU, ``UGRO_FLOPS_PER_TOKEN`` or ``UGRO_FLOPS_PER_SAMPLE`` gives the model's training FLOPs
per token or per sample (one of the two), ``UGRO_PEAK_FLOPS`` the device's peak FLOP/s when the
built-in table (``ugro.trainer.flops``) does not know it, and ``UGRO_TRAIN_DTYPE`` (bf16 by
default; fp16, tf32, fp32) which of the table's peaks applies. torchrun's
``TORCHELASTIC_RESTART_COUNT`` says how often it had restarted the workers before this one
started (``ugro_train_restarts``). ``UGRO_WEB_CONFIG`` names a web configuration file (the
format of Prometheus's ``--web.config.file``: TLS, client certificates, basic auth) for the
rank's ``/metrics``; without it the endpoint is plain HTTP. Every bad value is
rejected here, before the first training step, with an error that names the variable and what
was expected.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

# Dependency-free modules of ugro.common: the trainer imports nothing else of ugro's.
from ugro.common.identifiers import JOB_ID
from ugro.common.ports import DEFAULT_METRICS_BASE_PORT
from ugro.common.web_config import WebConfig, WebConfigError, load_web_config

from .flops import positive_flops, train_dtype_name

DEFAULT_BIND_ADDRESS = "0.0.0.0"
DEFAULT_JOB_ID = "local"
# At close, the longest wait for one more scrape (Prometheus's default interval is 60 s, ugro's
# 5 s; the wait ends at the scrape, or after two of the intervals seen so far).
DEFAULT_FINAL_SCRAPE_TIMEOUT_SECONDS = 30.0

# Port-taken policy: "continue" trains on without telemetry, "fail" stops before the first step.
PortTakenPolicy = Literal["continue", "fail"]
PORT_TAKEN_POLICIES: tuple[str, ...] = ("continue", "fail")

# NVML names a GPU "GPU-<uuid>" (a MIG instance "MIG-<uuid>"); the node exporter labels with that.
_GPU_UUID_PATTERN = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-]{1,100}$")

# Present in every process that torchrun (torch.distributed.elastic) starts.
_TORCHRUN_MARKERS = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


class TelemetryConfigError(ValueError):
    """A telemetry setting (argument or environment variable) has a value that cannot be used."""


@dataclass(frozen=True)
class TelemetryConfig:
    """Who this rank is and where it serves ``/metrics``."""

    job_id: str
    rank: int
    local_rank: int
    world_size: int
    node: str
    metrics_base_port: int
    bind_address: str
    on_port_taken: PortTakenPolicy = "continue"
    total_steps: int | None = None
    # The rank's GPU as NVML names it, when given; otherwise learnt from the rank's CUDA device.
    gpu_uuid: str | None = None
    final_scrape_timeout: float = DEFAULT_FINAL_SCRAPE_TIMEOUT_SECONDS
    registered_target: bool = False  # Prometheus scrapes this rank: wait for it at close
    # Model FLOPs per token or per sample (at most one is set), for ugro_train_model_flops_total.
    flops_per_token: float | None = None
    flops_per_sample: float | None = None
    peak_flops: float | None = None  # the device's peak FLOP/s, when given rather than looked up
    train_dtype: str = "bf16"  # which peak of the table applies
    # How often torchrun had restarted the workers before this incarnation started.
    restart_count: int = 0
    # TLS and basic auth for /metrics (UGRO_WEB_CONFIG); None serves plain HTTP.
    web_config: WebConfig | None = None

    @property
    def metrics_port(self) -> int:
        """The port this rank listens on: base port + local rank (base 0: any free port)."""
        if self.metrics_base_port == 0:
            return 0
        return self.metrics_base_port + self.local_rank

    @classmethod
    def resolve(
        cls,
        env: Mapping[str, str] | None = None,
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
        train_dtype: str | None = None,
        web_config: str | os.PathLike[str] | None = None,
    ) -> TelemetryConfig:
        """Build the config: each explicit argument wins over its environment variable."""
        env = os.environ if env is None else env
        under_torchrun = any(marker in env for marker in _TORCHRUN_MARKERS)

        def integer(value: int | None, variable: str, default: int | None, minimum: int) -> int:
            if value is not None:
                source, raw = f"argument for {variable}", value
            elif variable in env:
                source, raw = variable, env[variable]
            elif default is None:
                raise TelemetryConfigError(
                    f"{variable} is not set, but this process runs under torchrun "
                    f"({'/'.join(_TORCHRUN_MARKERS)} present): expected torchrun to set it"
                )
            else:
                return default
            try:
                number = int(str(raw).strip())
            except ValueError:
                raise TelemetryConfigError(
                    f"{source}={raw!r}: expected an integer >= {minimum}"
                ) from None
            if number < minimum:
                raise TelemetryConfigError(f"{source}={raw!r}: expected an integer >= {minimum}")
            return number

        torchrun_default = None if under_torchrun else 0
        # torchrun sets it in every worker (0 for the first incarnation); unset elsewhere.
        resolved_restart_count = integer(None, "TORCHELASTIC_RESTART_COUNT", 0, 0)
        resolved_rank = integer(rank, "RANK", torchrun_default, 0)
        resolved_local_rank = integer(local_rank, "LOCAL_RANK", torchrun_default, 0)
        resolved_world_size = integer(world_size, "WORLD_SIZE", None if under_torchrun else 1, 1)
        if resolved_rank >= resolved_world_size:
            raise TelemetryConfigError(
                f"RANK={resolved_rank} with WORLD_SIZE={resolved_world_size}: "
                "expected a rank below the world size"
            )

        base_port = integer(metrics_port, "UGRO_METRICS_PORT", DEFAULT_METRICS_BASE_PORT, 0)
        if base_port > 65535 or (base_port and base_port + resolved_local_rank > 65535):
            raise TelemetryConfigError(
                f"UGRO_METRICS_PORT={base_port}: with LOCAL_RANK={resolved_local_rank} the rank "
                f"would listen on {base_port + resolved_local_rank}; expected a port in 1..65535 "
                "(or 0 for any free port)"
            )

        resolved_job_id = job_id if job_id is not None else env.get("UGRO_JOB_ID", DEFAULT_JOB_ID)
        if not JOB_ID.fullmatch(resolved_job_id):
            raise TelemetryConfigError(
                f"UGRO_JOB_ID={resolved_job_id!r}: expected 1-128 characters of letters, digits, "
                "'.', '_' or '-', starting with a letter or digit"
            )

        resolved_node = node if node is not None else env.get("UGRO_NODE") or socket.gethostname()
        if not resolved_node or any(ch.isspace() for ch in resolved_node):
            raise TelemetryConfigError(
                f"UGRO_NODE={resolved_node!r}: expected a non-empty node name without spaces"
            )

        address = (
            bind_address
            if bind_address is not None
            else env.get("UGRO_METRICS_ADDR", DEFAULT_BIND_ADDRESS)
        )
        if not address or any(ch.isspace() for ch in address):
            raise TelemetryConfigError(
                f"UGRO_METRICS_ADDR={address!r}: expected an IP address or host name to bind to"
            )

        policy = (
            on_port_taken
            if on_port_taken is not None
            else env.get("UGRO_METRICS_ON_PORT_TAKEN", "continue")
        )
        if policy not in PORT_TAKEN_POLICIES:
            raise TelemetryConfigError(
                f"UGRO_METRICS_ON_PORT_TAKEN={policy!r}: expected one of "
                + ", ".join(PORT_TAKEN_POLICIES)
            )

        if total_steps is not None and total_steps < 1:
            raise TelemetryConfigError(f"total_steps={total_steps!r}: expected a positive integer")

        resolved_gpu_uuid = gpu_uuid
        source = "gpu_uuid"
        if resolved_gpu_uuid is None and env.get("UGRO_GPU_UUIDS"):
            # Like CUDA_VISIBLE_DEVICES: one entry per local rank, in local-rank order.
            entries = [entry.strip() for entry in env["UGRO_GPU_UUIDS"].split(",")]
            if resolved_local_rank >= len(entries):
                raise TelemetryConfigError(
                    f"UGRO_GPU_UUIDS={env['UGRO_GPU_UUIDS']!r}: {len(entries)} entries, but "
                    f"LOCAL_RANK={resolved_local_rank}: expected one NVML GPU UUID per local rank"
                )
            resolved_gpu_uuid = entries[resolved_local_rank]
            source = f"UGRO_GPU_UUIDS entry {resolved_local_rank}"
        if resolved_gpu_uuid is not None and not _GPU_UUID_PATTERN.fullmatch(resolved_gpu_uuid):
            raise TelemetryConfigError(
                f"{source}={resolved_gpu_uuid!r}: expected an NVML UUID such as "
                "'GPU-5f2a…' (as `nvidia-smi -L` prints it)"
            )

        if final_scrape_timeout is not None:
            timeout_source, raw_timeout = "final_scrape_timeout", final_scrape_timeout
        else:
            timeout_source = "UGRO_FINAL_SCRAPE_TIMEOUT"
            raw_timeout = env.get(timeout_source, DEFAULT_FINAL_SCRAPE_TIMEOUT_SECONDS)
        try:
            resolved_timeout = float(str(raw_timeout).strip())
        except ValueError:
            resolved_timeout = -1.0
        if not 0 <= resolved_timeout <= 3600:
            raise TelemetryConfigError(
                f"{timeout_source}={raw_timeout!r}: expected seconds from 0 to 3600"
            )

        web_config_source, web_config_path = (
            ("web_config", web_config)
            if web_config is not None
            else ("UGRO_WEB_CONFIG", env.get("UGRO_WEB_CONFIG") or None)
        )
        try:
            resolved_web_config = (
                None if web_config_path is None else load_web_config(web_config_path)
            )
        except WebConfigError as error:
            # Serving plain HTTP where TLS or a password was asked for would leak what the
            # file was written to protect: the rank stops, naming the field.
            raise TelemetryConfigError(f"{web_config_source}: {error}") from None

        registered = env.get("UGRO_REGISTERED_TARGET", "0").strip().lower()
        if registered not in ("0", "1", "true", "false", ""):
            raise TelemetryConfigError(
                f"UGRO_REGISTERED_TARGET={env['UGRO_REGISTERED_TARGET']!r}: expected 1 or 0"
            )

        # Per token and per sample are one setting: an argument for either ignores both variables.
        if flops_per_token is not None or flops_per_sample is not None:
            flops_sources = {
                "flops_per_token": flops_per_token,
                "flops_per_sample": flops_per_sample,
            }
        else:
            flops_sources = {
                "UGRO_FLOPS_PER_TOKEN": env.get("UGRO_FLOPS_PER_TOKEN") or None,
                "UGRO_FLOPS_PER_SAMPLE": env.get("UGRO_FLOPS_PER_SAMPLE") or None,
            }
        flops: list[float | None] = []
        for flops_source, raw_flops in flops_sources.items():
            try:
                flops.append(None if raw_flops is None else positive_flops(flops_source, raw_flops))
            except ValueError as error:
                raise TelemetryConfigError(str(error)) from None
        if None not in flops:
            raise TelemetryConfigError(
                " and ".join(flops_sources)
                + " are both set: expected one (model FLOPs count per token or per sample)"
            )

        peak_source, raw_peak = (
            ("peak_flops", peak_flops)
            if peak_flops is not None
            else ("UGRO_PEAK_FLOPS", env.get("UGRO_PEAK_FLOPS") or None)
        )
        dtype_source, raw_dtype = (
            ("train_dtype", train_dtype)
            if train_dtype is not None
            else ("UGRO_TRAIN_DTYPE", env.get("UGRO_TRAIN_DTYPE") or "bf16")
        )
        try:
            resolved_peak = None if raw_peak is None else positive_flops(peak_source, raw_peak)
        except ValueError as error:
            raise TelemetryConfigError(str(error)) from None
        try:
            resolved_dtype = train_dtype_name(raw_dtype)
        except ValueError as error:
            raise TelemetryConfigError(f"{dtype_source}={raw_dtype!r}: {error}") from None

        return cls(
            job_id=resolved_job_id,
            rank=resolved_rank,
            local_rank=resolved_local_rank,
            world_size=resolved_world_size,
            node=resolved_node,
            metrics_base_port=base_port,
            bind_address=address,
            on_port_taken=policy,  # type: ignore[arg-type]
            total_steps=total_steps,
            gpu_uuid=resolved_gpu_uuid,
            final_scrape_timeout=resolved_timeout,
            registered_target=registered in ("1", "true"),
            flops_per_token=flops[0],
            flops_per_sample=flops[1],
            peak_flops=resolved_peak,
            train_dtype=resolved_dtype,
            restart_count=resolved_restart_count,
            web_config=resolved_web_config,
        )
