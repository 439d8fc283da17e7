"""Where a job's files live on a node, and how they are written and read.

    <workdir>/jobs/<job_id>/<node>/
        command.json     argv, env additions, cwd and submission time, written by ``start``
        output.log       torchrun's stdout and stderr (and the supervisor's own complaints)
        supervisor.pid   "<pid> <create_time>" of the supervisor process
        started_at       when torchrun was started, in seconds since the epoch
        pid              "<pid> <create_time>" of torchrun, also its process-group id
        exit_code        torchrun's exit status, or 128 + signal number if a signal killed it

The node name is part of the path because nodes may share a filesystem (an NFS home, or the
test namespaces). Job ids and node names are checked against a strict pattern before they
become path components, so ``..`` or ``/`` can never reach the filesystem. Everything another
process may read while it is being written goes through :func:`write_atomic`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import tempfile

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

COMMAND = "command.json"
OUTPUT = "output.log"
SUPERVISOR_PID = "supervisor.pid"
STARTED_AT = "started_at"
PID = "pid"
EXIT_CODE = "exit_code"


def check_name(value: str, what: str = "name") -> str:
    """``value`` if it is a safe job id or node name, else ValueError naming ``what``."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ValueError(
            f"{what} {value!r}: expected 1 to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def job_dir(workdir: str | os.PathLike[str], job_id: str, node: str) -> pathlib.Path:
    """``<workdir>/jobs/<job_id>/<node>``; ``~`` in workdir is expanded (no shell does it)."""
    return (
        pathlib.Path(workdir).expanduser()
        / "jobs"
        / check_name(job_id, "job id")
        / check_name(node, "node name")
    )


def exporter_dir(workdir: str | os.PathLike[str]) -> pathlib.Path:
    """Where ``ensure-exporter`` keeps each node's exporter log (``<node>.log``) and the
    ``<pid> <create_time>`` of the exporter it started (``<node>.pid``)."""
    return pathlib.Path(workdir).expanduser() / "exporter"


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Readers see either no file or the whole text: temp file in the same folder + rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_text(path: pathlib.Path) -> str | None:
    """The file's text, or None if it does not exist (yet)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def read_int(path: pathlib.Path) -> int | None:
    text = read_text(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def read_float(path: pathlib.Path) -> float | None:
    text = read_text(path)
    try:
        return float(text.strip()) if text is not None else None
    except ValueError:
        return None


def format_process_ref(pid: int, create_time: float) -> str:
    return f"{pid} {create_time!r}\n"


def read_process_ref(path: pathlib.Path) -> tuple[int, float] | None:
    """``(pid, create_time)`` from a pid file; create_time (psutil, seconds since the epoch)
    tells the process apart from a later one that got the same pid."""
    text = read_text(path)
    if text is None:
        return None
    try:
        pid_text, time_text = text.split()
        return int(pid_text), float(time_text)
    except ValueError:
        return None
