"""The node side of ``ugro-launch``: every remote action is one run of this module.

    <python> -m ugro.launcher.agent preflight --workdir W --ports 9500,9501,9490 [--gpus N]
    <python> -m ugro.launcher.agent ensure-exporter --port P --node NAME --workdir W
    <python> -m ugro.launcher.agent stop-exporter --node NAME --workdir W
    <python> -m ugro.launcher.agent start --job-id J --node NAME --workdir W [--env K=V] -- ARGV...
    <python> -m ugro.launcher.agent status|stop|logs --job-id J --node NAME --workdir W

Each verb except ``logs`` prints one JSON object on one line and exits 0, also when it reports
a problem: problems are data for the launcher. A usage error exits 2, anything unexpected 1,
each with one line on stderr. The work is done here, in Python with psutil, so the launcher
sends one ``shlex.join``-ed argv over SSH and never builds a shell pipeline.

``start`` hands the job to a detached supervisor (``supervise``, in its own session) that
starts ARGV in a second new session, so that ``stop`` can signal torchrun's process group
without hitting the supervisor, which then records the exit status. torchrun puts each
worker in a session of its own, so every job process also carries ``UGRO_AGENT_JOB_DIR`` in
its environment, by which ``stop`` finds and kills what SIGTERM left. Nothing is tied to the
SSH session: it may close as soon as ``start`` has answered.
See :mod:`ugro.launcher.jobfiles` for the files of a job.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import IO, Any

import psutil

from . import jobfiles
from .jobfiles import (
    COMMAND,
    EXIT_CODE,
    OUTPUT,
    PID,
    STARTED_AT,
    SUPERVISOR_PID,
    UnsafePath,
    job_dir,
    read_float,
    read_int,
    read_process_ref,
    write_atomic,
)

PROG = "python -m ugro.launcher.agent"
EXIT_USAGE = 2
EXIT_ERROR = 1
EXIT_CANNOT_EXECUTE = 127  # what shells report when a command cannot be run

START_PID_TIMEOUT_SECONDS = 10.0
# A torchrun that exits within this is reported as a failed start. Its workers fail at once on
# a wrong script path or working directory, and torchrun notices and exits about 2 s later.
START_SETTLE_SECONDS = 5.0
START_FAILURE_LOG_LINES = 20
EXPORTER_PROBE_TIMEOUT_SECONDS = 2.0
EXPORTER_START_TIMEOUT_SECONDS = 15.0
EXPORTER_FAILURE_LOG_LINES = 10
EXPORTER_LOCK_TIMEOUT_SECONDS = 30.0
EXPORTER_STOP_GRACE_SECONDS = 10.0
STOP_AFTER_KILL_SECONDS = 5.0
FOLLOW_POLL_SECONDS = 0.2
# Set in the environment of every job process, to the job directory: how stop finds them all.
JOB_MARKER_ENV = "UGRO_AGENT_JOB_DIR"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

__all__ = [
    "ensure_exporter",
    "job_dir",
    "job_status",
    "main",
    "preflight",
    "start_job",
    "stop_job",
    "supervise",
]


# --------------------------------------------------------------------------- command line


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def _name(what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        try:
            return jobfiles.check_name(value, what)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return check


def _port(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a port number 1..65535")
    return int(value)


def _ports(value: str) -> list[int]:
    ports: list[int] = []
    for part in filter(None, value.split(",")):
        port = _port(part.strip())
        if port not in ports:
            ports.append(port)
    return ports


def _non_negative_int(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole number >= 0")
    return int(value)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{value!r}: expected 0 to 3600 seconds")
    return seconds


def _env_pair(value: str) -> tuple[str, str]:
    name, sep, text = value.partition("=")
    if not sep or not _ENV_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected NAME=VALUE with NAME made of letters, digits and '_'"
        )
    return name, text


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected an IP address") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG, description="The node side of ugro-launch: one action, one JSON line."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def job_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--job-id", required=True, type=_name("job id"))
        sub.add_argument("--node", required=True, type=_name("node name"))
        sub.add_argument("--workdir", required=True, help="job files go to WORKDIR/jobs/J/NODE")

    sub = verbs.add_parser("preflight", help="can this node run a job? (JSON report)")
    sub.add_argument("--workdir", required=True, help="created if missing; must be writable")
    sub.add_argument("--ports", type=_ports, default=[], metavar="P[,P...]")
    sub.add_argument("--gpus", type=_non_negative_int, help="GPUs NVML should see (checked)")
    sub.add_argument("--min-free-bytes", type=_non_negative_int, default=0, metavar="BYTES")
    sub.add_argument("--bind-address", type=_address, default="0.0.0.0")
    sub.add_argument("--chdir", help="the job's working directory: must exist")

    sub = verbs.add_parser("ensure-exporter", help="start ugro-exporter unless it runs")
    sub.add_argument("--port", required=True, type=_port)
    sub.add_argument("--node", required=True, type=_name("node name"))
    sub.add_argument("--workdir", required=True, help="its log goes to WORKDIR/exporter/NODE.log")
    sub.add_argument("--listen-address", type=_address, default="0.0.0.0")

    sub = verbs.add_parser("stop-exporter", help="stop the exporter ensure-exporter started")
    sub.add_argument("--node", required=True, type=_name("node name"))
    sub.add_argument("--workdir", required=True)

    sub = verbs.add_parser("start", help="start -- ARGV... detached, under a supervisor")
    job_options(sub)
    sub.add_argument("--env", type=_env_pair, action="append", default=[], metavar="K=V")
    sub.add_argument("--cwd", help="working directory of ARGV (default: the agent's)")

    sub = verbs.add_parser("status", help="running, finished, failed, lost or unknown")
    job_options(sub)

    sub = verbs.add_parser("stop", help="SIGTERM the job's process group, SIGKILL after grace")
    job_options(sub)
    sub.add_argument("--grace", type=_seconds, default=10.0, metavar="SECONDS")

    sub = verbs.add_parser("logs", help="print the tail of the job's output (raw text)")
    job_options(sub)
    sub.add_argument("--lines", type=_non_negative_int, default=100, metavar="N")
    sub.add_argument("--follow", action="store_true", help="until the job ends")

    sub = verbs.add_parser("supervise", help="internal: run a started job and record its exit")
    sub.add_argument("--dir", required=True, type=pathlib.Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if argv[:1] == ["start"]:
        # Everything after the first "--" is the job's argv, verbatim: argparse never sees it.
        if "--" not in argv:
            build_parser().parse_args(argv)  # to report other errors first
            _usage_error("start: expected -- ARGV... (the command to run)")
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
        if not command:
            _usage_error("start: expected a command after --")
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "logs":
            return show_logs(job_dir(args.workdir, args.job_id, args.node), args.lines, args.follow)
        if args.verb == "supervise":
            return supervise(args.dir)
        result = _run_verb(args, command)
    except OSError as error:
        print(f"{PROG} {args.verb}: {_describe_os_error(error)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # the launcher needs one line, not a traceback over SSH
        print(f"{PROG} {args.verb}: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(result))
    return 0


def _usage_error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _run_verb(args: argparse.Namespace, command: list[str]) -> dict[str, Any]:
    if args.verb == "preflight":
        return preflight(
            args.workdir,
            ports=args.ports,
            gpus=args.gpus,
            min_free_bytes=args.min_free_bytes,
            bind_address=args.bind_address,
            chdir=args.chdir,
        )
    if args.verb == "ensure-exporter":
        return ensure_exporter(args.port, args.node, args.workdir, args.listen_address)
    if args.verb == "stop-exporter":
        return stop_exporter(args.node, args.workdir)
    directory = job_dir(args.workdir, args.job_id, args.node)
    if args.verb == "start":
        return start_job(
            directory,
            command,
            env=dict(args.env),
            cwd=args.cwd,
            job_id=args.job_id,
            node=args.node,
        )
    if args.verb == "status":
        return job_status(directory)
    if args.verb == "stop":
        return stop_job(directory, args.grace)
    raise AssertionError(f"unhandled verb {args.verb}")


def _describe_os_error(error: OSError) -> str:
    text = error.strerror or str(error)
    return f"{text}: {error.filename}" if error.filename else text


# --------------------------------------------------------------------------- preflight


def preflight(
    workdir: str,
    *,
    ports: Sequence[int] = (),
    gpus: int | None = None,
    min_free_bytes: int = 0,
    bind_address: str = "0.0.0.0",
    chdir: str | None = None,
) -> dict[str, Any]:
    """Can this node run a job? Facts, and ``problems``: sentences, empty when all is well."""
    problems: list[str] = []
    if chdir is not None and not os.path.isdir(os.path.expanduser(chdir)):
        problems.append(f"the job's directory {chdir} (chdir) does not exist here")
    directory = pathlib.Path(workdir).expanduser()

    torch_version = _distribution_version("torch")
    if torch_version is None:
        problems.append(f"torch is not installed in {sys.executable}")

    gpu_count: int | None = None
    gpu_error: str | None = None
    if gpus is not None:  # NVML is only asked when the inventory declares a GPU count
        gpu_count, gpu_error = _nvml_gpu_count()
        if gpu_count is None:
            problems.append(f"expected {gpus} GPUs, NVML unavailable: {gpu_error}")
        elif gpu_count < gpus:
            problems.append(f"expected {gpus} GPUs, NVML sees {gpu_count}")

    ports_taken: list[int] = []
    for port in ports:
        error = _bind_error(bind_address, port)
        if error is None:
            continue
        if error.errno == errno.EADDRINUSE:
            ports_taken.append(port)
            problems.append(f"port {port} is in use")
        else:
            problems.append(f"port {port} cannot be bound on {bind_address}: {error.strerror}")

    free_bytes: int | None = None
    try:
        jobfiles.private_dirs(directory)
        with tempfile.TemporaryFile(dir=directory, prefix=".ugro-preflight-"):
            pass
    except UnsafePath as error:
        problems.append(str(error.strerror))
    except OSError as error:
        problems.append(f"{directory} is not writable: {error.strerror or error}")
    with contextlib.suppress(OSError):
        free_bytes = _free_bytes(directory)
    if free_bytes is not None and free_bytes < min_free_bytes:
        problems.append(
            f"only {_gib(free_bytes)} GiB free in {directory} (need {_gib(min_free_bytes)} GiB)"
        )

    return {
        "hostname": socket.gethostname(),
        "python": sys.executable,
        "ugro_version": _distribution_version("ugro"),
        "torch_version": torch_version,
        "gpus": gpu_count,
        "gpu_error": gpu_error,
        "ports_taken": ports_taken,
        "workdir": str(directory),
        "workdir_free_bytes": free_bytes,
        "problems": problems,
    }


def _distribution_version(name: str) -> str | None:
    """The installed version, without importing the package (importing torch takes seconds)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _nvml_gpu_count() -> tuple[int | None, str | None]:
    """``(count, None)``, or ``(None, why)`` when NVML cannot be used on this node."""
    try:
        import pynvml
    except ImportError as error:
        return None, f"cannot import pynvml: {error}"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        return None, str(error)
    try:
        return int(pynvml.nvmlDeviceGetCount()), None
    except pynvml.NVMLError as error:
        return None, str(error)
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _free_bytes(path: pathlib.Path) -> int:
    """Bytes an unprivileged user may still write (f_bavail), like ``df`` reports."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _gib(count: int) -> str:
    return f"{count / 1024**3:.1f}".removesuffix(".0")


def _bind_error(address: str, port: int) -> OSError | None:
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


# --------------------------------------------------------------------------- exporter


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
        reason = _describe_os_error(error) if isinstance(error, OSError) else str(error)
        return {"state": "failed", "reason": f"cannot prepare {directory}: {reason}"}
    # Two launchers at once must not start two exporters: the second waits and finds the first.
    with lock:
        host = _probe_host(listen_address)
        if _exporter_answers(host, port, EXPORTER_PROBE_TIMEOUT_SECONDS):
            return {"state": "running", "port": port}
        error = _bind_error(listen_address, port)
        if error is not None and error.errno == errno.EADDRINUSE:
            return {"state": "failed", "reason": f"port {port} is in use by another program"}
        if error is not None:
            return {
                "state": "failed",
                "reason": f"cannot listen on {_host_port(listen_address, port)}: {error.strerror}",
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
        _host_port(listen_address, port),
        "--node",
        node,
    ]
    try:
        output = os.fdopen(jobfiles.open_append(log), "ab")
    except OSError as error:
        return {"state": "failed", "reason": f"cannot write {log}: {_describe_os_error(error)}"}
    with output:
        output.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {shlex.join(argv)}\n".encode())
        output.flush()
        exporter = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=_environment_outside_jobs(),
            start_new_session=True,
        )
    deadline = time.monotonic() + EXPORTER_START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        code = exporter.poll()
        if code is not None:
            return {
                "state": "failed",
                "reason": f"ugro-exporter exited with code {code} at start; "
                f"last lines of {log}:\n{_tail_text(log, EXPORTER_FAILURE_LOG_LINES)}",
            }
        if _exporter_answers(host, port, 1.0):
            _detach(exporter)
            with contextlib.suppress(psutil.Error, OSError):
                ref = jobfiles.format_process_ref(
                    exporter.pid, psutil.Process(exporter.pid).create_time()
                )
                write_atomic(log.with_suffix(".pid"), ref)
            return {"state": "started", "pid": exporter.pid, "log": str(log)}
        time.sleep(0.1)
    # Silent after 15 s is broken: remove it, so that the next attempt does not find it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(exporter.pid, signal.SIGKILL)
    exporter.wait()
    return {
        "state": "failed",
        "reason": f"ugro-exporter did not answer on port {port} within "
        f"{EXPORTER_START_TIMEOUT_SECONDS:g} s; last lines of {log}:\n"
        f"{_tail_text(log, EXPORTER_FAILURE_LOG_LINES)}",
    }


def stop_exporter(node: str, workdir: str) -> dict[str, Any]:
    """Stop the exporter that ``ensure-exporter`` started for ``node`` (SIGTERM, SIGKILL after
    a grace period). One it did not start (its pid file is missing, or names another process)
    is left alone: a node's own service manager owns that one."""
    pid_file = jobfiles.exporter_dir(workdir) / f"{jobfiles.check_name(node, 'node name')}.pid"
    ref = read_process_ref(pid_file)
    if not _alive(ref):
        pid_file.unlink(missing_ok=True)
        return {"state": "not_running"}
    process = psutil.Process(ref[0])
    with contextlib.suppress(ProcessLookupError):
        os.killpg(ref[0], signal.SIGTERM)  # it leads a session of its own
    try:
        process.wait(EXPORTER_STOP_GRACE_SECONDS)
    except psutil.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ref[0], signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            process.wait(EXPORTER_STOP_GRACE_SECONDS)
    except psutil.NoSuchProcess:
        pass
    pid_file.unlink(missing_ok=True)
    return {"state": "stopped", "pid": ref[0]}


