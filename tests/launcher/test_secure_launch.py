"""ugro-launch with a web configuration: the ranks and exporters it starts on real SSH nodes
serve TLS with client certificates and basic auth, only paths travel on command lines and in
environments, and preflight refuses a node whose file is missing, open to others, or invalid.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import pathlib
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest
import yaml

from tests.support import wait_for
from tests.support.certs import CertificateAuthority, KeyPair, bcrypt_hash, secured_web_config
from ugro.common.ports import free_port

from .test_launch import Launcher, job_processes

PASSWORD = "correct horse battery staple"
USER = "prometheus"
RANK_PORT, EXPORTER_PORT = 9500, 9490  # the inventory's defaults
AGENT = [sys.executable, "-m", "ugro.launcher.agent"]


@dataclass(frozen=True)
class Secrets:
    """A CA, each node's server certificate and web configuration, and a scraper's client."""

    ca: CertificateAuthority
    client: KeyPair
    password_hash: str
    web_configs: dict[str, pathlib.Path]  # node name -> its web config file

    def key_file(self, node: str) -> pathlib.Path:
        return self.web_configs[node].parent / "server.key"


def write_web_config(
    directory: pathlib.Path, server: KeyPair, ca: CertificateAuthority, password_hash: str
) -> pathlib.Path:
    """A node's web configuration and its files, all mode 0600, as an operator installs them."""
    directory.mkdir(parents=True)
    shutil.copy(server.cert, directory / "server.crt")
    shutil.copy(server.key, directory / "server.key")
    shutil.copy(ca.cert_file, directory / "ca.crt")
    web_config = directory / "web-config.yml"
    web_config.write_text(
        yaml.safe_dump(
            secured_web_config("server.crt", "server.key", "ca.crt", {USER: password_hash})
        )
    )
    for file in directory.iterdir():
        file.chmod(0o600)
    return web_config


def make_secrets(directory: pathlib.Path, nodes: dict[str, str]) -> Secrets:
    """``nodes``: name -> address, the address each server certificate is issued for."""
    ca = CertificateAuthority(directory / "ca")
    password_hash = bcrypt_hash(PASSWORD)
    web_configs = {
        name: write_web_config(
            directory / "nodes" / name,
            ca.issue(f"server-{name}", server=True, names=(address, name)),
            ca,
            password_hash,
        )
        for name, address in nodes.items()
    }
    return Secrets(ca, ca.issue(USER), password_hash, web_configs)


def name_web_configs(launcher: Launcher, web_configs: dict[str, pathlib.Path | str]) -> None:
    """Each node of the launcher's inventory names its own web config file."""
    data = yaml.safe_load(launcher.inventory.read_text())
    for node in data["nodes"]:
        node["web_config"] = str(web_configs[node["name"]])
    launcher.inventory.write_text(yaml.safe_dump(data))


def https_get(
    secrets: Secrets, address: str, port: int, *, client: bool = True, password: bool = True
) -> tuple[int, str] | str:
    """``(status, body)`` of GET /metrics, or "refused (ERROR)" where the server refused the
    connection (a failed handshake shows as an alert, a reset or an end of file)."""
    context = ssl.create_default_context(cafile=secrets.ca.cert_file)
    if client:
        context.load_cert_chain(secrets.client.cert, secrets.client.key)
    headers = {}
    if password:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    connection = http.client.HTTPSConnection(address, port, timeout=10, context=context)
    try:
        connection.request("GET", "/metrics", headers=headers)
        reply = connection.getresponse()
        return reply.status, reply.read().decode()
    except (ssl.SSLError, ConnectionError) as error:
        return f"refused ({type(error).__name__})"
    finally:
        connection.close()


def serves_metrics(secrets: Secrets, address: str, port: int, series: str) -> bool:
    answer = https_get(secrets, address, port)
    return isinstance(answer, tuple) and answer[0] == 200 and series in answer[1]


def exposed_text(process: psutil.Process) -> str:
    """What any user of the node may read of a process: its command line and environment
    (the environment only by its owner and root, but it is handed down to every child)."""
    return "\n".join([*process.cmdline(), *(f"{k}={v}" for k, v in process.environ().items())])


