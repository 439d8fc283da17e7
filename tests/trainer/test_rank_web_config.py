"""A rank's web configuration (``UGRO_WEB_CONFIG`` or ``Telemetry(web_config=...)``): a file it
cannot use stops the rank at ``Telemetry()`` with one line naming the field, before its
endpoint binds, rather than serving plain HTTP where TLS or a password was asked for."""

from __future__ import annotations

import base64
import socket
import ssl
import threading
import urllib.error
import urllib.request

import pytest
import yaml

from tests.support.certs import TlsMaterial
from ugro.common.ports import free_port
from ugro.trainer import Telemetry, TelemetryConfigError

PASSWORD = "s3cret"
IDENTITY = {"job_id": "tls-job", "rank": 0, "local_rank": 0, "world_size": 1, "node": "n1"}


def mtls_config(tls: TlsMaterial, **fields: object) -> dict:
    return tls.web_config(PASSWORD, **fields)


def bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


BAD = {
    "not YAML": ("basic_auth_users: {", "is not valid YAML"),
    "unknown field": (lambda t: {"tls_server_config": {"cert": "a"}}, "tls_server_config.cert:"),
    "plain password": (
        lambda t: {"basic_auth_users": {"prometheus": PASSWORD}},
        "basic_auth_users.prometheus: expected a bcrypt hash",
    ),
    "key of another certificate": (
        lambda t: mtls_config(t, key_file=str(t.client.key)),
        "tls_server_config.key_file:",
    ),
    "max below min": (
        lambda t: mtls_config(t, min_version="TLS13", max_version="TLS12"),
        "tls_server_config.max_version:",
    ),
}


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("source", ["UGRO_WEB_CONFIG", "web_config"])
def test_a_bad_web_config_raises_naming_the_field_and_binds_nothing(tmp_path, tls, case, source):
    content, expected = BAD[case]
    path = tmp_path / "web-config.yml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content(tls)))
    port = free_port()
    threads = set(threading.enumerate())
    setting = (
        {"env": {"UGRO_WEB_CONFIG": str(path)}}
        if source == "UGRO_WEB_CONFIG"
        else {"env": {}, "web_config": path}
    )
    with pytest.raises(TelemetryConfigError) as caught:
        Telemetry(**IDENTITY, metrics_port=port, bind_address="127.0.0.1", **setting)
    message = str(caught.value)
    assert message.startswith(f"{source}: {path}: "), message
    assert expected in message and "\n" not in message
    assert bindable(port)
    assert set(threading.enumerate()) <= threads  # no server thread was left behind


def test_an_empty_variable_serves_plain_http(tmp_path):
    with Telemetry(
        **IDENTITY,
        metrics_port=0,
        bind_address="127.0.0.1",
        env={"UGRO_WEB_CONFIG": ""},
        final_scrape_timeout=0,
    ) as telemetry:
        assert telemetry.metrics_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(telemetry.metrics_url, timeout=10) as response:
            assert b"ugro_train_rank_info" in response.read()


def test_a_good_web_config_serves_the_rank_over_mtls_with_basic_auth(tmp_path, tls):
    path = tmp_path / "web-config.yml"
    path.write_text(yaml.safe_dump(mtls_config(tls)))
    with Telemetry(
        **IDENTITY,
        metrics_port=0,
        bind_address="127.0.0.1",
        env={"UGRO_WEB_CONFIG": str(path)},
        final_scrape_timeout=0,
    ) as telemetry:
        url = telemetry.metrics_url
        assert url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(tls.ca.cert_file))
        context.load_cert_chain(tls.client.cert, tls.client.key)
        token = base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            assert b"ugro_train_rank_info{" in response.read()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, context=context, timeout=10)
        assert refused.value.code == 401
