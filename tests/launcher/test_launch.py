"""ugro-launch against real sshd "nodes" (network namespaces), real torchrun and Prometheus."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from tests.support import wait_for
from tests.support.stack import AlertStack
from ugro.common.ports import free_port
from ugro.launcher.agent.start import START_SETTLE_SECONDS

SMALL_TRAINER = [
    *("-m", "ugro.trainer.train", "--steps", "1000000"),
    *("--width", "64", "--depth", "1", "--batch-size", "8", "--context", "32"),
]
LAUNCH = [sys.executable, "-m", "ugro.launcher.cli"]
# Rank 1 crashes once the agent counts the job as started (START_SETTLE_SECONDS): a crash
# inside that window is a failed start, which is another test's subject.
CRASHING_AFTER_START = [
    *SMALL_TRAINER, "--fault-rank=1", "--crash-at=30", f"--start-delay={START_SETTLE_SECONDS + 2}"
]  # fmt: skip


class Launcher:
    """Runs ugro-launch as a user would, against an inventory of the cluster's nodes."""

    def __init__(
        self, workdir: pathlib.Path, cluster, targets_dir: pathlib.Path, scraped: bool = True
    ) -> None:
        self.cluster = cluster
        self.state_dir = workdir / "state"
        self.targets_dir = targets_dir
        self.inventory = workdir / "inventory.yml"
        self.known_hosts = cluster.known_hosts
        self.inventory.write_text(
            yaml.safe_dump(
                {
                    "defaults": {
                        "python": sys.executable,
                        "workdir": str(workdir / "nodes"),
                        "user": "root",
                        "identity_file": str(cluster.client_key),
                        "min_free_disk_gb": 0,
                        "env": {
                            "OMP_NUM_THREADS": "1",
                            # Without a Prometheus, no scrape comes for a rank to wait for.
                            **({} if scraped else {"UGRO_FINAL_SCRAPE_TIMEOUT": "0"}),
                        },
                    },
                    "prometheus": {"targets_dir": str(targets_dir)},
                    "nodes": [{"name": node.name, "host": node.address} for node in cluster.nodes],
                }
            )
        )

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        verb_args = list(args)
        if "--" in verb_args:
            split = verb_args.index("--")
            head, tail = verb_args[:split], verb_args[split:]
        else:
            head, tail = verb_args, []
        if head and head[0] in ("status", "stop", "logs", "stacks"):
            head += [f"--known-hosts={self.known_hosts}"]
        return subprocess.run(
            [*LAUNCH, *head, *tail],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "UGRO_STATE_DIR": str(self.state_dir)},
        )

    def run(self, job_id: str, *extra: str, command=SMALL_TRAINER, nproc: int = 2):
        return self(
            "run",
            f"--inventory={self.inventory}",
            f"--known-hosts={self.known_hosts}",
            f"--job-id={job_id}",
            f"--nproc-per-node={nproc}",
            *extra,
            "--",
            *command,
        )

    def record(self, job_id: str) -> dict:
        return json.loads((self.state_dir / f"{job_id}.json").read_text())

    def kill_watchers(self) -> None:
        self._signal_watchers(signal.SIGKILL)

    def pause_watchers(self) -> None:
        self._signal_watchers(signal.SIGSTOP)

    def _signal_watchers(self, signum: int) -> None:
        # process_iter fills an attribute it cannot read (a zombie's environment) with None.
        for process in psutil.process_iter(["cmdline", "environ"]):
            cmdline = process.info["cmdline"] or []
            environment = process.info["environ"] or {}
            if "ugro.launcher.follower" in cmdline and any(
                str(self.state_dir) in part for part in environment.values()
            ):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signum)


def job_processes(cluster, job_id: str) -> list:
    """Every process on any node whose command line or environment belongs to the job."""
    found = []
    for node in cluster.nodes:
        for pid in node.pids():
            try:
                process = psutil.Process(pid)
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue
                if process.environ().get("UGRO_JOB_ID") == job_id:
                    found.append((node.name, pid, process.cmdline()))
            except psutil.Error:
                continue
    return found


