"""A job's own record, written at launch, says where the job runs: `status`, `stop` and `logs`
act there whatever became of the inventory since, a node where the job cannot be found is
never taken for stopped, and a damaged record is one clear line, not a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
import yaml

from tests.launcher.test_interrupted_launch import TRAINER, HeldLaunch, free_port
from tests.launcher.test_interrupted_launch import job_processes as processes_here
from tests.launcher.test_launch import LAUNCH, job_processes
from tests.support import wait_for
from ugro.launcher.launch import stop_watcher
from ugro.launcher.records import JobRecord


def test_stop_after_the_inventory_was_edited_and_deleted_stops_the_job(launcher):
    started = launcher.run("moved", nproc=1)
    assert started.returncode == 0, started.stderr + started.stdout
    assert launcher.record("moved")["access"]["nodes"]["node-b"]["host"]
    # Another work directory in the inventory: the job's files are not there.
    data = yaml.safe_load(launcher.inventory.read_text())
    data["defaults"]["workdir"] = str(launcher.inventory.parent / "elsewhere")
    launcher.inventory.write_text(yaml.safe_dump(data))
    status = launcher("status", "moved")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "node-b           running" in status.stdout
    logs = launcher("logs", "moved")
    assert logs.returncode == 0, logs.stderr
    launcher.inventory.unlink()

    stopped = launcher("stop", "moved")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "node-a           stopped" in stopped.stdout
    assert "node-b           stopped" in stopped.stdout
    assert job_processes(launcher.cluster, "moved") == []
    assert launcher.record("moved")["state"] == "stopped"
    assert not (launcher.targets_dir / "ranks" / "moved.json").exists()


def watchers(job_id: str) -> list[int]:
    return [
        process.pid
        for process in psutil.process_iter(["cmdline", "status"])
        if "ugro.launcher.follower" in (process.info["cmdline"] or [])
        and job_id in process.info["cmdline"]
        and process.info["status"] != psutil.STATUS_ZOMBIE
    ]


@pytest.mark.parametrize(
    ("module", "ours"),
    [
        ("ugro.launcher.follower", True),
        ("ugro.launcher.watch", True),  # started before the rename, still running after it
        ("ugro.console.watch", False),  # a pid reused by another program is left alone
    ],
)
def test_stop_ends_the_recorded_watcher_under_its_old_and_new_module_name(module, ours):
    stand_in = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", module, "old-job"],
        stdin=subprocess.DEVNULL,
    )
    try:
        record = JobRecord(
            job_id="old-job", inventory="/nowhere.yml", nodes=["node-a"], nproc_per_node=1,
            command=["train.py"], rdzv_port=29500, started_at=0.0, watcher_pid=stand_in.pid,
        )  # fmt: skip
        wait_for(lambda: module in psutil.Process(stand_in.pid).cmdline(), 10, "its cmdline")
        assert stop_watcher(record) is ours
        if ours:
            assert stand_in.wait(10) == -signal.SIGTERM
        else:
            assert stand_in.poll() is None
    finally:
        stand_in.kill()
        stand_in.wait()


def test_a_node_without_the_job_directory_is_not_stopped_and_the_job_is_kept(launcher, tmp_path):
    # Ranks that never talk to each other: a training job's rank on node-b would end on its own
    # once node-a's rank, its peer in every collective, is stopped; this one runs on.
    (tmp_path / "idle.py").write_text("import time\ntime.sleep(600)\n")
    started = launcher.run("hidden", f"--chdir={tmp_path}", command=["idle.py"], nproc=1)
    assert started.returncode == 0, started.stderr + started.stdout
    jobs = launcher.inventory.parent / "nodes" / "jobs"
    # The job's directory on node-b goes away (a cleaner, a hand): its agent answers "unknown".
    (jobs / "hidden" / "node-b").rename(jobs / "node-b-hidden")

    stopped = launcher("stop", "hidden")
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert "node-b           NOT stopped: node-b: no job hidden in" in stopped.stdout
    assert "job hidden was NOT stopped on node-b" in stopped.stderr
    assert "targets removed" not in stopped.stdout
    assert launcher.record("hidden")["state"] != "stopped"
    assert (launcher.targets_dir / "ranks" / "hidden.json").exists()
    assert any(node == "node-b" for node, _, _ in job_processes(launcher.cluster, "hidden"))
    assert watchers("hidden")  # something still follows the job

    (jobs / "node-b-hidden").rename(jobs / "hidden" / "node-b")
    again = launcher("stop", "hidden")
    assert again.returncode == 0, again.stdout + again.stderr
    assert job_processes(launcher.cluster, "hidden") == []
    assert not (launcher.targets_dir / "ranks" / "hidden.json").exists()


def good_record(job_id: str) -> dict:
    return {
        "job_id": job_id,
        "inventory": "/nonexistent/inventory.yml",
        "nodes": ["node-a"],
        "nproc_per_node": 1,
        "command": ["-m", "ugro.trainer.train"],
        "rdzv_port": 29500,
        "started_at": 1_700_000_000.0,
        "state": "finished",
        "ended_at": 1_700_000_100.0,
    }


def test_a_damaged_record_is_named_in_one_line_by_every_verb(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "fine.json").write_text(json.dumps(good_record("fine")))
    (state / "garbled.json").write_text('{"job_id": "garbled", ')
    (state / "typed.json").write_text(json.dumps({**good_record("typed"), "nodes": "node-a"}))
    (state / "timeless.json").write_text(
        json.dumps({**good_record("timeless"), "started_at": "yesterday"})
    )
    env = {**os.environ, "UGRO_STATE_DIR": str(state)}

    def launch(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*LAUNCH, *args], capture_output=True, text=True, timeout=60, env=env,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    expected = {
        "garbled": f"{state / 'garbled.json'}: not a job record (invalid JSON: ",
        "typed": f"{state / 'typed.json'}: nodes: expected a non-empty list of node names, "
        "got 'node-a'",
        "timeless": f"{state / 'timeless.json'}: started_at: expected seconds since the epoch, "
        "got 'yesterday'",
    }
    for job_id, line in expected.items():
        for verb in ("status", "stop", "logs"):
            result = launch(verb, job_id, "--known-hosts=/nonexistent")
            assert result.returncode == 2, (verb, result.stdout + result.stderr)
            assert result.stderr.startswith(f"ugro-launch: {line}"), (verb, result.stderr)
            assert len(result.stderr.splitlines()) == 1, result.stderr

    listing = launch("list")
    assert listing.returncode == 1
    assert "fine" in listing.stdout and "finished" in listing.stdout
    assert "garbled" not in listing.stdout
    for line in expected.values():
        assert f"ugro-launch: {line}" in listing.stderr
    assert len(listing.stderr.splitlines()) == 3, listing.stderr


def test_a_one_node_start_failure_does_not_speak_of_other_nodes(tmp_path):
    held = HeldLaunch(tmp_path)
    try:
        held.release()  # no hold: the start answers as soon as it knows
        (held.workdir / "jobs" / "single" / "here").mkdir(parents=True)  # taken: start fails
        result = held(
            "run", f"--inventory={held.inventory}", "--job-id=single",
            f"--rdzv-port={free_port()}", "--known-hosts=/nonexistent", "--", *TRAINER,
        )  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr
        assert "torchrun could not be started on here" in result.stderr
        assert "other nodes" not in result.stderr
        assert not held.record_file("single").exists()
    finally:
        held.close()


def test_a_job_record_keeps_how_its_nodes_were_reached(tmp_path):
    """What `stop` relies on, written before anything starts (an interrupted launch too)."""
    held = HeldLaunch(tmp_path)
    try:
        launcher = held.start("kept")
        wait_for(held.record_file("kept").exists, 60, "the job's record")
        held.wait_until_torchrun_runs("kept")
        record = json.loads(held.record_file("kept").read_text())
        assert record["state"] == "launching"
        assert record["access"]["workdir"] == str(held.workdir)
        assert record["access"]["nodes"] == {
            "here": {"host": "localhost", "ssh_port": 22, "user": None, "identity_file": None}
        }
        assert record["access"]["prometheus"]["targets_dir"] == str(held.targets_dir)
        launcher.kill()
        launcher.communicate()
        held.inventory.unlink()  # the interrupted launch is still found and stopped
        stopped = held("stop", "kept", "--known-hosts=/nonexistent")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        wait_for(lambda: not processes_here("kept"), 30, "no process of kept left")
    finally:
        held.close()
