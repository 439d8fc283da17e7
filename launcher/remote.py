"""Running one command on a node: over SSH with Fabric, or directly for a local node.

Commands are argv lists. Over SSH they are joined with ``shlex.join``, so every value reaches
the remote shell quoted; locally they are run without a shell at all. Host keys are checked
against known_hosts (Fabric on its own would accept any key): an unknown host is refused with
its fingerprint, unless the caller explicitly accepts new keys.
"""

from __future__ import annotations

import base64
import hashlib
import pathlib
import shlex
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

import paramiko
from fabric import Connection

from .inventory import Node

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
        return f"{self.node.name} ({_host_port(self.node.host, self.node.ssh_port)})"

    def _open(self) -> None:
        with self._lock:
            if self.connection.is_connected:
                return
            client = self.connection.client
            known_hosts = self.options.known_hosts.expanduser()
            if self.options.accept_new_host_keys:
                known_hosts.parent.mkdir(parents=True, exist_ok=True)
                known_hosts.touch(exist_ok=True)
            if known_hosts.exists():
                # load_host_keys also makes paramiko save newly accepted keys to this file.
                client.load_host_keys(str(known_hosts))
            client.set_missing_host_key_policy(
                paramiko.AutoAddPolicy()
                if self.options.accept_new_host_keys
                else paramiko.RejectPolicy()
            )
            try:
                self.connection.open()
            except paramiko.BadHostKeyException as error:
                raise RemoteError(
                    f"{self.where}: the host key CHANGED: it offers {_fingerprint(error.key)} but "
                    f"{known_hosts} has {_fingerprint(error.expected_key)}. This may be an attack "
                    "or a reinstalled node; ugro-launch never accepts a changed key: check it, "
                    "then fix known_hosts (ssh-keygen -R)."
                ) from error
            except paramiko.SSHException as error:
                if "not found in known_hosts" in str(error):
                    raise RemoteError(self._unknown_host_message(known_hosts)) from error
                raise RemoteError(f"{self.where}: SSH failed: {error}") from error
            except (OSError, EOFError) as error:
                reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
                raise RemoteError(f"{self.where}: cannot connect: {reason}") from error

    def _unknown_host_message(self, known_hosts: pathlib.Path) -> str:
        try:
            offered = _fingerprint(_server_key(self.node.host, self.node.ssh_port))
        except (OSError, paramiko.SSHException) as error:
            offered = f"(its key could not be read: {error})"
        return (
            f"{self.where}: unknown host key {offered}, not in {known_hosts}. If that fingerprint "
            "is the node's, accept it with --accept-new-host-keys (adds it to known_hosts), or "
            f"add it yourself: ssh-keyscan -p {self.node.ssh_port} {self.node.host} >> "
            f"{known_hosts}"
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


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _server_key(host: str, port: int) -> paramiko.PKey:
    with socket.create_connection((host, port), timeout=10) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=10)
            return transport.get_remote_server_key()
        finally:
            transport.close()


def _fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"
