"""The web configuration loader against malformed and hostile files, and against promtool.

Every file it cannot use is one WebConfigError line naming the file and the field path, never a
traceback, a hang or a silently weaker endpoint. Every web config the project ships is accepted
by the loader and by ``promtool check web-config`` alike, and what promtool refuses the loader
refuses too (it refuses more: what Python's ssl module cannot honour, and what is unsafe).
"""

from __future__ import annotations

import base64
import os
import pathlib
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.support.certs import TlsMaterial, bcrypt_hash
from tests.support.hostile_files import BINARY, billion_laughs
from ugro.common.config_files import MAX_CONFIG_BYTES
from ugro.common.web_config import (
    MAX_BCRYPT_COST,
    BasicAuth,
    WebConfigError,
    load_web_config,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED_WEB_CONFIGS = [ROOT / "exporter" / "web-config.example.yml"]
# The password whose hash exporter/web-config.example.yml holds, as its comment says.
EXAMPLE_PASSWORD = "change-me"
PASSWORD = "s3cret"
HASH = bcrypt_hash(PASSWORD)


def server_tls(tls: TlsMaterial, **fields: Any) -> dict:
    """A tls_server_config with the server's certificate and key, plus ``fields``."""
    return {"cert_file": str(tls.server.cert), "key_file": str(tls.server.key), **fields}


def mtls(tls: TlsMaterial, **fields: Any) -> dict:
    """A tls_server_config that requires a client certificate signed by the test CA."""
    required = {
        "client_auth_type": "RequireAndVerifyClientCert",
        "client_ca_file": str(tls.ca.cert_file),
    }
    return server_tls(tls, **{**required, **fields})


def write(directory: pathlib.Path, content: object, name: str = "web-config.yml") -> pathlib.Path:
    """``content``: bytes or str as they are, anything else as YAML."""
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(yaml.safe_dump(content))
    return path


def refused(path: pathlib.Path, *expected: str) -> str:
    """The one-line error loading ``path`` gives; it names the file and each ``expected``."""
    with pytest.raises(WebConfigError) as caught:
        load_web_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and "\r" not in message, message
    for text in expected:
        assert text in message, message
    return message


# -- files that are not web configs at all ------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param("tls_server_config: [unclosed", "is not valid YAML", id="not-yaml"),
        pytest.param("tls_server_config:\n\tcert_file: a\n", "is not valid YAML", id="tab-indent"),
        pytest.param(BINARY, "is not UTF-8", id="binary"),
        pytest.param(b"#" * (MAX_CONFIG_BYTES + 1), "is larger than", id="huge"),
        pytest.param(
            f"basic_auth_users:\n  prometheus: {billion_laughs()}\n",
            "aliases",
            id="alias-bomb",
        ),
        pytest.param("a: " + "[" * 200 + "]" * 200 + "\n", "nested deeper", id="deep-nesting"),
        pytest.param("- tls_server_config\n", "expected a mapping, got list", id="a-list"),
        pytest.param("42\n", "expected a mapping, got int", id="a-number"),
        pytest.param("just words\n", "expected a mapping, got str", id="a-string"),
    ],
)
def test_a_file_that_is_no_web_config_is_one_line_naming_it(tmp_path, content, expected):
    refused(write(tmp_path, content), expected)


def test_an_empty_file_is_plain_http_as_the_exporter_toolkit_reads_it(tmp_path):
    config = load_web_config(write(tmp_path, ""))
    assert config.tls is None and config.ssl_context is None and config.scheme == "http"
    assert config.basic_auth_users == {} and not config.secured


def test_a_missing_file_or_a_folder_is_refused_naming_it(tmp_path):
    # Root reads a chmod 000 file, and the tests may run as root: a path that cannot be opened
    # as a file stands in for one that cannot be read (the chmod test is below, for non-root).
    refused(tmp_path / "no-such-file.yml", "cannot read", "No such file")
    refused(tmp_path, "cannot read")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_an_unreadable_file_is_refused_naming_it(tmp_path, tls):
    key = tmp_path / "node.key"
    shutil.copyfile(tls.server.key, key)
    key.chmod(0)
    path = write(tmp_path, {"tls_server_config": server_tls(tls, key_file=str(key))})
    refused(path, ": tls_server_config.key_file: cannot read", "Permission denied")
    path.chmod(0)
    refused(path, "cannot read", "Permission denied")


# -- each field ----------------------------------------------------------------------------------

