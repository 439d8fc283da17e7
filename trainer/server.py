"""The rank's ``/metrics`` HTTP endpoint (plain, or TLS and basic auth as ``UGRO_WEB_CONFIG``
says: see :mod:`ugro.common.web_config`)."""

from __future__ import annotations

import errno

from prometheus_client import CollectorRegistry

from ugro.common.metrics_endpoint import MetricsEndpoint, serve_registry
from ugro.common.web_config import WebConfig

MetricsServer = MetricsEndpoint


class MetricsServerError(RuntimeError):
    """The rank could not serve ``/metrics`` (port taken, address not bindable)."""


def serve_metrics(
    registry: CollectorRegistry,
    address: str,
    port: int,
    rank: int,
    web_config: WebConfig | None = None,
) -> MetricsServer:
    """Serve ``registry`` on ``address:port`` from a daemon thread; port 0 picks a free port."""
    try:
        return serve_registry(registry, address, port, web_config)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            reason = "address already in use"
        elif error.errno == errno.EADDRNOTAVAIL:
            reason = "address not available on this host"
        else:
            reason = error.strerror or str(error)
        raise MetricsServerError(
            f"rank {rank} cannot serve /metrics on {address}:{port}: {reason}"
        ) from error
