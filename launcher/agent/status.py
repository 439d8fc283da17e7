"""``status`` and ``stop``: what became of a job, and ending it with every process it started.

torchrun puts each worker in a session of its own, so torchrun's process group does not hold
the whole job: ``stop`` signals that group, then finds what is left by the job's marker
(:data:`~ugro.launcher.agent.base.JOB_MARKER_ENV`) in the processes' environments.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import time
from typing import Any

import psutil

from ..jobfiles import (
    EXIT_CODE,
    PID,
    STARTED_AT,
    SUPERVISOR_PID,
    read_float,
    read_int,
    read_process_ref,
)
from .base import JOB_MARKER_ENV, START_PID_TIMEOUT_SECONDS, wait_until

STOP_AFTER_KILL_SECONDS = 5.0


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


def process_alive(ref: tuple[int, float] | None) -> bool:
    return _process_state(ref) == "alive"


def _leader_alive(directory: pathlib.Path) -> bool:
    """Is torchrun still running? A zombie counts while its supervisor lives, about to
    record its exit; after the supervisor's death it waits for whoever adopted it."""
    state = _process_state(read_process_ref(directory / PID))
    return state == "alive" or (
        state == "zombie" and process_alive(read_process_ref(directory / SUPERVISOR_PID))
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
    if (
        exit_code is None
        and not alive
        and process_alive(read_process_ref(directory / SUPERVISOR_PID))
    ):
        # The supervisor lives: torchrun is being started, or its exit is being written.
        if leader is None:
            wait_until(
                lambda: (directory / PID).exists() or (directory / EXIT_CODE).exists(),
                START_PID_TIMEOUT_SECONDS,
            )
            leader = read_process_ref(directory / PID)
            result["pid"] = leader[0] if leader else None
            result["started_at"] = read_float(directory / STARTED_AT)
            alive = _leader_alive(directory)
        else:
            wait_until(lambda: (directory / EXIT_CODE).exists(), 2.0)
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
        recorded = (directory / EXIT_CODE).exists() or not process_alive(supervisor)
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
        if process_alive(leader):
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
