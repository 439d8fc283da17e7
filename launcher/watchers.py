"""Keeping one watcher alive per job that has not ended.

A job's watcher (follower.py) is the only thing that settles the job when it ends: it removes a
finished job's Prometheus targets and records the end. A watcher that is killed (out of memory,
a reboot of the machine that launched the job, a stray ``kill``) would leave a job that ends
later registered, and RUNNING in its record, for ever. So every ``ugro-launch`` command that
reads a job still going checks its watcher (:func:`watcher_alive`) and starts a new one where it
died (:func:`revive`); the new watcher settles the job on its first poll if it has ended
meanwhile.

Two watchers must never follow one job (two would stop nodes, write the record and take stack
dumps twice): each holds an exclusive ``flock`` on ``STATE_DIR/JOB.watch.lock`` for as long as it
runs (:class:`WatcherLock`). The kernel drops the lock when its holder dies, however it dies, so
a lock that is held is a watcher that runs. A second watcher (two commands revived the same job
at once) finds the lock held and ends without touching the job. The lock file holds the pid of
the watcher that holds it, for diagnostics; it is never deleted (a lock file removed while a
process opens it could give two processes "the" lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from . import records
from .launch import WATCHER_MODULES, start_watcher
from .remote import SshOptions

# A job whose watcher must run: RUNNING, or PENDING in Slurm's queue. LAUNCHING is not one: its
# launcher starts the watcher once the job runs, and a launch whose launcher died (shown as
# INTERRUPTED) has nothing to follow until `ugro-launch stop` ends it.
WATCHED = (records.RUNNING, records.PENDING)
# A watcher waits this long for the lock before it concludes that another watcher holds it:
# a command that checks the lock (watcher_alive) holds it for an instant, and a watcher that
# was just sent SIGTERM (`stop` restarting one) still holds it until the kernel has ended it.
LOCK_WAIT_SECONDS = 5.0
# How long a command waits for the watcher it started to take the job over (take the lock and
# write its pid into the record): the new process imports the launcher first.
TAKE_OVER_SECONDS = 60.0


class WatcherRunning(RuntimeError):
    """Another watcher holds the job's lock; the message names its pid where it is known."""


def lock_path(job_id: str) -> pathlib.Path:
    return records.state_dir() / f"{job_id}.watch.lock"


class WatcherLock:
    """The job's watcher lock, held from :meth:`acquire` until :meth:`release` or the holder's
    death."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._fd: int | None = None

    def acquire(self, wait_seconds: float = LOCK_WAIT_SECONDS) -> None:
        """Take the lock, waiting up to ``wait_seconds`` for it; WatcherRunning if it stays
        held."""
        path = lock_path(self.job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_pid(fd)
                    os.close(fd)
                    who = f" (pid {holder})" if holder else ""
                    raise WatcherRunning(
                        f"job {self.job_id}: another watcher{who} follows it ({path} is locked)"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> WatcherLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def lock_held(job_id: str) -> bool:
    """True while a watcher of the job holds its lock."""
    try:
        fd = os.open(lock_path(job_id), os.O_RDONLY)
    except FileNotFoundError:
        return False  # no watcher of this version ever ran for the job
    except OSError:
        return False  # unreadable here: starting a watcher will say why
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock this check may have taken
    return False


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None


def recorded_watcher_runs(record: records.JobRecord) -> bool:
    """True if the record's ``watcher_pid`` is a live watcher of this job: the pid alone could
    be another program's by now (pids are reused), so its command line must name the watcher
    module and the job, as launch.stop_watcher checks."""
    if record.watcher_pid is None:
        return False
    try:
        process = psutil.Process(record.watcher_pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by its parent
            return False
        cmdline = process.cmdline()
    except psutil.Error:
        return False
    return any(name in cmdline for name in WATCHER_MODULES) and record.job_id in cmdline


def watcher_alive(record: records.JobRecord) -> bool:
    """Whether a watcher follows the job: the one the record names, or any holding the lock
    (a watcher started before the lock existed holds none, hence the pid too)."""
    return recorded_watcher_runs(record) or lock_held(record.job_id)


def claim(job_id: str) -> records.JobRecord | None:
    """Called by a watcher holding the lock: write its own pid into the job's record, so that
    the record names the watcher that runs, whoever started it. None (nothing written) if the
    job no longer needs a watcher."""
    record = records.load_record(job_id)
    if record.state not in WATCHED:
        return None
    if record.watcher_pid != os.getpid():
        record.watcher_pid = os.getpid()
        record.save()
    return record


@dataclass(frozen=True)
class Revival:
    job_id: str
    dead_pid: int | None
    new_pid: int | None  # None: it could not be started (``error`` says why)
    took_over: bool  # the new watcher holds the lock and is named in the record
    error: str | None = None

    def message(self) -> str:
        before = (
            f"its watcher (pid {self.dead_pid}) had died"
            if self.dead_pid is not None
            else "it had no watcher"
        )
        if self.new_pid is None:
            return f"job {self.job_id}: {before}; a new one cannot be started: {self.error}"
        if self.took_over:
            return f"job {self.job_id}: {before}; restarted it (pid {self.new_pid})"
        log = records.state_dir() / f"{self.job_id}.watch.log"
        return (
            f"job {self.job_id}: {before}; started a new one (pid {self.new_pid}), which has "
            f"not taken the job over within {TAKE_OVER_SECONDS:g} s: see {log}"
        )


def revive(
    jobs: list[records.JobRecord], options_of: Callable[[records.JobRecord], SshOptions]
) -> list[Revival]:
    """Start a watcher for each job in ``jobs`` that needs one and has none; wait until each new
    watcher has taken its job over. ``options_of(record)`` gives the SSH options to start it
    with. A job that another command revived at the same time is left out: only one watcher
    takes it over, and only its starter reports it."""
    started: dict[str, tuple[int | None, int]] = {}
    revivals = []
    for record in jobs:
        if record.state in WATCHED and not watcher_alive(record):
            try:
                pid = start_watcher(record, options_of(record))
            except OSError as error:  # e.g. another user's state directory
                revivals.append(Revival(record.job_id, record.watcher_pid, None, False, str(error)))
                continue
            started[record.job_id] = (record.watcher_pid, pid)
    deadline = time.monotonic() + TAKE_OVER_SECONDS
    for job_id, (dead, new) in started.items():
        outcome = _take_over(job_id, new, deadline)
        if outcome is not None:
            revivals.append(Revival(job_id, dead, new, took_over=outcome))
    return revivals


def _take_over(job_id: str, pid: int, deadline: float) -> bool | None:
    """True once the watcher ``pid`` is named in the job's record; None if it ended without
    (another watcher had the job, or the job had ended); False if neither happens in time."""
    while True:
        try:
            record = records.load_record(job_id)
        except records.RecordError:
            return None  # deleted meanwhile: nothing to follow
        if record.watcher_pid == pid:
            return True
        if record.state not in WATCHED or not _runs(pid):
            return None
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _runs(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
