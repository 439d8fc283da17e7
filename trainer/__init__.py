"""ugro's training-side telemetry: per-rank training health on ``/metrics``.

A training loop needs three lines::

    from ugro.trainer import Telemetry

    telemetry = Telemetry()                      # identity and port from torchrun's environment
    telemetry.step(loss=loss, tokens=n, grad_norm=norm, optimizer=optimizer)   # once per step
    telemetry.close()                            # or use it as a context manager
"""

from __future__ import annotations

from .config import DEFAULT_METRICS_BASE_PORT, TelemetryConfig, TelemetryConfigError
from .server import MetricsServerError
from .telemetry import Telemetry

__all__ = [
    "DEFAULT_METRICS_BASE_PORT",
    "MetricsServerError",
    "Telemetry",
    "TelemetryConfig",
    "TelemetryConfigError",
]
