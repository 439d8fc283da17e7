"""The node agent for real: each test runs ``python -m ugro.launcher.agent`` as the launcher
would over SSH, in a subprocess on this machine, with ``tmp_path`` as the work directory.

Exit codes after ``stop``: a plain Python program killed by SIGTERM is recorded as 143
(128 + 15); torchrun catches SIGTERM, stops its workers and exits 1 (SignalException); what
had to be SIGKILLed after the grace period is recorded as 137 (128 + 9).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from ugro.common.ports import free_port
from ugro.launcher.agent.base import JOB_MARKER_ENV
from ugro.launcher.agent.preflight import nvml_gpu_count
from ugro.launcher.agent.start import START_SETTLE_SECONDS
from ugro.launcher.jobfiles import job_dir, read_process_ref

from ..exporter.fake_nvml import NVML_ERROR_UNKNOWN, FakeNvml, NVMLError, h100s
from ..support import wait_for

AGENT = [sys.executable, "-m", "ugro.launcher.agent"]
NODE = "node-a"

# Small programs run as jobs (argv[0] is this Python, never a shell).
SLEEP_WITH_CHILD = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
    "print('ready', flush=True)\n"
    "time.sleep(300)\n"
)
IGNORE_TERM_WITH_DETACHED_CHILD = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "code = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'\n"
    "subprocess.Popen([sys.executable, '-c', code], start_new_session=True)\n"
    "time.sleep(300)\n"
)


def run_agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AGENT, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def agent_json(*args: str, timeout: float = 60) -> dict:
    """Runs a verb that must answer with exit 0 and exactly one JSON line."""
    result = run_agent(*args, timeout=timeout)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def job_processes(directory: pathlib.Path) -> list[psutil.Process]:
    """Every live process that belongs to the job (by the marker the supervisor sets)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(JOB_MARKER_ENV) == str(directory):
                found.append(process)
        except psutil.Error:
            continue
    return found


def gone(processes: list[psutil.Process]) -> bool:
    def dead(process: psutil.Process) -> bool:
        try:
            return process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return all(dead(p) for p in processes)