def _probe_host(listen_address: str) -> str:
    """Where to reach a server that listens on listen_address, from this node."""
    if listen_address == "0.0.0.0":
        return "127.0.0.1"
    if listen_address == "::":
        return "::1"
    return listen_address


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _exporter_answers(host: str, port: int, timeout: float) -> bool:
    """Does a ugro-exporter serve /metrics there? (A node's http_proxy is not used.)"""
    try:
        with _NO_PROXY.open(f"http://{_host_port(host, port)}/metrics", timeout=timeout) as reply:
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


def _environment_outside_jobs() -> dict[str, str]:
    """This environment without a job's marker: an agent run from inside a job must not
    start a supervisor or an exporter that a ``stop`` of that job would kill."""
    return {name: value for name, value in os.environ.items() if name != JOB_MARKER_ENV}


def _detach(process: subprocess.Popen) -> None:
    """The child is meant to outlive this process: stop Popen from warning about it."""
    process.returncode = 0


# --------------------------------------------------------------------------- start


def start_job(
    directory: pathlib.Path,
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    job_id: str | None = None,
    node: str | None = None,
) -> dict[str, Any]:
    """Create the job directory and hand ``argv`` to a detached supervisor; report the start."""
    job_id = job_id or directory.parent.name
    node = node or directory.name
    try:
        # directory is WORKDIR/jobs/JOB/NODE
        jobfiles.private_dirs(directory.parents[2], "jobs", directory.parent.name)
        directory.mkdir(0o700)
    except FileExistsError:
        return {
            "state": "failed",
            "reason": f"job {job_id} already exists on node {node} ({directory})",
        }
    except UnsafePath as error:
        return {"state": "failed", "reason": f"cannot create {directory}: {error.strerror}"}
    except OSError as error:
        return {"state": "failed", "reason": f"cannot create {directory}: {error.strerror}"}

    command = {
        "argv": list(argv),
        "env": dict(env or {}),
        # absolute: the supervisor runs in /, so that it keeps no directory busy
        "cwd": os.path.abspath(os.path.expanduser(cwd)) if cwd else os.getcwd(),
        "submitted_at": time.time(),
        "job_id": job_id,
        "node": node,
    }
    write_atomic(directory / COMMAND, json.dumps(command, indent=2) + "\n")
    log = directory / OUTPUT
    with os.fdopen(jobfiles.open_append(log), "ab") as output:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "ugro.launcher.agent", "supervise", "--dir", str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=_environment_outside_jobs(),
            start_new_session=True,
        )

    def started_or_ended() -> bool:
        return (directory / PID).exists() or (directory / EXIT_CODE).exists()

    if not _wait_until(started_or_ended, START_PID_TIMEOUT_SECONDS):
        how = "exited" if supervisor.poll() is not None else "hangs"
        if supervisor.poll() is None:  # give up on it for good: no job may start later
            supervisor.kill()
            supervisor.wait()
            if (directory / PID).exists():
                stop_job(directory, grace=0)
        return {
            "state": "failed",
            "reason": f"the supervisor {how}, torchrun not started after "
            f"{START_PID_TIMEOUT_SECONDS:g} s: {_tail_text(log, START_FAILURE_LOG_LINES)}",
        }
    _detach(supervisor)
    _wait_until(lambda: (directory / EXIT_CODE).exists(), START_SETTLE_SECONDS)
    exit_code = read_int(directory / EXIT_CODE)
    if exit_code is not None and exit_code != 0:  # a quick success is no failed start
        return {
            "state": "failed",
            "reason": f"exited with code {exit_code} at once: "
            f"{_head_and_tail_text(log, START_FAILURE_LOG_LINES)}",
            "exit_code": exit_code,
            "dir": str(directory),
        }
    ref = read_process_ref(directory / PID)
    return {
        "state": "started",
        "pid": ref[0] if ref else None,
        "dir": str(directory),
        "log": str(log),
    }


