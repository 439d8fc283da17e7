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

A work directory may sit in a place every user can write to (``/tmp``): its directories are
created with mode 0700 and must be this user's own real directories (:func:`private_dirs`),
and the files the agent appends to are opened without following a symbolic link
(:func:`open_append`), so nobody can make the agent write into a file of their choosing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import stat

from ugro.common.files import write_atomically
from ugro.common.identifiers import JOB_ID

COMMAND = "command.json"
OUTPUT = "output.log"
SUPERVISOR_PID = "supervisor.pid"
STARTED_AT = "started_at"
PID = "pid"
EXIT_CODE = "exit_code"


def check_name(value: str, what: str = "name") -> str:
    """``value`` if it is a safe job id or node name, else ValueError naming ``what``. Node
    names are held to the job id's pattern, which allows every inventory node name and is all
    that a path component needs."""
    if not isinstance(value, str) or not JOB_ID.fullmatch(value):
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


class UnsafePath(OSError):
    """A work directory or file that another user could have put there: a symbolic link, or
    a directory that belongs to someone else."""


def private_dirs(workdir: str | os.PathLike[str], *parts: str) -> pathlib.Path:
    """``workdir/part/part...`` as directories of this user, created with mode 0700 where
    missing (the work directory's missing parents too); UnsafePath if one of them is a
    symbolic link or another user's, OSError if it cannot be made."""
    directory = pathlib.Path(workdir).expanduser()
    _make_missing(directory)
    _check_own_directory(directory)
    for part in parts:
        directory = directory / part
        with contextlib.suppress(FileExistsError):  # made before, or by a concurrent agent
            os.mkdir(directory, 0o700)
        _check_own_directory(directory)
    return directory


def _make_missing(directory: pathlib.Path) -> None:
    missing = []
    while True:
        try:
            os.lstat(directory)
            break
        except FileNotFoundError:
            missing.append(directory)
            directory = directory.parent
    for each in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(each, 0o700)


def _check_own_directory(directory: pathlib.Path) -> None:
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePath(errno.ELOOP, f"{directory} is a symbolic link, not a directory of its own")
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
    if info.st_uid != os.geteuid():
        raise UnsafePath(
            errno.EPERM,
            f"{directory} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}); "
            "choose a work directory of your own (defaults.workdir in the inventory)",
        )


def open_append(path: pathlib.Path) -> int:
    """A descriptor that appends to ``path`` (created 0600), never through a symbolic link:
    UnsafePath if one is planted there."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafePath(
                errno.ELOOP, f"{path} is a symbolic link; refusing to write through it"
            ) from None
        raise


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Readers see either no file or the whole text. Private (0600), in a job directory that
    must already exist: it was made and checked by :func:`private_dirs`."""
    write_atomically(path, text, mode=0o600, make_parents=False)


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