def secret_material(secrets: Secrets, node: str) -> list[str]:
    """Strings that must never show in a process's command line or environment."""
    key_body = "".join(secrets.key_file(node).read_text().splitlines()[1:-1])
    client_key_body = "".join(secrets.client.key.read_text().splitlines()[1:-1])
    return [
        PASSWORD,
        secrets.password_hash,
        key_body[:40],
        client_key_body[:40],
        "PRIVATE KEY",
        "BEGIN CERTIFICATE",
    ]


# ---------------------------------------------------------------------------- launches


@pytest.fixture
def secured(tmp_path, namespace_cluster) -> Iterator[tuple[Launcher, Secrets]]:
    cluster = namespace_cluster(2)
    launcher = Launcher(tmp_path, cluster, tmp_path / "targets", scraped=False)
    secrets = make_secrets(tmp_path / "tls", {node.name: node.address for node in cluster.nodes})
    name_web_configs(launcher, secrets.web_configs)
    yield launcher, secrets
    launcher.kill_watchers()


def test_ranks_and_exporters_serve_tls_and_basic_auth_and_see_only_paths(secured):
    launcher, secrets = secured
    cluster = launcher.cluster
    started = launcher.run("secure", nproc=1)
    assert started.returncode == 0, started.stderr + started.stdout

    for node in cluster.nodes:
        wait_for(
            lambda node=node: serves_metrics(
                secrets, node.address, RANK_PORT, "ugro_train_rank_info{"
            ),
            120,
            f"the rank on {node.name} answering https",
        )
        assert serves_metrics(secrets, node.address, EXPORTER_PORT, "ugro_node_info{")
        for port in (RANK_PORT, EXPORTER_PORT):
            # No client certificate: the handshake is refused, whatever the password.
            refused = https_get(secrets, node.address, port, client=False)
            assert isinstance(refused, str) and refused.startswith("refused"), refused
            # The certificate without the password: 401, and no metrics.
            status, body = https_get(secrets, node.address, port, password=False)
            assert status == 401 and "ugro_" not in body

    for node in cluster.nodes:
        web_config = str(secrets.web_configs[node.name])
        ranks = [
            psutil.Process(pid)
            for name, pid, cmdline in job_processes(cluster, "secure")
            if name == node.name
            and "ugro.trainer.train" in cmdline
            and "torch.distributed.run" not in cmdline
        ]
        exporters = [psutil.Process(pid) for pid in node.find_processes("ugro.exporter")]
        assert ranks and len(exporters) == 1
        assert all(rank.environ()["UGRO_WEB_CONFIG"] == web_config for rank in ranks)
        argv = exporters[0].cmdline()
        assert argv[argv.index("--web.config.file") + 1] == web_config
        supervisors_torchruns_ranks = [
            psutil.Process(pid) for name, pid, _ in job_processes(cluster, "secure")
            if name == node.name
        ]  # fmt: skip
        for process in [*supervisors_torchruns_ranks, *exporters]:
            text = exposed_text(process)
            for secret in secret_material(secrets, node.name):
                assert secret not in text, (process.cmdline(), secret)

    assert launcher.record("secure")["metrics_scheme"] == "https"
    # Nothing secret in what the launcher keeps or hands Prometheus either.
    kept = (launcher.state_dir / "secure.json").read_text()
    kept += "".join(p.read_text() for p in launcher.targets_dir.rglob("*.json"))
    assert PASSWORD not in kept and secrets.password_hash not in kept

    stopped = launcher("stop", "secure")
    assert stopped.returncode == 0, stopped.stderr + stopped.stdout
    assert job_processes(cluster, "secure") == []


def assert_refused_at_preflight(launcher: Launcher, job_id: str, node: str, *expected: str):
    result = launcher.run(job_id, nproc=1)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"preflight failed on {node}: nothing was started" in result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith(f"{node} "))
    assert "FAILED" in row
    for text in expected:
        assert text in row, row
    assert_nothing_left(launcher, job_id)


