"""ugro's default ports, ``host:port`` as URLs and target files write it, and free local ports.

Standard library only: the trainer and the exporter import this module.
"""

from __future__ import annotations

import contextlib
import errno
import socket

DEFAULT_EXPORTER_PORT = 9490  # just below the trainer ranks' default base port
DEFAULT_METRICS_BASE_PORT = 9500  # a rank serves on base + its local rank
DEFAULT_PROMETHEUS_PORT = 9090
DEFAULT_ALERTMANAGER_PORT = 9093

MAX_PORT = 65535


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:9490``) as URLs need it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NoFreePorts(OSError):
    """No free port (or block of them) could be found on this machine."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EADDRINUSE, message)

    def __str__(self) -> str:
        return self.strerror


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """``preferred`` when it is free on ``host`` now, else any free port. Another process may
    take it before the caller binds it: unlikely, and the caller's bind then says so."""
    if preferred:
        with socket.socket() as probe:
            try:
                probe.bind((host, preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports: each probe stays bound until all are chosen, so the
    kernel cannot hand out one port twice."""
    with contextlib.ExitStack() as probes:
        ports = []
        for _ in range(count):
            probe = probes.enter_context(socket.socket())
            probe.bind((host, 0))
            ports.append(probe.getsockname()[1])
        return ports


def free_port_block(count: int, attempts: int = 200) -> int:
    """A base port such that base .. base + count - 1 are all free now, on every interface
    (ranks listen on 0.0.0.0 by default): NoFreePorts if none is found in ``attempts`` tries."""
    for _ in range(attempts):
        base = free_port()
        if base + count - 1 <= MAX_PORT and _all_free(range(base, base + count)):
            return base
    raise NoFreePorts(f"no block of {count} free ports on this machine")


def _all_free(ports: range) -> bool:
    with contextlib.ExitStack() as probes:
        try:
            for port in ports:
                probes.enter_context(socket.socket()).bind(("0.0.0.0", port))
        except OSError:
            return False
    return True
