"""``logs``, and the log excerpts other verbs quote: a job's output.log, its tail or followed."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import sys
import time

from ..jobfiles import EXIT_CODE, OUTPUT
from .base import EXIT_ERROR, PROG, describe_os_error
from .status import job_status

FOLLOW_POLL_SECONDS = 0.2


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


def tail_text(path: pathlib.Path, lines: int) -> str:
    try:
        data, _ = _tail(path, lines)
    except OSError as error:
        return f"({path}: {describe_os_error(error)})"
    return data.decode(errors="replace").rstrip("\n")


def head_and_tail_text(path: pathlib.Path, lines: int) -> str:
    """A short log whole; a longer one's first and last ``lines // 2`` lines. A worker's own
    error (a script that cannot be opened) comes first, torchrun's summary of it last."""
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"({path}: {describe_os_error(error)})"
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