def supervise(directory: pathlib.Path) -> int:
    """Run the job of ``directory/command.json`` and record its pid, start and exit status.

    Runs detached from any terminal (``start`` made it a session leader, stdout and stderr
    go to output.log). The job gets a session of its own, so signals to its process group
    never reach this process, which must survive to write ``exit_code``.
    """
    command = json.loads((directory / COMMAND).read_text())
    write_atomic(
        directory / SUPERVISOR_PID,
        jobfiles.format_process_ref(os.getpid(), psutil.Process().create_time()),
    )
    argv: list[str] = command["argv"]
    child: subprocess.Popen | None = None

    def forward(signum: int, _frame: object) -> None:
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signum)

    # Python handlers, not SIG_IGN: an ignored signal would stay ignored in torchrun.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: None)

    with os.fdopen(jobfiles.open_append(directory / OUTPUT), "ab", buffering=0) as output:
        try:
            child = subprocess.Popen(
                argv,
                env={**os.environ, **command["env"], JOB_MARKER_ENV: str(directory)},
                cwd=command["cwd"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as error:
            output.write(
                f"ugro-agent: cannot start {shlex.join(argv)} in {command['cwd']}: "
                f"{_describe_os_error(error)}\n".encode()
            )
            write_atomic(directory / EXIT_CODE, f"{EXIT_CANNOT_EXECUTE}\n")
            return 0
        try:
            create_time = psutil.Process(child.pid).create_time()
        except psutil.Error:  # unreachable in practice: an unreaped child stays a zombie
            create_time = time.time()
        write_atomic(directory / STARTED_AT, f"{time.time()!r}\n")
        write_atomic(directory / PID, jobfiles.format_process_ref(child.pid, create_time))
        status = child.wait()
    # Popen reports death by signal N as -N; shells and torchrun's own callers say 128 + N.
    write_atomic(directory / EXIT_CODE, f"{status if status >= 0 else 128 - status}\n")
    return 0


# --------------------------------------------------------------------------- status, stop


def _process_state(ref: tuple[int, float] | None) -> str:
    """ "alive", "zombie" or "gone" for the process of a pid file; a later process that
    reuses the pid (another create_time) counts as gone."""
    if ref is None:
        return "gone"
    pid, create_time = ref
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - create_time) >= 0.01:
            return "gone"
        return "zombie" if process.status() == psutil.STATUS_ZOMBIE else "alive"
    except psutil.Error:
        return "gone"


def _alive(ref: tuple[int, float] | None) -> bool:
    return _process_state(ref) == "alive"


def _leader_alive(directory: pathlib.Path) -> bool:
    """Is torchrun still running? A zombie counts while its supervisor lives, about to
    record its exit; after the supervisor's death it waits for whoever adopted it."""
    state = _process_state(read_process_ref(directory / PID))
    return state == "alive" or (
        state == "zombie" and _alive(read_process_ref(directory / SUPERVISOR_PID))
    )


def job_status(directory: pathlib.Path) -> dict[str, Any]:
    """running, finished (exit 0), failed (other exit), lost (gone, no exit) or unknown."""
    result: dict[str, Any] = {
        "state": "unknown",
        "exit_code": None,
        "pid": None,
        "started_at": None,
        "dir": str(directory),
    }
    if not directory.is_dir():
        return result
    leader = read_process_ref(directory / PID)
    result["pid"] = leader[0] if leader else None
    result["started_at"] = read_float(directory / STARTED_AT)
    # Liveness before exit_code: a job that ends in between is then seen as ended, not lost.
    alive = _leader_alive(directory)
    exit_code = read_int(directory / EXIT_CODE)
    if exit_code is None and not alive and _alive(read_process_ref(directory / SUPERVISOR_PID)):
        # The supervisor lives: torchrun is being started, or its exit is being written.
        if leader is None:
            _wait_until(
                lambda: (directory / PID).exists() or (directory / EXIT_CODE).exists(),
                START_PID_TIMEOUT_SECONDS,
            )
            leader = read_process_ref(directory / PID)
            result["pid"] = leader[0] if leader else None
            result["started_at"] = read_float(directory / STARTED_AT)
            alive = _leader_alive(directory)
        else:
            _wait_until(lambda: (directory / EXIT_CODE).exists(), 2.0)
        exit_code = read_int(directory / EXIT_CODE)
    if exit_code is not None:
        result.update(state="finished" if exit_code == 0 else "failed", exit_code=exit_code)
    else:
        result["state"] = "running" if alive else "lost"
    return result


def _job_processes(directory: pathlib.Path, since: float) -> list[psutil.Process]:
    """The live processes of the job: those whose environment carries the job's marker.

    torchrun starts every worker in a session of its own (``start_new_session``), so
    torchrun's process group does not hold the whole job, and a worker whose torchrun was
    killed is adopted by init. The marker, which every descendant inherits, finds them all;
    ``since`` (the supervisor's start) skips the environments of older processes.
    """
    marker = str(directory)
    found = []
    for process in psutil.process_iter(["create_time"]):
        created = process.info["create_time"]
        if created is None or created < since - 1 or process.pid == os.getpid():
            continue
        try:
            if process.environ().get(JOB_MARKER_ENV) == marker:
                found.append(process)
        except psutil.Error:  # gone, a zombie, or another user's
            continue
    return found


def stop_job(directory: pathlib.Path, grace: float = 10.0) -> dict[str, Any]:
    """SIGTERM the job, SIGKILL every process of it still there after ``grace`` seconds.

    SIGTERM goes to torchrun's process group: torchrun passes it on to its workers and waits
    for them. Safe to repeat: a job without processes left is reported as not running.
    """
    status = job_status(directory)  # also waits out a supervisor that is still starting it
    if status["state"] == "unknown":
        return {"state": "unknown"}
    leader = read_process_ref(directory / PID)
    supervisor = read_process_ref(directory / SUPERVISOR_PID)
    since = (supervisor or leader or (0, 0.0))[1]
    leader_alive = _leader_alive(directory)
    stragglers = _job_processes(directory, since)
    if not leader_alive and not stragglers:
        return {"state": "not_running", "exit_code": read_int(directory / EXIT_CODE)}

    def terminate_stragglers() -> None:
        for process in _job_processes(directory, since):
            with contextlib.suppress(psutil.Error):
                process.terminate()

    def ended() -> bool:
        # The supervisor writes exit_code; with the supervisor gone (lost job) nobody will.
        recorded = (directory / EXIT_CODE).exists() or not _alive(supervisor)
        return recorded and not _leader_alive(directory) and not _job_processes(directory, since)

    if leader_alive:
        _signal_group(leader[0], signal.SIGTERM)
    else:  # torchrun is gone (lost job) but some of its processes are not
        terminate_stragglers()
    orphans_told = not leader_alive
    deadline = time.monotonic() + grace
    while not ended():
        if time.monotonic() >= deadline:
            break
        if not orphans_told and not _leader_alive(directory):
            # Nobody forwards SIGTERM to what outlived torchrun in sessions of its own.
            terminate_stragglers()
            orphans_told = True
        time.sleep(0.1)

    killed = False
    deadline = time.monotonic() + STOP_AFTER_KILL_SECONDS
    while not ended() and time.monotonic() < deadline:
        if _alive(leader):
            killed |= _signal_group(leader[0], signal.SIGKILL)
        for process in _job_processes(directory, since):
            with contextlib.suppress(psutil.Error):
                process.kill()  # psutil checks that the pid was not reused
                killed = True
        time.sleep(0.1)
    return {"state": "stopped", "exit_code": read_int(directory / EXIT_CODE), "killed": killed}


def _signal_group(pgid: int, signum: int) -> bool:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def _wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


# --------------------------------------------------------------------------- logs


def _tail(path: pathlib.Path, lines: int) -> tuple[bytes, int]:
    """The last ``lines`` lines of a file (a final line without newline counts) and its size."""
    with open(path, "rb") as file:
        end = file.seek(0, os.SEEK_END)
        if lines <= 0:
            return b"", end
        data, position = b"", end
        while position > 0:
            step = min(64 * 1024, position)
            position -= step
            file.seek(position)
            data = file.read(step) + data
            if data.count(b"\n", 0, len(data) - 1) >= lines:
                break
        start = len(data) - 1  # a trailing newline ends the last line, it starts none
        for _ in range(lines):
            start = data.rfind(b"\n", 0, start)
            if start < 0:
                break
        return data[start + 1 :], end


def _tail_text(path: pathlib.Path, lines: int) -> str:
    try:
        data, _ = _tail(path, lines)
    except OSError as error:
        return f"({path}: {_describe_os_error(error)})"
    return data.decode(errors="replace").rstrip("\n")


def _head_and_tail_text(path: pathlib.Path, lines: int) -> str:
    """A short log whole; a longer one's first and last ``lines // 2`` lines. A worker's own
    error (a script that cannot be opened) comes first, torchrun's summary of it last."""
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"({path}: {_describe_os_error(error)})"
    all_lines = text.rstrip("\n").splitlines()
    if len(all_lines) <= lines:
        return "\n".join(all_lines)
    half = lines // 2
    return "\n".join([*all_lines[:half], "…", *all_lines[-half:]])


class _Interrupted(Exception):
    pass


def show_logs(directory: pathlib.Path, lines: int, follow: bool) -> int:
    """Print the tail of output.log; with ``follow``, new output until the job ends."""
    log = directory / OUTPUT
    if not directory.is_dir():
        print(f"{PROG} logs: no job at {directory}", file=sys.stderr)
        return EXIT_ERROR

    def interrupted(_signum: int, _frame: object) -> None:
        raise _Interrupted

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    out = sys.stdout.buffer
    try:
        data, offset = _tail(log, lines)
        out.write(data)
        out.flush()
        if not follow:
            return 0
        checked_lost_at = time.monotonic()
        while True:
            ended = (directory / EXIT_CODE).exists()
            if not ended and time.monotonic() - checked_lost_at > 1.0:
                checked_lost_at = time.monotonic()
                ended = job_status(directory)["state"] == "lost"  # nobody will end it
            with open(log, "rb") as file:
                file.seek(offset)
                data = file.read()
            if data:
                offset += len(data)
                out.write(data)
                out.flush()
            if ended:
                return 0
            time.sleep(FOLLOW_POLL_SECONDS)
    except (_Interrupted, BrokenPipeError):
        # The SSH session is gone or the user pressed Ctrl-C: leave quietly, without a
        # second EPIPE when Python flushes stdout at exit.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