class Jobs:
    """``agent start|status|stop|logs`` on one work directory; kills every job at teardown."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self.workdir = workdir

    def options(self, job_id: str, node: str = NODE) -> list[str]:
        return ["--job-id", job_id, "--node", node, "--workdir", str(self.workdir)]

    def dir(self, job_id: str, node: str = NODE) -> pathlib.Path:
        return job_dir(self.workdir, job_id, node)

    def start(
        self, job_id: str, argv: list[str], *, env: dict[str, str] | None = None, **kw: str
    ) -> dict:
        env_args = [f"--env={name}={value}" for name, value in (env or {}).items()]
        extra = [f"--{key}={value}" for key, value in kw.items()]
        return agent_json("start", *self.options(job_id), *env_args, *extra, "--", *argv)

    def python(self, job_id: str, code: str, **kw) -> dict:
        return self.start(job_id, [sys.executable, "-c", code], **kw)

    def status(self, job_id: str) -> dict:
        return agent_json("status", *self.options(job_id))

    def stop(self, job_id: str, grace: float = 10) -> dict:
        return agent_json("stop", *self.options(job_id), "--grace", str(grace))

    def wait_ended(self, job_id: str, timeout: float = 20) -> dict:
        return wait_for(
            lambda: (s := self.status(job_id))["state"] in ("finished", "failed") and s,
            timeout,
            f"job {job_id} to end",
        )

    def kill_all(self) -> None:
        jobs = self.workdir / "jobs"
        for directory in jobs.glob("*/*") if jobs.is_dir() else ():
            supervisor = read_process_ref(directory / "supervisor.pid")
            victims = job_processes(directory)
            if supervisor is not None:
                try:
                    process = psutil.Process(supervisor[0])
                    if abs(process.create_time() - supervisor[1]) < 0.01:
                        victims.append(process)
                except psutil.Error:
                    pass
            for process in victims:
                with contextlib.suppress(psutil.Error):
                    process.kill()


@pytest.fixture
def jobs(tmp_path: pathlib.Path) -> Iterator[Jobs]:
    jobs = Jobs(tmp_path / "work")
    yield jobs
    jobs.kill_all()


# --------------------------------------------------------------------------- preflight


def test_preflight_reports_a_taken_port_and_not_a_free_one(tmp_path):
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        free = free_port()
        started = time.monotonic()
        report = agent_json(
            "preflight", "--workdir", str(tmp_path / "w"), "--ports", f"{taken},{free}"
        )
        elapsed = time.monotonic() - started

    assert report["ports_taken"] == [taken]
    assert report["problems"] == [f"port {taken} is in use"]
    assert report["python"] == sys.executable
    assert report["hostname"] == socket.gethostname()
    assert report["ugro_version"]
    assert report["torch_version"]  # the test venv has torch, found without importing it
    assert report["gpus"] is None and report["gpu_error"] is None  # no --gpus: NVML not asked
    assert report["workdir"] == str(tmp_path / "w")
    assert (tmp_path / "w").is_dir()
    assert report["workdir_free_bytes"] > 0
    assert elapsed < 2.0, f"preflight took {elapsed:.2f} s"


def test_preflight_checks_the_gpu_count_only_when_asked(tmp_path):
    report = agent_json("preflight", "--workdir", str(tmp_path), "--gpus", "999")
    gpu_problems = [p for p in report["problems"] if "GPU" in p]
    assert len(gpu_problems) == 1
    if report["gpus"] is None:  # no NVML on this machine
        assert report["gpu_error"]
        assert gpu_problems[0] == f"expected 999 GPUs, NVML unavailable: {report['gpu_error']}"
    else:
        assert gpu_problems[0] == f"expected 999 GPUs, NVML sees {report['gpus']}"

    report = agent_json("preflight", "--workdir", str(tmp_path))
    assert report["problems"] == []


def test_preflight_counts_gpus_through_the_exporters_nvml_wrapper(monkeypatch):
    """The count ``--gpus`` is checked against, from a scripted NVML: its errors are the
    exporter's, and NVML is shut down again however the count went."""
    fake = FakeNvml(h100s(2))
    assert nvml_gpu_count(fake) == (2, None)
    assert not fake.initialised

    count, why = nvml_gpu_count(FakeNvml(library_missing=True))
    assert count is None
    assert why == "nvmlInit failed: NVML Shared Library Not Found"

    fake = FakeNvml(h100s(2), unsupported=frozenset({"nvmlDeviceGetCount"}))
    assert nvml_gpu_count(fake) == (None, "nvmlDeviceGetCount is not available in this NVML")
    assert not fake.initialised

    class CountFails(FakeNvml):
        def nvmlDeviceGetCount(self) -> int:
            raise NVMLError(NVML_ERROR_UNKNOWN)

    fake = CountFails(h100s(2))
    assert nvml_gpu_count(fake) == (None, "nvmlDeviceGetCount: Unknown Error")
    assert not fake.initialised

    monkeypatch.setitem(sys.modules, "pynvml", None)  # a node without nvidia-ml-py
    count, why = nvml_gpu_count()
    assert count is None and why.startswith("cannot import 'pynvml': ")


def test_preflight_reports_too_little_disk_and_an_unwritable_workdir(tmp_path):
    report = agent_json("preflight", "--workdir", str(tmp_path), "--min-free-bytes", str(10**18))
    [problem] = report["problems"]
    assert problem.startswith("only ") and f"GiB free in {tmp_path} (need " in problem

    (tmp_path / "file").write_text("not a directory")
    report = agent_json("preflight", "--workdir", str(tmp_path / "file" / "w"))
    [problem] = report["problems"]
    assert problem.startswith(f"{tmp_path / 'file' / 'w'} is not writable: ")
    assert report["workdir_free_bytes"] is None