def assert_nothing_left(launcher: Launcher, job_id: str) -> None:
    """No record, no targets, no process of the job, no exporter."""
    assert not (launcher.state_dir / f"{job_id}.json").exists()
    assert not (launcher.targets_dir / "ranks" / f"{job_id}.json").exists()
    assert job_processes(launcher.cluster, job_id) == []
    assert all(not node.find_processes("ugro.exporter") for node in launcher.cluster.nodes)


def test_preflight_refuses_a_missing_open_or_invalid_web_config_and_starts_nothing(secured):
    launcher, secrets = secured
    a_config, b_config = secrets.web_configs["node-a"], secrets.web_configs["node-b"]

    missing = b_config.with_name("not-there.yml")
    name_web_configs(launcher, {"node-a": a_config, "node-b": missing})
    assert_refused_at_preflight(
        launcher, "missing", "node-b", f"web_config: {missing}: cannot read the web configuration"
    )
    name_web_configs(launcher, secrets.web_configs)

    key = secrets.key_file("node-a")
    key.chmod(0o644)
    assert_refused_at_preflight(
        launcher,
        "open-key",
        "node-a",
        f"web_config: {a_config}: tls_server_config.key_file {key} has mode 0644",
        f"chmod 600 {key}",
    )
    key.chmod(0o600)

    a_config.chmod(0o640)
    assert_refused_at_preflight(
        launcher, "open-config", "node-a", f"web_config: {a_config} has mode 0640"
    )
    a_config.chmod(0o600)

    document = yaml.safe_load(b_config.read_text())
    # Prometheus's name for the client side, a likely slip in a server's file.
    document["tls_config"] = document.pop("tls_server_config")
    b_config.write_text(yaml.safe_dump(document))
    assert_refused_at_preflight(
        launcher, "invalid", "node-b", f"web_config: {b_config}: tls_config: unknown field"
    )

    # Valid on each node, but one serves https and the other plain HTTP with a password:
    # Prometheus's one scrape job for the ranks could not scrape both.
    b_config.write_text(yaml.safe_dump({"basic_auth_users": {USER: secrets.password_hash}}))
    result = launcher.run("mixed", nproc=1)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "the nodes' endpoints would not serve one scheme (https on node-a; http on node-b)"
        in result.stderr
    )
    assert_nothing_left(launcher, "mixed")


# ---------------------------------------------------------------------------- the agent


