"""`make demo`, README's first command, as a newcomer runs it; Ctrl-C and --keep.

The newcomer test clones this repository into a fresh folder and runs `make demo` there: the
set-up (a new virtual environment), the local stack, a real 2-rank job through ugro-launch with
a fault, the live view and the report. It checks the exit code, the report, the notifications
and that nothing the demo started is still running.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.parse

import psutil
import pytest

from tests.support import wait_for
from tests.support.net import http_json

ROOT = pathlib.Path(__file__).resolve().parents[2]


def demo_processes(path: pathlib.Path) -> list[str]:
    """What a demo run has running: processes whose command line or working directory names
    ``path`` (its state directory, or the clone it runs from), and the ranks of its jobs (their
    UGRO_JOB_ID is demo-...)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "cwd", "environ"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            cwd = process.info["cwd"] or ""
            job_id = (process.info["environ"] or {}).get("UGRO_JOB_ID", "")
        except psutil.Error:
            continue
        if process.pid == os.getpid():
            continue
        if str(path) in cmdline or cwd.startswith(str(path)) or job_id.startswith("demo-"):
            found.append(f"{process.pid}: {cmdline}")
    return found


def assert_nothing_left(path: pathlib.Path) -> None:
    # Children get a few seconds to finish exiting after the demo's own exit.
    deadline = time.monotonic() + 15
    while demo_processes(path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert demo_processes(path) == []


def clean_environment() -> dict[str, str]:
    """The environment a newcomer's shell has: no virtual environment of ours active."""
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    env["PATH"] = os.pathsep.join(
        entry for entry in env.get("PATH", "").split(os.pathsep) if ".venv" not in entry
    )
    # pytest's terminal size would squeeze the output; a newcomer's terminal is wider.
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    return env


@pytest.mark.timeout(1200)
def test_a_newcomer_runs_make_demo_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "ugro"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    started = time.monotonic()
    result = subprocess.run(
        ["make", "demo"],
        cwd=clone,
        env=clean_environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    output = result.stdout
    print(output, f"\nmake demo took {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, output[-3000:] + result.stderr[-3000:]
    # What the newcomer is promised: the stages, the alert firing and resolving, the report.
    assert "==> starting Prometheus, Alertmanager and a local Slack webhook" in output
    job = re.search(r"launching job (demo-[0-9-]+) with ugro-launch", output).group(1)
    # Rank 1's NaN loss, and under DDP every rank's NaN gradient norm: 1 to 4 alerts at once.
    assert re.search(rf"Slack ▸ \[FIRING:\d\] TrainingNonFiniteValues · job {job}", output)
    assert f"Slack ▸ [RESOLVED] TrainingNonFiniteValues · job {job}" in output
    assert f"Job {job}: finished, 600 of 600 steps" in output
    # 600 steps × 2 ranks × the reference trainer's default 16 sequences × 64 bytes.
    assert re.search(r"tokens\s+1,228,800\s", output)
    assert "TrainingNonFiniteValues   critical   rank 1 on local" in output
    assert re.search(r"==> done in \d+ s", output)
    assert_nothing_left(clone)


def start_demo(
    state_dir: pathlib.Path, *args: str, sigint_ignored: bool = False
) -> subprocess.Popen:
    """The demo in a process group of its own, as a terminal's foreground job. With
    ``sigint_ignored`` it starts as a background job of a non-interactive shell does (`cmd &`,
    nohup, some CI runners): with SIGINT ignored, which Python then leaves ignored."""
    return subprocess.Popen(
        [sys.executable, "-m", "ugro.console", "demo", f"--state-dir={state_dir}", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        if sigint_ignored
        else None,
    )


def stop_demo(demo: subprocess.Popen) -> None:
    """After a failure: let the demo tear down as on Ctrl-C, and kill it only if it hangs."""
    if demo.poll() is None:
        os.killpg(demo.pid, signal.SIGINT)
        try:
            demo.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.communicate()


def read_until(process: subprocess.Popen, marker: str, timeout: float) -> str:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"{marker!r} not printed; output:\n{''.join(seen)}")


@pytest.fixture
def cpu_hog():
    """One busy loop per core beside the demo: the load under which CI once saw it hang."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 2)
    ]
    yield
    for hog in hogs:
        hog.kill()
        hog.wait()


def wait_for_stage(demo: subprocess.Popen, state_dir: pathlib.Path, stage: str) -> None:
    """Block until the demo is at ``stage``: "launching" (ugro-launch has written the job's
    record and is starting it) or "training" (the live view runs and so do the ranks)."""
    if stage == "launching":
        read_until(demo, "==> launching job", 120)
        wait_for(lambda: list((state_dir / "jobs").glob("demo-*.json")), 60, "the launch under way")
        return
    read_until(demo, "==> ugro watch", 120)
    wait_for(
        lambda: any("ugro.trainer.train" in line for line in demo_processes(state_dir)),
        60,
        "the ranks running",
    )


# How a demo gets interrupted: the signal, whether it goes to the demo's process group (a
# terminal does that) or to its pid only (`kill`), and when.
INTERRUPTIONS = {
    "ctrl-c-training-1": (signal.SIGINT, "group", "training", False),
    "ctrl-c-training-2": (signal.SIGINT, "group", "training", False),
    "ctrl-c-training-3": (signal.SIGINT, "group", "training", False),
    "ctrl-c-launching": (signal.SIGINT, "group", "launching", False),
    "ctrl-c-sigint-inherited-ignored": (signal.SIGINT, "group", "training", True),
    "terminal-closed": (signal.SIGHUP, "group", "training", False),
    "kill-launching": (signal.SIGTERM, "pid", "launching", False),
}


@pytest.mark.parametrize("case", list(INTERRUPTIONS))
def test_an_interrupted_demo_stops_the_job_and_everything_it_started(tmp_path, cpu_hog, case):
    signum, target, stage, sigint_ignored = INTERRUPTIONS[case]
    state_dir = tmp_path / "state"
    demo = start_demo(state_dir, "--steps=100000", sigint_ignored=sigint_ignored)
    try:
        wait_for_stage(demo, state_dir, stage)
        if target == "group":
            os.killpg(demo.pid, signum)
        else:
            os.kill(demo.pid, signum)
        output, _ = demo.communicate(timeout=150)
    finally:
        stop_demo(demo)
    assert demo.returncode == 130, output
    assert "interrupted: stopping everything the demo started" in output
    assert "Traceback" not in output
    assert_nothing_left(state_dir)
    # Nothing left for the guard to do: the demo stopped it all itself.
    assert "stopping" not in (state_dir / "guard.log").read_text()


@pytest.mark.parametrize("stage", ["launching", "training"])
def test_a_killed_demo_leaves_nothing_running(tmp_path, stage):
    """SIGKILL (or the OOM killer) gives the demo no chance to tear down: its guard does."""
    state_dir = tmp_path / "state"
    demo = start_demo(state_dir, "--steps=100000")
    try:
        wait_for_stage(demo, state_dir, stage)
        os.kill(demo.pid, signal.SIGKILL)
        demo.communicate(timeout=30)
        # Ranks, torchrun, the watcher, the exporter and both servers: all gone, within a
        # bound that covers the launcher's own rollback and the agent's stop grace.
        deadline = time.monotonic() + 90
        while demo_processes(state_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert demo_processes(state_dir) == []
    finally:
        if demo_processes(state_dir):  # do not leave two ranks training for the next tests
            for line in demo_processes(state_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split(":")[0]), signal.SIGKILL)
    guard_log = (state_dir / "guard.log").read_text()
    assert "the owner exited without stopping everything it started" in guard_log
    assert "stopping Prometheus" in guard_log and "stopping Alertmanager" in guard_log
    assert guard_log.rstrip().endswith("guard: done")
    # The job's targets are gone too: nothing is left for Prometheus to page about.
    assert list((state_dir / "targets" / "ranks").glob("*.json")) == []


def test_keep_leaves_prometheus_and_alertmanager_running_with_the_job_in_them(tmp_path):
    state_dir = tmp_path / "state"
    demo = start_demo(state_dir, "--steps=120", "--keep")
    pids: list[int] = []
    try:
        output, _ = demo.communicate(timeout=300)
        assert demo.returncode == 0, output
        pids = [int(pid) for pid in re.search(r"stop them with: kill ([0-9 ]+)", output)[1].split()]
        assert len(pids) == 2 and all(psutil.pid_exists(pid) for pid in pids)
        job = re.search(r"launching job (demo-[0-9-]+)", output)[1]
        prometheus = re.search(
            r"Prometheus +(http://127\.0\.0\.1:\d+)", output.split("--keep")[-1]
        )[1]
        query = f'max(max_over_time(ugro_train_steps_total{{job_id="{job}"}}[15m]))'
        reply = http_json(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
        assert float(reply["data"]["result"][0]["value"][1]) == 120
        # Everything else the demo started is gone; the two servers are what is left.
        left = demo_processes(state_dir)
        assert sorted(int(line.split(":")[0]) for line in left) == sorted(pids), left
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        stop_demo(demo)
    assert_nothing_left(state_dir)