def test_preflight_checks_that_the_jobs_directory_exists(tmp_path):
    report = agent_json("preflight", "--workdir", str(tmp_path), f"--chdir={tmp_path}")
    assert report["problems"] == []
    missing = tmp_path / "nanogpt"
    report = agent_json("preflight", "--workdir", str(tmp_path), f"--chdir={missing}")
    assert report["problems"] == [f"the job's directory {missing} (chdir) does not exist here"]


# --------------------------------------------------------------------------- start, status, stop


def test_stop_terminates_the_whole_process_tree(jobs):
    started = jobs.python("tree", SLEEP_WITH_CHILD)
    assert started["state"] == "started"
    directory = jobs.dir("tree")
    assert started["dir"] == str(directory)
    assert started["log"] == str(directory / "output.log")

    status = jobs.status("tree")
    assert status["state"] == "running"
    assert status["pid"] == started["pid"] and status["exit_code"] is None
    assert status["started_at"] == pytest.approx(time.time(), abs=30)
    leader = psutil.Process(started["pid"])
    assert os.getpgid(leader.pid) == leader.pid  # its own process group
    tree = [leader, *wait_for(lambda: leader.children(recursive=True), 10, "the child")]

    stopped = jobs.stop("tree")
    assert stopped == {"state": "stopped", "exit_code": 143, "killed": False}
    assert gone(tree)
    assert job_processes(directory) == []
    assert jobs.status("tree")["state"] == "failed"
    assert jobs.status("tree")["exit_code"] == 143
    # Idempotent: a second stop finds nothing to do.
    assert jobs.stop("tree") == {"state": "not_running", "exit_code": 143}


def test_stop_kills_what_ignores_sigterm_after_the_grace_period(jobs):
    # The child has a session of its own, as torchrun gives its workers: not in the group.
    started = jobs.python("stubborn", IGNORE_TERM_WITH_DETACHED_CHILD)
    leader = psutil.Process(started["pid"])
    [child] = wait_for(lambda: leader.children(), 10, "the detached child")
    assert os.getsid(child.pid) == child.pid

    begin = time.monotonic()
    stopped = jobs.stop("stubborn", grace=0.5)
    assert stopped == {"state": "stopped", "exit_code": 137, "killed": True}
    assert time.monotonic() - begin < 5
    assert gone([leader, child])


def test_a_lost_job_is_reported_and_its_orphans_are_stopped(jobs):
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
        " start_new_session=True)\n"
        "time.sleep(300)\n"
    )
    started = jobs.python("lost", code)
    leader = psutil.Process(started["pid"])
    [orphan] = wait_for(lambda: leader.children(), 10, "the child")
    supervisor = psutil.Process(read_process_ref(jobs.dir("lost") / "supervisor.pid")[0])
    supervisor.kill()  # as if the node's OOM killer hit the supervisor and torchrun
    leader.kill()
    wait_for(lambda: gone([supervisor, leader]), 10, "the supervisor and the job to die")

    assert jobs.status("lost")["state"] == "lost"
    assert orphan.is_running()
    assert jobs.stop("lost", grace=5) == {"state": "stopped", "exit_code": None, "killed": False}
    assert gone([orphan])
    assert jobs.stop("lost") == {"state": "not_running", "exit_code": None}


def test_a_quick_success_is_finished(jobs):
    assert jobs.python("ok", "print('done')")["state"] == "started"
    status = jobs.wait_ended("ok")
    assert status["state"] == "finished" and status["exit_code"] == 0
    assert (jobs.dir("ok") / "output.log").read_text() == "done\n"


def test_exit_code_3_is_failed(jobs):
    # It outlives the start's settling time, so it is a job that failed, not a failed start.
    later = START_SETTLE_SECONDS + 1.5
    assert (
        jobs.python("three", f"import time, sys; time.sleep({later}); sys.exit(3)")["state"]
        == "started"
    )
    status = jobs.wait_ended("three")
    assert status["state"] == "failed" and status["exit_code"] == 3


