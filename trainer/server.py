"""The rank's ``/metrics`` HTTP endpoint."""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server

# How long close() lets scrapes being answered finish.
CLOSE_WAIT_SECONDS = 2.0


class MetricsServerError(RuntimeError):
    """The rank could not serve ``/metrics`` (port taken, address not bindable)."""


class _RequestsInFlight:
    """Counts the requests being answered. The server answers each on a daemon thread, which
    the process's exit would cut short: the final scrape that ``Telemetry.close()`` waits for
    has taken its values once the collector ran, but its response may not be written yet."""

    def __init__(self) -> None:
        self._idle = threading.Condition()
        self._count = 0

    def __enter__(self) -> None:
        with self._idle:
            self._count += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


@dataclass
class MetricsServer:
    """A running endpoint; ``close()`` stops it and frees the port."""

    address: str
    port: int
    _server: object
    _thread: threading.Thread
    _in_flight: _RequestsInFlight

    def close(self) -> None:
        """Stop accepting, let the responses being written finish (briefly), free the port."""
        self._server.shutdown()  # type: ignore[attr-defined]
        self._in_flight.wait_idle(CLOSE_WAIT_SECONDS)
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
    in_flight = _RequestsInFlight()
    answer = server.process_request_thread

    def answer_counted(request: object, client_address: object) -> None:
        with in_flight:
            answer(request, client_address)

    server.process_request_thread = answer_counted  # type: ignore[method-assign]
    return MetricsServer(address, server.server_port, server, thread, in_flight)
