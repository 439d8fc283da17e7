"""The rank's ``/metrics`` HTTP endpoint."""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server


class MetricsServerError(RuntimeError):
    """The rank could not serve ``/metrics`` (port taken, address not bindable)."""


@dataclass
class MetricsServer:
    """A running endpoint; ``close()`` stops it and frees the port."""

    address: str
    port: int
    _server: object
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]
        self._thread.join(timeout=2)


def serve_metrics(registry: CollectorRegistry, address: str, port: int, rank: int) -> MetricsServer:
    """Serve ``registry`` on ``address:port`` from a daemon thread; port 0 picks a free port."""
    try:
        server, thread = start_http_server(port, addr=address, registry=registry)
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
    return MetricsServer(address, server.server_port, server, thread)