def test_a_command_that_fails_at_once_is_a_failed_start(jobs):
    result = jobs.python("boom", "import sys; print('bad config', flush=True); sys.exit(3)")
    assert result["state"] == "failed"
    assert result["reason"] == "exited with code 3 at once: bad config"


def test_a_missing_program_is_a_failed_start_with_127(jobs, tmp_path):
    result = jobs.start("missing", [str(tmp_path / "no-such-program"), "--flag"])
    assert result["state"] == "failed"
    assert result["reason"].startswith("exited with code 127 at once: ")
    assert "no-such-program" in result["reason"] and "No such file" in result["reason"]
    status = jobs.status("missing")
    assert status["state"] == "failed" and status["exit_code"] == 127 and status["pid"] is None


def test_starting_the_same_job_twice_fails_clearly(jobs):
    assert jobs.python("twice", "import time; time.sleep(300)")["state"] == "started"
    again = jobs.python("twice", "print('second')")
    directory = jobs.dir("twice")
    assert again == {
        "state": "failed",
        "reason": f"job twice already exists on node {NODE} ({directory})",
    }
    assert jobs.status("twice")["state"] == "running"
    jobs.stop("twice", grace=5)


def test_env_values_reach_the_job_verbatim_and_no_shell_runs_them(jobs, tmp_path):
    canary = tmp_path / "canary"
    env = {
        "UGRO_T_SPACES": "a b  c",
        "UGRO_T_QUOTES": 'it\'s "quoted" \\ back',
        "UGRO_T_SUBST": f"$(touch {canary})",
        "UGRO_T_BACKTICK": f"`touch {canary}`",
        "UGRO_T_SEMI": f"; touch {canary}; rm -rf {tmp_path}",
        "UGRO_T_EQUALS": "x=y=z",
        "UGRO_T_EMPTY": "",
        "UGRO_T_GLOB": "* ? [a] ~ $HOME ${PATH}",
    }
    code = (
        "import json, os\n"
        "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('UGRO_T_')}))"
    )
    (tmp_path / "cwd").mkdir()
    jobs.python("env", code, env=env, cwd=str(tmp_path / "cwd"))
    jobs.wait_ended("env")
    assert json.loads((jobs.dir("env") / "output.log").read_text()) == env
    assert not canary.exists()
    command = json.loads((jobs.dir("env") / "command.json").read_text())
    assert command["env"] == env and command["cwd"] == str(tmp_path / "cwd")


def test_hostile_argv_reaches_the_job_verbatim(jobs, tmp_path):
    canary = tmp_path / "canary"
    hostile = [
        f"$(touch {canary})",
        f"`touch {canary}`",
        f"; touch {canary}",
        "a b",
        "'",
        '"',
        "--",
        "--job-id",
        "*",
        "",
        "line\nbreak",
        "-",
    ]
    code = "import json, sys; print(json.dumps(sys.argv[1:]))"
    jobs.start("argv", [sys.executable, "-c", code, *hostile])
    jobs.wait_ended("argv")
    assert json.loads((jobs.dir("argv") / "output.log").read_text()) == hostile
    assert not canary.exists()


def test_an_unknown_job(jobs):
    status = jobs.status("nobody")
    assert status == {
        "state": "unknown",
        "exit_code": None,
        "pid": None,
        "started_at": None,
        "dir": str(jobs.dir("nobody")),
    }
    assert jobs.stop("nobody") == {"state": "unknown"}
    result = run_agent("logs", *jobs.options("nobody"))
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "no job" in result.stderr


