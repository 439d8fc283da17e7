"""What a scrape of ``ugro-exporter`` costs, next to Debian's ``prometheus-node-exporter``.

Both exporters run as subprocesses on loopback ports. ugro runs with the scripted fake NVML
(``tests.exporter.fake_nvml``: 8 H100s with GPM, ``UGRO_FAKE_NVML_SLOW=1`` so the slow NVML
queries take H100-like time in ugro's background poller, which is off the scrape path). Measured:

* ``startup_s`` — ugro, from ``Popen`` to the first HTTP 200 on ``/metrics``;
* scrape latency — after a warm-up, the two are scraped alternately (which one goes first
  swaps every round, so neither always follows the other's CPU burst) for ``--scrapes`` rounds.
  Each latency is wall time from sending the request to having read the whole body, over one
  persistent keep-alive connection per exporter if both keep connections open, else over a
  fresh connection per scrape for both (the JSON says which). p50/p99 are
  ``statistics.quantiles(n=100, method="inclusive")``;
* CPU per 1000 scrapes — each process's user+system CPU time (psutil) across the measured
  phase. ugro's background poller keeps running during that phase and its CPU is included:
  it is part of what the exporter costs the node, as node_exporter's own per-scrape reads are;
* series — sample lines (not ``#`` comments) in one scrape of each;
* ``rss_growth_ratio`` — ugro's RSS after ``--soak`` further scrapes over its RSS before them;
* ``sigterm_exit_s`` / ``sigterm_exit_code`` — how long ugro takes to exit on SIGTERM, and how;
* ``poll_nvml_calls`` — NVML calls one background poll makes for the 8 GPUs (GPM sample and
  metrics, field values, energy), counted in this process on the same scripted NVML, with
  ``poll_nvml_calls_by_function`` and ``poll_s`` (one steady-state poll's wall time).

The last line printed is one JSON object.

    python benchmarks/exporter_scrape.py                  # about a minute or two on 2 cores
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import psutil

from ugro.common.ports import free_port
from ugro.common.processes import NotReady, ProcessExited, stop_process_group, wait_until_ready

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
NODE_EXPORTER = "prometheus-node-exporter"
GPUS = 8
READY_TIMEOUT_S = 10.0
STOP_GRACE_S = 3.0
WARMUP_SCRAPES = 20
MIN_SOAK = 2000
EXIT_FAILED = 2


class BenchmarkError(Exception):
    """Something that makes the figures meaningless; reported as one line on stderr."""


@dataclass
class Exporter:
    """One exporter subprocess, where it listens and where its stderr goes."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    stderr: IO[bytes]
    started: float  # perf_counter() just before Popen

    @property
    def psutil(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def stderr_tail(self, limit: int = 600) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        text = self.stderr.read().decode(errors="replace").strip()
        return " | ".join(text[-limit:].splitlines()) or "(no stderr)"


def start(name: str, argv: list[str], port: int, env: dict[str, str]) -> Exporter:
    # stderr goes to a file, not a pipe nobody reads: a chatty exporter must not block on it.
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 (outlives this call; stop() closes it)
    started = time.perf_counter()
    process = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,  # its own process group, so stopping it stops all of it
    )
    return Exporter(name, process, port, stderr, started)


def start_ugro(port: int) -> Exporter:
    env = dict(os.environ)
    # The fake NVML lives in tests/, which is importable only from the repository root.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["UGRO_FAKE_NVML_GPUS"] = str(GPUS)
    env["UGRO_FAKE_NVML_SLOW"] = "1"
    argv = [
        sys.executable,
        "-m",
        "ugro.exporter",
        "--listen",
        f"127.0.0.1:{port}",
        "--nvml-module",
        "tests.exporter.fake_nvml:from_environment",
        "--poll-interval",
        "5",
    ]
    return start("ugro", argv, port, env)


def start_node_exporter(binary: str, port: int) -> Exporter:
    argv = [binary, f"--web.listen-address=127.0.0.1:{port}"]
    return start("node_exporter", argv, port, dict(os.environ))


