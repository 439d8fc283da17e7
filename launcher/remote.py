"""Running one command on a node: over SSH with Fabric, or directly for a local node.

Commands are argv lists. Over SSH they are joined with ``shlex.join``, so every value reaches
the remote shell quoted; locally they are run without a shell at all. Host keys are checked
against known_hosts (Fabric on its own would accept any key): an unknown host is refused with
its fingerprint, unless the caller explicitly accepts new keys; known_hosts.py reads that file
and only ever appends to it.
"""

from __future__ import annotations

import base64
import hashlib
import pathlib
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass

import paramiko
from fabric import Connection

from ugro.common.ports import host_port

from .inventory import Node
from .known_hosts import (
    HostKeyPolicy,
    KnownHosts,
    KnownHostsError,
    RevokedHostKey,
    UnknownHostKey,
    read_known_hosts,
    transport_factory,
)

DEFAULT_KNOWN_HOSTS = pathlib.Path("~/.ssh/known_hosts")


class RemoteError(RuntimeError):
    """A node could not be reached, or refused us; the message names the node."""


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class SshOptions:
    known_hosts: pathlib.Path = DEFAULT_KNOWN_HOSTS
    accept_new_host_keys: bool = (
        False  # add unknown hosts' keys to known_hosts (never changed ones)
    )
    connect_timeout: float = 10.0


