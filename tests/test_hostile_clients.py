"""Real ``ugro-exporter`` and training-rank processes under bounded rounds of hostile clients on
loopback (oversize requests, slow and silent connections, unread answers, floods, garbage, the
wrong protocol): each keeps answering a good scrape between rounds, its memory stays flat, and
the rank trains to the end, exit 0, without an exception in its output."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
import pytest

from tests.support import sample, sample_values, wait_for
from tests.support.hostile import (
    FLOOD_CONNECTIONS,
    WRONG_PASSWORDS,
    Target,
    flood,
    good_scrape,
    oversize_requests,
    secured_target,
    slow_clients,
    write_secured_web_config,
    wrong_passwords,
    wrong_protocol,
)
from ugro.common.ports import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
PASSWORD = "scrape me"
ROUNDS = 5
# RSS the process may gain between the first round and the last: allocator noise, not a leak
# (a leak of one thread or one request head per connection would be tens of MiB by then).
RSS_GROWTH_LIMIT = 10 * 1024 * 1024
MIB = 1024 * 1024
STEPS = 150


@dataclass
class Attack:
    """What the rounds saw: the process's RSS after each round, and each good scrape."""

    rss: list[int] = field(default_factory=list)
    scrapes: list[str] = field(default_factory=list)
    hostile_connections: int = 0
    oversize_answers: dict[str, str] = field(default_factory=dict)  # the last round's

    def report(self, what: str) -> str:
        first, last = self.rss[0], self.rss[-1]
        return (
            f"{what}: {len(self.rss)} rounds, {self.hostile_connections} hostile connections, "
            f"{len(self.scrapes)} good scrapes answered; RSS after round 1 {first / MIB:.1f} "
            f"MiB, after round {len(self.rss)} {last / MIB:.1f} MiB "
            f"({(last - first) / MIB:+.1f} MiB); oversize requests got {self.oversize_answers}"
        )


def hostile_round(target: Target, process: psutil.Process, attack: Attack) -> None:
    """One round of the mix; a good scrape while the slow clients hold on, then the RSS."""
    oversize = oversize_requests(target)
    with slow_clients(target) as held:
        attack.scrapes.append(good_scrape(target))
        flood(target)
        wrong_protocol(target)
        if target.authorization:
            assert set(wrong_passwords(target)) <= {"401", "503"}
        attack.scrapes.append(good_scrape(target))
    attack.hostile_connections += (
        len(oversize)
        + held.opened
        + FLOOD_CONNECTIONS
        + 2  # wrong_protocol's
        + (WRONG_PASSWORDS if target.authorization else 0)
    )
    attack.oversize_answers = oversize
    attack.rss.append(process.memory_info().rss)


def assert_flat(attack: Attack, what: str) -> None:
    print(attack.report(what))
    assert attack.rss[-1] - attack.rss[0] < RSS_GROWTH_LIMIT, attack.report(what)


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str], log: pathlib.Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@pytest.mark.parametrize("secured", [False, True], ids=["plain", "tls+auth"])
def test_the_exporter_keeps_serving_under_hostile_clients(secured, tls, tmp_path):
    port = free_port()
    argv = [
        sys.executable, "-m", "ugro.exporter", "--listen", f"127.0.0.1:{port}",
        "--node", "hostile-node", "--poll-interval", "0.5",
        "--nvml-module", "tests.exporter.fake_nvml:from_environment",
    ]  # fmt: skip
    target = Target("127.0.0.1", port)
    if secured:
        config = write_secured_web_config(tls, tmp_path / "web.yml", PASSWORD)
        argv += ["--web.config.file", str(config)]
        target = secured_target(tls, port, PASSWORD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "UGRO_FAKE_NVML_GPUS": "8"}
    log = tmp_path / "exporter.log"
    with running(argv, env, log) as exporter:
        wait_for(lambda: "ugro_gpu_up" in good_scrape(target), 30, "the exporter's first scrape")
        attack = Attack()
        for _ in range(ROUNDS):
            hostile_round(target, psutil.Process(exporter.pid), attack)
            assert exporter.poll() is None, log.read_text()
        for exposition in attack.scrapes:
            assert sample(sample_values(exposition), "ugro_node_gpus") == 8
        assert_flat(attack, f"ugro-exporter ({'TLS + auth' if secured else 'plain'})")
    output = log.read_text()
    assert "Traceback" not in output, output


def test_a_training_rank_trains_to_the_end_under_hostile_clients(tls, tmp_path):
    port = free_port()
    config = write_secured_web_config(tls, tmp_path / "web.yml", PASSWORD)
    env = {
        **os.environ,
        "UGRO_JOB_ID": "hostile",
        "UGRO_METRICS_PORT": str(port),
        "UGRO_METRICS_ADDR": "127.0.0.1",
        "UGRO_NODE": "hostile-node",
        "UGRO_WEB_CONFIG": str(config),
        "OMP_NUM_THREADS": "1",
    }
    # The data delay makes the run last long enough (steps x delay, at least) for the rounds
    # below; they go on for as long as the rank trains.
    argv = [
        sys.executable, "-m", "ugro.trainer.train", "--steps", str(STEPS), "--data-delay", "0.1",
        "--width", "32", "--depth", "1", "--batch-size", "4", "--log-every", "1000000",
    ]  # fmt: skip
    target = secured_target(tls, port, PASSWORD)
    log = tmp_path / "rank.log"
    with running(argv, env, log) as rank:
        wait_for(lambda: "ugro_train_steps_total" in good_scrape(target), 60, "the rank's /metrics")
        attack = Attack()
        process = psutil.Process(rank.pid)
        while rank.poll() is None and len(attack.rss) < 10 * ROUNDS:
            try:
                hostile_round(target, process, attack)
            except (OSError, AssertionError, psutil.Error):
                # Refused only once training is over: the rank printed its last step before
                # closing its endpoint.
                if f"step {STEPS}/{STEPS}" not in log.read_text():
                    raise
                break
        assert rank.wait(timeout=60) == 0, log.read_text()
    output = log.read_text()
    assert "Traceback" not in output and "Exception" not in output, output
    assert len(attack.rss) >= ROUNDS, (
        f"only {len(attack.rss)} rounds before training ended; give it more steps"
    )
    steps = [sample(sample_values(text), "ugro_train_steps_total") for text in attack.scrapes]
    assert steps[-1] > steps[0]  # it trained while under attack
    assert_flat(attack, "training rank (TLS + auth)")
