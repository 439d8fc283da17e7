"""Reading an OpenSSH known_hosts file without ever rewriting it, and appending accepted keys.

known_hosts is usually the user's own file, shared with OpenSSH, so ugro never writes it back:
paramiko's ``load_host_keys`` + ``save_host_keys`` would drop comments, the keys paramiko
cannot parse (FIDO ``sk-*`` keys, certificates) and split hashed or multi-host lines. Here the
file is read line by line, what paramiko cannot use is skipped (and left in the file), and a
newly accepted key is appended as exactly one line in OpenSSH's format.

``@revoked`` lines are honoured: a revoked key is never trusted, for any host (their host
patterns are usually ``*``, which paramiko cannot match, and a revoked key is compromised
everywhere). Lines marked ``@cert-authority`` are skipped with a warning: paramiko cannot verify
host certificates.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paramiko

CERT_AUTHORITY = "@cert-authority"
REVOKED = "@revoked"

# One warning per file and kind per process: every SSH connection reads the file again.
_warned: set[tuple[pathlib.Path, str]] = set()
_warned_lock = threading.Lock()
# Shells connect in parallel threads; appends to one file must not interleave.
_append_lock = threading.Lock()


class KnownHostsError(RuntimeError):
    """known_hosts cannot be read or appended to; the message names the file."""


class UnknownHostKey(paramiko.SSHException):
    """The host offered a key known_hosts does not have, and new keys are not accepted."""

    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(f"{hostname}: host key not found in known_hosts")
        self.hostname = hostname
        self.key = key


class RevokedHostKey(paramiko.SSHException):
    """The host offered a key that known_hosts marks ``@revoked``."""

    def __init__(self, key: paramiko.PKey, where: str) -> None:
        super().__init__(f"the host key is revoked in {where}")
        self.key = key
        self.where = where  # "file:line" of the @revoked line


@dataclass
class KnownHosts:
    """The usable content of one known_hosts file."""

    path: pathlib.Path
    host_keys: paramiko.HostKeys = field(default_factory=paramiko.HostKeys)
    revoked: dict[bytes, int] = field(default_factory=dict)  # key blob -> line number

    def revoked_at(self, key: paramiko.PKey) -> str | None:
        """``file:line`` of the ``@revoked`` line for ``key``, or None if it is not revoked."""
        line = self.revoked.get(key.asbytes())
        return None if line is None else f"{self.path}:{line}"


def read_known_hosts(path: pathlib.Path) -> KnownHosts:
    """Parse ``path`` tolerantly; a missing file knows no host."""
    known = KnownHosts(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return known
    except OSError as error:
        raise KnownHostsError(f"{path}: cannot read known_hosts: {error.strerror}") from error
    entries: list[paramiko.hostkeys.HostKeyEntry] = []
    cert_authority_lines: list[int] = []
    unreadable_lines: list[int] = []
    for number, raw in enumerate(data.decode("utf-8", "surrogateescape").splitlines(), 1):
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields[0] if fields[0].startswith("@") else None
        if marker == CERT_AUTHORITY:
            cert_authority_lines.append(number)
            continue
        if marker is not None:
            fields = fields[1:]
        entry, readable = _entry(fields)
        if not readable or (marker is not None and marker != REVOKED):
            unreadable_lines.append(number)
        elif entry is None:
            pass  # a key type paramiko lacks (FIDO sk-* keys): no warning, OpenSSH uses it
        elif marker == REVOKED:
            known.revoked.setdefault(entry.key.asbytes(), number)
        else:
            entries.append(entry)
    for entry in entries:
        # Revoked keys stay listed: a host whose listed key was revoked and that now offers
        # another one has a CHANGED key, as for OpenSSH, not a new one to accept.
        for name in entry.hostnames:
            # HostKeys matches hashed names (|1|salt|hash) itself.
            known.host_keys.add(name, entry.key.get_name(), entry.key)
    if cert_authority_lines:
        _warn_once(
            path,
            CERT_AUTHORITY,
            f"{_lines(path, cert_authority_lines)}: {CERT_AUTHORITY} skipped: ugro-launch cannot "
            "verify host certificates; a host that relies on one needs its own host key line "
            "in this file",
        )
    if unreadable_lines:
        _warn_once(
            path,
            "unreadable",
            f"{_lines(path, unreadable_lines)}: not a known_hosts line ugro-launch can read; "
            "skipped (left in the file)",
        )
    return known


def _entry(fields: list[str]) -> tuple[paramiko.hostkeys.HostKeyEntry | None, bool]:
    """(entry, readable): (None, True) for a well-formed line of a key type paramiko lacks."""
    if len(fields) < 3:
        return None, False
    try:
        # Fields joined by one space: OpenSSH allows any run of blanks, paramiko only one.
        return paramiko.hostkeys.HostKeyEntry.from_line(" ".join(fields[:3])), True
    except Exception:  # InvalidHostKey, SSHException, ValueError...: key parsers vary
        return None, False


def _lines(path: pathlib.Path, numbers: list[int]) -> str:
    more = f" (and {len(numbers) - 1} more line(s))" if len(numbers) > 1 else ""
    return f"{path}:{numbers[0]}{more}"


def _warn_once(path: pathlib.Path, kind: str, message: str) -> None:
    with _warned_lock:
        if (path, kind) in _warned:
            return
        _warned.add((path, kind))
    print(f"warning: {message}", file=sys.stderr)


def append_host_key(path: pathlib.Path, hostname: str, key: paramiko.PKey) -> None:
    """Append ``hostname keytype base64`` to ``path`` unless that exact line is there already.

    ``hostname`` is as OpenSSH writes it: ``host`` for port 22, else ``[host]:port``. Nothing
    already in the file is rewritten or moved; a missing file is created (0600, its folder
    0700, as ssh does).
    """
    line = f"{hostname} {key.get_name()} {key.get_base64()}"
    with _append_lock:
        try:
            try:
                existing = path.read_bytes()
            except FileNotFoundError:
                existing = b""
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if line.encode() in existing.splitlines():
                return
            text = ("\n" if existing and not existing.endswith(b"\n") else "") + line + "\n"
            descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(descriptor, text.encode())
            finally:
                os.close(descriptor)
        except OSError as error:
            raise KnownHostsError(
                f"{path}: cannot add the host key of {hostname}: {error.strerror or error}"
            ) from error


class RevocationCheckingTransport(paramiko.Transport):
    """Refuses a revoked host key as soon as key exchange has shown it, before authentication.

    paramiko's own check would accept a revoked key that a plain line lists too, and its
    missing-host policy only sees hosts that no line lists; this sees every connection.
    """

    def __init__(self, sock: Any, *, known: KnownHosts, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self.known = known

    def start_client(self, event: threading.Event | None = None, timeout: float | None = None):
        super().start_client(event, timeout)
        if event is None:  # otherwise key exchange is still running (SSHClient never does this)
            key = self.get_remote_server_key()
            where = self.known.revoked_at(key)
            if where is not None:
                raise RevokedHostKey(key, where)


def transport_factory(known: KnownHosts) -> Callable[..., paramiko.Transport]:
    """For ``SSHClient.connect(transport_factory=...)``: transports that honour ``@revoked``."""
    return functools.partial(RevocationCheckingTransport, known=known)


class HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Decides about a host known_hosts has no key for: refuses it, or (when asked to accept new
    keys) appends its key to the file."""

    def __init__(self, known: KnownHosts, accept_new: bool) -> None:
        self.known = known
        self.accept_new = accept_new

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey):
        if not self.accept_new:
            raise UnknownHostKey(hostname, key)
        append_host_key(self.known.path, hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)