class LocalShell:
    """A node that is this machine: commands run as child processes, with no shell."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def run(self, argv: list[str], timeout: float | None = 60.0) -> CommandResult:
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                # Out of the terminal's process group: Ctrl-C interrupts the launcher, which
                # rolls back, never an agent half-way through one action (as over SSH).
                start_new_session=True,
            )
        except FileNotFoundError as error:
            return CommandResult(127, "", f"{argv[0]}: {error.strerror}\n")
        except subprocess.TimeoutExpired as error:
            raise RemoteError(
                f"{self.node.name}: {argv[0]} took longer than {timeout} s"
            ) from error
        return CommandResult(done.returncode, done.stdout, done.stderr)

    def stream(self, argv: list[str]) -> int:
        """Run with output passed straight through (``logs --follow``)."""
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL).returncode
        except FileNotFoundError as error:
            print(f"{self.node.name}: {argv[0]}: {error.strerror}", file=sys.stderr)
            return 127

    def close(self) -> None:
        pass


class SshShell:
    """A node reached over SSH; the connection opens on first use and is reused."""

    def __init__(self, node: Node, options: SshOptions) -> None:
        self.node = node
        self.options = options
        self._lock = threading.Lock()
        connect_kwargs: dict[str, object] = {}
        if node.identity_file:
            connect_kwargs["key_filename"] = str(pathlib.Path(node.identity_file).expanduser())
        self.connection = Connection(
            node.host,
            user=node.user,
            port=node.ssh_port,
            connect_timeout=int(options.connect_timeout),
            connect_kwargs=connect_kwargs,
        )

    @property
    def where(self) -> str:
        return f"{self.node.name} ({host_port(self.node.host, self.node.ssh_port)})"

    def _open(self) -> None:
        with self._lock:
            if self.connection.is_connected:
                return
            self._check_identity_file()
            client = self.connection.client
            known_hosts = self.options.known_hosts.expanduser()
            try:
                known = read_known_hosts(known_hosts)
            except KnownHostsError as error:
                raise RemoteError(f"{self.where}: {error}") from error
            # Never client.load_host_keys(): paramiko would then save its own parsed copy over
            # the file, losing comments and every line it cannot read.
            for name in known.host_keys:
                for key_type, key in known.host_keys[name].items():
                    client.get_host_keys().add(name, key_type, key)
            client.set_missing_host_key_policy(
                HostKeyPolicy(known, self.options.accept_new_host_keys)
            )
            self.connection.connect_kwargs["transport_factory"] = transport_factory(known)
            try:
                self.connection.open()
            except Exception as error:
                # A refused host leaves paramiko's transport (and its thread) running.
                client.close()
                explained = self._connect_error(error, known)
                if explained is error:
                    raise
                raise explained from error

    def _check_identity_file(self) -> None:
        """Paramiko's own error for a missing key file names neither the file nor the node."""
        if not self.node.identity_file:
            return
        path = pathlib.Path(self.node.identity_file).expanduser()
        try:
            path.open("rb").close()
        except OSError as error:
            raise RemoteError(
                f"{self.where}: identity_file {self.node.identity_file} (inventory) cannot be "
                f"read: {error.strerror or error}"
            ) from error

    def _connect_error(self, error: Exception, known: KnownHosts) -> Exception:
        """The RemoteError that explains ``error``; ``error`` itself if it is unexpected."""
        known_hosts = known.path
        if isinstance(error, RevokedHostKey):
            return RemoteError(
                f"{self.where}: the host offers {_fingerprint(error.key)}, a key that "
                f"{error.where} marks @revoked; ugro-launch never connects to a host with a "
                "revoked key: check the node, then give it a new host key."
            )
        if isinstance(error, paramiko.BadHostKeyException):
            return RemoteError(
                f"{self.where}: the host key CHANGED: it offers {_fingerprint(error.key)} but "
                f"{known_hosts} has {_fingerprint(error.expected_key)}. This may be an attack "
                "or a reinstalled node; ugro-launch never accepts a changed key: check it, "
                "then fix known_hosts (ssh-keygen -R)."
            )
        if isinstance(error, UnknownHostKey):
            return RemoteError(self._unknown_host_message(known_hosts, error.key))
        if isinstance(error, KnownHostsError):
            return RemoteError(f"{self.where}: {error}")
        if isinstance(error, paramiko.SSHException):
            return RemoteError(f"{self.where}: SSH failed: {error}")
        if isinstance(error, OSError | EOFError):
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            return RemoteError(f"{self.where}: cannot connect: {reason}")
        return error

    def _unknown_host_message(self, known_hosts: pathlib.Path, offered: paramiko.PKey) -> str:
        return (
            f"{self.where}: unknown host key {_fingerprint(offered)}, not in {known_hosts}. If "
            "that fingerprint is the node's, accept it with --accept-new-host-keys (adds it to "
            f"known_hosts), or add it yourself: ssh-keyscan -p {self.node.ssh_port} "
            f"{self.node.host} >> {known_hosts}"
        )

    def run(self, argv: list[str], timeout: float | None = 60.0) -> CommandResult:
        self._open()
        try:
            result = self.connection.run(
                shlex.join(argv), hide=True, warn=True, in_stream=False, timeout=timeout
            )
        except Exception as error:  # invoke's CommandTimedOut, paramiko's transport errors
            raise RemoteError(f"{self.where}: {argv[0]} failed: {error}") from error
        return CommandResult(result.exited, result.stdout, result.stderr)

    def stream(self, argv: list[str]) -> int:
        """Run with output passed straight through (``logs --follow``). On a pseudo-terminal,
        so that Ctrl-C here (which Fabric forwards as ^C) interrupts the remote command at
        once, as it would in an ssh session, and nothing is left following on the node."""
        self._open()
        result = self.connection.run(
            shlex.join(argv), hide=False, warn=True, in_stream=False, pty=True
        )
        return result.exited

    def put_text(self, path: str, text: str) -> None:
        """Write a file atomically: to a temporary name beside it, then rename over."""
        self._open()
        directory = path.rsplit("/", 1)[0] or "/"
        self.run(["mkdir", "-p", directory])
        temporary = f"{path}.tmp-ugro"
        sftp = self.connection.sftp()  # Fabric keeps one per connection and closes it with it
        with sftp.open(temporary, "w") as handle:
            handle.write(text)
        sftp.chmod(temporary, 0o644)
        sftp.posix_rename(temporary, path)

    def remove(self, path: str) -> bool:
        result = self.run(["rm", "-f", "--", path])
        return result.exit_code == 0

    def close(self) -> None:
        self.connection.close()


def shell_for(node: Node, options: SshOptions) -> LocalShell | SshShell:
    return LocalShell(node) if node.is_local else SshShell(node, options)


def _fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"