# Every field with a value of the wrong type, and the field path the error must name.
WRONG_TYPES: dict[str, tuple[Callable[[TlsMaterial], dict], str]] = {
    "tls_server_config": (lambda t: {"tls_server_config": "on"}, "tls_server_config"),
    "cert_file": (
        lambda t: {"tls_server_config": server_tls(t, cert_file=42)},
        "tls_server_config.cert_file",
    ),
    "key_file": (
        lambda t: {"tls_server_config": server_tls(t, key_file=["a.key"])},
        "tls_server_config.key_file",
    ),
    "client_auth_type": (
        lambda t: {"tls_server_config": server_tls(t, client_auth_type=1)},
        "tls_server_config.client_auth_type",
    ),
    "client_ca_file": (
        lambda t: {"tls_server_config": mtls(t, client_ca_file=42)},
        "tls_server_config.client_ca_file",
    ),
    "min_version": (
        lambda t: {"tls_server_config": server_tls(t, min_version=12)},
        "tls_server_config.min_version",
    ),
    "max_version": (
        lambda t: {"tls_server_config": server_tls(t, max_version=True)},
        "tls_server_config.max_version",
    ),
    "prefer_server_cipher_suites": (
        lambda t: {"tls_server_config": server_tls(t, prefer_server_cipher_suites="yes")},
        "tls_server_config.prefer_server_cipher_suites",
    ),
    "http_server_config": (lambda t: {"http_server_config": ["http2"]}, "http_server_config"),
    "http2": (lambda t: {"http_server_config": {"http2": "on"}}, "http_server_config.http2"),
    "headers": (
        lambda t: {"http_server_config": {"headers": "X-Frame-Options: deny"}},
        "http_server_config.headers",
    ),
    "a header's value": (
        lambda t: {"http_server_config": {"headers": {"X-Frame-Options": 1}}},
        "http_server_config.headers.X-Frame-Options",
    ),
    "basic_auth_users": (lambda t: {"basic_auth_users": ["prometheus"]}, "basic_auth_users"),
    "a user's hash": (
        lambda t: {"basic_auth_users": {"prometheus": 10}},
        "basic_auth_users.prometheus",
    ),
    "a user's name": (lambda t: {"basic_auth_users": {7: HASH}}, "basic_auth_users.7"),
}


@pytest.mark.parametrize("case", WRONG_TYPES)
def test_a_wrong_type_at_any_field_names_the_field(tmp_path, tls, case):
    build, field = WRONG_TYPES[case]
    refused(write(tmp_path, build(tls)), f": {field}: ")


@pytest.mark.parametrize(
    ("document", "field"),
    [
        pytest.param({"tls_config": {}}, "tls_config", id="top-level"),
        pytest.param({"basic_auth": {}}, "basic_auth", id="top-level-near-miss"),
        pytest.param(
            {"http_server_config": {"header": {}}}, "http_server_config.header", id="http"
        ),
    ],
)
def test_an_unknown_field_is_refused_by_name(tmp_path, document, field):
    refused(write(tmp_path, document), f": {field}: unknown field", "expected one of")


def test_an_unknown_tls_field_is_refused_by_name(tmp_path, tls):
    path = write(tmp_path, {"tls_server_config": server_tls(tls, certfile="a.crt")})
    refused(path, ": tls_server_config.certfile: unknown field")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cipher_suites", ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]),
        ("curve_preferences", ["X25519"]),
        ("client_allowed_sans", ["prometheus.example.org"]),
    ],
)
def test_each_unsupported_tls_field_is_refused_rather_than_ignored(tmp_path, tls, field, value):
    path = write(tmp_path, {"tls_server_config": mtls(tls, **{field: value})})
    refused(path, f": tls_server_config.{field}: not supported")


@pytest.mark.parametrize("mode", ["RequestClientCert", "RequireAnyClientCert"])
def test_client_auth_without_verification_is_refused(tmp_path, tls, mode):
    path = write(tmp_path, {"tls_server_config": mtls(tls, client_auth_type=mode)})
    refused(path, ": tls_server_config.client_auth_type: ", mode, "RequireAndVerifyClientCert")


# -- certificates and keys -----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["cert_file", "key_file"])
def test_tls_without_a_certificate_or_key_is_refused(tmp_path, tls, field):
    section = server_tls(tls)
    del section[field]
    refused(write(tmp_path, {"tls_server_config": section}), f"tls_server_config.{field}: missing")
    section[field] = ""
    refused(write(tmp_path, {"tls_server_config": section}), f"tls_server_config.{field}: missing")


