"""``start`` and ``supervise``: a job handed to a detached supervisor, which records its end.

``start`` hands the job to a detached supervisor (``supervise``, in its own session) that starts
ARGV in a second new session, so that ``stop`` can signal torchrun's process group without
hitting the supervisor, which then records the exit status. Nothing is tied to the SSH session:
it may close as soon as ``start`` has answered.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import psutil

from .. import jobfiles
from ..jobfiles import (
    COMMAND,
    EXIT_CODE,
    OUTPUT,
    PID,
    STARTED_AT,
    SUPERVISOR_PID,
    UnsafePath,
    read_int,
    read_process_ref,
    write_atomic,
)
from .base import (
    EXIT_CANNOT_EXECUTE,
    JOB_MARKER_ENV,
    START_PID_TIMEOUT_SECONDS,
    describe_os_error,
    detach,
    environment_outside_jobs,
    wait_until,
)
from .logs import head_and_tail_text, tail_text
from .stacks import rank_processes
from .status import stop_job

# A torchrun that exits before its ranks have run this long is reported as a failed start. Its
# workers fail at once on a wrong script path or working directory, and torchrun notices and
# exits about 2 s later. Counted from the ranks' start, not torchrun's: on a loaded machine
# torchrun's own imports can take longer than this, and a fixed window from its start would call
# a start that is about to fail "started".
START_SETTLE_SECONDS = 5.0
# Ranks appear only once every node's torchrun has joined the rendezvous. A torchrun with no
# ranks after this long is reported as started (its rendezvous waits for a slow node, or for one
# whose start failed, which the launcher then stops): well within the launcher's SSH command
# timeout, and long enough for torchrun's imports on a loaded machine.
START_RENDEZVOUS_SECONDS = 15.0
START_FAILURE_LOG_LINES = 20


def _runs_torchrun(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is torchrun (as ugro-launch starts it, or the console script)."""
    return os.path.basename(argv[0]) == "torchrun" or list(argv[1:3]) == [
        "-m",
        "torch.distributed.run",
    ]


def _wait_until_settled(directory: pathlib.Path, argv: Sequence[str]) -> None:
    """Until the command has exited, or torchrun's ranks have run for START_SETTLE_SECONDS (any
    other command: until it has run that long), or START_RENDEZVOUS_SECONDS have passed without
    ranks."""
    if not _runs_torchrun(argv):
        wait_until(lambda: (directory / EXIT_CODE).exists(), START_SETTLE_SECONDS)
        return
    deadline = time.monotonic() + START_RENDEZVOUS_SECONDS
    ranks_since: float | None = None
    while time.monotonic() < deadline:
        if (directory / EXIT_CODE).exists():
            return
        ref = read_process_ref(directory / PID)
        if ref is not None and rank_processes(ref[0]):
            now = time.monotonic()
            ranks_since = now if ranks_since is None else ranks_since
            if now - ranks_since >= START_SETTLE_SECONDS:
                return
        else:  # none yet, or they exited: torchrun is about to exit or restart them
            ranks_since = None
        time.sleep(0.1)


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
            env=environment_outside_jobs(),
            start_new_session=True,
        )

    def started_or_ended() -> bool:
        return (directory / PID).exists() or (directory / EXIT_CODE).exists()

    if not wait_until(started_or_ended, START_PID_TIMEOUT_SECONDS):
        how = "exited" if supervisor.poll() is not None else "hangs"
        if supervisor.poll() is None:  # give up on it for good: no job may start later
            supervisor.kill()
            supervisor.wait()
            if (directory / PID).exists():
                stop_job(directory, grace=0)
        return {
            "state": "failed",
            "reason": f"the supervisor {how}, torchrun not started after "
            f"{START_PID_TIMEOUT_SECONDS:g} s: {tail_text(log, START_FAILURE_LOG_LINES)}",
        }
    detach(supervisor)
    _wait_until_settled(directory, argv)
    exit_code = read_int(directory / EXIT_CODE)
    if exit_code is not None and exit_code != 0:  # a quick success is no failed start
        return {
            "state": "failed",
            "reason": f"exited with code {exit_code} at once: "
            f"{head_and_tail_text(log, START_FAILURE_LOG_LINES)}",
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
                f"{describe_os_error(error)}\n".encode()
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
