"""``ensure-exporter`` and ``stop-exporter``: the node's ugro-exporter, started once per node.

An exporter this agent starts runs detached, in a session of its own, with its log and pid file
in WORKDIR/exporter/; one the node runs itself (a service) is found and left alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from typing import IO, Any

import psutil

from ugro.common.ports import host_port
from ugro.common.processes import NotReady, ProcessExited, stop_process_group, wait_until_ready

from .. import jobfiles
from ..jobfiles import read_process_ref, write_atomic
from .base import bind_error, describe_os_error, detach, environment_outside_jobs
from .logs import tail_text
from .status import process_alive

EXPORTER_PROBE_TIMEOUT_SECONDS = 2.0
EXPORTER_START_TIMEOUT_SECONDS = 15.0
EXPORTER_FAILURE_LOG_LINES = 10
EXPORTER_LOCK_TIMEOUT_SECONDS = 30.0
EXPORTER_STOP_GRACE_SECONDS = 10.0


def ensure_exporter(
    port: int, node: str, workdir: str, listen_address: str = "0.0.0.0"
) -> dict[str, Any]:
    """Make sure a ugro-exporter answers on ``port``: found running, started, or failed."""
    jobfiles.check_name(node, "node name")
    directory = jobfiles.exporter_dir(workdir)
    log = directory / f"{node}.log"
    try:
        jobfiles.private_dirs(workdir, directory.name)
        lock = _exclusive_lock(directory / f".{node}.lock", EXPORTER_LOCK_TIMEOUT_SECONDS)
    except (OSError, TimeoutError) as error:
        reason = describe_os_error(error) if isinstance(error, OSError) else str(error)
        return {"state": "failed", "reason": f"cannot prepare {directory}: {reason}"}
    # Two launchers at once must not start two exporters: the second waits and finds the first.
    with lock:
        host = _probe_host(listen_address)
        if _exporter_answers(host, port, EXPORTER_PROBE_TIMEOUT_SECONDS):
            return {"state": "running", "port": port}
        error = bind_error(listen_address, port)
        if error is not None and error.errno == errno.EADDRINUSE:
            return {"state": "failed", "reason": f"port {port} is in use by another program"}
        if error is not None:
            return {
                "state": "failed",
                "reason": f"cannot listen on {host_port(listen_address, port)}: {error.strerror}",
            }
        return _start_exporter(port, node, listen_address, host, log)


def _start_exporter(
    port: int, node: str, listen_address: str, host: str, log: pathlib.Path
) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "ugro.exporter",
        "--listen",
        host_port(listen_address, port),
        "--node",
        node,
    ]
    try:
        output = os.fdopen(jobfiles.open_append(log), "ab")
    except OSError as error:
        return {"state": "failed", "reason": f"cannot write {log}: {describe_os_error(error)}"}
    with output:
        output.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {shlex.join(argv)}\n".encode())
        output.flush()
        exporter = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=environment_outside_jobs(),
            start_new_session=True,
        )
    try:
        wait_until_ready(
            lambda: _exporter_answers(host, port, 1.0),
            EXPORTER_START_TIMEOUT_SECONDS,
            process=exporter,
            interval=0.1,
        )
    except ProcessExited as exited:
        return {
            "state": "failed",
            "reason": f"ugro-exporter exited with code {exited.returncode} at start; "
            f"last lines of {log}:\n{tail_text(log, EXPORTER_FAILURE_LOG_LINES)}",
        }
    except NotReady:
        # Silent after 15 s is broken: remove it, so that the next attempt does not find it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(exporter.pid, signal.SIGKILL)
        exporter.wait()
        return {
            "state": "failed",
            "reason": f"ugro-exporter did not answer on port {port} within "
            f"{EXPORTER_START_TIMEOUT_SECONDS:g} s; last lines of {log}:\n"
            f"{tail_text(log, EXPORTER_FAILURE_LOG_LINES)}",
        }
    detach(exporter)
    with contextlib.suppress(psutil.Error, OSError):
        ref = jobfiles.format_process_ref(exporter.pid, psutil.Process(exporter.pid).create_time())
        write_atomic(log.with_suffix(".pid"), ref)
    return {"state": "started", "pid": exporter.pid, "log": str(log)}


def stop_exporter(node: str, workdir: str) -> dict[str, Any]:
    """Stop the exporter that ``ensure-exporter`` started for ``node`` (SIGTERM, SIGKILL after
    a grace period). One it did not start (its pid file is missing, or names another process)
    is left alone: a node's own service manager owns that one."""
    pid_file = jobfiles.exporter_dir(workdir) / f"{jobfiles.check_name(node, 'node name')}.pid"
    ref = read_process_ref(pid_file)
    if not process_alive(ref):
        pid_file.unlink(missing_ok=True)
        return {"state": "not_running"}
    # It leads a session of its own. Stuck even after SIGKILL: reported stopped all the same,
    # as there is nothing more to do.
    with contextlib.suppress(subprocess.TimeoutExpired):
        stop_process_group(ref[0], EXPORTER_STOP_GRACE_SECONDS)
    pid_file.unlink(missing_ok=True)
    return {"state": "stopped", "pid": ref[0]}


def _probe_host(listen_address: str) -> str:
    """Where to reach a server that listens on listen_address, from this node."""
    if listen_address == "0.0.0.0":
        return "127.0.0.1"
    if listen_address == "::":
        return "::1"
    return listen_address


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _exporter_answers(host: str, port: int, timeout: float) -> bool:
    """Does a ugro-exporter serve /metrics there? (A node's http_proxy is not used.)"""
    try:
        with _NO_PROXY.open(f"http://{host_port(host, port)}/metrics", timeout=timeout) as reply:
            return b"ugro_exporter_" in reply.read()
    except (OSError, ValueError):  # refused, timed out, not HTTP, an error status
        return False


def _exclusive_lock(path: pathlib.Path, timeout: float) -> IO[str]:
    """The open lock file, flock-ed; closing it (``with``) releases the lock.

    The descriptor is not inheritable, so an exporter started meanwhile does not hold it.
    """
    file = os.fdopen(jobfiles.open_append(path), "a")  # the caller closes it
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return file
        except BlockingIOError:
            if time.monotonic() > deadline:
                file.close()
                raise TimeoutError(f"{path} stayed locked for {timeout:g} s") from None
            time.sleep(0.1)