@pytest.mark.parametrize("field", ["cert_file", "key_file", "client_ca_file"])
def test_a_missing_or_unreadable_file_is_refused_naming_the_field(tmp_path, tls, field):
    # As root, a chmod 000 file is readable: a missing file and a folder are what cannot be read.
    for unreadable in (tmp_path / "missing.pem", tmp_path):
        path = write(tmp_path, {"tls_server_config": mtls(tls, **{field: str(unreadable)})})
        refused(path, f": tls_server_config.{field}: cannot read {unreadable}")


def test_a_key_that_is_not_the_certificates_is_refused(tmp_path, tls):
    path = write(tmp_path, {"tls_server_config": server_tls(tls, key_file=str(tls.client.key))})
    refused(path, ": tls_server_config.key_file: ", "is not the private key of server.crt")


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("cert_file", "holds no PEM certificate"),
        ("key_file", "is not the private key"),
        ("client_ca_file", "holds no PEM CA certificate"),
    ],
)
def test_a_file_that_is_not_pem_is_refused_naming_the_field(tmp_path, tls, field, expected):
    not_pem = write(tmp_path, "not a certificate\n", "not-pem.txt")
    path = write(tmp_path, {"tls_server_config": mtls(tls, **{field: str(not_pem)})})
    refused(path, f": tls_server_config.{field}: ", expected)


def test_a_binary_certificate_is_refused(tmp_path, tls):
    binary = write(tmp_path, BINARY * 1000, "server.der")
    path = write(tmp_path, {"tls_server_config": server_tls(tls, cert_file=str(binary))})
    refused(path, ": tls_server_config.cert_file: ", "holds no PEM certificate")


def test_a_client_ca_without_client_auth_and_client_auth_without_a_ca_are_refused(tmp_path, tls):
    path = write(
        tmp_path, {"tls_server_config": server_tls(tls, client_ca_file=str(tls.ca.cert_file))}
    )
    refused(path, ": tls_server_config.client_auth_type: ", "client_ca_file is given")
    for mode in ("RequireAndVerifyClientCert", "VerifyClientCertIfGiven"):
        path = write(tmp_path, {"tls_server_config": server_tls(tls, client_auth_type=mode)})
        refused(path, ": tls_server_config.client_ca_file: missing", mode)


@pytest.mark.parametrize(
    ("fields", "field", "expected"),
    [
        ({"min_version": "TLS14"}, "min_version", "expected one of TLS10, TLS11, TLS12, TLS13"),
        ({"min_version": "tls12"}, "min_version", "'tls12'"),
        ({"min_version": "SSL3"}, "min_version", "'SSL3'"),
        ({"max_version": "TLS1.3"}, "max_version", "'TLS1.3'"),
        ({"min_version": "TLS13", "max_version": "TLS12"}, "max_version", "below min_version"),
        ({"max_version": "TLS11"}, "max_version", "TLS11 is below min_version TLS12"),
    ],
)
def test_bad_tls_versions_are_refused(tmp_path, tls, fields, field, expected):
    path = write(tmp_path, {"tls_server_config": server_tls(tls, **fields)})
    refused(path, f": tls_server_config.{field}: ", expected)


