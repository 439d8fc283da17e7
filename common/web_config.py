"""The web configuration file of ugro's ``/metrics`` endpoints: TLS, client certificates and
basic auth, in the format Prometheus, Alertmanager and node_exporter read with
``--web.config.file`` (the exporter-toolkit's), so that one file, one ``promtool check
web-config`` and one habit cover the whole stack::

    tls_server_config:
      cert_file: node.crt            # relative paths are relative to this file's folder
      key_file: node.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt
      min_version: TLS12
    basic_auth_users:
      prometheus: $2b$10$...         # bcrypt hashes, never passwords

``ugro-exporter --web.config.file FILE`` and every rank (``UGRO_WEB_CONFIG=FILE``) load it once
at start: a file that cannot be used stops the process with one line naming the field, before
anything listens. What the exporter-toolkit accepts but Python's ``ssl`` module cannot honour
(cipher suite and curve lists, a client certificate requested but not verified) is refused by
name rather than ignored: a silently weaker endpoint is worse than one that does not start.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import pathlib
import re
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

import bcrypt

from .config_files import ConfigFileError, load_yaml

# The client_auth_type values ugro serves, as ssl verify modes. RequestClientCert and
# RequireAnyClientCert ask for a certificate without verifying it: Python's ssl module has no
# such mode (it verifies every certificate it asks for), so they are refused.
CLIENT_AUTH_MODES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
DEFAULT_MIN_TLS = "TLS12"  # the exporter-toolkit's default too
# The response headers the exporter-toolkit lets a web config set, and the values it allows
# (None: any value without control characters).
SETTABLE_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
# Each failed check of a password costs one bcrypt of this cost; above it one check takes
# seconds (every +1 doubles), which would let a wrong password stall the endpoint.
MAX_BCRYPT_COST = 14
_BCRYPT_HASH = re.compile(r"\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}")
_TOP_LEVEL = ("tls_server_config", "http_server_config", "basic_auth_users")
_TLS_FIELDS = (
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "min_version",
    "max_version",
    "prefer_server_cipher_suites",
)
_UNSUPPORTED_TLS_FIELDS = {
    "cipher_suites": "Python's ssl module takes OpenSSL's cipher choice; remove it",
    "curve_preferences": "Python's ssl module takes OpenSSL's curve choice; remove it",
    "client_allowed_sans": "ugro's endpoints do not filter client certificates by SAN; remove it "
    "and give them a client CA that signs only the scrapers' certificates",
}
_HTTP_FIELDS = ("http2", "headers")
# Successful password checks remembered, so that a scrape every second does not pay a bcrypt
# (tens of milliseconds at cost 10) on a training process.
_VERIFIED_CACHE_SIZE = 64


class WebConfigError(ValueError):
    """The web configuration cannot be used; the one-line message names the file and field."""


@dataclass(frozen=True)
class TlsSettings:
    cert_file: pathlib.Path
    key_file: pathlib.Path
    client_auth_type: str
    client_ca_file: pathlib.Path | None
    min_version: str
    max_version: str | None
    prefer_server_cipher_suites: bool


@dataclass(frozen=True)
class WebConfig:
    """A loaded, checked web configuration; ``ssl_context`` is built from it once."""

    path: pathlib.Path
    tls: TlsSettings | None
    basic_auth_users: dict[str, bytes]  # user -> bcrypt hash
    headers: dict[str, str]
    ssl_context: ssl.SSLContext | None = field(repr=False, compare=False)

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def secured(self) -> bool:
        """Whether anything is asked of a client: TLS, a client certificate or a password."""
        return self.tls is not None or bool(self.basic_auth_users)


def load_web_config(path: str | pathlib.Path) -> WebConfig:
    """Read and check ``path``; WebConfigError names what is wrong and what was expected."""
    path = pathlib.Path(path)
    try:
        document = load_yaml(path, "the web configuration")
    except ConfigFileError as error:
        raise WebConfigError(str(error)) from None
    fields = _Fields(path)
    if document is None:
        document = {}  # an empty file: plain HTTP, as the exporter-toolkit reads it
    top = fields.mapping(document, "", _TOP_LEVEL)
    tls = _tls(fields, top.get("tls_server_config"))
    users = _users(fields, top.get("basic_auth_users"))
    headers = _headers(fields, top.get("http_server_config"))
    return WebConfig(path, tls, users, headers, _ssl_context(fields, tls) if tls else None)


class _Fields:
    """Checks values of one file; every error says ``FILE: field.path: problem``."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def error(self, where: str, problem: str) -> WebConfigError:
        # A field name comes from the file: its control characters must not reach a terminal.
        where = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in where)
        return WebConfigError(f"{self.path}: {where + ': ' if where else ''}{problem}")

    def mapping(
        self, value: Any, where: str, known: tuple[str, ...], unsupported: dict | None = None
    ) -> dict:
        extra = unsupported or {}
        if not isinstance(value, dict):
            raise self.error(where, f"expected a mapping, got {_kind(value)}")
        for key in value:
            name = f"{where}.{key}" if where else str(key)
            if key in extra:
                raise self.error(name, f"not supported: {extra[key]}")
            if key not in known:
                raise self.error(name, f"unknown field (expected one of: {', '.join(known)})")
        return value

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(where, f"expected a non-empty string, got {_kind(value)}")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise self.error(where, "contains control characters")
        return value

    def file(self, value: Any, where: str) -> pathlib.Path:
        """A readable regular file; relative to the web config's folder, as Prometheus reads it."""
        path = self.path.parent / self.text(value, where)
        try:
            with path.open("rb"):
                pass
        except OSError as error:
            raise self.error(where, f"cannot read {path}: {error.strerror}") from None
        if not path.is_file():
            raise self.error(where, f"{path} is not a regular file")
        return path

    def choice(self, value: Any, where: str, choices: Any) -> str:
        if value not in choices:
            raise self.error(where, f"{value!r}: expected one of {', '.join(choices)}")
        return value