def test_two_nodes_two_ranks_each_are_scraped_and_stopped_cleanly(tmp_path, namespace_cluster):
    cluster = namespace_cluster(2)
    stack = AlertStack(tmp_path / "stack")
    launcher = Launcher(tmp_path, cluster, stack.workdir / "targets")
    try:
        started = launcher.run("two-by-two")
        assert started.returncode == 0, started.stderr + started.stdout
        assert "job two-by-two started on node-a, node-b" in started.stdout

        # All four ranks and both exporters are scraped by Prometheus from the target files.
        def ranks_up() -> list[dict]:
            up = stack.query('up{job="ugro-ranks",job_id="two-by-two"} == 1')
            return up if len(up) == 4 else []

        up = wait_for(ranks_up, 120, "four rank endpoints up")
        assert sorted((s["metric"]["node"], s["metric"]["rank"]) for s in up) == [
            ("node-a", "0"), ("node-a", "1"), ("node-b", "2"), ("node-b", "3"),
        ]  # fmt: skip
        wait_for(
            lambda: len(stack.query('up{job="ugro-nodes"} == 1')) == 2, 60, "both exporters up"
        )
        # The ranks train together: the world is 4 and every rank steps.
        worlds = stack.query('ugro_train_rank_info{job_id="two-by-two"}')
        assert {s["metric"]["world_size"] for s in worlds} == {"4"}

        status = launcher("status", "two-by-two")
        assert status.returncode == 0, status.stderr
        assert "node-a           running" in status.stdout
        assert "node-b           running" in status.stdout

        stopped = launcher("stop", "two-by-two")
        assert stopped.returncode == 0, stopped.stderr + stopped.stdout
        assert job_processes(cluster, "two-by-two") == []
        assert not (stack.workdir / "targets" / "ranks" / "two-by-two.json").exists()
        assert launcher.record("two-by-two")["state"] == "stopped"
        again = launcher("stop", "two-by-two")  # safe to repeat
        assert again.returncode == 0, again.stderr
    finally:
        launcher.kill_watchers()
        stack.close()


def test_job_that_finishes_is_deregistered_by_its_watcher(launcher):
    short = [*SMALL_TRAINER[:3], "20", *SMALL_TRAINER[4:]]
    started = launcher.run("short-job", "--wait", command=short, nproc=1)
    assert started.returncode == 0, started.stderr + started.stdout
    assert "job short-job: finished" in started.stdout
    assert launcher.record("short-job")["state"] == "finished"
    assert not (launcher.targets_dir / "ranks" / "short-job.json").exists()
    logs = launcher("logs", "short-job")  # the first node's: rank 0 reports progress
    assert logs.returncode == 0
    assert "step 20/20" in logs.stdout
    logs = launcher("logs", "short-job", "--node=node-b")
    assert "rank 1: metrics at" in logs.stdout


def test_preflight_failure_starts_nothing_anywhere(launcher):
    launcher.cluster["node-b"].stop_sshd()
    result = launcher.run("no-start")
    assert result.returncode == 1
    assert "node-b" in result.stdout and "FAILED" in result.stdout
    assert "preflight failed on node-b: nothing was started" in result.stderr
    assert job_processes(launcher.cluster, "no-start") == []
    assert not (launcher.targets_dir / "ranks" / "no-start.json").exists()
    assert not (launcher.state_dir / "no-start.json").exists()


def test_port_taken_fails_preflight_with_the_port_named(launcher):
    with launcher.cluster["node-b"].listen_on(9501):
        result = launcher.run("port-taken")
    assert result.returncode == 1
    assert "port 9501" in result.stdout
    assert job_processes(launcher.cluster, "port-taken") == []


def test_start_failure_on_one_node_stops_the_others(launcher):
    # The job directory already exists on node-b, so its start fails after node-a started.
    (pathlib.Path(launcher.inventory.parent) / "nodes" / "jobs" / "half" / "node-b").mkdir(
        parents=True
    )
    result = launcher.run("half")
    assert result.returncode == 1
    assert "torchrun could not be started on node-b" in result.stderr
    assert "the job was stopped on the other nodes" in result.stderr
    time.sleep(1)
    assert job_processes(launcher.cluster, "half") == []
    assert not (launcher.targets_dir / "ranks" / "half.json").exists()


