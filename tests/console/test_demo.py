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

from tests.alerts.stack import http_json
from tests.support import wait_for

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


def start_demo(state_dir: pathlib.Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ugro.console", "demo", f"--state-dir={state_dir}", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
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


def test_ctrl_c_stops_the_job_and_everything_the_demo_started(tmp_path):
    state_dir = tmp_path / "state"
    demo = start_demo(state_dir, "--steps=100000")
    try:
        read_until(demo, "==> ugro watch", 120)
        # The job's ranks are running before the terminal's Ctrl-C reaches the demo's group.
        wait_for(
            lambda: any("ugro.trainer.train" in line for line in demo_processes(state_dir)),
            60,
            "the ranks running",
        )
        os.killpg(demo.pid, signal.SIGINT)
        output, _ = demo.communicate(timeout=120)
    finally:
        stop_demo(demo)
    assert demo.returncode == 130, output
    assert "interrupted: stopping everything the demo started" in output
    assert "Traceback" not in output
    assert_nothing_left(state_dir)


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
