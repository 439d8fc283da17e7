"""Real X.509 certificates made for one test run (the ``cryptography`` package): a CA, a server
certificate for loopback, client certificates good and bad, and a bcrypt-hashed password.

Keys are EC P-256: generating one takes microseconds, where RSA takes a good part of a second
on a loaded 2-core machine.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
from dataclasses import dataclass

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost", "127.0.0.1")
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class KeyPair:
    cert: pathlib.Path
    key: pathlib.Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: pathlib.Path, stem: str, cert: x509.Certificate, key) -> KeyPair:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    return KeyPair(cert_path, key_path)


class CertificateAuthority:
    """A CA that signs server and client certificates into ``directory``."""

    def __init__(self, directory: pathlib.Path, name: str = "ugro test CA") -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pair = _write(directory, name.replace(" ", "-"), self.cert, self.key)

    @property
    def cert_file(self) -> pathlib.Path:
        return self.pair.cert

    def issue(
        self,
        stem: str,
        *,
        server: bool = False,
        names: tuple[str, ...] = LOOPBACK_NAMES,
        expired: bool = False,
    ) -> KeyPair:
        """A certificate signed by this CA: for a server (``names`` as SANs) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = (
            (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1))
            if expired
            else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
        )
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return _write(self.directory, stem, cert, key)


def self_signed(directory: pathlib.Path, stem: str) -> KeyPair:
    """A client certificate signed by its own key: no CA vouches for it."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .issuer_name(_name(stem))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return _write(directory, stem, cert, key)


def bcrypt_hash(password: str, cost: int = 4) -> str:
    """A bcrypt hash for a web config's basic_auth_users (cost 4: quick in tests)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()


def secured_web_config(
    cert: str | pathlib.Path,
    key: str | pathlib.Path,
    client_ca: str | pathlib.Path,
    users: dict[str, str],
    **tls_fields: object,
) -> dict:
    """A web config document asking for everything: TLS, a client certificate signed by
    ``client_ca`` and basic auth for ``users`` (name -> bcrypt hash)."""
    return {
        "tls_server_config": {
            "cert_file": str(cert),
            "key_file": str(key),
            "client_auth_type": "RequireAndVerifyClientCert",
            "client_ca_file": str(client_ca),
            **tls_fields,
        },
        "basic_auth_users": users,
    }


@dataclass(frozen=True)
class TlsMaterial:
    """Everything one secured run needs, under one folder."""

    ca: CertificateAuthority
    server: KeyPair
    client: KeyPair
    other_ca: CertificateAuthority  # signs certificates the server must not trust
    wrong_client: KeyPair
    expired_client: KeyPair
    self_signed_client: KeyPair

    def web_config(
        self, password: str, user: str = "prometheus", cost: int = 4, **tls_fields: object
    ) -> dict:
        """A web config document for the server certificate, asking for a client certificate
        from ``ca`` and ``user``'s ``password``."""
        users = {user: bcrypt_hash(password, cost)}
        return secured_web_config(
            self.server.cert, self.server.key, self.ca.cert_file, users, **tls_fields
        )

    @classmethod
    def create(cls, directory: pathlib.Path) -> TlsMaterial:
        ca = CertificateAuthority(directory / "ca")
        other = CertificateAuthority(directory / "other-ca", name="untrusted test CA")
        return cls(
            ca=ca,
            server=ca.issue("server", server=True),
            client=ca.issue("prometheus"),
            other_ca=other,
            wrong_client=other.issue("intruder"),
            expired_client=ca.issue("expired-prometheus", expired=True),
            self_signed_client=self_signed(directory / "self-signed", "self-signed"),
        )
