"""What TLS, client certificates and basic auth cost a scrape of ``ugro-exporter``.

Three real ``ugro-exporter`` processes on loopback, with the scripted fake NVML of 8 H100s
(as ``exporter_scrape.py``): ``plain`` (no web configuration: the baseline), ``tls`` (server
certificate only) and ``mtls_auth`` (a client certificate required and verified, and a bcrypt
password at cost 10, the usual one). Certificates are EC P-256, made for this run.

After a warm-up, the three are scraped in turn (the order rotates every round) for ``--scrapes``
rounds, each over a new connection, as Prometheus scrapes ugro's endpoints (they answer one
request per connection, so every scrape of a TLS endpoint is a full handshake). Measured per
mode: the wall time from connecting to having read the whole body (p50, p99), and the
exporter's CPU time per scrape (user + system, psutil, over the measured phase, its background
poller included as in every mode). Also: the same for a wrong password (one bcrypt per try).

The last line printed is one JSON object.

    python benchmarks/endpoint_security.py                # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import pathlib
import ssl
import statistics
import sys
import tempfile
import time

import yaml
from exporter_scrape import (
    GPUS,
    REPO_ROOT,
    BenchmarkError,
    Exporter,
    start,
    stop,
)

sys.path.insert(0, str(REPO_ROOT))
from tests.support.certs import TlsMaterial
from ugro.common.ports import free_ports

WARMUP_SCRAPES = 20
PASSWORD = "benchmark-password"
BCRYPT_COST = 10
EXIT_FAILED = 2


def web_configs(directory: pathlib.Path, tls: TlsMaterial) -> dict[str, pathlib.Path | None]:
    server = {"cert_file": str(tls.server.cert), "key_file": str(tls.server.key)}
    documents = {
        "tls": {"tls_server_config": server},
        "mtls_auth": tls.web_config(PASSWORD, cost=BCRYPT_COST),
    }
    paths: dict[str, pathlib.Path | None] = {"plain": None}
    for name, document in documents.items():
        paths[name] = directory / f"{name}.yml"
        paths[name].write_text(yaml.safe_dump(document))
    return paths


def start_exporter(name: str, port: int, web_config: pathlib.Path | None) -> Exporter:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["UGRO_FAKE_NVML_GPUS"] = str(GPUS)
    env["UGRO_FAKE_NVML_SLOW"] = "1"
    argv = [sys.executable, "-m", "ugro.exporter", "--listen", f"127.0.0.1:{port}"]
    argv += ["--nvml-module", "tests.exporter.fake_nvml:from_environment"]
    if web_config is not None:
        argv += ["--web.config.file", str(web_config)]
    return start(name, argv, port, env)


class Client:
    """One mode's scrapes: a new connection each, with its certificate and password."""

    def __init__(self, port: int, tls: TlsMaterial | None, password: str | None) -> None:
        self.port = port
        self.context: ssl.SSLContext | None = None
        if tls is not None:
            self.context = ssl.create_default_context(cafile=str(tls.ca.cert_file))
            self.context.load_cert_chain(tls.client.cert, tls.client.key)
        self.headers = {}
        if password is not None:
            token = base64.b64encode(f"prometheus:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def fetch(self) -> tuple[float, int]:
        """(wall milliseconds from connecting to the end of the body, the HTTP status)."""
        started = time.perf_counter()
        if self.context is None:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        else:
            connection = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=10, context=self.context
            )
        try:
            connection.request("GET", "/metrics", headers=self.headers)
            response = connection.getresponse()
            response.read()
        finally:
            connection.close()
        return (time.perf_counter() - started) * 1e3, response.status


def wait_answering(exporter: Exporter, client: Client, expected: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            if client.fetch()[1] == expected:
                return
        except OSError:
            pass
        if exporter.process.poll() is not None or time.monotonic() > deadline:
            raise BenchmarkError(f"{exporter.name} did not answer: {exporter.stderr_tail()}")
        time.sleep(0.05)


def quantiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50_ms": round(cuts[49], 3), "p99_ms": round(cuts[98], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=300, help="rounds (default 300)")
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="ugro-endpoint-security-"))
    tls = TlsMaterial.create(work / "certs")
    configs = web_configs(work, tls)
    ports = dict(zip(configs, free_ports(len(configs)), strict=True))
    exporters = {name: start_exporter(name, ports[name], configs[name]) for name in configs}
    clients = {
        "plain": Client(ports["plain"], None, None),
        "tls": Client(ports["tls"], tls, None),
        "mtls_auth": Client(ports["mtls_auth"], tls, PASSWORD),
    }
    wrong_password = Client(ports["mtls_auth"], tls, "not-the-password")
    try:
        for name, exporter in exporters.items():
            wait_answering(exporter, clients[name], 200)
        for _ in range(WARMUP_SCRAPES):
            for client in clients.values():
                client.fetch()
        latencies: dict[str, list[float]] = {name: [] for name in clients}
        cpu_before = {name: e.psutil.cpu_times() for name, e in exporters.items()}
        order = list(clients)
        for round_number in range(args.scrapes):
            shift = round_number % len(order)
            for name in order[shift:] + order[:shift]:
                elapsed, status = clients[name].fetch()
                if status != 200:
                    raise BenchmarkError(f"{name}: HTTP {status}")
                latencies[name].append(elapsed)
        cpu_after = {name: e.psutil.cpu_times() for name, e in exporters.items()}
        wrong = []
        for _ in range(max(10, args.scrapes // 20)):
            elapsed, status = wrong_password.fetch()
            if status != 401:
                raise BenchmarkError(f"a wrong password got HTTP {status}")
            wrong.append(elapsed)
    finally:
        for exporter in exporters.values():
            stop(exporter)
    results: dict[str, object] = {"scrapes": args.scrapes, "gpus": GPUS}
    for name in clients:
        before, after = cpu_before[name], cpu_after[name]
        cpu = (after.user - before.user) + (after.system - before.system)
        results[name] = {
            **quantiles(latencies[name]),
            "cpu_ms_per_scrape": round(cpu * 1e3 / args.scrapes, 3),
        }
    results["wrong_password"] = {**quantiles(wrong), "bcrypt_cost": BCRYPT_COST}
    for name in ("tls", "mtls_auth"):
        plain = results["plain"]["p50_ms"]  # type: ignore[index]
        results[f"{name}_p50_over_plain"] = round(results[name]["p50_ms"] / plain, 2)  # type: ignore[index]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as error:
        print(f"endpoint_security: {error}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
