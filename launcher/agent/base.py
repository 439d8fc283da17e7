"""What every verb of the agent shares: its name and exit codes, the job marker, small helpers.

Kept apart so that the verbs' modules import it and not one another, where they can.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import Callable

PROG = "python -m ugro.launcher.agent"
EXIT_USAGE = 2
EXIT_ERROR = 1
EXIT_CANNOT_EXECUTE = 127  # what shells report when a command cannot be run

# How long torchrun may take to appear: ``start`` waits for it, ``status`` of a job still being
# started too.
START_PID_TIMEOUT_SECONDS = 10.0
# Set in the environment of every job process, to the job directory: how stop finds them all.
JOB_MARKER_ENV = "UGRO_AGENT_JOB_DIR"


def describe_os_error(error: OSError) -> str:
    text = error.strerror or str(error)
    return f"{text}: {error.filename}" if error.filename else text


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def bind_error(address: str, port: int) -> OSError | None:
    """None if a server could listen on address:port now, else the bind error.

    SO_REUSEADDR is on, as servers set it, so sockets lingering in TIME_WAIT do not count.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as error:
            return error
    return None


def environment_outside_jobs() -> dict[str, str]:
    """This environment without a job's marker: an agent run from inside a job must not
    start a supervisor or an exporter that a ``stop`` of that job would kill."""
    return {name: value for name, value in os.environ.items() if name != JOB_MARKER_ENV}


def detach(process: subprocess.Popen) -> None:
    """The child is meant to outlive this process: stop Popen from warning about it."""
    process.returncode = 0
