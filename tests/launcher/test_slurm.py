"""ugro-launch through a real Slurm: slurmctld, one slurmd per namespace node, munge.

Every test submits with the real ``sbatch`` from this machine (the head node, where
Prometheus runs), and the job's steps run inside the nodes' network namespaces under their
slurmd, as on real machines. The nodes run ugro-exporter as a service, as a Slurm cluster
does (slurm_jobs.py says why the launcher starts none).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import psutil
import pytest
import yaml

from tests.support import wait_for
from tests.support.stack import alert_stack

from .slurm_cluster import SlurmCluster, slurm_problem
from .test_launch import LAUNCH, SMALL_TRAINER, job_processes

EXPORTER_PORT = 9490


@pytest.fixture
def slurm_cluster(tmp_path, namespace_cluster):
    problem = slurm_problem()
    if problem is not None:
        pytest.fail(f"cannot run Slurm here: {problem}", pytrace=False)
    cluster = namespace_cluster(2)
    slurm = SlurmCluster(cluster, tmp_path / "slurm")
    slurm.start()
    exporter = [sys.executable, "-m", "ugro.exporter", "--listen", f"0.0.0.0:{EXPORTER_PORT}"]
    exporters = [
        node.popen(
            [*exporter, "--node", node.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for node in cluster
    ]
    try:
        yield slurm
    finally:
        for exporter in exporters:
            exporter.terminate()
            exporter.wait(timeout=10)
        slurm.close()


class SlurmLauncher:
    """Runs ugro-launch as a user on a Slurm login node would, with a ``slurm`` inventory."""

    def __init__(self, workdir: pathlib.Path, slurm: SlurmCluster, targets_dir: pathlib.Path):
        self.slurm = slurm
        self.state_dir = workdir / "state"
        self.targets_dir = targets_dir
        self.log_dir = workdir / "slurm-logs"
        self.inventory = workdir / "inventory.yml"
        self.write_inventory(
            {"partition": slurm.PARTITION, "nodes": 2, "log_dir": str(self.log_dir)}
        )

    def write_inventory(
        self, slurm_section: dict, python: str = sys.executable, env: dict | None = None
    ) -> None:
        self.inventory.write_text(
            yaml.safe_dump(
                {
                    "defaults": {
                        "python": python,
                        "exporter_port": EXPORTER_PORT,
                        "env": {"OMP_NUM_THREADS": "1", **(env or {})},
                    },
                    "prometheus": {"targets_dir": str(self.targets_dir)},
                    "slurm": slurm_section,
                }
            )
        )

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*LAUNCH, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.slurm.environment, "UGRO_STATE_DIR": str(self.state_dir)},
        )

    def run(self, job_id: str, *extra: str, command=SMALL_TRAINER, nproc: int = 2, timeout=120):
        return self(
            "run", f"--inventory={self.inventory}", f"--job-id={job_id}",
            f"--nproc-per-node={nproc}", *extra, "--", *command, timeout=timeout,
        )  # fmt: skip

    def record(self, job_id: str) -> dict:
        return json.loads((self.state_dir / f"{job_id}.json").read_text())

    def slurm_jobs(self) -> list[str]:
        """The jobs Slurm still runs or waits to run: "ID STATE" each."""
        result = self.slurm.client("squeue", "--noheader", "--format=%i %T")
        assert result.returncode == 0, result.stderr
        return result.stdout.split("\n")[:-1]

    def kill_watchers(self) -> None:
        for process in psutil.process_iter(["cmdline", "environ"]):
            cmdline = process.info["cmdline"] or []
            environment = process.info["environ"] or {}
            if "ugro.launcher.follower" in cmdline and environment.get("UGRO_STATE_DIR") == str(
                self.state_dir
            ):
                process.kill()


def test_two_nodes_two_ranks_under_slurm_are_scraped_and_cancelled_cleanly(tmp_path, slurm_cluster):
    with alert_stack(tmp_path / "stack") as stack:
        launcher = SlurmLauncher(tmp_path, slurm_cluster, stack.workdir / "targets")
        try:
            started = launcher.run("slurm-two")
            assert started.returncode == 0, started.stderr + started.stdout
            slurm_id = launcher.record("slurm-two")["slurm"]["job_id"]
            assert f"submitted as Slurm job {slurm_id}" in started.stdout

            def ranks_up() -> list[dict]:
                up = stack.query('up{job="ugro-ranks",job_id="slurm-two"} == 1')
                return up if len(up) == 4 else []

            up = wait_for(ranks_up, 180, "four rank endpoints up")
            assert sorted((s["metric"]["node"], s["metric"]["rank"]) for s in up) == [
                ("node-a", "0"), ("node-a", "1"), ("node-b", "2"), ("node-b", "3"),
            ]  # fmt: skip
            # From an alert to Slurm: every rank carries the Slurm job's id.
            assert {s["metric"]["scheduler_job_id"] for s in up} == {slurm_id}
            worlds = stack.query('ugro_train_rank_info{job_id="slurm-two"}')
            assert {s["metric"]["world_size"] for s in worlds} == {"4"}
            wait_for(
                lambda: len(stack.query('up{job="ugro-nodes"} == 1')) == 2, 60, "both exporters up"
            )

            status = launcher("status", "slurm-two")
            assert status.returncode == 0, status.stderr
            assert "job slurm-two: running" in status.stdout
            assert f"Slurm job {slurm_id}: RUNNING" in status.stdout
            assert "node-b           node 1" in status.stdout
            logs = launcher("logs", "slurm-two", "--node", "node-b", "--lines", "50")
            assert logs.returncode == 0, logs.stderr
            assert "node-b is node 1 of 2" in logs.stdout
            listing = launcher("list")
            assert f"Slurm job {slurm_id}: node-a,node-b × 2" in listing.stdout

            stopped = launcher("stop", "slurm-two")
            assert stopped.returncode == 0, stopped.stderr + stopped.stdout
            assert launcher.slurm_jobs() == []
            assert job_processes(slurm_cluster.cluster, "slurm-two") == []
            assert not (launcher.targets_dir / "ranks" / "slurm-two.json").exists()
            record = launcher.record("slurm-two")
            assert record["state"] == "stopped"
            assert record["slurm"]["state"] == "CANCELLED"
            assert stack.firing() == []
        finally:
            launcher.kill_watchers()


def test_a_job_that_finishes_under_slurm_is_deregistered(tmp_path, slurm_cluster):
    launcher = SlurmLauncher(tmp_path, slurm_cluster, tmp_path / "targets")
    short = [*SMALL_TRAINER[:3], "20", *SMALL_TRAINER[4:]]
    try:
        # No Prometheus scrapes these targets: the ranks must not wait for a final scrape.
        launcher.write_inventory(
            {"partition": slurm_cluster.PARTITION, "nodes": 1, "log_dir": str(launcher.log_dir)},
            env={"UGRO_FINAL_SCRAPE_TIMEOUT": "0"},
        )
        started = launcher.run("slurm-short", "--wait", command=short, nproc=1)
        assert started.returncode == 0, started.stderr + started.stdout
        assert "job slurm-short: finished" in started.stdout
        record = launcher.record("slurm-short")
        assert record["state"] == "finished"
        assert record["slurm"]["state"] == "COMPLETED"
        assert record["slurm"]["exit_code"] == "0:0"
        assert record["nodes"] == ["node-a"]
        assert not (launcher.targets_dir / "ranks" / "slurm-short.json").exists()
        # The exporter of the node stays registered: it runs there as a service.
        assert (launcher.targets_dir / "nodes" / "node-a.json").exists()
        assert launcher.slurm_jobs() == []
    finally:
        launcher.kill_watchers()


def test_a_failed_rank_under_slurm_keeps_the_targets_and_pages(tmp_path, slurm_cluster):
    with alert_stack(tmp_path / "stack") as stack:
        launcher = SlurmLauncher(tmp_path, slurm_cluster, stack.workdir / "targets")
        crashing = [*SMALL_TRAINER, "--fault-rank=3", "--crash-at=30"]
        try:
            started = launcher.run("slurm-crash", "--wait", command=crashing, timeout=240)
            assert started.returncode == 1, started.stderr + started.stdout
            assert "job slurm-crash: failed" in started.stdout
            record = launcher.record("slurm-crash")
            assert record["slurm"]["state"] == "FAILED"
            # Slurm ended node-a's torchrun too (--kill-on-bad-exit): nothing is left running.
            assert launcher.slurm_jobs() == []
            assert job_processes(slurm_cluster.cluster, "slurm-crash") == []
            assert (launcher.targets_dir / "ranks" / "slurm-crash.json").exists()

            def ranks_down() -> list[dict]:
                return [
                    alert
                    for alert in stack.firing()
                    if alert["labels"]["alertname"] == "TrainingRanksDown"
                    and alert["labels"].get("job_id") == "slurm-crash"
                ]

            wait_for(ranks_down, 120, "TrainingRanksDown firing for the failed job")
            status = launcher("status", "slurm-crash")
            assert "job slurm-crash: failed" in status.stdout, status.stdout
            assert "FAILED" in status.stdout
            stopped = launcher("stop", "slurm-crash")  # clears the targets of an ended job
            assert stopped.returncode == 0, stopped.stderr + stopped.stdout
            assert not (launcher.targets_dir / "ranks" / "slurm-crash.json").exists()
        finally:
            launcher.kill_watchers()


def test_bad_slurm_requests_are_refused_and_leave_nothing(tmp_path, slurm_cluster):
    launcher = SlurmLauncher(tmp_path, slurm_cluster, tmp_path / "targets")
    log_dir = str(launcher.log_dir)

    def refused(result, *expected: str) -> None:
        assert result.returncode != 0, result.stdout
        for text in expected:
            assert text in result.stderr, result.stderr
        assert not list(launcher.state_dir.glob("*.json")) if launcher.state_dir.exists() else True
        assert launcher.slurm_jobs() == []

    launcher.write_inventory({"partition": "nosuch", "log_dir": log_dir})
    refused(launcher.run("bad-partition"), "slurm.partition", "no partition 'nosuch'")

    launcher.write_inventory({"partition": slurm_cluster.PARTITION, "log_dir": log_dir})
    refused(launcher.run("too-many", "--nodes", "3"), "--nodes 3", "has 2 node(s)")
    refused(launcher.run("not-a-count", "--nodes", "node-a"), "--nodes 'node-a'", "node count")

    launcher.write_inventory(
        {"partition": slurm_cluster.PARTITION, "sbatch_args": ["-x; rm -rf /"]}
    )
    refused(launcher.run("hostile"), "slurm.sbatch_args", "sbatch long options")

    # sbatch itself refuses: an option Slurm does not know is named in the error.
    launcher.write_inventory(
        {"partition": slurm_cluster.PARTITION, "log_dir": log_dir, "sbatch_args": ["--bogus=1"]}
    )
    refused(launcher.run("sbatch-refuses"), "sbatch refused the job", "bogus")

    inventory = yaml.safe_load(launcher.inventory.read_text())
    inventory["nodes"] = [{"name": "node-a", "host": "10.0.0.1"}]
    launcher.inventory.write_text(yaml.safe_dump(inventory))
    refused(launcher.run("both"), "nodes: not with a slurm section")


def test_without_slurm_commands_the_launch_says_so(tmp_path):
    launcher_env = {**os.environ, "PATH": "/nonexistent", "UGRO_STATE_DIR": str(tmp_path / "s")}
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump({"prometheus": {"targets_dir": str(tmp_path / "t")}, "slurm": {"nodes": 1}})
    )
    result = subprocess.run(
        [*LAUNCH, "run", f"--inventory={inventory}", "--job-id=no-slurm", "--", "train.py"],
        capture_output=True, text=True, timeout=60, env=launcher_env,
    )  # fmt: skip
    assert result.returncode == 1
    assert "sinfo not found on PATH" in result.stderr
    assert not (tmp_path / "s" / "no-slurm.json").exists()


def test_a_node_without_the_inventorys_python_fails_the_job_and_its_log_says_why(
    tmp_path, slurm_cluster
):
    launcher = SlurmLauncher(tmp_path, slurm_cluster, tmp_path / "targets")
    section = {"partition": slurm_cluster.PARTITION, "nodes": 2, "log_dir": str(launcher.log_dir)}
    launcher.write_inventory(section, python="/opt/missing/bin/python")
    try:
        started = launcher.run("no-python", "--wait", nproc=1)
        assert started.returncode == 1, started.stderr + started.stdout
        assert "job no-python: failed" in started.stdout
        logs = launcher("logs", "no-python", "--node", "node-b")
        assert "/opt/missing/bin/python" in logs.stdout, logs.stdout + logs.stderr
        assert "No such file or directory" in logs.stdout
        assert launcher.slurm_jobs() == []
    finally:
        launcher.kill_watchers()


def test_slurm_jobs_whose_watchers_died_are_settled_by_status(tmp_path, slurm_cluster):
    """Watchers killed with the job running (registered), held in the queue, or before a run
    nobody saw; and a job Slurm's controller no longer knows. One `status` restarts them all."""
    launcher = SlurmLauncher(tmp_path, slurm_cluster, tmp_path / "targets")
    # Each job is held in the queue until the test releases it, so that its watcher can be
    # killed before it runs; the jobs share the nodes, each on ports of its own.
    short = [*SMALL_TRAINER[:3], "20", *SMALL_TRAINER[4:], "--start-delay=5"]
    ranks = launcher.targets_dir / "ranks"

    def submit_held(job_id: str, port: int) -> str:
        section = {"partition": slurm_cluster.PARTITION, "nodes": 1,
                   "log_dir": str(launcher.log_dir), "sbatch_args": ["--hold"]}  # fmt: skip
        launcher.write_inventory(section)
        inventory = yaml.safe_load(launcher.inventory.read_text())
        inventory["defaults"]["metrics_base_port"] = port
        # No Prometheus scrapes these targets: the ranks must not wait for a final scrape.
        inventory["defaults"]["env"]["UGRO_FINAL_SCRAPE_TIMEOUT"] = "0"
        launcher.inventory.write_text(yaml.safe_dump(inventory))
        started = launcher.run(job_id, f"--rdzv-port={port + 100}", command=short, nproc=1)
        assert started.returncode == 0, started.stderr + started.stdout
        return launcher.record(job_id)["slurm"]["job_id"]

    def kill_watcher(job_id: str) -> int:
        pid = launcher.record(job_id)["watcher_pid"]
        psutil.Process(pid).kill()
        wait_for(lambda: not _runs(pid), 30, f"watcher {pid} gone")
        return pid

    def release(slurm_id: str) -> None:
        released = slurm_cluster.client("scontrol", "release", slurm_id)
        assert released.returncode == 0, released.stderr

    def ended(*slurm_ids: str) -> bool:
        return not [job for job in launcher.slurm_jobs() if job.split()[0] in slurm_ids]

    try:
        running, held, unseen = (
            submit_held(job_id, port)
            for job_id, port in (("w-running", 9600), ("w-held", 9610), ("w-unseen", 9620))
        )
        dead = {job_id: kill_watcher(job_id) for job_id in ("w-held", "w-unseen")}
        release(running)
        release(unseen)
        wait_for((ranks / "w-running.json").exists, 120, "w-running's ranks registered")
        dead["w-running"] = kill_watcher("w-running")
        wait_for(lambda: ended(running, unseen), 180, "w-running and w-unseen ended")
        # The defect: a finished job's ranks stay registered, and no record shows the ends.
        assert (ranks / "w-running.json").exists()
        assert launcher.record("w-running")["state"] == "running"
        assert launcher.record("w-unseen")["state"] == "pending"
        # A job the controller has forgotten (it does MinJobAge after the end): its ranks are
        # registered and nothing says how it ended (this cluster keeps no accounting).
        forgotten = {**launcher.record("w-running"), "job_id": "w-forgotten", "watcher_pid": None}
        forgotten["slurm"] = {**forgotten["slurm"], "job_id": "999999"}
        (launcher.state_dir / "w-forgotten.json").write_text(json.dumps(forgotten))
        (ranks / "w-forgotten.json").write_text((ranks / "w-running.json").read_text())

        status = launcher("status")  # every job
        assert status.returncode == 0, status.stdout + status.stderr
        for job_id, pid in dead.items():
            assert f"job {job_id}: its watcher (pid {pid}) had died; restarted it" in status.stderr
        assert "job w-forgotten: it had no watcher; restarted it" in status.stderr
        # Still held when its watcher was restarted: the new one registers it when it runs.
        assert launcher.record("w-held")["state"] == "pending"
        release(held)

        def settled(job_id: str, state: str):
            return lambda: launcher.record(job_id)["state"] == state

        wait_for(settled("w-running", "finished"), 60, "w-running finished")
        assert not (ranks / "w-running.json").exists()
        wait_for(settled("w-unseen", "finished"), 60, "w-unseen finished")
        record = launcher.record("w-unseen")
        assert record["slurm"]["state"] == "COMPLETED"
        assert len(record["nodes"]) == 1  # for `logs --node`, although no watcher saw it run
        assert not (ranks / "w-unseen.json").exists()  # never registered: nothing to scrape
        wait_for(settled("w-forgotten", "lost"), 60, "w-forgotten lost")
        assert (ranks / "w-forgotten.json").exists()  # until `stop`: it may have crashed
        shown = launcher("status", "w-forgotten")
        assert "job w-forgotten: lost" in shown.stdout, shown.stdout + shown.stderr
        assert "Slurm no longer shows it" in shown.stdout

        wait_for((ranks / "w-held.json").exists, 120, "w-held's ranks registered")
        wait_for(settled("w-held", "finished"), 120, "w-held finished")
        assert not (ranks / "w-held.json").exists()

        cleared = launcher("stop", "w-forgotten")
        assert cleared.returncode == 0, cleared.stdout + cleared.stderr
        assert not (ranks / "w-forgotten.json").exists()
    finally:
        launcher.kill_watchers()


def _runs(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