def _tls(fields: _Fields, section: Any) -> TlsSettings | None:
    if section is None or section == {}:
        return None
    where = "tls_server_config"
    section = fields.mapping(section, where, _TLS_FIELDS, _UNSUPPORTED_TLS_FIELDS)
    for required in ("cert_file", "key_file"):
        if not section.get(required):
            raise fields.error(f"{where}.{required}", "missing (TLS needs a certificate and key)")
    auth = section.get("client_auth_type") or "NoClientCert"
    if auth in UNVERIFIED_CLIENT_AUTH:
        raise fields.error(
            f"{where}.client_auth_type",
            f"{auth} accepts unverified client certificates, which ugro's endpoints cannot "
            "serve (Python's ssl module verifies every certificate it asks for): use "
            "RequireAndVerifyClientCert or VerifyClientCertIfGiven with client_ca_file",
        )
    fields.choice(auth, f"{where}.client_auth_type", CLIENT_AUTH_MODES)
    ca = section.get("client_ca_file")
    if auth != "NoClientCert" and not ca:
        raise fields.error(f"{where}.client_ca_file", f"missing: {auth} needs a CA to verify with")
    if ca and auth == "NoClientCert":
        raise fields.error(
            f"{where}.client_auth_type",
            "client_ca_file is given but no client certificate is asked for: set "
            "RequireAndVerifyClientCert (or VerifyClientCertIfGiven)",
        )
    low = fields.choice(section.get("min_version", DEFAULT_MIN_TLS), f"{where}.min_version",
                        TLS_VERSIONS)  # fmt: skip
    high = section.get("max_version")
    if high is not None:
        fields.choice(high, f"{where}.max_version", TLS_VERSIONS)
        if TLS_VERSIONS[high] < TLS_VERSIONS[low]:
            raise fields.error(f"{where}.max_version", f"{high} is below min_version {low}")
    prefer = section.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise fields.error(f"{where}.prefer_server_cipher_suites", "expected true or false")
    return TlsSettings(
        cert_file=fields.file(section["cert_file"], f"{where}.cert_file"),
        key_file=fields.file(section["key_file"], f"{where}.key_file"),
        client_auth_type=auth,
        client_ca_file=fields.file(ca, f"{where}.client_ca_file") if ca else None,
        min_version=low,
        max_version=high,
        prefer_server_cipher_suites=prefer,
    )


