"""Secured scraping end to end: a real ugro-exporter and a real training rank serve /metrics
with TLS, client certificates and basic auth (the shipped exporter/web-config.example.yml, its
files made for this run), and a real Prometheus scrapes them with the shipped
prometheus/prometheus.secure.example.yml. Beside the two real jobs, scrape jobs on the same
targets each get one thing wrong (password, client certificate, scheme): they must be refused,
with a reason Prometheus shows, while the real jobs stay up.

Also: the secure example is prometheus.yml plus the TLS and auth fields of the two ugro jobs and
nothing else, and ``promtool check config`` accepts it.
"""

from __future__ import annotations

import base64
import copy
import os
import pathlib
import shutil
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from tests.support.certs import TlsMaterial, bcrypt_hash
from tests.support.models import SMALL_MODEL
from tests.support.net import http_json
from tests.support.servers import server
from tests.support.waiting import wait_for
from ugro.catalogue import names
from ugro.common.ports import free_ports
from ugro.common.processes import NotReady, ProcessExited, stop_process_group, wait_until_ready
from ugro.launcher.targets import LocalTargets, RankEndpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLAIN_CONFIG = ROOT / "prometheus" / "prometheus.yml"
SECURE_CONFIG = ROOT / "prometheus" / "prometheus.secure.example.yml"
WEB_CONFIG_EXAMPLE = ROOT / "exporter" / "web-config.example.yml"
RANKS, NODES = names.RANKS_JOB, names.NODES_JOB
SECURED_JOBS = (RANKS, NODES)
REAL_JOBS = f"{RANKS}|{NODES}"  # a regular expression matching both
# What the secure example adds to each of SECURED_JOBS, and nothing else.
SECURITY_FIELDS = {"scheme", "tls_config", "basic_auth"}
FAKE_NVML = "tests.exporter.fake_nvml:from_environment"
PASSWORD = "scrape-secret-for-tests"
JOB_ID = "secure-job"
NODE = "secure-node"
GPUS = 2
# Scrapes each bad job must have made (and failed) before the real jobs' history is checked.
BAD_SCRAPES = 5


def _secured_jobs(config: dict) -> dict[str, dict]:
    return {j["job_name"]: j for j in config["scrape_configs"] if j["job_name"] in SECURED_JOBS}


def test_the_secure_example_is_prometheus_yml_plus_tls_and_basic_auth_on_the_ugro_jobs():
    plain = yaml.safe_load(PLAIN_CONFIG.read_text())
    secure = yaml.safe_load(SECURE_CONFIG.read_text())
    jobs = _secured_jobs(secure)
    assert set(jobs) == set(SECURED_JOBS)
    for name, job in jobs.items():
        added = {field: job.pop(field) for field in SECURITY_FIELDS}
        assert added["scheme"] == "https", name
        assert set(added["tls_config"]) == {"ca_file", "cert_file", "key_file"}, name
        # A password in a committed file is a leak waiting to happen: only password_file.
        assert set(added["basic_auth"]) == {"username", "password_file"}, name
    assert secure == plain


def _secure_example_files(config: dict) -> dict[str, str]:
    """The files the secure example's ugro jobs name (relative paths), by what they hold; both
    jobs name the same ones."""
    names = set()
    for job in _secured_jobs(config).values():
        tls, auth = job["tls_config"], job["basic_auth"]
        names.add((tls["ca_file"], tls["cert_file"], tls["key_file"], auth["password_file"]))
    [(ca, cert, key, password)] = names
    return {"ca": ca, "cert": cert, "key": key, "password": password}


def _place_secrets(folder: pathlib.Path, files: dict[str, str], tls: TlsMaterial) -> None:
    """Writes Prometheus's CA, client certificate, key and password at the example's paths."""
    sources = {"ca": tls.ca.cert_file, "cert": tls.client.cert, "key": tls.client.key}
    for what, source in sources.items():
        target = folder / files[what]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    os.chmod(folder / files["key"], 0o600)
    (folder / files["password"]).write_text(PASSWORD + "\n")  # as an editor saves it


