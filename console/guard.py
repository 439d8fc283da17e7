"""What a command started, written down, and a guard process that stops it if the command dies.

``ugro demo`` starts servers and a training job that run in sessions of their own (so that the
terminal's Ctrl-C reaches the demo, which stops them in order, and so that ``--keep`` can leave
servers behind). Its own teardown runs on Ctrl-C, SIGTERM and SIGHUP; it cannot run when the
demo is killed with SIGKILL or by the OOM killer. For that, the demo keeps a :class:`Ledger`
(a JSON file) of everything it started, and starts a guard first:

    python -m ugro.console.guard LEDGER   (stdin: a pipe whose write end only the demo holds)

The kernel closes the pipe when the demo exits, however it exits, so the guard wakes at once
(no polling, no pid that could be reused) and stops whatever the ledger still lists. The demo's
own teardown uses the same :meth:`Ledger.stop_all`, removing each entry once it is stopped; after
a normal exit the guard finds the ledger empty. Processes are named by pid *and* start time,
so a pid reused after an entry's process ended is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import psutil

from ugro.common.files import write_atomically

# A launcher interrupted half-way stops what it started on every node first; give it time.
LAUNCHER_GRACE_SECONDS = 90.0
SERVER_GRACE_SECONDS = 10.0
JOB_STOP_TIMEOUT_SECONDS = 120.0

Say = Callable[[str], None]


@dataclass
class OwnedProcess:
    name: str  # for messages: "Prometheus", "ugro-launch run"
    pid: int
    create_time: float
    # "launcher": SIGTERM the process only (it rolls back, then exits); "server": SIGTERM its
    # process group (it leads one), SIGKILL after a grace period.
    kind: str = "server"


@dataclass
class OwnedJob:
    job_id: str
    state_dir: str  # the UGRO_STATE_DIR its record is in


class Ledger:
    """The file of what is owned; every change is written atomically before it matters."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.processes: list[OwnedProcess] = []
        self.jobs: list[OwnedJob] = []

    @classmethod
    def load(cls, path: pathlib.Path) -> Ledger:
        ledger = cls(path)
        with contextlib.suppress(FileNotFoundError):
            data = json.loads(path.read_text())
            ledger.processes = [OwnedProcess(**entry) for entry in data.get("processes", [])]
            ledger.jobs = [OwnedJob(**entry) for entry in data.get("jobs", [])]
        return ledger

    def _save(self) -> None:
        data = {
            "processes": [asdict(entry) for entry in self.processes],
            "jobs": [asdict(entry) for entry in self.jobs],
        }
        write_atomically(self.path, json.dumps(data, indent=2) + "\n")

    def add_process(self, name: str, pid: int, kind: str = "server") -> None:
        try:
            create_time = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            return  # already gone: nothing to stop
        self.processes.append(OwnedProcess(name, pid, create_time, kind))
        self._save()

    def forget_process(self, name: str) -> None:
        """No longer ours to stop (ended, or handed to the user by --keep)."""
        self.processes = [entry for entry in self.processes if entry.name != name]
        self._save()

    def add_job(self, job_id: str, state_dir: pathlib.Path) -> None:
        """Written before the launch starts, so a launch in flight is covered too."""
        self.jobs.append(OwnedJob(job_id, str(state_dir)))
        self._save()

    def stop_all(self, say: Say) -> None:
        """Stop everything listed: launches in flight first (they roll back what they
        started), then jobs, then servers. Each entry is removed once it is stopped."""
        launchers = [entry for entry in self.processes if entry.kind == "launcher"]
        _stop_processes(launchers, LAUNCHER_GRACE_SECONDS, say)
        for entry in launchers:
            self.forget_process(entry.name)
        for job in list(self.jobs):
            _stop_job(job, say)
            self.jobs.remove(job)
            self._save()
        servers = [entry for entry in self.processes if entry.kind == "server"]
        _stop_processes(servers, SERVER_GRACE_SECONDS, say)
        for entry in servers:
            self.forget_process(entry.name)


