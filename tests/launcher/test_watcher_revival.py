"""A job whose watcher was killed is still settled when it ends: the next `ugro-launch` command
that reads it starts a new watcher, which deregisters a finished job and records a failed one
(keeping its targets), and never two watchers follow one job. Real sshd nodes and torchrun;
the Slurm side is in test_slurm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

from tests.launcher.test_launch import CRASHING_AFTER_START, LAUNCH, SMALL_TRAINER, job_processes
from tests.launcher.test_record_is_the_truth import watchers
from tests.support import wait_for
from ugro.launcher.records import JobRecord
from ugro.launcher.slurm_jobs import parse_sacct
from ugro.launcher.watchers import WatcherLock, lock_held, watcher_alive

# Long enough after the launch returns for the test to kill the watcher before the job ends.
SHORT_JOB = [*SMALL_TRAINER[:3], "20", *SMALL_TRAINER[4:], "--start-delay=5"]


def kill_watcher(launcher, job_id: str) -> int:
    """SIGKILL the job's watcher, as the OOM killer would; its pid."""
    pid = launcher.record(job_id)["watcher_pid"]
    assert pid in watchers(job_id)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid not in watchers(job_id), 30, f"watcher {pid} gone")
    return pid


def revived_pid(stderr: str, job_id: str, dead: int) -> int:
    prefix = f"ugro-launch: job {job_id}: its watcher (pid {dead}) had died; restarted it (pid "
    (line,) = [line for line in stderr.splitlines() if line.startswith(prefix)]
    return int(line[len(prefix) :].rstrip(")"))


def test_a_job_that_finishes_after_its_watcher_was_killed_is_deregistered_by_status(launcher):
    started = launcher.run("orphan-ends", command=SHORT_JOB, nproc=1)
    assert started.returncode == 0, started.stderr + started.stdout
    dead = kill_watcher(launcher, "orphan-ends")
    wait_for(lambda: not job_processes(launcher.cluster, "orphan-ends"), 180, "the job's end")
    # The defect: nobody settles the job; its ranks stay registered and its record running.
    assert (launcher.targets_dir / "ranks" / "orphan-ends.json").exists()
    assert launcher.record("orphan-ends")["state"] == "running"

    status = launcher("status", "orphan-ends")
    assert status.returncode == 0, status.stdout + status.stderr
    new = revived_pid(status.stderr, "orphan-ends", dead)
    assert new != dead
    wait_for(lambda: launcher.record("orphan-ends")["state"] == "finished", 120, "finished")
    record = launcher.record("orphan-ends")
    assert record["watcher_pid"] == new
    assert {state["state"] for state in record["node_states"].values()} == {"finished"}
    assert not (launcher.targets_dir / "ranks" / "orphan-ends.json").exists()
    wait_for(lambda: not watchers("orphan-ends"), 30, "the new watcher's end")
    # An ended job needs no watcher: reading it again starts none.
    again = launcher("status", "orphan-ends")
    assert "watcher" not in again.stderr, again.stderr
    assert "job orphan-ends: finished" in again.stdout


def test_a_job_that_fails_after_its_watcher_was_killed_is_recorded_failed_and_keeps_targets(
    launcher,
):
    started = launcher.run("orphan-fails", command=CRASHING_AFTER_START, nproc=1)
    assert started.returncode == 0, started.stderr + started.stdout
    dead = kill_watcher(launcher, "orphan-fails")

    def node_b_ended() -> bool:
        processes = job_processes(launcher.cluster, "orphan-fails")
        return not [node for node, _, _ in processes if node == "node-b"]

    wait_for(node_b_ended, 180, "rank 1's crash on node-b")
    assert launcher.record("orphan-fails")["state"] == "running"

    listing = launcher("list")  # every job's watcher is checked, not only a named one's
    assert listing.returncode == 0, listing.stdout + listing.stderr
    new = revived_pid(listing.stderr, "orphan-fails", dead)
    wait_for(lambda: launcher.record("orphan-fails")["state"] == "failed", 120, "failed")
    record = launcher.record("orphan-fails")
    assert record["watcher_pid"] == new
    assert record["node_states"]["node-b"]["state"] == "failed"
    # The dead ranks stay registered, so TrainingRanksDown fires until `stop` clears them, and
    # nothing of the job is left running on node-a (the new watcher stops what still runs).
    assert (launcher.targets_dir / "ranks" / "orphan-fails.json").exists()
    wait_for(lambda: not job_processes(launcher.cluster, "orphan-fails"), 60, "node-a stopped")
    stopped = launcher("stop", "orphan-fails")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not (launcher.targets_dir / "ranks" / "orphan-fails.json").exists()


