"""A launch cut short: ugro-launch interrupted, killed, or stopped while it starts a job.

The node is this machine (a localhost node, no SSH). Its "Python" is a wrapper that holds the
agent's ``start`` answer until the test releases it: torchrun is then running on the node but
the launcher has not heard back, so every interruption lands exactly half-way.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shlex
import signal
import subprocess
import sys

import psutil
import pytest
import yaml

from tests.support import wait_for
from ugro.common.ports import free_port

LAUNCH = [sys.executable, "-m", "ugro.launcher.cli"]
TRAINER = [
    *("-m", "ugro.trainer.train", "--steps", "1000000"),
    *("--width", "64", "--depth", "1", "--batch-size", "8", "--context", "32"),
]
NODE = "here"


def job_processes(job_id: str) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            ours = (process.info["environ"] or {}).get("UGRO_JOB_ID") == job_id
            if ours and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid}: {' '.join(process.info['cmdline'] or [])}")
        except psutil.Error:
            continue
    return found


class HeldLaunch:
    """A launch whose agent ``start`` waits for :meth:`release`: on this machine, or on the SSH
    nodes of ``cluster`` (network namespaces; they share this filesystem)."""

    def __init__(self, tmp_path: pathlib.Path, cluster=None) -> None:
        self.tmp_path = tmp_path
        self.state_dir = tmp_path / "state"
        self.workdir = tmp_path / "work"
        self.targets_dir = tmp_path / "targets"
        self.release_file = tmp_path / "release"
        self.exporter_port = free_port()
        python = tmp_path / "node-python"
        python.write_text(
            "#!/bin/sh\n"
            f'{shlex.quote(sys.executable)} "$@"\n'
            "code=$?\n"
            # argv: -m ugro.launcher.agent VERB ...
            'if [ "$3" = start ]; then\n'
            f"  while [ ! -e {shlex.quote(str(self.release_file))} ]; do sleep 0.1; done\n"
            "fi\n"
            "exit $code\n"
        )
        python.chmod(0o755)
        defaults = {
            "python": str(python),
            "workdir": str(self.workdir),
            "min_free_disk_gb": 0,
            "exporter_port": self.exporter_port,
            "metrics_base_port": free_port(),
            # No Prometheus here: no scrape comes for a rank to wait for at its end.
            "env": {"OMP_NUM_THREADS": "1", "UGRO_FINAL_SCRAPE_TIMEOUT": "0"},
        }
        nodes = [{"name": NODE, "host": "localhost"}]
        self.known_hosts = "/nonexistent"
        if cluster is not None:
            defaults.update(user="root", identity_file=str(cluster.client_key))
            nodes = [{"name": node.name, "host": node.address} for node in cluster.nodes]
            self.known_hosts = str(cluster.known_hosts)
        self.node_names = [node["name"] for node in nodes]
        self.inventory = tmp_path / "inventory.yml"
        self.inventory.write_text(
            yaml.safe_dump(
                {
                    "defaults": defaults,
                    "prometheus": {"targets_dir": str(self.targets_dir)},
                    "nodes": nodes,
                }
            )
        )
        self.env = {**os.environ, "UGRO_STATE_DIR": str(self.state_dir)}

    def start(self, job_id: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*LAUNCH, "run", f"--inventory={self.inventory}", f"--job-id={job_id}",
             f"--rdzv-port={free_port()}", f"--known-hosts={self.known_hosts}", "--", *TRAINER],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=self.env,
        )  # fmt: skip

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*LAUNCH, *args], capture_output=True, text=True, timeout=120, env=self.env,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def wait_until_torchrun_runs(self, job_id: str) -> None:
        """The job is running on every node, and the launcher has not heard back."""
        for node in self.node_names:
            pid_file = self.workdir / "jobs" / job_id / node / "pid"
            wait_for(pid_file.exists, 60, f"torchrun started on {node}")
        wait_for(lambda: job_processes(job_id), 30, "the job's processes")

    def release(self) -> None:
        self.release_file.touch()

    def record_file(self, job_id: str) -> pathlib.Path:
        return self.state_dir / f"{job_id}.json"

    def close(self) -> None:
        self.release()
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if "ugro.exporter" in cmdline and str(self.exporter_port) in cmdline:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()


@pytest.fixture
def held(tmp_path):
    launch = HeldLaunch(tmp_path)
    yield launch
    launch.close()


def assert_nothing_of(job_id: str) -> None:
    wait_for(lambda: not job_processes(job_id), 30, f"no process of {job_id} left")


def test_sigterm_half_way_rolls_the_launch_back(held):
    launcher = held.start("halfway")
    held.wait_until_torchrun_runs("halfway")
    record = yaml.safe_load(held.record_file("halfway").read_text())
    assert record["state"] == "launching"
    assert "launching" in held("list").stdout
    launcher.send_signal(signal.SIGTERM)
    held.release()  # the agent answers; the launcher then stops what it started
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, out + err
    assert "ugro-launch: interrupted" in err
    assert_nothing_of("halfway")
    assert not held.record_file("halfway").exists()
    assert not (held.targets_dir / "ranks" / "halfway.json").exists()


def test_a_launcher_killed_half_way_leaves_a_record_that_stop_acts_on(held):
    launcher = held.start("orphaned")
    held.wait_until_torchrun_runs("orphaned")
    launcher.kill()
    launcher.communicate()
    held.release()
    listing = held("list")
    assert "orphaned" in listing.stdout and "interrupted" in listing.stdout, listing.stdout
    status = held("status", "orphaned", "--known-hosts=/nonexistent")
    assert "job orphaned: interrupted" in status.stdout, status.stdout + status.stderr
    assert "ugro-launch stop orphaned" in status.stdout
    assert f"{NODE:<16} running" in status.stdout
    assert job_processes("orphaned")  # still training: exactly what the record is for
    stopped = held("stop", "orphaned", "--known-hosts=/nonexistent")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert_nothing_of("orphaned")
    assert "stopped" in held("list").stdout


def test_stop_during_a_launch_interrupts_the_launcher_which_rolls_back(held):
    launcher = held.start("raced")
    held.wait_until_torchrun_runs("raced")
    stop = subprocess.Popen(
        [*LAUNCH, "stop", "raced", "--known-hosts=/nonexistent"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=held.env,
    )  # fmt: skip
    assert "interrupting its launcher" in stop.stdout.readline()
    held.release()
    out, err = stop.communicate(timeout=150)
    assert stop.returncode == 0, out + err
    assert "its launch was rolled back; nothing is left" in out
    assert launcher.wait(timeout=30) == 130
    assert_nothing_of("raced")
    assert not held.record_file("raced").exists()


def test_two_launches_with_one_job_id_start_one_job(held):
    first = held.start("twice")
    held.wait_until_torchrun_runs("twice")
    second = held("run", f"--inventory={held.inventory}", "--job-id=twice",
                  "--known-hosts=/nonexistent", "--", *TRAINER)  # fmt: skip
    assert second.returncode == 1
    assert "job 'twice' already exists" in second.stderr
    held.release()
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, out + err
    assert held("stop", "twice", "--known-hosts=/nonexistent").returncode == 0
    assert_nothing_of("twice")


def test_a_launcher_killed_half_way_on_two_ssh_nodes_is_stopped_on_both(
    tmp_path, namespace_cluster
):
    held = HeldLaunch(tmp_path, namespace_cluster(2))
    try:
        launcher = held.start("split")
        held.wait_until_torchrun_runs("split")
        launcher.kill()
        launcher.communicate()
        held.release()
        status = held("status", "split", f"--known-hosts={held.known_hosts}")
        assert "job split: interrupted" in status.stdout, status.stdout + status.stderr
        for node in held.node_names:
            assert f"{node:<16} running" in status.stdout
        stopped = held("stop", "split", f"--known-hosts={held.known_hosts}")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert_nothing_of("split")
    finally:
        held.close()


def test_a_relative_chdir_is_refused_before_anything_starts(held):
    result = held("run", f"--inventory={held.inventory}", "--chdir=nanogpt", "--", "train.py")
    assert result.returncode == 2
    assert "--chdir 'nanogpt': expected an absolute path (or ~/...)" in result.stderr
    assert not held.state_dir.exists() or list(held.state_dir.iterdir()) == []


def test_a_script_that_cannot_start_fails_the_launch_and_leaves_nothing(held):
    """torchrun starts, its workers cannot open the script, torchrun exits ~2 s later: that is
    a failed start, rolled back, not a job "started" whose targets then raise alerts."""
    held.release()  # no hold: the start answers as soon as it knows
    result = held(
        "run", f"--inventory={held.inventory}", "--job-id=no-script", f"--chdir={held.tmp_path}",
        f"--rdzv-port={free_port()}", "--known-hosts=/nonexistent", "--", "no_such_train.py",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "torchrun could not be started on here" in result.stderr
    assert "can't open file" in result.stderr  # the end of torchrun's output, to act on
    assert "started on" not in result.stdout
    assert not held.record_file("no-script").exists()
    assert not (held.targets_dir / "ranks" / "no-script.json").exists()
    assert_nothing_of("no-script")


def test_stop_exporters_stops_what_run_started_and_forgets_its_target(held):
    launcher = held.start("exported")
    held.wait_until_torchrun_runs("exported")
    refused = held("stop-exporters", f"--inventory={held.inventory}")
    assert refused.returncode == 2
    assert "jobs launched from here run on here (exported)" in refused.stderr
    held.release()
    launcher.communicate(timeout=120)
    assert held("stop", "exported", "--known-hosts=/nonexistent").returncode == 0

    def exporters() -> list[int]:
        return [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if "ugro.exporter" in (p.info["cmdline"] or [])
            and any(str(held.exporter_port) in part for part in p.info["cmdline"])
        ]

    node_target = held.targets_dir / "nodes" / f"{NODE}.json"
    assert exporters() and node_target.exists()
    stopped = held("stop-exporters", f"--inventory={held.inventory}", "--known-hosts=/nonexistent")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"{NODE:<16} stopped" in stopped.stdout
    assert exporters() == []
    assert not node_target.exists()  # Prometheus does not page about it
    again = held("stop-exporters", f"--inventory={held.inventory}", "--known-hosts=/nonexistent")
    assert f"{NODE:<16} not_running" in again.stdout
