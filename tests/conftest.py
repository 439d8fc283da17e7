"""Fixtures shared by every test folder: real binaries, free ports, scraping."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest

from .support import sample_values, scrape
from .support.certs import TlsMaterial


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> TlsMaterial:
    """Certificates made for this run (tests/support/certs.py): a CA, a loopback server
    certificate, client certificates good and bad."""
    return TlsMaterial.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def promtool() -> Callable[[str], subprocess.CompletedProcess[str]]:
    """Runs the real ``promtool check metrics`` (installed by make setup) on an exposition."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: run `make setup` (Debian package prometheus)")

    def check_metrics(exposition: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [path, "check", "metrics"],
            input=exposition,
            capture_output=True,
            text=True,
            timeout=30,
        )

    return check_metrics


def _ports_free(base: int, count: int) -> bool:
    sockets = []
    try:
        for port in range(base, base + count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("0.0.0.0", port))
        return True
    except OSError:
        return False
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def free_port_block() -> Callable[[int], int]:
    """Returns a base port such that base .. base+count-1 are all free right now."""

    def find(count: int) -> int:
        for _ in range(200):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                base = probe.getsockname()[1]
            if base + count <= 65535 and _ports_free(base, count):
                return base
        raise RuntimeError(f"no block of {count} free ports found")

    return find


@pytest.fixture
def scrape_metrics() -> Callable[[str], str]:
    return scrape


@pytest.fixture
def parse_samples() -> Callable[[str], dict]:
    return sample_values


@pytest.fixture
def start_process() -> Iterator[Callable[..., subprocess.Popen]]:
    """Starts a command in its own process group; kills the group at teardown."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        process = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)