def test_two_commands_at_once_leave_one_watcher_and_a_second_watcher_gives_way(launcher):
    started = launcher.run("one-watcher", "--nodes=node-a", nproc=1)
    assert started.returncode == 0, started.stderr + started.stdout
    dead = kill_watcher(launcher, "one-watcher")
    env = {**os.environ, "UGRO_STATE_DIR": str(launcher.state_dir)}
    readers = [
        subprocess.Popen(
            [*LAUNCH, *verb, f"--known-hosts={launcher.known_hosts}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for verb in (["status", "one-watcher"], ["logs", "one-watcher", "--lines=1"])
    ]
    errors = [reader.communicate(timeout=120)[1] for reader in readers]
    assert [reader.returncode for reader in readers] == [0, 0], errors
    said = [error for error in errors if "had died; restarted it" in error]
    assert len(said) == 1, errors  # one restarted it; the other found it restarted
    new = revived_pid(said[0], "one-watcher", dead)
    assert launcher.record("one-watcher")["watcher_pid"] == new
    assert watchers("one-watcher") == [new]

    # A watcher started by hand while one follows the job ends, and leaves the record alone.
    second = subprocess.run(
        [sys.executable, "-m", "ugro.launcher.follower", "one-watcher",
         f"--known-hosts={launcher.known_hosts}"],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert f"another watcher (pid {new}) follows it" in second.stderr
    assert launcher.record("one-watcher")["watcher_pid"] == new
    assert watchers("one-watcher") == [new]
    assert psutil.Process(new).is_running()

    stopped = launcher("stop", "one-watcher")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    wait_for(lambda: not watchers("one-watcher"), 30, "the watcher's end after stop")
    assert launcher.record("one-watcher")["state"] == "stopped"


def test_a_reused_pid_is_not_taken_for_the_jobs_watcher(tmp_path, monkeypatch):
    monkeypatch.setenv("UGRO_STATE_DIR", str(tmp_path))

    def record_of(pid: int) -> JobRecord:
        return JobRecord(
            job_id="reused", inventory="/nowhere.yml", nodes=["node-a"], nproc_per_node=1,
            command=["train.py"], rdzv_port=29500, started_at=0.0, watcher_pid=pid,
        )  # fmt: skip

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    others = subprocess.Popen([*sleeper, "ugro.console.watch", "reused"])  # another program
    ours = subprocess.Popen([*sleeper, "ugro.launcher.follower", "reused"])
    try:
        for process in (others, ours):
            wait_for(lambda p=process: "reused" in psutil.Process(p.pid).cmdline(), 10, "argv")
        assert not watcher_alive(record_of(others.pid))
        assert watcher_alive(record_of(ours.pid))
        ours.kill()
        ours.wait()
        assert not watcher_alive(record_of(ours.pid))
        # Whatever the record says, a watcher holding the job's lock is alive.
        with WatcherLock("reused"):
            assert lock_held("reused")
            assert watcher_alive(record_of(others.pid))
        assert not lock_held("reused")
    finally:
        for process in (others, ours):
            process.kill()
            process.wait()


def test_sacct_says_how_a_forgotten_job_ended():
    # sacct --jobs=ID --allocations --noheader --parsable2 --format=JobID,State,ExitCode
    cancelled = parse_sacct("812", "812|CANCELLED by 0|0:15\n")
    assert (cancelled.state, cancelled.exit_code) == ("CANCELLED", "0:15")
    assert parse_sacct("812", "812|COMPLETED|0:0\n").state == "COMPLETED"
    assert parse_sacct("812", "812|RUNNING|0:0\n") is None  # not ended there either
    assert parse_sacct("812", "") is None  # accounting does not know it
    assert parse_sacct("812", "8120|FAILED|1:0\n") is None
