"""``ensure-exporter`` and ``stop-exporter``: the node's ugro-exporter, started once per node.

An exporter this agent starts runs detached, in a session of its own, with its log and pid file
in WORKDIR/exporter/; one the node runs itself (a service) is found and left alone.

With a web configuration (``--web-config``), the exporter is started with ``--web.config.file``
and found by what its endpoint shows a client that has no credentials: the certificate the
file names (TLS), or a request for a password (basic auth alone). The agent has no client
certificate or password and needs none: it only tells whether the node's exporter answers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import IO, Any

import psutil

from ugro.common.ports import host_port
from ugro.common.processes import NotReady, ProcessExited, stop_process_group, wait_until_ready
from ugro.common.web_config import WebConfig, WebConfigError, load_web_config

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
    port: int,
    node: str,
    workdir: str,
    listen_address: str = "0.0.0.0",
    web_config: str | None = None,
) -> dict[str, Any]:
    """Make sure a ugro-exporter answers on ``port``: found running, started, or failed.

    ``web_config``: the exporter serves as that web configuration says (and one found running
    must show that it does)."""
    jobfiles.check_name(node, "node name")
    security: WebConfig | None = None
    if web_config is not None:
        try:
            security = load_web_config(web_config)
        except WebConfigError as error:
            return {"state": "failed", "reason": f"web_config: {error}"}
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
        if _exporter_answers(host, port, EXPORTER_PROBE_TIMEOUT_SECONDS, security):
            return {"state": "running", "port": port}
        error = bind_error(listen_address, port)
        if error is not None and error.errno == errno.EADDRINUSE:
            reason = None if security is None else _why_not_secured(host, port, security)
            return {
                "state": "failed",
                "reason": reason or f"port {port} is in use by another program",
            }
        if error is not None:
            return {
                "state": "failed",
                "reason": f"cannot listen on {host_port(listen_address, port)}: {error.strerror}",
            }
        return _start_exporter(port, node, listen_address, host, log, security)


def _why_not_secured(host: str, port: int, security: WebConfig) -> str | None:
    """Why what answers on ``port`` is not the exporter ``security`` describes, where it is an
    exporter of another web configuration (None: something else holds the port)."""
    timeout = EXPORTER_PROBE_TIMEOUT_SECONDS
    stop_it = "stop it (`ugro-launch stop-exporters`, or its service), so that one with"
    if _exporter_answers(host, port, timeout, None):
        return (
            f"a ugro-exporter serves plain HTTP on port {port}, without the web configuration "
            f"{security.path}: {stop_it} --web.config.file {security.path} starts"
        )
    if security.tls is not None and _presented_certificate(host, port, timeout):
        return (
            f"the TLS server on port {port} presents another certificate than "
            f"{security.tls.cert_file} (a ugro-exporter started before the certificate was "
            f"replaced?): {stop_it} the new one starts"
        )
    return None


def _start_exporter(
    port: int,
    node: str,
    listen_address: str,
    host: str,
    log: pathlib.Path,
    security: WebConfig | None,
) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "ugro.exporter",
        "--listen",
        host_port(listen_address, port),
        "--node",
        node,
        # Its path, absolute (the exporter runs in /); never what it holds.
        *(["--web.config.file", str(security.path.absolute())] if security is not None else []),
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
            lambda: _exporter_answers(host, port, 1.0, security),
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


def _exporter_answers(
    host: str, port: int, timeout: float, security: WebConfig | None = None
) -> bool:
    """Does a ugro-exporter serve /metrics there, as ``security`` says it should?

    Plain HTTP: its metrics show it. With TLS: the certificate it presents is the one the web
    configuration names (the handshake may then fail for want of a client certificate: this
    probe has none). With basic auth alone: it asks for a password. A node's http_proxy is not
    used.
    """
    if security is not None and security.tls is not None:
        return _presents_certificate(host, port, timeout, security.tls.cert_file)
    url = f"http://{host_port(host, port)}/metrics"
    try:
        with _NO_PROXY.open(url, timeout=timeout) as reply:
            if security is not None and security.secured:
                return False  # it serves without the password the web configuration asks for
            return b"ugro_exporter_" in reply.read()
    except urllib.error.HTTPError as error:
        asks_password = "basic" in error.headers.get("WWW-Authenticate", "").lower()
        return security is not None and error.code == 401 and asks_password
    except (OSError, ValueError):  # refused, timed out, not HTTP, an error status
        return False


def _presents_certificate(host: str, port: int, timeout: float, cert_file: pathlib.Path) -> bool:
    """Whether a TLS server there presents the certificate in ``cert_file``.

    Compared as bytes, not verified: the probe asks "is this the server of that file", which
    an exact match answers without a CA. Under TLS 1.2 a server that requires a client
    certificate ends the handshake with an alert before the certificate can be compared: that
    alert is taken as the answer (TLS 1.3, the default, completes the handshake first).
    """
    try:
        expected = ssl.PEM_cert_to_DER_cert(_first_pem_certificate(cert_file.read_text()))
    except (OSError, ValueError):
        return False
    presented = _presented_certificate(host, port, timeout)
    return presented is not None and presented in (expected, b"")


def _presented_certificate(host: str, port: int, timeout: float) -> bytes | None:
    """The certificate (DER) a TLS server there presents to a client without one; b"" if it
    ends the handshake with an alert first; None if no TLS server answers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            return tls.getpeercert(binary_form=True)
    except ssl.SSLError as error:
        # A TLS server, refusing a client without a certificate.
        return b"" if "ALERT" in (error.reason or "") else None
    except (OSError, ValueError):  # refused, timed out, not TLS
        return None


def _first_pem_certificate(text: str) -> str:
    """The server's own certificate: the first of a chain file."""
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.index(begin)
    return text[start : text.index(end, start) + len(end)] + "\n"


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