def test_relative_paths_are_read_from_the_files_folder_not_the_working_directory(
    tmp_path, tls, monkeypatch
):
    folder = tmp_path / "etc" / "ugro"
    (folder / "tls").mkdir(parents=True)
    for source, name in (
        (tls.server.cert, "node.crt"),
        (tls.server.key, "node.key"),
        (tls.ca.cert_file, "ca.crt"),
    ):
        shutil.copyfile(source, folder / "tls" / name)
    path = write(
        folder,
        {
            "tls_server_config": {
                "cert_file": "tls/node.crt",
                "key_file": "tls/node.key",
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_ca_file": "tls/ca.crt",
            }
        },
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_web_config(path)
    assert config.tls.cert_file == folder / "tls" / "node.crt"
    assert config.tls.key_file == folder / "tls" / "node.key"
    assert config.tls.client_ca_file == folder / "tls" / "ca.crt"
    assert config.scheme == "https" and config.ssl_context is not None
    # And a relative path that exists only under the working directory is not found.
    (elsewhere / "only-here.crt").write_bytes(tls.server.cert.read_bytes())
    moved = write(
        folder, {"tls_server_config": server_tls(tls, cert_file="only-here.crt")}, "b.yml"
    )
    refused(moved, ": tls_server_config.cert_file: cannot read", str(folder / "only-here.crt"))


# -- basic auth ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("users", "field", "expected"),
    [
        pytest.param({"prometheus": PASSWORD}, "prometheus", "never a password", id="plain"),
        pytest.param({"prometheus": HASH[:-1]}, "prometheus", "never a password", id="truncated"),
        pytest.param(
            {"prometheus": "$2b$31$" + HASH[7:]}, "prometheus", "bcrypt cost 31", id="cost-31"
        ),
        pytest.param(
            {"prometheus": f"$2b${MAX_BCRYPT_COST + 1}$" + HASH[7:]},
            "prometheus",
            f"expected 4..{MAX_BCRYPT_COST}",
            id="cost-above-limit",
        ),
        pytest.param({"prometheus": "$2b$03$" + HASH[7:]}, "prometheus", "cost 3", id="cost-3"),
        pytest.param({"prometheus": "$1$" + HASH[3:]}, "prometheus", "bcrypt hash", id="md5"),
        pytest.param({"a:b": HASH}, "a:b", "without ':'", id="colon-in-user"),
        pytest.param({"": HASH}, "", "non-empty", id="empty-user"),
        pytest.param({" prometheus": HASH}, " prometheus", "spaces", id="space-around-user"),
    ],
)
def test_bad_basic_auth_users_are_refused(tmp_path, users, field, expected):
    refused(write(tmp_path, {"basic_auth_users": users}), f": basic_auth_users.{field}: ", expected)


@pytest.mark.parametrize(
    "document",
    [
        pytest.param({"basic_auth_users": {"pro\nmetheus": HASH}}, id="user"),
        pytest.param({"http_server_config": {"headers": {"X-A\r\nSet-Cookie": "a"}}}, id="header"),
        pytest.param({"tls\x1b[2J": {}}, id="unknown-field"),
    ],
)
def test_control_characters_in_a_field_name_stay_out_of_the_message(tmp_path, document):
    message = refused(write(tmp_path, document))
    assert message.isprintable(), repr(message)


# -- response headers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"Server": "ugro"}, "expected one of", id="not-settable"),
        pytest.param({"Set-Cookie": "a=b"}, "expected one of", id="set-cookie"),
        pytest.param({"x-frame-options": "deny"}, "expected one of", id="name-case"),
        pytest.param({"X-Frame-Options": "allow"}, "expected one of deny, sameorigin", id="value"),
        pytest.param({"X-Content-Type-Options": "sniff"}, "expected one of nosniff", id="nosniff"),
        pytest.param(
            {"Strict-Transport-Security": "max-age=1\r\nSet-Cookie: session=stolen"},
            "contains control characters",
            id="crlf-injection",
        ),
        pytest.param(
            {"Content-Security-Policy": "default-src 'self'\x00"},
            "contains control characters",
            id="nul",
        ),
        pytest.param({"X-XSS-Protection": ""}, "non-empty string", id="empty"),
    ],
)
def test_bad_headers_are_refused(tmp_path, headers, expected):
    [name] = headers
    path = write(tmp_path, {"http_server_config": {"headers": headers}})
    refused(path, f": http_server_config.headers.{name}: ", expected)


# -- BasicAuth against hostile Authorization headers ---------------------------------------------


def basic(user: bytes | str, password: bytes | str) -> str:
    user = user.encode() if isinstance(user, str) else user
    password = password.encode() if isinstance(password, str) else password
    return "Basic " + base64.b64encode(user + b":" + password).decode()


@pytest.fixture(scope="module")
def auth() -> BasicAuth:
    return BasicAuth({"prometheus": HASH.encode(), "long": bcrypt_hash("p" * 72).encode()})


def test_the_right_password_is_allowed_and_others_are_not(auth):
    assert auth.allows(basic("prometheus", PASSWORD))
    assert auth.allows(basic("prometheus", PASSWORD))  # remembered: still right
    assert auth.allows(f"basic   {basic('prometheus', PASSWORD)[6:]}  ")  # scheme any case
    assert not auth.allows(basic("prometheus", PASSWORD + "x"))
    assert not auth.allows(basic("prometheus", ""))
    assert not auth.allows(basic("nobody", PASSWORD))
    assert not auth.allows(basic("Prometheus", PASSWORD))


