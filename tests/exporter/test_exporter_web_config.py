"""``ugro-exporter --web.config.file``: a file it cannot use stops it before it listens, with
one line naming the field; a usable one serves /metrics only to a client with the CA-signed
certificate and the password."""

from __future__ import annotations

import base64
import os
import pathlib
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import yaml

from tests.support import sample, sample_values, wait_for
from tests.support.certs import TlsMaterial
from ugro.common.ports import free_port

REPO = pathlib.Path(__file__).resolve().parents[2]
FAKE = "tests.exporter.fake_nvml:from_environment"
PASSWORD = "s3cret"


def exporter_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UGRO_FAKE_NVML")}
    env["PYTHONPATH"] = str(REPO)  # so the scripted NVML double is importable
    env.update(extra)
    return env


def mtls_config(tls: TlsMaterial, **fields: object) -> dict:
    return tls.web_config(PASSWORD, **fields)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


BAD_FILES = {
    "not YAML": ("tls_server_config: [", "is not valid YAML"),
    "unknown field": (
        lambda t: {"tls_server_config": {"certfile": "a"}},
        "tls_server_config.certfile",
    ),
    "plain password": (
        lambda t: {"basic_auth_users": {"prometheus": PASSWORD}},
        "basic_auth_users.prometheus: expected a bcrypt hash",
    ),
    "key of another certificate": (
        lambda t: mtls_config(t, key_file=str(t.client.key)),
        "tls_server_config.key_file:",
    ),
    "missing client CA": (
        lambda t: mtls_config(t, client_ca_file="missing-ca.crt"),
        "tls_server_config.client_ca_file: cannot read",
    ),
    "unverified client certificates": (
        lambda t: mtls_config(t, client_auth_type="RequireAnyClientCert"),
        "tls_server_config.client_auth_type:",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_web_config_exits_2_with_one_line_naming_the_field_and_never_listens(
    tmp_path, tls, case
):
    content, expected = BAD_FILES[case]
    path = tmp_path / "web-config.yml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content(tls)))
    port = free_port()
    result = subprocess.run(
        [
            sys.executable, "-m", "ugro.exporter", "--listen", f"127.0.0.1:{port}",
            "--nvml-module", FAKE, "--web.config.file", str(path),
        ],
        env=exporter_env(UGRO_FAKE_NVML_GPUS="1"), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"ugro-exporter: --web.config.file: {path}: "), lines[0]
    assert expected in lines[0]
    assert result.stdout == ""
    assert not listening(port)


def test_an_empty_or_missing_web_config_path_is_one_line(tmp_path):
    for value, expected in (
        ("", "--web.config.file '': expected the path"),
        (str(tmp_path / "nope.yml"), "cannot read the web configuration"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "ugro.exporter", "--web.config.file", value,
             "--listen", "127.0.0.1:0"],
            env=exporter_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2
        [line] = result.stderr.strip().splitlines()
        assert expected in line, line


def fetch(url: str, tls: TlsMaterial, *, client=None, password: str | None = None) -> str:
    context = ssl.create_default_context(cafile=str(tls.ca.cert_file))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    request = urllib.request.Request(url)
    if password is not None:
        token = base64.b64encode(f"prometheus:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return response.read().decode()


def test_the_exporter_serves_mtls_and_basic_auth_from_its_web_config(tmp_path, tls, start_process):
    path = tmp_path / "web-config.yml"
    path.write_text(yaml.safe_dump(mtls_config(tls)))
    port = free_port()
    process = start_process(
        [
            sys.executable, "-m", "ugro.exporter", "--listen", f"127.0.0.1:{port}",
            "--node", "tls-node", "--nvml-module", FAKE, "--web.config.file", str(path),
        ],
        exporter_env(UGRO_FAKE_NVML_GPUS="2"),
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}/metrics"
    text = wait_for(
        lambda: process.poll() is None and fetch(url, tls, client=tls.client, password=PASSWORD),
        30,
        "a scrape over mTLS",
    )
    assert sample(sample_values(text), "ugro_node_gpus") == 2
    with pytest.raises(urllib.error.HTTPError) as refused:
        fetch(url, tls, client=tls.client, password="wrong")
    assert refused.value.code == 401
    assert refused.value.headers.get("WWW-Authenticate", "").startswith("Basic")
    for client in (None, tls.wrong_client, tls.expired_client, tls.self_signed_client):
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            fetch(url, tls, client=client, password=PASSWORD)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
    # Still serving the right client after all of that.
    assert "ugro_node_gpus" in fetch(url, tls, client=tls.client, password=PASSWORD)


def refused_reason(port: int, tls: TlsMaterial, client) -> str | None:
    """What a TLS 1.3 client learns when it sends a request as soon as its side of the handshake
    is done, as Prometheus does: the server checks the client's certificate only then."""
    context = ssl.create_default_context(cafile=str(tls.ca.cert_file))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        try:
            connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            connection.recv(1024)
        except ssl.SSLError as error:
            return error.reason
        except OSError as error:
            return type(error).__name__
    return "answered"


def test_a_refused_client_certificate_is_told_why_every_time(tmp_path, tls, start_process):
    path = tmp_path / "web-config.yml"
    path.write_text(yaml.safe_dump(mtls_config(tls)))
    port = free_port()
    process = start_process(
        [
            sys.executable, "-m", "ugro.exporter", "--listen", f"127.0.0.1:{port}",
            "--nvml-module", FAKE, "--web.config.file", str(path),
        ],
        exporter_env(UGRO_FAKE_NVML_GPUS="1"),
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}/metrics"
    wait_for(
        lambda: process.poll() is None and fetch(url, tls, client=tls.client, password=PASSWORD),
        30,
        "a scrape over mTLS",
    )
    expected = {
        "no certificate": (None, "CERTIFICATE_REQUIRED"),
        "another CA's": (tls.wrong_client, "UNKNOWN_CA"),
        "expired": (tls.expired_client, "CERTIFICATE_EXPIRED"),
    }
    for case, (client, alert) in expected.items():
        reasons = [refused_reason(port, tls, client) for _ in range(20)]
        assert all(alert in str(reason) for reason in reasons), (case, reasons)
