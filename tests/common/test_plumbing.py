"""The plumbing every package shares: names, ports, atomic files, process groups, readiness."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.test_layering import dependency_free_common_modules
from ugro.common.files import write_atomically
from ugro.common.identifiers import JOB_ID, NODE_NAME
from ugro.common.ports import free_port, free_port_block, free_ports, host_port
from ugro.common.processes import (
    NotReady,
    ProcessExited,
    stop_process_group,
    url_answers,
    wait_until_ready,
)

# Time a loaded 2-core machine may add to a bounded wait.
SLACK_SECONDS = 3.0


def test_the_plumbing_is_open_to_the_trainer_and_the_exporter():
    # They may import only the modules of ugro.common that need nothing but the standard library.
    free = dependency_free_common_modules()
    for module in ("identifiers", "ports", "files", "processes"):
        assert f"ugro.common.{module}" in free


# -- identifiers ---------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "llm-7", "A.b_c-9", "x" * 128])
def test_a_job_id_of_the_safe_alphabet_is_accepted(good):
    assert JOB_ID.fullmatch(good)


@pytest.mark.parametrize("bad", ["", "-x", ".hidden", "_x", "a b", "a/b", "abc\n", "x" * 129])
def test_a_job_id_outside_the_safe_alphabet_is_refused(bad):
    assert not JOB_ID.fullmatch(bad)


def test_a_node_name_is_at_most_a_dns_label_long():
    assert NODE_NAME.fullmatch("n" * 63)
    assert not NODE_NAME.fullmatch("n" * 64)
    assert not NODE_NAME.fullmatch("node-a\n")


def test_the_launcher_still_offers_the_job_id_pattern():
    from ugro.launcher import records

    assert records.JOB_ID is JOB_ID


# -- ports ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("node-a", 9490, "node-a:9490"),
        ("10.0.0.7", 22, "10.0.0.7:22"),
        ("::1", 9490, "[::1]:9490"),
        ("fe80::1", 9500, "[fe80::1]:9500"),
    ],
)
def test_host_port_puts_an_ipv6_address_in_brackets(host, port, expected):
    assert host_port(host, port) == expected


def _bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(_bindable(port) for port in ports)


def test_free_port_prefers_the_port_asked_for_while_it_is_free():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        other = free_port(taken)
        assert other != taken
        assert _bindable(other)
    assert free_port(taken) == taken


def test_a_free_port_block_is_free_on_every_interface():
    base = free_port_block(4)
    assert all(_bindable(port, "0.0.0.0") for port in range(base, base + 4))


# -- atomic writes -------------------------------------------------------------------------


def test_write_atomically_leaves_only_the_file(tmp_path):
    path = tmp_path / "deep" / "targets.json"
    write_atomically(path, "old\n")
    write_atomically(path, "new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["targets.json"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_atomically_can_write_a_private_file_into_an_existing_folder_only(tmp_path):
    private = tmp_path / "pid"
    write_atomically(private, "1\n", mode=0o600, make_parents=False)
    assert private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "missing" / "pid", "1\n", make_parents=False)
    assert not (tmp_path / "missing").exists()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    write_atomically(path, "old\n")
    with pytest.raises(TypeError):  # fails half-way: after the temporary file is made
        write_atomically(path, b"bytes are not text")  # type: ignore[arg-type]
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_concurrent_reader_sees_the_old_or_the_new_file_never_half(tmp_path):
    path = tmp_path / "targets.json"
    versions = ["A" * 200_000, "B" * 200_000]
    write_atomically(path, versions[0])
    done = threading.Event()
    seen: set[str] = set()
    torn: list[int] = []

    def read() -> None:
        while not done.is_set():
            text = path.read_text()
            seen.add(text[:1])
            if text not in versions:
                torn.append(len(text))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for round_ in range(200):
            write_atomically(path, versions[round_ % 2])
    finally:
        done.set()
        reader.join()
    assert not torn, f"reader saw partial files of lengths {torn[:5]}"
    assert seen  # the reader did read


# -- process groups ------------------------------------------------------------------------

# A leader and a child in one process group, both ignoring SIGTERM; the leader prints the
# child's pid once both handlers are in place.
STUBBORN_GROUP = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); "
    "time.sleep(120)"], stdout=subprocess.PIPE)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(120)
"""


def _start_group(code: str) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    child = int(process.stdout.readline())
    return process, child


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace():
    process, child = _start_group(STUBBORN_GROUP)
    try:
        started = time.monotonic()
        killed = stop_process_group(process, grace=0.5)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()
    assert killed
    assert 0.5 <= elapsed < 0.5 + SLACK_SECONDS
    assert process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + SLACK_SECONDS
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child), "the leader's child survived: the group was not signalled"


def test_a_group_named_by_pid_is_stopped_too():
    process, _ = _start_group(STUBBORN_GROUP)
    try:
        assert stop_process_group(process.pid, grace=0.3)
        assert _gone(process.pid)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()


def test_a_process_that_heeds_sigterm_is_not_killed_and_one_gone_is_no_error():
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    time.sleep(0.2)
    started = time.monotonic()
    assert stop_process_group(process, grace=10) is False
    assert time.monotonic() - started < SLACK_SECONDS
    assert process.returncode == -signal.SIGTERM
    assert stop_process_group(process, grace=10) is False
    assert stop_process_group(process.pid, grace=10) is False


# -- readiness -----------------------------------------------------------------------------


@pytest.fixture
def http_server():
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_wait_until_ready_returns_once_the_url_answers(http_server):
    wait_until_ready(http_server, 5)


def test_a_readiness_probe_never_goes_through_a_proxy(http_server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # the discard port: nothing there
    monkeypatch.setenv("no_proxy", "")
    assert url_answers(http_server)


def test_wait_until_ready_times_out_with_a_clear_error():
    nothing_there = f"http://127.0.0.1:{free_port()}/-/ready"
    started = time.monotonic()
    with pytest.raises(NotReady, match=r"^Prometheus not ready within 0\.5 s$"):
        wait_until_ready(nothing_there, 0.5, what="Prometheus", interval=0.05)
    assert time.monotonic() - started < 0.5 + SLACK_SECONDS


def test_a_check_that_raises_oserror_counts_as_not_yet():
    calls = []

    def check() -> bool:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError
        return True

    wait_until_ready(check, 5, interval=0.01)
    assert len(calls) == 3


def test_a_process_that_exits_first_ends_the_wait_at_once():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    started = time.monotonic()
    with pytest.raises(ProcessExited, match="ugro-exporter exited with code 3") as raised:
        wait_until_ready(lambda: False, 30, process=process, what="ugro-exporter")
    assert raised.value.returncode == 3
    assert time.monotonic() - started < SLACK_SECONDS