def stop(exporter: Exporter) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited after a grace period."""
    try:
        stop_process_group(exporter.process, STOP_GRACE_S)
    finally:
        exporter.stderr.close()


def wait_ready(exporter: Exporter) -> float:
    """Seconds from Popen to the first 200 on /metrics; BenchmarkError after READY_TIMEOUT_S."""
    try:
        wait_until_ready(
            f"http://127.0.0.1:{exporter.port}/metrics",
            exporter.started + READY_TIMEOUT_S - time.perf_counter(),
            process=exporter.process,
            what=exporter.name,
            interval=0.01,
            probe_timeout=2,
        )
    except ProcessExited:
        raise BenchmarkError(
            f"{exporter.name} exited with code {exporter.process.returncode} before serving "
            f"/metrics; stderr: {exporter.stderr_tail()}"
        ) from None
    except NotReady:
        raise BenchmarkError(
            f"{exporter.name} did not answer 200 on /metrics within {READY_TIMEOUT_S:.0f} s; "
            f"stderr: {exporter.stderr_tail()}"
        ) from None
    return time.perf_counter() - exporter.started


class Scraper:
    """GETs one exporter's /metrics, over one kept-alive connection or a new one each time."""

    def __init__(self, port: int, keep_alive: bool) -> None:
        self.port = port
        self.keep_alive = keep_alive
        self._connection: http.client.HTTPConnection | None = None

    def _open(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def fetch(self) -> tuple[float, bytes]:
        """(wall milliseconds from sending the request to the end of the body, the body)."""
        if not self.keep_alive:
            self.close()
        connection = self._connection or self._open()
        started = time.perf_counter()
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read()
        elapsed_ms = (time.perf_counter() - started) * 1e3
        self._connection = connection
        if response.status != 200:
            raise BenchmarkError(f"port {self.port}: /metrics answered HTTP {response.status}")
        if self.keep_alive and response.will_close:
            raise BenchmarkError(f"port {self.port}: the server closed a kept-alive connection")
        return elapsed_ms, body

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def keeps_alive(port: int) -> bool:
    """Whether the server keeps an HTTP/1.1 connection open across two GETs."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(2):
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            response.read()
            if response.will_close:
                return False
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def series_count(body: bytes) -> int:
    return sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(latencies_ms, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "max": max(latencies_ms)}


def alternating_rounds(rounds: int) -> Iterator[tuple[int, int]]:
    """Index pairs (0, 1), (1, 0), (0, 1), ...: who goes first swaps each round."""
    for i in range(rounds):
        yield (0, 1) if i % 2 == 0 else (1, 0)


def node_exporter_version(binary: str) -> str:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0] if first else "unknown"


def sig(value: float, digits: int = 4) -> float:
    """Rounded to `digits` significant figures: ms and seconds span several magnitudes here."""
    return float(f"{value:.{digits}g}")


def poller_calls() -> dict[str, object]:
    """What one steady-state background poll costs in NVML calls, on the scripted H100s."""
    # tests/ is importable only from the repository root.
    sys.path.insert(0, str(REPO_ROOT))
    from tests.exporter.fake_nvml import FakeNvml, h100s
    from ugro.exporter.gpu import GpuCollector
    from ugro.exporter.nvml import Nvml

    fake = FakeNvml(h100s(GPUS), slow=True)
    collector = GpuCollector(Nvml(fake))
    try:
        collector.poll()  # the first poll only takes GPM's first samples
        time.sleep(0.05)
        before = fake.calls.copy()
        started = time.perf_counter()
        collector.poll()
        poll_s = time.perf_counter() - started
        made = fake.calls - before
    finally:
        collector.close()
    made.pop("nvmlEventSetWait_v2", None)  # the XID thread's wait, not the poller's
    return {
        "poll_nvml_calls": sum(made.values()),
        "poll_nvml_calls_by_function": dict(sorted(made.items())),
        "poll_s": sig(poll_s),
    }


def run(args: argparse.Namespace, binary: str, exporters: list[Exporter]) -> dict[str, object]:
    ugro = start_ugro(free_port())
    exporters.append(ugro)
    startup_s = wait_ready(ugro)
    node = start_node_exporter(binary, free_port())
    exporters.append(node)
    node_startup_s = wait_ready(node)
    print(f"up: ugro in {startup_s:.3f} s, node_exporter in {node_startup_s:.3f} s", flush=True)

    # Same client method for both, so the client's share of each latency is the same.
    keep_alive = keeps_alive(ugro.port) and keeps_alive(node.port)
    pair = (ugro, node)
    scrapers = [Scraper(e.port, keep_alive) for e in pair]
    for scraper in scrapers:
        for _ in range(WARMUP_SCRAPES):
            scraper.fetch()

    processes = [e.psutil for e in pair]
    latencies: list[list[float]] = [[], []]
    cpu_before = [cpu_seconds(p) for p in processes]
    measured_started = time.perf_counter()
    for i, order in enumerate(alternating_rounds(args.scrapes), start=1):
        for which in order:
            latencies[which].append(scrapers[which].fetch()[0])
        if i % max(1, args.scrapes // 5) == 0:
            print(f"  {i}/{args.scrapes} rounds", flush=True)
    measured_s = time.perf_counter() - measured_started
    cpu_used = [cpu_seconds(p) - before for p, before in zip(processes, cpu_before, strict=True)]

    bodies = [scraper.fetch()[1] for scraper in scrapers]
    series = [series_count(body) for body in bodies]

    ugro_process = processes[0]
    rss_before = ugro_process.memory_info().rss
    for _ in range(args.soak):
        scrapers[0].fetch()
    rss_after = ugro_process.memory_info().rss
    for scraper in scrapers:
        scraper.close()

    ugro.process.send_signal(signal.SIGTERM)
    signalled = time.perf_counter()
    try:
        exit_code = ugro.process.wait(timeout=READY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(
            f"ugro did not exit within {READY_TIMEOUT_S:.0f} s of SIGTERM; "
            f"stderr: {ugro.stderr_tail()}"
        ) from None
    sigterm_exit_s = time.perf_counter() - signalled

    stats = [percentiles(samples) for samples in latencies]
    for exporter, stat, used, count, body in zip(
        pair, stats, cpu_used, series, bodies, strict=True
    ):
        print(
            f"{exporter.name:>13}: p50 {stat['p50']:6.3f} ms  p99 {stat['p99']:6.3f} ms  "
            f"max {stat['max']:7.3f} ms  CPU {used / args.scrapes * 1e3:6.3f} s/1000 scrapes  "
            f"{count} series, {len(body)} bytes"
        )
    print(
        f"ugro RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB over {args.soak} "
        f"scrapes; SIGTERM exit {sigterm_exit_s:.3f} s, code {exit_code}"
    )
    return {
        "benchmark": "exporter_scrape",
        "ugro_p50_ms": sig(stats[0]["p50"]),
        "ugro_p99_ms": sig(stats[0]["p99"]),
        "node_exporter_p50_ms": sig(stats[1]["p50"]),
        "node_exporter_p99_ms": sig(stats[1]["p99"]),
        "ugro_cpu_s_per_1000": sig(cpu_used[0] / args.scrapes * 1e3),
        "node_exporter_cpu_s_per_1000": sig(cpu_used[1] / args.scrapes * 1e3),
        "ugro_series": series[0],
        "node_exporter_series": series[1],
        "rss_growth_ratio": round(rss_after / rss_before, 4),
        "startup_s": sig(startup_s),
        "sigterm_exit_s": sig(sigterm_exit_s),
        "sigterm_exit_code": exit_code,
        "scrapes": args.scrapes,
        "soak_scrapes": args.soak,
        "gpus": GPUS,
        "nvml": "fake (scripted H100s, GPM)",
        **poller_calls(),
        "ugro_p90_ms": sig(stats[0]["p90"]),
        "ugro_max_ms": sig(stats[0]["max"]),
        "node_exporter_p90_ms": sig(stats[1]["p90"]),
        "node_exporter_max_ms": sig(stats[1]["max"]),
        "ugro_bytes": len(bodies[0]),
        "node_exporter_bytes": len(bodies[1]),
        "ugro_rss_mib": [round(rss_before / 2**20, 1), round(rss_after / 2**20, 1)],
        "node_exporter_startup_s": sig(node_startup_s),
        "measured_phase_s": sig(measured_s),
        "keep_alive": keep_alive,
        "quantiles": "statistics.quantiles(n=100, method='inclusive')",
        "node_exporter_version": node_exporter_version(binary),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scrapes", type=int, default=1000, help="measured scrapes of each")
    parser.add_argument(
        "--soak", type=int, default=MIN_SOAK, help=f"further ugro scrapes (at least {MIN_SOAK})"
    )
    args = parser.parse_args()
    if args.scrapes < 100:
        parser.error("--scrapes: at least 100, or p99 means nothing")
    if args.soak < MIN_SOAK:
        parser.error(f"--soak: at least {MIN_SOAK}, or slow growth does not show")

    binary = shutil.which(NODE_EXPORTER)
    if binary is None:
        print(f"exporter_scrape: {NODE_EXPORTER} is not on PATH", file=sys.stderr)
        sys.exit(EXIT_FAILED)

    exporters: list[Exporter] = []
    try:
        result = run(args, binary, exporters)
    except (BenchmarkError, OSError, http.client.HTTPException) as error:
        print(f"exporter_scrape: {error}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    finally:
        for exporter in exporters:
            stop(exporter)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
