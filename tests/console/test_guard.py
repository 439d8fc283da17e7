"""console/guard.py: the ledger of what the demo started, and the guard that stops it when
the demo dies without tearing down (SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from tests.support import wait_for
from ugro.console import guard as guard_module
from ugro.console.guard import Ledger


def server(*code: str) -> subprocess.Popen:
    """A stand-in server: a Python process leading a session of its own, as the demo's are."""
    process = subprocess.Popen(
        [sys.executable, "-c", "\n".join([*code, "print('ready', flush=True)",
                                          "import time; time.sleep(600)"])],
        start_new_session=True, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout.readline() == "ready\n"
    return process


def gone(process: subprocess.Popen) -> bool:
    return process.poll() is not None


def test_stop_all_stops_servers_and_forgets_them(tmp_path):
    first, second = server(), server()
    ledger = Ledger(tmp_path / "started.json")
    ledger.add_process("first", first.pid)
    ledger.add_process("second", second.pid)
    said: list[str] = []
    ledger.stop_all(said.append)
    assert gone(first) and gone(second)  # (reaped by the ledger: no exit status left here)
    assert said == [f"stopping first (pid {first.pid})", f"stopping second (pid {second.pid})"]
    assert Ledger.load(ledger.path).processes == []


def test_a_server_that_ignores_sigterm_is_killed_after_the_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(guard_module, "SERVER_GRACE_SECONDS", 1.0)
    stubborn = server(
        "import signal, sys",
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)",
    )
    ledger = Ledger(tmp_path / "started.json")
    ledger.add_process("stubborn", stubborn.pid)
    said: list[str] = []
    ledger.stop_all(said.append)
    assert gone(stubborn)
    assert any("ignored SIGTERM for 1 s: SIGKILL" in line for line in said)


def test_a_reused_pid_is_never_signalled(tmp_path):
    bystander = server()
    try:
        ledger = Ledger(tmp_path / "started.json")
        ledger.add_process("old", bystander.pid)
        # The entry's process "ended" and its pid now names another process.
        ledger.processes[0].create_time -= 100
        ledger.stop_all(lambda _text: None)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_an_owned_job_without_a_record_is_left_alone(tmp_path):
    """A launch that rolled back (or never started) has no record: nothing to stop."""
    ledger = Ledger(tmp_path / "started.json")
    ledger.add_job("never-launched", tmp_path / "jobs")
    said: list[str] = []
    ledger.stop_all(said.append)
    assert said == []
    assert Ledger.load(ledger.path).jobs == []


OWNER = textwrap.dedent(
    """
    import pathlib, subprocess, sys, time
    from ugro.console.guard import Ledger, start_guard
    state = pathlib.Path(sys.argv[1])
    ledger = Ledger(state / "started.json")
    start_guard(ledger, state / "guard.log")
    for name in ("server-a", "server-b"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                 start_new_session=True)
        ledger.add_process(name, child.pid)
    print("ready", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_the_guard_stops_what_its_owner_left_when_the_owner_dies(tmp_path, signum):
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout.readline() == "ready\n"
    owned = [entry.pid for entry in Ledger.load(tmp_path / "started.json").processes]
    assert len(owned) == 2 and all(psutil.pid_exists(pid) for pid in owned)
    guard = next(
        child
        for child in psutil.Process(owner.pid).children()
        if "ugro.console.guard" in child.cmdline()
    )
    # A Ctrl-C or a closed terminal meant for the owner does not stop the guard.
    wait_for(lambda: "on watch" in (tmp_path / "guard.log").read_text(), 30, "guard ready")
    os.kill(guard.pid, signal.SIGINT)
    os.kill(guard.pid, signal.SIGHUP)
    owner.send_signal(signum)  # the owner dies without any teardown of its own
    owner.wait()
    wait_for(lambda: not any(psutil.pid_exists(pid) for pid in owned), 30, "owned gone")
    guard.wait(30)
    log = (tmp_path / "guard.log").read_text()
    assert "the owner exited without stopping everything it started" in log
    assert "stopping server-a" in log and "stopping server-b" in log
    assert Ledger.load(tmp_path / "started.json").processes == []