def _live_process(entry: OwnedProcess) -> psutil.Process | None:
    try:
        process = psutil.Process(entry.pid)
        if abs(process.create_time() - entry.create_time) >= 0.01:
            return None  # the pid was reused
        if process.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(psutil.Error):
                process.wait(0)  # ours to reap, when we are its parent
            return None
        return process
    except psutil.Error:
        return None


def _signal(entry: OwnedProcess, process: psutil.Process, signum: int) -> None:
    with contextlib.suppress(psutil.Error, ProcessLookupError):
        if entry.kind == "server":
            os.killpg(entry.pid, signum)  # a server leads a process group of its own
        else:
            process.send_signal(signum)  # a launcher's rollback must not be signalled


def _stop_processes(entries: list[OwnedProcess], grace: float, say: Say) -> None:
    """SIGTERM all of them at once, SIGKILL what is left after ``grace`` seconds."""
    live = [(entry, process) for entry in entries if (process := _live_process(entry))]
    for entry, process in live:
        say(f"stopping {entry.name} (pid {entry.pid})")
        _signal(entry, process, signal.SIGTERM)
    _, alive = psutil.wait_procs([process for _, process in live], timeout=grace)
    for entry, process in live:
        if process in alive:
            say(f"{entry.name} (pid {entry.pid}) ignored SIGTERM for {grace:g} s: SIGKILL")
            _signal(entry, process, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=SERVER_GRACE_SECONDS)


def _stop_job(job: OwnedJob, say: Say) -> None:
    """``ugro-launch stop``, which also covers a launch that was interrupted half-way (its
    record says LAUNCHING) and is a no-op for a job that ended or was rolled back."""
    if not (pathlib.Path(job.state_dir) / f"{job.job_id}.json").exists():
        return  # never recorded, or its launch was rolled back: nothing runs
    say(f"stopping job {job.job_id}")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ugro.launcher.cli", "stop", job.job_id],
            env={**os.environ, "UGRO_STATE_DIR": job.state_dir},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=JOB_STOP_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        say(f"`ugro-launch stop {job.job_id}` took over {JOB_STOP_TIMEOUT_SECONDS:g} s")
        return
    if result.returncode != 0:
        say(f"`ugro-launch stop {job.job_id}` failed: {result.stderr.strip() or result.stdout}")


def start_guard(ledger: Ledger, log: pathlib.Path) -> tuple[subprocess.Popen, int]:
    """Start the guard of ``ledger``; returns it and the pipe's write end, which the caller
    keeps open for as long as it lives (it is not inherited by the caller's children)."""
    read_end, write_end = os.pipe()
    try:
        with open(log, "ab") as output:
            guard = subprocess.Popen(
                [sys.executable, "-m", "ugro.console.guard", str(ledger.path)],
                stdin=read_end,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not in the terminal's group: Ctrl-C must not stop it
            )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return guard, write_end


def guard(ledger_path: pathlib.Path) -> int:
    # Signals for the owner (a closed terminal's SIGHUP, Ctrl-C) are not for the guard; it ends
    # when the pipe does. SIGTERM and SIGKILL still end it. (A handler, not SIG_IGN, which
    # the processes it starts would inherit.)
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda _signum, _frame: None)

    def say(text: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} guard: {text}", flush=True)

    say(f"on watch (pid {os.getpid()}) over {ledger_path}")
    while os.read(sys.stdin.fileno(), 4096):
        pass  # the owner never writes; EOF means it has exited
    ledger = Ledger.load(ledger_path)
    if ledger.processes or ledger.jobs:
        say("the owner exited without stopping everything it started; stopping the rest")
        ledger.stop_all(say)
        say("done")
    return 0


if __name__ == "__main__":
    sys.exit(guard(pathlib.Path(sys.argv[1])))