def test_passwords_longer_than_bcrypts_72_bytes_are_refused_without_an_exception(auth):
    assert auth.allows(basic("long", "p" * 72))
    # bcrypt reads 72 bytes: a longer password must not pass for its first 72.
    for password in ("p" * 73, "p" * 72 + "anything", "p" * 10_000):
        assert auth.allows(basic("long", password)) is False
    assert auth.allows(basic("prometheus", PASSWORD + "x" * 100)) is False


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(None, id="none"),
        pytest.param("", id="empty"),
        pytest.param("Basic", id="scheme-only"),
        pytest.param("Basic ", id="scheme-and-space"),
        pytest.param("Bearer " + base64.b64encode(b"prometheus:s3cret").decode(), id="bearer"),
        pytest.param("Basic !!!not-base64!!!", id="not-base64"),
        pytest.param("Basic cHJvbWV0aGV1cw", id="bad-padding"),
        pytest.param("Basic " + base64.b64encode(b"prometheus").decode(), id="no-colon"),
        pytest.param(basic(b"\xff\xfeprometheus", PASSWORD), id="user-not-utf8"),
        pytest.param(basic("prometheus", b"\xff\xfe" + PASSWORD.encode()), id="password-bytes"),
        pytest.param(basic("prometheus", PASSWORD).replace("Basic ", "Basic\t\r\n"), id="crlf"),
        pytest.param("Basic " + "A" * 1_000_000, id="huge"),
        pytest.param(basic("prometheus", PASSWORD) + "A" * 5000, id="huge-tail"),
        pytest.param(basic("", ""), id="empty-credentials"),
        pytest.param(basic("prometheus", PASSWORD + "\x00"), id="nul"),
    ],
)
def test_malformed_authorization_headers_are_refused_without_an_exception(auth, header):
    assert auth.allows(header) is False


# -- agreement with promtool ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def check_web_config() -> Callable[[pathlib.Path], subprocess.CompletedProcess[str]]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: run `make setup` (Debian package prometheus)")

    def check(config: pathlib.Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [path, "check", "web-config", str(config)], capture_output=True, text=True, timeout=30
        )

    return check


def place_example_files(example: pathlib.Path, folder: pathlib.Path, tls: TlsMaterial) -> None:
    """Copies ``example`` into ``folder`` with certificate, key and CA files at the paths it
    names (relative to itself), as an operator sets it up."""
    shutil.copyfile(example, folder / example.name)
    section = yaml.safe_load(example.read_text()).get("tls_server_config") or {}
    sources = {
        "cert_file": tls.server.cert,
        "key_file": tls.server.key,
        "client_ca_file": tls.ca.cert_file,
    }
    for field, source in sources.items():
        if field in section:
            target = folder / section[field]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    if "key_file" in section:
        os.chmod(folder / section["key_file"], 0o600)