@pytest.mark.parametrize("bad", ["../x", "a b", ";rm", "", ".hidden", "x/y", "x\n", "a" * 129])
@pytest.mark.parametrize("field", ["--job-id", "--node"])
def test_unsafe_names_are_usage_errors(tmp_path, bad, field):
    names = {"--job-id": "job", "--node": NODE, field: bad}
    options = [x for pair in names.items() for x in pair] + ["--workdir", str(tmp_path)]
    for verb in (["start", *options, "--", "true"], ["status", *options]):
        result = run_agent(*verb)
        assert result.returncode == 2, result
        assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["--env", "NOT-A-NAME=1", "--", "true"],
        ["--env", "NOEQUALS", "--", "true"],
        ["--"],
        [],
    ],
)
def test_start_usage_errors(tmp_path, args):
    result = run_agent("start", "--job-id", "j", "--node", NODE, "--workdir", str(tmp_path), *args)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- logs


def test_logs_prints_the_tail_and_follow_ends_with_the_job(jobs, tmp_path):
    release = tmp_path / "release"
    code = (
        "import os, time\n"
        "for i in range(1, 51): print(f'line {i}')\n"
        "print('', end='', flush=True)\n"
        f"while not os.path.exists({str(release)!r}): time.sleep(0.05)\n"
        "print('last', flush=True)\n"
    )
    jobs.python("logs", code)
    log = jobs.dir("logs") / "output.log"
    wait_for(lambda: "line 50\n" in log.read_text(), 10, "the first lines")

    tail = run_agent("logs", *jobs.options("logs"), "--lines", "3")
    assert tail.returncode == 0 and tail.stdout == "line 48\nline 49\nline 50\n"
    assert run_agent("logs", *jobs.options("logs"), "--lines", "0").stdout == ""
    everything = run_agent("logs", *jobs.options("logs"), "--lines", "1000").stdout
    assert everything == "".join(f"line {i}\n" for i in range(1, 51))

    def follow() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*AGENT, "logs", *jobs.options("logs"), "--lines", "1", "--follow"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    follower, hung_up = follow(), follow()
    try:
        # The tail is written once the signal handlers are set: after it, a SIGHUP is the
        # agent's to handle (a fixed sleep raced the agent's start-up on a loaded machine).
        assert hung_up.stdout.readline() == "line 50\n"
        # The job goes on only once the follower has printed its tail too: released earlier, a
        # follower still starting on a loaded machine would find "last" as the log's last line.
        assert follower.stdout.readline() == "line 50\n"
        assert follower.poll() is None
        hung_up.send_signal(signal.SIGHUP)  # what the SSH session closing does
        out, err = hung_up.communicate(timeout=10)
        assert (hung_up.returncode, out, err) == (0, "", "")

        release.touch()
        out, err = follower.communicate(timeout=20)
        assert (follower.returncode, out, err) == (0, "last\n", "")
    finally:
        for process in (follower, hung_up):
            if process.poll() is None:
                process.kill()
                process.communicate()


# --------------------------------------------------------------------------- exporter