def test_promtool_accepts_the_secure_example_with_the_files_it_names(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not on PATH: run `make setup` (Debian package prometheus)")
    # The repository's layout: prometheus/ (rules/ inside) beside alerts/.
    folder = tmp_path / "prometheus"
    shutil.copytree(ROOT / "prometheus" / "rules", folder / "rules")
    (tmp_path / "alerts").mkdir()
    shutil.copyfile(ROOT / "alerts" / "rules.yml", tmp_path / "alerts" / "rules.yml")
    config = folder / SECURE_CONFIG.name
    shutil.copyfile(SECURE_CONFIG, config)
    files = _secure_example_files(yaml.safe_load(config.read_text()))
    _place_secrets(folder, files, TlsMaterial.create(tmp_path / "tls"))
    result = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# -- the secured scrape ------------------------------------------------------------------------


def _node_web_config(directory: pathlib.Path, tls: TlsMaterial) -> pathlib.Path:
    """The shipped web config example, its files made for this run at the paths it names and
    its example hash replaced by one of PASSWORD."""
    document = yaml.safe_load(WEB_CONFIG_EXAMPLE.read_text())
    server_tls = document["tls_server_config"]
    for field, source in (
        ("cert_file", tls.server.cert),
        ("key_file", tls.server.key),
        ("client_ca_file", tls.ca.cert_file),
    ):
        target = directory / server_tls[field]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    os.chmod(directory / server_tls["key_file"], 0o600)
    [user] = document["basic_auth_users"]
    document["basic_auth_users"] = {user: bcrypt_hash(PASSWORD)}
    path = directory / "web-config.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _bad_jobs(template: dict, tls: TlsMaterial, wrong_password: pathlib.Path) -> dict[str, dict]:
    """Scrape jobs on the ranks' and the nodes' targets, each with one thing wrong."""

    def variant(name: str) -> dict:
        job = copy.deepcopy(template)
        job["job_name"] = name
        job["file_sd_configs"] = [
            {"files": ["targets/ranks/*.json", "targets/nodes/*.json"], "refresh_interval": "1s"}
        ]
        return job

    jobs = {}
    jobs["bad-password"] = variant("bad-password")
    jobs["bad-password"]["basic_auth"]["password_file"] = str(wrong_password)
    for name, pair in (("other-ca-cert", tls.wrong_client), ("expired-cert", tls.expired_client)):
        jobs[name] = variant(name)
        jobs[name]["tls_config"].update(cert_file=str(pair.cert), key_file=str(pair.key))
    jobs["no-cert"] = variant("no-cert")
    del jobs["no-cert"]["tls_config"]["cert_file"], jobs["no-cert"]["tls_config"]["key_file"]
    jobs["plain-http"] = variant("plain-http")
    jobs["plain-http"]["scheme"] = "http"
    del jobs["plain-http"]["tls_config"]
    return jobs


def _prometheus_config(folder: pathlib.Path, port: int, tls: TlsMaterial) -> tuple[dict, list]:
    """The secure example as a test runs it: 1 s intervals, rule files at the repository's
    paths, no Alertmanager, its own address; the example's relative secret and target paths
    kept, with the files placed under ``folder``. Plus the bad jobs."""
    config = yaml.safe_load(SECURE_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str((SECURE_CONFIG.parent / f).resolve()) for f in config["rule_files"]]
    del config["alerting"]
    for job in config["scrape_configs"]:
        for file_sd in job.get("file_sd_configs", []):
            file_sd["refresh_interval"] = "1s"
        for static in job.get("static_configs", []):
            static["targets"] = [f"127.0.0.1:{port}"]
    _place_secrets(folder, _secure_example_files(config), tls)
    wrong_password = folder / "secrets" / "wrong_password"
    wrong_password.write_text("not-" + PASSWORD + "\n")
    bad = _bad_jobs(_secured_jobs(config)[RANKS], tls, wrong_password)
    config["scrape_configs"].extend(bad.values())
    return config, list(bad)


def _start(argv: list[str], log: pathlib.Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _secure_get(url: str, tls: TlsMaterial) -> str:
    """GET with Prometheus's credentials: the client certificate and the password."""
    context = ssl.create_default_context(cafile=str(tls.ca.cert_file))
    context.load_cert_chain(tls.client.cert, tls.client.key)
    request = urllib.request.Request(url)
    token = base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, context=context, timeout=5) as response:
        return response.read().decode()


@dataclass
class SecuredScrape:
    prometheus_url: str
    bad_jobs: list[str]
    workdir: pathlib.Path

    def query(self, promql: str) -> list[dict]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        return http_json(url)["data"]["result"]

    def values(self, promql: str) -> dict[str, float]:
        """``{job/instance: value}`` of an instant query."""
        return {
            f"{r['metric'].get('job')}/{r['metric'].get('instance')}": float(r["value"][1])
            for r in self.query(promql)
        }

    def targets(self, job: str) -> list[dict]:
        active = http_json(f"{self.prometheus_url}/api/v1/targets?state=active")
        return [t for t in active["data"]["activeTargets"] if t["scrapePool"] == job]

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
            for log in sorted(self.workdir.glob("*.log"))
        )


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> Iterator[SecuredScrape]:
    workdir = tmp_path_factory.mktemp("secure-scrape")
    tls = TlsMaterial.create(workdir / "tls")
    web_config = _node_web_config(workdir / "node", tls)
    prometheus_port, exporter_port, rank_port = free_ports(3)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # the scripted NVML double lives in tests/
        "OMP_NUM_THREADS": "1",
    }
    processes: list[subprocess.Popen] = []
    prometheus = None
    try:
        processes.append(
            _start(
                [
                    sys.executable, "-m", "ugro.exporter", "--listen", f"127.0.0.1:{exporter_port}",
                    "--node", NODE, "--poll-interval", "0.5", "--nvml-module", FAKE_NVML,
                    "--web.config.file", str(web_config),
                ],
                workdir / "exporter.log",
                {**env, "UGRO_FAKE_NVML_GPUS": str(GPUS)},
            )
        )  # fmt: skip
        # One rank without torchrun (WORLD_SIZE unset): the trainer's own endpoint, paced so
        # that it keeps training through the test without taking a whole core.
        processes.append(
            _start(
                [
                    sys.executable, "-m", "ugro.trainer.train", "--steps", "1000000",
                    "--log-every", "1000000", "--data-delay", "0.05", "--device", "cpu",
                    *SMALL_MODEL,
                ],
                workdir / "rank.log",
                {
                    **env, "UGRO_JOB_ID": JOB_ID, "UGRO_NODE": NODE,
                    "UGRO_METRICS_ADDR": "127.0.0.1", "UGRO_METRICS_PORT": str(rank_port),
                    "UGRO_WEB_CONFIG": str(web_config), "UGRO_FINAL_SCRAPE_TIMEOUT": "0",
                },
            )
        )  # fmt: skip

        folder = workdir / "prometheus"
        config, bad_jobs = _prometheus_config(folder, prometheus_port, tls)
        config_file = folder / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        prometheus_log = workdir / "prometheus.log"
        prometheus = server("prometheus").start(
            [
                f"--config.file={config_file}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            prometheus_log,
            writable=[workdir],
            readonly=[ROOT],
        )
        scrape = SecuredScrape(f"http://127.0.0.1:{prometheus_port}", bad_jobs, workdir)
        try:
            wait_until_ready(
                f"{scrape.prometheus_url}/-/ready", 60, process=prometheus, what="Prometheus"
            )
            # Registered once they answer, as ugro-launch registers a started job: every scrape
            # of the real jobs can then succeed, from the first.
            for process, port in zip(processes, (exporter_port, rank_port), strict=True):
                url = f"https://127.0.0.1:{port}/metrics"
                wait_until_ready(lambda u=url: _secure_get(u, tls), 120, process=process)
        except (NotReady, ProcessExited) as error:
            raise AssertionError(f"{error}\n{scrape.logs()}") from None
        targets = LocalTargets(folder / "targets")
        targets.register_node(NODE, "127.0.0.1", exporter_port)
        targets.register_job(JOB_ID, [RankEndpoint("127.0.0.1", rank_port, 0, NODE)])
        yield scrape
    finally:
        if prometheus is not None:
            prometheus.stop()
        for process in processes:
            stop_process_group(process, grace=10.0)


def test_the_real_jobs_scrape_the_exporter_and_the_rank_over_tls(secured):
    def all_up():
        values = secured.values(f'up{{job=~"{REAL_JOBS}"}}')
        return len(values) == 2 and set(values.values()) == {1.0} and values

    try:
        wait_for(all_up, 60, "the rank and the exporter up over TLS")
    except AssertionError as error:
        raise AssertionError(f"{error}: {secured.values('up')}\n{secured.logs()}") from None
    for job in SECURED_JOBS:
        [target] = secured.targets(job)
        assert target["scrapeUrl"].startswith("https://127.0.0.1:"), target
        assert target["health"] == "up" and target["lastError"] == "", target

    # Both say at start how they serve.
    exporter_log = (secured.workdir / "exporter.log").read_text()
    assert (
        "/metrics (client certificates: RequireAndVerifyClientCert; basic auth: 1 user(s))"
        in (exporter_log)
        and " on https://127.0.0.1:" in exporter_log
    ), exporter_log
    assert "rank 0: metrics at https://127.0.0.1:" in (secured.workdir / "rank.log").read_text()

    # The exporter's GPU series (from the scripted NVML) and the rank's arrive whole.
    [exporter] = secured.targets(NODES)
    assert secured.values(f'ugro_node_gpus{{job="{NODES}"}}') == {
        f"{NODES}/{exporter['labels']['instance']}": GPUS
    }
    [gpus_up] = secured.query(f'count(ugro_gpu_up{{job="{NODES}"}} == 1)')
    assert float(gpus_up["value"][1]) == GPUS
    steps = f'ugro_train_steps_total{{job="{RANKS}", job_id="{JOB_ID}", rank="0"}}'
    [first] = wait_for(lambda: list(secured.values(steps).values()), 30, "the rank's steps")
    wait_for(
        lambda: [v for v in secured.values(steps).values() if v > first], 60, "the steps to rise"
    )
    # The recording rules read the secured series as any others.
    wait_for(
        lambda: [
            v
            for v in secured.values(
                f'job_rank:ugro_train_steps:rate1m{{job_id="{JOB_ID}"}}'
            ).values()
            if v > 0
        ],
        60,
        "a recorded step rate",
    )


# Each bad job's cause, as Prometheus reports it in the target's lastError.
EXPECTED_ERRORS = {
    "bad-password": "server returned HTTP status 401 Unauthorized",
    "other-ca-cert": "remote error: tls: unknown certificate authority",
    "expired-cert": "remote error: tls: expired certificate",
    "no-cert": "remote error: tls: certificate required",
    # What Go's servers (node_exporter, Prometheus) answer a plain-HTTP request on TLS too.
    "plain-http": "server returned HTTP status 400 Bad Request",
}


def test_each_bad_scrape_job_is_refused_with_its_reason_and_the_real_jobs_stay_up(secured):
    assert set(secured.bad_jobs) == set(EXPECTED_ERRORS)

    def errors() -> dict[str, list[str]]:
        return {
            job: [t["lastError"] for t in secured.targets(job) if t["health"] == "down"]
            for job in secured.bad_jobs
        }

    def all_refused_naming_the_cause():
        found = errors()
        return all(
            len(found[job]) == 2 and all(expected in error for error in found[job])
            for job, expected in EXPECTED_ERRORS.items()
        )

    # Polled: a client certificate is refused after a TLS 1.3 client has sent its request, and
    # an endpoint that closes at once with that request unread resets the connection, which
    # Prometheus may then report instead of the alert ("write: connection reset by peer").
    try:
        wait_for(all_refused_naming_the_cause, 60, "every bad job's targets down, with the cause")
    except AssertionError as error:
        raise AssertionError(f"{error}: {errors()}\n{secured.logs()}") from None
    for job in secured.bad_jobs:
        values = secured.values(f'up{{job="{job}"}}')
        assert len(values) == 2 and set(values.values()) == {0.0}, (job, values)

    # Several failed scrapes of every bad job later, every scrape of the real jobs succeeded.
    wait_for(
        lambda: (
            min(
                secured.values(
                    f'count_over_time(up{{job=~"{"|".join(secured.bad_jobs)}"}}[10m])'
                ).values(),
                default=0,
            )
            >= BAD_SCRAPES
        ),
        60,
        f"{BAD_SCRAPES} scrapes of every bad job",
    )
    real = f'up{{job=~"{REAL_JOBS}"}}[10m]'
    assert set(secured.values(f"min_over_time({real})").values()) == {1.0}
    counts = secured.values(f"count_over_time({real})")
    assert len(counts) == 2 and min(counts.values()) >= BAD_SCRAPES, counts