def _ssl_context(fields: _Fields, tls: TlsSettings) -> ssl.SSLContext:
    where = "tls_server_config"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    if tls.max_version:
        context.maximum_version = TLS_VERSIONS[tls.max_version]
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])  # no HTTP/2 here; clients fall back cleanly
    if b"-----BEGIN CERTIFICATE-----" not in tls.cert_file.read_bytes()[: 1024 * 1024]:
        raise fields.error(f"{where}.cert_file", f"{tls.cert_file} holds no PEM certificate")
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except ssl.SSLError as error:
        raise fields.error(
            f"{where}.key_file",
            f"{tls.key_file} is not the private key of {tls.cert_file.name} "
            f"(or not PEM): {error.reason or error}",
        ) from None
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except ssl.SSLError as error:
            raise fields.error(
                f"{where}.client_ca_file",
                f"{tls.client_ca_file} holds no PEM CA certificate: {error.reason or error}",
            ) from None
    context.verify_mode = CLIENT_AUTH_MODES[tls.client_auth_type]
    return context


def _users(fields: _Fields, section: Any) -> dict[str, bytes]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise fields.error("basic_auth_users", f"expected a mapping user: bcrypt hash, got "
                           f"{_kind(section)}")  # fmt: skip
    users = {}
    for user, hashed in section.items():
        where = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user or user != user.strip():
            raise fields.error(where, "a user name is a non-empty string without ':' or spaces "
                               "around it")  # fmt: skip
        fields.text(user, where)
        if not isinstance(hashed, str) or not (match := _BCRYPT_HASH.fullmatch(hashed)):
            raise fields.error(
                where,
                "expected a bcrypt hash ($2b$10$ and 53 characters: `htpasswd -nbBC 10 USER "
                "PASSWORD` or Python's bcrypt.hashpw), never a password",
            )
        cost = int(match.group(1))
        if not 4 <= cost <= MAX_BCRYPT_COST:
            raise fields.error(
                where,
                f"bcrypt cost {cost}: expected 4..{MAX_BCRYPT_COST} (every check of a wrong "
                "password costs one bcrypt; 10 takes about 50 ms)",
            )
        users[user] = hashed.encode()
    return users


def _headers(fields: _Fields, section: Any) -> dict[str, str]:
    if section is None:
        return {}
    section = fields.mapping(section, "http_server_config", _HTTP_FIELDS)
    if "http2" in section and not isinstance(section["http2"], bool):
        raise fields.error("http_server_config.http2", "expected true or false")
    headers = section.get("headers") or {}
    if not isinstance(headers, dict):
        raise fields.error("http_server_config.headers", f"expected a mapping, got "
                           f"{_kind(headers)}")  # fmt: skip
    checked = {}
    for name, value in headers.items():
        where = f"http_server_config.headers.{name}"
        fields.choice(name, where, SETTABLE_HEADERS)
        text = fields.text(value, where)
        allowed = SETTABLE_HEADERS[name]
        if allowed is not None and text.lower() not in allowed:
            raise fields.error(where, f"{text!r}: expected one of {', '.join(allowed)}")
        checked[name] = text
    return checked


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against the config's bcrypt hashes.

    A wrong user costs the same bcrypt as a wrong password (no timing tells which users
    exist). Checks run one at a time, so a flood of wrong passwords takes at most one core
    from a training process. Right answers are remembered (a keyed digest, not the password),
    so a scrape every second costs a hash lookup, not a bcrypt.
    """

    def __init__(self, users: dict[str, bytes]) -> None:
        self._users = users
        costs = [int(hashed[4:6]) for hashed in users.values()] or [4]
        self._decoy = bcrypt.hashpw(b"no such user", bcrypt.gensalt(rounds=max(costs)))
        self._lock = threading.Lock()
        self._verified: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def allows(self, header: str | None) -> bool:
        credentials = _basic_credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self._users.get(user)
        digest = hashlib.sha256(b"\0".join((user.encode(), password, hashed or b""))).digest()
        with self._lock:
            if hashed is not None and digest in self._verified:
                self._verified.move_to_end(digest)
                return True
            try:
                right = bcrypt.checkpw(password, hashed or self._decoy) and hashed is not None
            except ValueError:  # longer than bcrypt's 72 bytes: no hash can match it
                right = False
            if right:
                self._verified[digest] = None
                while len(self._verified) > _VERIFIED_CACHE_SIZE:
                    self._verified.popitem(last=False)
            return right


def _basic_credentials(header: str | None) -> tuple[str, bytes] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` header, None if malformed."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic" or len(encoded) > 4096:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
        user, sep, password = decoded.partition(b":")
        return (user.decode("utf-8"), password) if sep else None
    except (binascii.Error, UnicodeDecodeError):
        return None