@pytest.mark.parametrize(
    "job_id",
    ["x; touch CANARY", "$(touch CANARY)", "a'b", 'a"b', "a\nb", "../escape", "`touch CANARY`"],
)
def test_hostile_job_ids_are_rejected(launcher, job_id, tmp_path):
    result = launcher.run(job_id)
    assert result.returncode == 2
    assert "--job-id" in result.stderr
    assert not list(tmp_path.rglob("CANARY"))
    assert not pathlib.Path("CANARY").exists()


def test_hostile_arguments_reach_the_program_verbatim(launcher, tmp_path):
    canary = tmp_path / "CANARY"
    hostile = [
        f"; touch {canary}",
        f"$(touch {canary})",
        f"`touch {canary}`",
        "it's",
        'a"b',
        "x\ny",
    ]
    # torchrun --no-python runs the program as given: here a Python one-liner.
    printer = [
        *("--no-python", sys.executable, "-c"),
        "import json, sys; print('ARGS=' + json.dumps(sys.argv[1:]))",
        *hostile,
    ]
    result = launcher.run("verbatim", "--wait", "--nodes=node-a", command=printer, nproc=1)
    assert result.returncode == 0, result.stderr + result.stdout
    logs = launcher("logs", "verbatim")
    line = next(x for x in logs.stdout.splitlines() if x.startswith("ARGS="))
    assert json.loads(line[len("ARGS=") :]) == hostile
    assert not canary.exists()


def test_unknown_host_key_is_refused_with_its_fingerprint(launcher):
    launcher.known_hosts = launcher.cluster.empty_known_hosts
    result = launcher.run("unknown-key")
    assert result.returncode == 1
    fingerprint = launcher.cluster["node-a"].host_key_fingerprint
    assert fingerprint in result.stdout + result.stderr
    assert "--accept-new-host-keys" in result.stdout + result.stderr
    assert job_processes(launcher.cluster, "unknown-key") == []


def test_bad_inventory_is_named_with_its_field(launcher):
    launcher.inventory.write_text(
        yaml.safe_dump({"prometheus": {"targets_dir": "/tmp/x"}, "nodes": [{"name": "a"}]})
    )
    result = launcher.run("bad-inventory")
    assert result.returncode == 2
    assert f"{launcher.inventory}: nodes[0].host: missing" in result.stderr


def test_crashed_node_fails_the_job_stops_the_rest_and_keeps_its_targets(launcher):
    crashing = CRASHING_AFTER_START
    started = launcher.run("crashes", "--wait", command=crashing, nproc=1)
    assert started.returncode == 1, started.stderr + started.stdout
    assert "job crashes: failed" in started.stdout
    record = launcher.record("crashes")
    assert record["state"] == "failed"
    assert record["node_states"]["node-b"]["state"] == "failed"
    # The dead ranks stay registered, so TrainingRanksDown fires until `stop` clears them.
    assert (launcher.targets_dir / "ranks" / "crashes.json").exists()
    assert job_processes(launcher.cluster, "crashes") == []
    listing = launcher("list")
    assert "crashes" in listing.stdout and "failed" in listing.stdout
    assert launcher("stop", "crashes").returncode == 0
    assert not (launcher.targets_dir / "ranks" / "crashes.json").exists()


def test_status_uses_the_jobs_known_hosts_and_fails_for_an_unreachable_node(launcher):
    started = launcher.run("remembered")
    assert started.returncode == 0, started.stderr + started.stdout

    def status() -> subprocess.CompletedProcess[str]:
        # No --known-hosts: the job's record remembers the file it was launched with.
        return subprocess.run(
            [*LAUNCH, "status", "remembered"], capture_output=True, text=True, timeout=120,
            stdin=subprocess.DEVNULL, env={**os.environ, "UGRO_STATE_DIR": str(launcher.state_dir)},
        )  # fmt: skip

    running = status()
    assert running.returncode == 0, running.stderr
    assert "job remembered: running" in running.stdout
    assert "node-b           running" in running.stdout
    launcher.cluster["node-b"].stop_sshd()
    try:
        cut_off = status()
        assert cut_off.returncode == 1
        assert "node-b           unreachable" in cut_off.stdout
        assert "cannot reach node-b" in cut_off.stderr
    finally:
        launcher.cluster["node-b"].start_sshd()
    assert launcher("stop", "remembered").returncode == 0
    stopped = status()
    assert "job remembered: stopped" in stopped.stdout
    # torchrun exits 1 on the SIGTERM of `stop`; the nodes say what happened: stopped.
    assert "node-a           stopped (exit code" in stopped.stdout
    assert "failed" not in stopped.stdout


