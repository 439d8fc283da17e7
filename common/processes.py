"""Starting a server and waiting until it answers; stopping a process and all it started.

Standard library only, so that the launcher's agent, the console, the tests and the benchmarks
share one copy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Protocol

# Readiness probes go to servers on this machine or a node's own address: never through the
# http_proxy of the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Polled(Protocol):
    """A started process as Popen shows it (a test's container also does)."""

    returncode: int | None

    def poll(self) -> int | None: ...


class ProcessExited(RuntimeError):
    """The process being waited for exited before it was ready."""

    def __init__(self, what: str, returncode: int) -> None:
        super().__init__(f"{what} exited with code {returncode} before it was ready")
        self.returncode = returncode


class NotReady(RuntimeError):
    """Not ready within the time allowed; the message says what and how long. (Not a
    TimeoutError, which is an OSError: callers' ``except OSError`` means "not yet".)"""


def url_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a GET of ``url`` answers with a 2xx status within ``timeout`` seconds."""
    try:
        with _NO_PROXY.open(url, timeout=timeout):
            return True
    except (OSError, ValueError):  # refused, timed out, an error status, not HTTP
        return False


def wait_until_ready(
    ready: str | Callable[[], object],
    timeout: float,
    *,
    process: Polled | None = None,
    what: str = "the server",
    interval: float = 0.2,
    probe_timeout: float = 1.0,
) -> None:
    """Poll until ``ready`` says so: a URL that answers 2xx (each try bounded by
    ``probe_timeout`` seconds), or a callable that returns something true (an OSError from it
    counts as not yet). ProcessExited as soon as ``process`` exits; NotReady after ``timeout``
    seconds."""
    if isinstance(ready, str):
        url = ready

        def check() -> object:
            return url_answers(url, probe_timeout)

    else:
        check = ready
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ProcessExited(what, process.returncode)
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(interval)
    raise NotReady(f"{what} not ready within {timeout:g} s")


def stop_process_group(
    process: subprocess.Popen | int, grace: float, first_signal: int = signal.SIGTERM
) -> bool:
    """Stop the process group that ``process`` leads (started with ``start_new_session``):
    ``first_signal`` to the group, SIGKILL to it if the leader has not exited ``grace`` seconds
    later, then up to ``grace`` seconds more for the leader to go. Returns whether SIGKILL was
    needed; subprocess.TimeoutExpired if even SIGKILL did not end it (a process stuck in the
    kernel).

    ``process`` is a Popen, or the pid of a group leader this process did not start (its exit
    is then seen by polling). A group already gone is not an error.
    """
    pid = process if isinstance(process, int) else process.pid
    if _ended(process):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, first_signal)
    if _wait(process, grace):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if not _wait(process, grace):
        raise subprocess.TimeoutExpired(str(pid), grace)
    return True


def _ended(process: subprocess.Popen | int) -> bool:
    if not isinstance(process, int):
        return process.poll() is not None
    try:
        waited, _ = os.waitpid(process, os.WNOHANG)  # reaps it if it is our child
        return waited == process
    except ChildProcessError:  # not our child: it has ended when the pid is gone
        try:
            os.kill(process, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's: still there
            return False
        return False


def _wait(process: subprocess.Popen | int, timeout: float) -> bool:
    """Whether the process ended within ``timeout`` seconds."""
    if not isinstance(process, int):
        try:
            process.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while not _ended(process):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