def test_ensure_exporter_starts_one_exporter_and_then_finds_it(tmp_path, exporters):
    port = free_port()
    args = ["ensure-exporter", "--port", str(port), "--node", NODE, "--workdir", str(tmp_path)]
    # Two launchers at once: one starts it, the other finds it running.
    calls = [subprocess.Popen([*AGENT, *args], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    answers = [json.loads(call.communicate(timeout=60)[0]) for call in calls]
    exporters.extend(a["pid"] for a in answers if "pid" in a)
    answers.sort(key=lambda a: a["state"])
    assert [a["state"] for a in answers] == ["running", "started"], answers
    assert answers[0] == {"state": "running", "port": port}
    log = tmp_path / "exporter" / f"{NODE}.log"
    assert answers[1]["log"] == str(log)
    assert "ugro.exporter" in psutil.Process(answers[1]["pid"]).cmdline()

    assert agent_json(*args) == {"state": "running", "port": port}
    assert "serving node" in log.read_text()


def test_ensure_exporter_refuses_a_port_held_by_another_program(tmp_path, exporters):
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        port = listener.getsockname()[1]
        answer = agent_json(
            "ensure-exporter", "--port", str(port), "--node", NODE, "--workdir", str(tmp_path)
        )
    exporters.extend([answer["pid"]] if "pid" in answer else [])
    assert answer == {"state": "failed", "reason": f"port {port} is in use by another program"}


# --------------------------------------------------------------------------- real torchrun


def test_stop_leaves_no_process_of_a_real_torchrun_job(jobs, free_port_block, scrape_metrics):
    base = free_port_block(2)
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free rendezvous port: tests may run side by side
        "--nproc-per-node=2",
        "-m",
        "ugro.trainer.train",
        *("--steps", "1000000", "--width", "64", "--depth", "1"),
        *("--batch-size", "8", "--context", "32"),
    ]
    env = {
        "UGRO_JOB_ID": "agent-test",
        "UGRO_METRICS_PORT": str(base),
        "UGRO_METRICS_ADDR": "127.0.0.1",
        "UGRO_NODE": NODE,
        "OMP_NUM_THREADS": "1",
    }
    started = jobs.start("torchrun", argv, env=env)
    assert started["state"] == "started", started
    for rank in (0, 1):
        wait_for(
            lambda rank=rank: "ugro_" in scrape_metrics(f"http://127.0.0.1:{base + rank}/metrics"),
            90,
            f"rank {rank}'s /metrics",
        )
    torchrun = psutil.Process(started["pid"])
    workers = [p for p in torchrun.children(recursive=True) if "ugro.trainer.train" in p.cmdline()]
    assert len(workers) == 2
    # torchrun puts each worker in a session of its own: signalling its group is not enough.
    assert all(os.getpgid(w.pid) != torchrun.pid for w in workers)

    marked = {p.pid for p in job_processes(jobs.dir("torchrun"))}
    assert marked >= {torchrun.pid, *(w.pid for w in workers)}

    stopped = jobs.stop("torchrun", grace=20)
    assert stopped["state"] == "stopped"
    assert stopped["exit_code"] == 1  # torchrun's answer to SIGTERM (SignalException)
    assert gone([torchrun, *workers])
    assert job_processes(jobs.dir("torchrun")) == []
    assert jobs.status("torchrun")["state"] == "failed"


# --------------------------------------------------------------------------- a shared work dir


def test_a_symlink_planted_at_the_exporter_log_is_not_followed(tmp_path, exporters):
    victim = tmp_path / "someone-elses-file"
    victim.write_text("theirs\n")
    (tmp_path / "work" / "exporter").mkdir(parents=True)
    log = tmp_path / "work" / "exporter" / f"{NODE}.log"
    log.symlink_to(victim)
    answer = agent_json(
        "ensure-exporter", "--port", str(free_port()), "--node", NODE,
        "--workdir", str(tmp_path / "work"),
    )  # fmt: skip
    exporters.extend([answer["pid"]] if "pid" in answer else [])
    assert answer == {
        "state": "failed",
        "reason": f"cannot write {log}: {log} is a symbolic link; refusing to write through it",
    }
    assert victim.read_text() == "theirs\n"


def test_a_work_directory_that_is_a_symlink_or_another_users_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    report = agent_json("preflight", "--workdir", str(link))
    assert report["problems"] == [f"{link} is a symbolic link, not a directory of its own"]

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)  # the tests run as root: "nobody" stands for another user
    report = agent_json("preflight", "--workdir", str(theirs))
    [problem] = report["problems"]
    assert problem.startswith(f"{theirs} belongs to uid 65534, not to this user (uid 0)")
    answer = agent_json(
        "start", "--job-id", "j", "--node", NODE, "--workdir", str(theirs), "--", "true"
    )
    assert answer["state"] == "failed"
    assert f"{theirs} belongs to uid 65534" in answer["reason"]
    assert list(theirs.iterdir()) == []


def test_work_directories_are_created_private(jobs):
    jobs.python("private", "pass")
    jobs.wait_ended("private")
    for directory in (jobs.workdir, jobs.workdir / "jobs", jobs.dir("private").parent,
                      jobs.dir("private")):  # fmt: skip
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    assert (jobs.dir("private") / "output.log").stat().st_mode & 0o777 == 0o600