def agent_json(*args: str) -> dict:
    result = subprocess.run(
        [*AGENT, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def basic_auth_only(directory: pathlib.Path) -> pathlib.Path:
    directory.mkdir(parents=True)
    web_config = directory / "web-config.yml"
    web_config.write_text(yaml.safe_dump({"basic_auth_users": {USER: bcrypt_hash(PASSWORD)}}))
    web_config.chmod(0o600)
    return web_config


@pytest.mark.parametrize("kind", ["tls", "tls12", "basic-auth-only"])
def test_ensure_exporter_starts_a_secured_exporter_and_finds_it_without_credentials(
    tmp_path, exporters, kind
):
    secrets = None
    if kind.startswith("tls"):
        secrets = make_secrets(tmp_path / "tls", {"node": "127.0.0.1"})
        web_config = secrets.web_configs["node"]
    if kind == "tls12":
        # TLS 1.2 refuses a client without a certificate inside the handshake, before the
        # agent's probe sees the server's certificate: the refusal is the answer.
        document = yaml.safe_load(web_config.read_text())
        document["tls_server_config"]["max_version"] = "TLS12"
        web_config.write_text(yaml.safe_dump(document))
    elif kind == "basic-auth-only":
        web_config = basic_auth_only(tmp_path / "auth")
    port = free_port()
    args = ["ensure-exporter", f"--port={port}", "--node=node", f"--workdir={tmp_path / 'w'}"]
    started = agent_json(*args, f"--web-config={web_config}")
    exporters.extend([started["pid"]] if "pid" in started else [])
    assert started["state"] == "started", started
    argv = psutil.Process(started["pid"]).cmdline()
    assert argv[argv.index("--web.config.file") + 1] == str(web_config)
    assert agent_json(*args, f"--web-config={web_config}") == {"state": "running", "port": port}
    # Asked for plain HTTP, the agent does not take the secured exporter for one.
    assert agent_json(*args) == {
        "state": "failed",
        "reason": f"port {port} is in use by another program",
    }
    if kind == "tls":
        # The node's certificate was renewed; the exporter still serves the old one.
        renewed = secrets.ca.issue("renewed", server=True, names=("127.0.0.1",))
        shutil.copy(renewed.cert, web_config.with_name("server.crt"))
        shutil.copy(renewed.key, web_config.with_name("server.key"))
        answer = agent_json(*args, f"--web-config={web_config}")
        assert answer["state"] == "failed"
        assert answer["reason"].startswith(
            f"the TLS server on port {port} presents another certificate than "
            f"{web_config.with_name('server.crt')} (a ugro-exporter started before"
        )


def test_a_plain_exporter_is_not_taken_for_a_secured_one(tmp_path, exporters):
    web_config = basic_auth_only(tmp_path / "auth")
    port = free_port()
    args = ["ensure-exporter", f"--port={port}", "--node=node", f"--workdir={tmp_path / 'w'}"]
    plain = agent_json(*args)
    exporters.extend([plain["pid"]] if "pid" in plain else [])
    assert plain["state"] == "started", plain
    refused = agent_json(*args, f"--web-config={web_config}")
    assert refused["state"] == "failed"
    assert refused["reason"] == (
        f"a ugro-exporter serves plain HTTP on port {port}, without the web configuration "
        f"{web_config}: stop it (`ugro-launch stop-exporters`, or its service), so that one "
        f"with --web.config.file {web_config} starts"
    )
    broken = tmp_path / "broken.yml"
    broken.write_text("basic_auth_users: {prometheus: not-a-hash}\n")
    answer = agent_json(*args, f"--web-config={broken}")
    assert answer["state"] == "failed"
    assert answer["reason"].startswith(f"web_config: {broken}: basic_auth_users.prometheus:")


def test_preflight_answers_the_scheme_and_names_what_is_wrong(tmp_path):
    web_config = make_secrets(tmp_path / "tls", {"node": "127.0.0.1"}).web_configs["node"]
    args = ["preflight", f"--workdir={tmp_path / 'w'}"]
    report = agent_json(*args, f"--web-config={web_config}")
    assert (report["problems"], report["metrics_scheme"]) == ([], "https")
    assert agent_json(*args)["metrics_scheme"] is None
    os.chmod(web_config, 0o604)
    report = agent_json(*args, f"--web-config={web_config}")
    assert report["problems"] == [
        f"web_config: {web_config} has mode 0604, open to group or others; it must be its "
        f"owner's alone: chmod 600 {web_config}"
    ]


def test_a_slurm_node_refuses_a_web_config_open_to_others_before_torchrun(tmp_path):
    web_config = make_secrets(tmp_path / "tls", {"node": "127.0.0.1"}).web_configs["node"]
    web_config.chmod(0o644)
    result = subprocess.run(
        [sys.executable, "-m", "ugro.launcher.agent.slurm_node", "--job-id=j",
         "--nproc-per-node=1", "--rdzv-port=29500", "--metrics-base-port=9500",
         f"--web-config={web_config}", "--", "-c", "pass"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "SLURMD_NODENAME": "gpu-7"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        f"ugro: gpu-7: web_config: {web_config} has mode 0644, open to group or others; it "
        f"must be its owner's alone: chmod 600 {web_config}\n"
    )


def test_a_record_with_an_unknown_scheme_is_named(tmp_path):
    from ugro.launcher.records import JobRecord, RecordError, record_from_text

    record = JobRecord("j", "/i.yml", ["a"], 1, ["train.py"], 29500, 1.0)
    path = tmp_path / "j.json"
    assert record_from_text(path, record._text()).metrics_scheme is None
    record.metrics_scheme = "https"
    assert record_from_text(path, record._text()) == record
    record.metrics_scheme = "ftp"
    with pytest.raises(RecordError) as error:
        record_from_text(path, record._text())
    expected = 'metrics_scheme: expected "https", "http" or null, got \'ftp\''
    assert str(error.value) == f"{path}: {expected}"