def test_one_ctrl_c_ends_logs_follow_here_and_on_the_node(launcher):
    started = launcher.run("followed")
    assert started.returncode == 0, started.stderr + started.stdout
    follower = subprocess.Popen(
        [*LAUNCH, "logs", "followed", "--follow", f"--known-hosts={launcher.known_hosts}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "UGRO_STATE_DIR": str(launcher.state_dir)}, start_new_session=True,
    )  # fmt: skip

    def remote_followers() -> list[int]:
        return [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if {"ugro.launcher.agent", "logs", "--job-id=followed"} <= set(p.info["cmdline"] or [])
        ]

    try:
        wait_for(remote_followers, 30, "the follower on node-a")
        time.sleep(1)
        os.killpg(follower.pid, signal.SIGINT)  # the terminal's Ctrl-C
        follower.communicate(timeout=5)
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
            follower.communicate()
    wait_for(lambda: not remote_followers(), 5, "the follower on the node gone")
    assert launcher("stop", "followed").returncode == 0


def test_status_says_failed_from_the_nodes_before_the_watcher_has_recorded_it(launcher):
    crashing = CRASHING_AFTER_START
    started = launcher.run("crash-seen", command=crashing, nproc=1)
    assert started.returncode == 0, started.stderr + started.stdout
    # Paused, not killed: a dead watcher would be restarted by status (watchers.py), and the
    # new one would record the end. Paused, nobody records it: the record says "running".
    launcher.pause_watchers()

    def a_failed_node() -> str | None:
        out = launcher("status", "crash-seen").stdout
        return out if "failed (exit code" in out else None

    status = wait_for(a_failed_node, 120, "node-b failed")
    assert "job crash-seen: failed" in status
    assert launcher.record("crash-seen")["state"] == "running"
    assert launcher("stop", "crash-seen").returncode == 0


def test_accepting_a_new_host_key_remembers_it(launcher, tmp_path):
    known_hosts = tmp_path / "fresh_known_hosts"
    launcher.known_hosts = known_hosts
    short = [*SMALL_TRAINER[:3], "5", *SMALL_TRAINER[4:]]
    started = launcher.run(
        "accepted", "--accept-new-host-keys", "--wait", "--nodes=node-a", command=short, nproc=1
    )
    assert started.returncode == 0, started.stderr + started.stdout
    assert launcher.cluster["node-a"].address in known_hosts.read_text()


def test_a_localhost_node_runs_without_ssh(tmp_path):
    state = tmp_path / "state"
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "defaults": {
                    "python": sys.executable,
                    "workdir": str(tmp_path / "work"),
                    "min_free_disk_gb": 0,
                    "exporter_port": free_port(),
                    "metrics_base_port": free_port(),
                    # No Prometheus here: no scrape comes for a rank to wait for.
                    "env": {"OMP_NUM_THREADS": "1", "UGRO_FINAL_SCRAPE_TIMEOUT": "0"},
                },
                "prometheus": {"targets_dir": str(tmp_path / "targets")},
                "nodes": [{"name": "here", "host": "localhost"}],
            }
        )
    )
    env = {**os.environ, "UGRO_STATE_DIR": str(state)}
    short = [*SMALL_TRAINER[:3], "10", *SMALL_TRAINER[4:]]
    try:
        result = subprocess.run(
            [*LAUNCH, "run", f"--inventory={inventory}", "--job-id=local-job", "--wait",
             f"--rdzv-port={free_port()}", "--known-hosts=/nonexistent", "--", *short],
            capture_output=True, text=True, timeout=180, env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr + result.stdout
        assert "job local-job: finished" in result.stdout
        assert (tmp_path / "targets" / "nodes" / "here.json").exists()
    finally:
        # The job ended with --wait; the exporter it started for "here" is still running.
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if "ugro.exporter" in cmdline and "--node here" in cmdline.replace("=", " "):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()


def test_targets_on_a_prometheus_host_are_written_over_ssh(launcher, tmp_path):
    # The head node is node-b, reached over SSH; the namespaces share this filesystem, so the
    # files it writes appear under tmp_path.
    head_dir = tmp_path / "head-targets"
    data = yaml.safe_load(launcher.inventory.read_text())
    data["prometheus"] = {
        "targets_dir": str(head_dir),
        "host": launcher.cluster["node-b"].address,
    }  # user and identity file: the defaults', as for the nodes
    launcher.inventory.write_text(yaml.safe_dump(data))
    short = [*SMALL_TRAINER[:3], "5", *SMALL_TRAINER[4:]]
    started = launcher.run("remote-targets", "--nodes=node-a", command=short, nproc=1)
    assert started.returncode == 0, started.stderr + started.stdout
    rank_file = head_dir / "ranks" / "remote-targets.json"
    groups = json.loads(rank_file.read_text())
    assert groups[0]["labels"] == {"job_id": "remote-targets", "rank": "0", "node": "node-a"}
    assert (head_dir / "nodes" / "node-a.json").exists()
    wait_for(lambda: not rank_file.exists(), 120, "the watcher to deregister the finished job")


THIRD_PARTY = pathlib.Path(__file__).parent / "thirdparty"


def test_a_third_party_script_runs_from_its_own_directory_and_reports_every_step(
    tmp_path, namespace_cluster
):
    """tests/launcher/thirdparty/train.py: gradient accumulation, a local import, a loop of
    max_iters + 1 iterations, no linger. Two nodes × two ranks, scraped by a real Prometheus,
    with the alert rules and Alertmanager: every step arrives and nobody is notified."""
    cluster = namespace_cluster(2)
    stack = AlertStack(tmp_path / "stack")
    launcher = Launcher(tmp_path, cluster, stack.workdir / "targets")
    try:
        finished = launcher.run(
            "third-party", "--wait", f"--chdir={THIRD_PARTY}", command=["train.py"]
        )
        assert finished.returncode == 0, finished.stderr + finished.stdout
        assert "job third-party: finished" in finished.stdout
        logs = launcher("logs", "third-party")
        assert "iter 600: loss" in logs.stdout  # rank 0's own progress lines, on node-a

        def last(metric: str) -> dict[str, float]:
            samples = stack.query(f'last_over_time({metric}{{job_id="third-party"}}[5m])')
            return {s["metric"]["rank"]: float(s["value"][1]) for s in samples}

        ranks = ["0", "1", "2", "3"]
        # 601 optimizer steps (iterations 0..600), each of 4 micro-batches of 4 × 16 tokens.
        assert last("ugro_train_steps_total") == dict.fromkeys(ranks, 601.0)
        assert last("ugro_train_tokens_total") == dict.fromkeys(ranks, 601 * 4 * 4 * 16.0)
        assert last("ugro_train_samples_total") == dict.fromkeys(ranks, 601 * 4 * 4.0)
        assert last("ugro_train_target_steps") == dict.fromkeys(ranks, 601.0)
        assert last("ugro_train_loss_count") == dict.fromkeys(ranks, 601.0)  # one mean per step
        assert sorted(last("ugro_train_end_time_seconds")) == ranks
        # Longer than the test `for:` windows and Alertmanager's group wait. Only the job's
        # alerts: the nodes' own (a CPU-saturation warning pending on a loaded machine) are
        # true readings of the machine, not about how the job ended.
        time.sleep(12)
        assert stack.query('ALERTS{job_id="third-party"}') == []
        assert stack.slack.texts() == []
        assert stack.mail.messages == []
    finally:
        launcher.kill_watchers()
        stack.close()