@pytest.mark.parametrize("example", SHIPPED_WEB_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_web_config_is_accepted_by_ugro_and_promtool(
    tmp_path, tls, check_web_config, example
):
    place_example_files(example, tmp_path, tls)
    copy = tmp_path / example.name
    config = load_web_config(copy)
    assert config.scheme == "https"
    assert config.tls.client_auth_type == "RequireAndVerifyClientCert"
    assert config.tls.min_version == "TLS12"
    # Its hash is of the password its comment names, so its instructions can be followed.
    assert BasicAuth(config.basic_auth_users).allows(basic("prometheus", EXAMPLE_PASSWORD))
    result = check_web_config(copy)
    assert result.returncode == 0, result.stdout + result.stderr


# Valid files: both accept. (name, document)
VALID: dict[str, Callable[[TlsMaterial], dict]] = {
    "empty TLS section": lambda t: {"tls_server_config": {}},
    "TLS only": lambda t: {"tls_server_config": server_tls(t)},
    "mTLS, TLS 1.3 only": lambda t: {
        "tls_server_config": mtls(t, min_version="TLS13", max_version="TLS13")
    },
    "client certificate if given": lambda t: {
        "tls_server_config": mtls(t, client_auth_type="VerifyClientCertIfGiven")
    },
    "basic auth only": lambda t: {"basic_auth_users": {"prometheus": HASH, "grafana": HASH}},
    "headers": lambda t: {
        "tls_server_config": server_tls(t, prefer_server_cipher_suites=False),
        "http_server_config": {
            "http2": False,
            "headers": {
                "Strict-Transport-Security": "max-age=31536000",
                "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "sameorigin",
            },
        },
    },
}

# Invalid files: (document, whether promtool refuses it too). ugro refuses every one; where
# promtool does not, ugro is stricter on purpose (the loader's module docstring says why).
INVALID: dict[str, tuple[Callable[[TlsMaterial], object], bool]] = {
    "not YAML": (lambda t: "tls_server_config: [unclosed", True),
    "a list": (lambda t: ["tls_server_config"], True),
    "unknown top-level field": (lambda t: {"tls_config": {}}, True),
    "unknown TLS field": (lambda t: {"tls_server_config": server_tls(t, certfile="x")}, True),
    "wrong type": (lambda t: {"http_server_config": {"http2": "on"}}, True),
    "no key": (lambda t: {"tls_server_config": {"cert_file": str(t.server.cert)}}, True),
    "no certificate": (lambda t: {"tls_server_config": {"key_file": str(t.server.key)}}, True),
    "missing certificate file": (
        lambda t: {"tls_server_config": server_tls(t, cert_file="/nonexistent/node.crt")},
        True,
    ),
    "certificate is a folder": (
        lambda t: {"tls_server_config": server_tls(t, cert_file=str(t.server.cert.parent))},
        True,
    ),
    "key of another certificate": (
        lambda t: {"tls_server_config": server_tls(t, key_file=str(t.client.key))},
        True,
    ),
    "certificate not PEM": (
        lambda t: {"tls_server_config": server_tls(t, cert_file=str(t.server.key))},
        True,
    ),
    "unknown client auth type": (
        lambda t: {"tls_server_config": mtls(t, client_auth_type="Maybe")},
        True,
    ),
    "client CA without client auth": (
        lambda t: {"tls_server_config": server_tls(t, client_ca_file=str(t.ca.cert_file))},
        True,
    ),
    "unknown TLS version": (
        lambda t: {"tls_server_config": server_tls(t, min_version="TLS14")},
        True,
    ),
    "lower-case TLS version": (
        lambda t: {"tls_server_config": server_tls(t, min_version="tls12")},
        True,
    ),
    "plain-text password": (lambda t: {"basic_auth_users": {"prometheus": PASSWORD}}, True),
    "bcrypt cost 3": (lambda t: {"basic_auth_users": {"prometheus": "$2b$03$" + HASH[7:]}}, True),
    "header not settable": (lambda t: {"http_server_config": {"headers": {"Server": "x"}}}, True),
    "bad X-Frame-Options": (
        lambda t: {"http_server_config": {"headers": {"X-Frame-Options": "allow"}}},
        True,
    ),
    # ugro only:
    "client auth without a CA": (
        lambda t: {
            "tls_server_config": server_tls(t, client_auth_type="RequireAndVerifyClientCert")
        },
        False,
    ),
    "client CA not PEM": (
        lambda t: {"tls_server_config": mtls(t, client_ca_file=str(t.server.key))},
        False,
    ),
    "max_version below min_version": (
        lambda t: {"tls_server_config": server_tls(t, min_version="TLS13", max_version="TLS12")},
        False,
    ),
    "cipher_suites": (
        lambda t: {"tls_server_config": server_tls(t, cipher_suites=["TLS_AES_128_GCM_SHA256"])},
        False,
    ),
    "unverified client certificates": (
        lambda t: {"tls_server_config": mtls(t, client_auth_type="RequireAnyClientCert")},
        False,
    ),
    "bcrypt cost 31": (lambda t: {"basic_auth_users": {"prometheus": "$2b$31$" + HASH[7:]}}, False),
    "user with a colon": (lambda t: {"basic_auth_users": {"a:b": HASH}}, False),
    "CRLF in a header": (
        lambda t: {
            "http_server_config": {
                "headers": {"Strict-Transport-Security": "max-age=1\r\nSet-Cookie: a=b"}
            }
        },
        False,
    ),
}


@pytest.mark.parametrize("case", VALID)
def test_valid_files_are_accepted_by_ugro_and_promtool(tmp_path, tls, check_web_config, case):
    path = write(tmp_path, VALID[case](tls))
    load_web_config(path)
    result = check_web_config(path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", INVALID)
def test_what_promtool_refuses_ugro_refuses(tmp_path, tls, check_web_config, case):
    build, promtool_refuses = INVALID[case]
    path = write(tmp_path, build(tls))
    refused(path)
    if promtool_refuses:
        result = check_web_config(path)
        assert result.returncode != 0, f"promtool accepted {case}: {result.stdout}"
