"""Several SSH "nodes" on one machine: network namespaces on a bridge, each with a real sshd.

Layout of one cluster (``R`` = the run id, made of this process's pid and a counter)::

    root namespace        switch namespace ugn-PID-N    node namespaces ugn-PID-N-node-a, …
    ugnR 10.S.T.1/24 ─ veth ─ uplink ─┐
                                      br0 ─ n0 ─ veth ─ eth0 10.S.T.11/24, sshd on :22 (node-a)
                                       └─── n1 ─ veth ─ eth0 10.S.T.12/24, sshd on :22 (node-b)

The bridge lives in a namespace of its own rather than in the root namespace: with
``br_netfilter`` loaded (Docker hosts) bridged packets go through the FORWARD chain of the
namespace the bridge is in, and Docker sets that chain's policy to DROP. In a fresh namespace
there are no rules, so node-to-node traffic (torchrun rendezvous) is never filtered, and the root
namespace gains exactly one interface per run.

Every process of a node (sshd, and therefore every command run over SSH, and whatever
:meth:`NamespaceNode.run` starts) runs in the node's network namespace, in a UTS namespace of its
own with the node's host name, and sees a per-run ``/etc/hosts`` that maps every node's host name
to its address, so ``socket.getfqdn()`` and the rendezvous's host-name lookups work as they would
on real machines. The filesystem is shared: every node sees the same ``.venv``.

Names carry the creating pid so that leftovers of a run killed before its teardown (SIGKILL) are
removed by the next run (:func:`sweep_leftovers`).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import ipaddress
import itertools
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

PREFIX = "ugn"
SSHD = "/usr/sbin/sshd"
# Privilege separation directory; Debian's init script creates it, a bare container lacks it.
SSHD_PRIVSEP_DIR = pathlib.Path("/run/sshd")
# Held while a run picks its subnet and puts it on its root-namespace interface, so that two
# runs starting at the same time never pick the same one.
SUBNET_LOCK = pathlib.Path("/run/ugro-netns.lock")
# Runs take /24 networks from 10.128.0.0/9, skipping any that overlap a route or an address
# already on this machine.
SUBNET_POOL = ipaddress.IPv4Network("10.128.0.0/9")
BRIDGE_HOST = 1  # the root namespace's address in each subnet: .1
FIRST_NODE_HOST = 11  # node-a is .11, node-b .12, …
MAX_NODES = 26

_NAMESPACE_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)(?:-[a-z0-9-]+)?$")
_ROOT_LINK_RE = re.compile(rf"^{PREFIX}([0-9a-z]+)x([0-9a-z]+)$")
_run_counter = itertools.count()
_open_clusters: weakref.WeakSet[NamespaceCluster] = weakref.WeakSet()

# Runs the command in a UTS namespace of its own with the node's host name, and with the node
# view of /etc/hosts. `ip netns exec` has already put the process in a private mount namespace
# (mounts propagate into it, never out of it), so the bind mount is seen by this process tree
# alone. Values come in as arguments, never as shell text.
_ENTER_SCRIPT = 'mount --bind "$2" /etc/hosts && hostname "$1" && shift 2 && exec "$@"'

# Prints "connected", "timeout" or an errno name (ECONNREFUSED, EHOSTUNREACH, …).
_PROBE_SCRIPT = """
import errno, socket, sys
address, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    socket.create_connection((address, port), timeout=timeout).close()
    print("connected")
except TimeoutError:
    print("timeout")
except OSError as error:
    print(errno.errorcode.get(error.errno, str(error)))
"""

# Binds, says "ready" and waits to be killed. It never accepts: connections complete in the
# backlog and are reset when it dies, so the port is left without TIME_WAIT sockets and is free
# again at once.
_LISTEN_SCRIPT = """
import signal, socket, sys
server = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(128)
print("ready", flush=True)
signal.pause()
"""


class NetnsError(RuntimeError):
    """A namespace, interface or sshd could not be set up or torn down."""


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
        if number == 0:
            return text


def root_link_name(pid: int, serial: int) -> str:
    """The root-namespace interface of run ``serial`` of process ``pid`` (at most 15 bytes)."""
    return f"{PREFIX}{_base36(pid)}x{_base36(serial)}"


def switch_namespace_name(pid: int, serial: int) -> str:
    """The bridge's namespace of run ``serial`` of process ``pid``; nodes add ``-node-a`` …"""
    return f"{PREFIX}-{pid}-{serial}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def _pid_exists(pid: int) -> bool:
    return pathlib.Path(f"/proc/{pid}").exists()


def namespace_names() -> list[str]:
    """Names of the network namespaces ``ip netns list`` shows."""
    lines = _ip("netns", "list").stdout.splitlines()
    return [line.split()[0] for line in lines if line.strip()]


def link_names(namespace: str | None = None) -> list[str]:
    """Interface names in the root namespace, or in ``namespace``."""
    where = ["-n", namespace] if namespace else []
    lines = _ip(*where, "-o", "link", "show").stdout.splitlines()
    return [line.split(":")[1].strip().split("@")[0] for line in lines]


def pids_in_namespace(namespace: str) -> list[int]:
    """Pids of every process whose network namespace is ``namespace`` (``ip netns pids``)."""
    result = _ip("netns", "pids", namespace, check=False)
    return [int(pid) for pid in result.stdout.split()]


def command_line(pid: int) -> list[str] | None:
    """A process's argv, or None if it has gone (or is a zombie)."""
    try:
        raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]] or None


def tcp_probe(address: str, port: int, timeout: float = 2.0) -> str:
    """Connects from the root namespace: "connected", "timeout" or an errno name."""
    try:
        socket.create_connection((address, port), timeout=timeout).close()
    except TimeoutError:
        return "timeout"
    except OSError as error:
        return str(error) if error.errno is None else errno.errorcode.get(error.errno, str(error))
    return "connected"


def _kill_namespace_processes(namespace: str, deadline_s: float = 10.0) -> list[int]:
    """SIGKILLs every process in ``namespace`` until none is left; returns those still there."""
    deadline = time.monotonic() + deadline_s
    while True:
        pids = [pid for pid in pids_in_namespace(namespace) if pid != os.getpid()]
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def sweep_leftovers() -> list[str]:
    """Removes namespaces and interfaces of earlier runs whose creating process is gone.

    Best effort: a run killed with SIGKILL leaves its sshds, namespaces and interface behind.
    Returns what was removed.
    """
    removed = []
    for namespace in namespace_names():
        match = _NAMESPACE_RE.match(namespace)
        if match and not _pid_exists(int(match.group(1))):
            _kill_namespace_processes(namespace)
            if _ip("netns", "delete", namespace, check=False).returncode == 0:
                removed.append(f"namespace {namespace}")
    for link in link_names():
        match = _ROOT_LINK_RE.match(link)
        if (
            match
            and not _pid_exists(int(match.group(1), 36))
            and _ip("link", "delete", link, check=False).returncode == 0
        ):
            removed.append(f"interface {link}")
    return removed


@dataclass
class NamespaceNode:
    """One node: a network namespace with its own address, host name and sshd."""

    name: str
    namespace: str
    address: str
    ssh_port: int
    hostname: str
    workdir: pathlib.Path
    client_key: pathlib.Path
    known_hosts: pathlib.Path
    hosts_file: pathlib.Path
    sshd_binary: str = SSHD
    _sshd: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _listeners: list[subprocess.Popen[str]] = field(default_factory=list, init=False, repr=False)

    # --- files ---------------------------------------------------------------------------------

    @property
    def host_key(self) -> pathlib.Path:
        return self.workdir / "ssh_host_ed25519_key"

    @property
    def host_public_key(self) -> str:
        """The host key line as in a ``.pub`` file: ``ssh-ed25519 AAAA… comment``."""
        return self.host_key.with_suffix(".pub").read_text().strip()

    @property
    def host_key_fingerprint(self) -> str:
        """``SHA256:…`` as ``ssh-keygen -lf`` (and ssh's host-key messages) print it."""
        result = subprocess.run(
            ["ssh-keygen", "-lf", str(self.host_key.with_suffix(".pub"))],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return result.stdout.split()[1]

    @property
    def sshd_config(self) -> pathlib.Path:
        return self.workdir / "sshd_config"

    @property
    def sshd_log(self) -> pathlib.Path:
        """sshd's own log (``-e``): connections, authentication failures, errors."""
        return self.workdir / "sshd.log"

    @property
    def known_hosts_entry(self) -> str:
        host = self.address if self.ssh_port == 22 else f"[{self.address}]:{self.ssh_port}"
        key_type, key = self.host_public_key.split()[:2]
        return f"{host} {key_type} {key}"

    # --- running commands inside the node ------------------------------------------------------

    def enter_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this node (namespace, host name, hosts)."""
        return [
            "ip", "netns", "exec", self.namespace,
            "unshare", "--uts",
            "sh", "-c", _ENTER_SCRIPT, "sh", self.hostname, str(self.hosts_file),
            *argv,
        ]  # fmt: skip

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run`` inside the node; ``timeout`` defaults to 60 s."""
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self.enter_argv(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """``subprocess.Popen`` inside the node. Its pid is the command's own (every step execs)."""
        return subprocess.Popen(self.enter_argv(argv), **kwargs)

    def ssh_argv(
        self, *command: str, known_hosts: pathlib.Path | None = None, options: Sequence[str] = ()
    ) -> list[str]:
        """The OpenSSH client's argv for ``command`` on this node as root, host key checked."""
        return [
            "ssh", "-F", "/dev/null",
            "-i", str(self.client_key),
            "-p", str(self.ssh_port),
            "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "ConnectTimeout=5",
            *options,
            f"root@{self.address}",
            "--", *command,
        ]  # fmt: skip

    # --- inspecting the node -------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process in this node's network namespace."""
        return pids_in_namespace(self.namespace)

    def processes(self) -> dict[int, list[str]]:
        """pid → argv of every process in this node (zombies left out)."""
        found = {}
        for pid in self.pids():
            argv = command_line(pid)
            if argv is not None:
                found[pid] = argv
        return found

    def find_processes(self, needle: str) -> dict[int, list[str]]:
        """The processes of :meth:`processes` whose command line contains ``needle``."""
        return {pid: argv for pid, argv in self.processes().items() if needle in " ".join(argv)}

    def listening_ports(self) -> set[int]:
        """TCP ports something listens on inside this node (IPv4 and IPv6)."""
        ports = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            result = self.run(["cat", table], capture_output=True, text=True, check=False)
            for line in result.stdout.splitlines()[1:]:
                fields = line.split()
                if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports

    def tcp_probe(self, address: str, port: int, timeout: float = 2.0) -> str:
        """Connects from inside this node: "connected", "timeout" or an errno name."""
        result = self.run(
            [sys.executable, "-I", "-c", _PROBE_SCRIPT, address, str(port), str(timeout)],
            capture_output=True,
            text=True,
            timeout=timeout + 30,
        )
        if result.returncode != 0:
            raise NetnsError(f"probe from {self.name} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    @contextlib.contextmanager
    def listen_on(self, port: int, address: str = "0.0.0.0") -> Iterator[subprocess.Popen[str]]:
        """Holds ``address:port`` inside this node: binding it fails, connecting succeeds."""
        listener = self.popen(
            [sys.executable, "-I", "-c", _LISTEN_SCRIPT, address, str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._listeners.append(listener)
        try:
            assert listener.stdout is not None
            if listener.stdout.readline().strip() != "ready":
                listener.wait(timeout=10)
                stderr = listener.stderr.read().strip() if listener.stderr else ""
                reason = stderr.splitlines()[-1] if stderr else f"exit status {listener.returncode}"
                raise NetnsError(f"{self.name}: cannot listen on {address}:{port}: {reason}")
            yield listener
        finally:
            self._stop(listener)
            self._listeners.remove(listener)

    # --- sshd ----------------------------------------------------------------------------------

    @property
    def sshd_running(self) -> bool:
        return self._sshd is not None and self._sshd.poll() is None

    def start_sshd(self, timeout: float = 10.0) -> None:
        """Starts sshd and returns once it answers with its banner."""
        self.spawn_sshd()
        self.wait_for_sshd(timeout)

    def spawn_sshd(self) -> None:
        """Starts sshd without waiting for it (:meth:`wait_for_sshd` does)."""
        if self.sshd_running:
            return
        SSHD_PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        with self.sshd_log.open("ab") as log:
            self._sshd = self.popen(
                [self.sshd_binary, "-D", "-e", "-f", str(self.sshd_config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_for_sshd(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.sshd_running:
                exit_code = self._sshd.returncode if self._sshd else None
                raise NetnsError(
                    f"{self.name}: sshd exited with status {exit_code}:\n{self._log_tail()}"
                )
            if self._banner_received():
                return
            if time.monotonic() > deadline:
                raise NetnsError(
                    f"{self.name}: sshd did not answer on {self.address}:{self.ssh_port} "
                    f"within {timeout} s:\n{self._log_tail()}"
                )
            time.sleep(0.02)

    def stop_sshd(self) -> None:
        """Stops the listening sshd: new connections are refused at once.

        Sessions already open, and what they started, keep running (as on a real host);
        :meth:`kill_all` is the node crashing.
        """
        if self._sshd is not None:
            self._stop(self._sshd)
            self._sshd = None

    def kill_all(self) -> list[int]:
        """Ends every process in the node, sshd included (the node crashing).

        Returns the pids still there after 10 s of SIGKILLs (none, normally).
        """
        for listener in self._listeners:
            self._stop(listener)
        self.stop_sshd()
        return _kill_namespace_processes(self.namespace)

    def _banner_received(self) -> bool:
        try:
            with socket.create_connection((self.address, self.ssh_port), timeout=1) as probe:
                probe.settimeout(2)
                return probe.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.sshd_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no sshd log)"

    @staticmethod
    def _stop(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


class NamespaceCluster:
    """``count`` nodes (node-a, node-b, …) on one subnet, reachable from the root namespace.

    ``with NamespaceCluster(2, workdir) as cluster:`` builds everything and removes all of it
    (sshds and every other process in the nodes, namespaces, interfaces) on the way out, also
    when building fails half-way. Keys, configs and logs go to ``workdir``.
    """

    def __init__(
        self, count: int, workdir: pathlib.Path, *, ssh_port: int = 22, sshd: str = SSHD
    ) -> None:
        if not 1 <= count <= MAX_NODES:
            raise ValueError(f"count: expected 1 to {MAX_NODES} nodes, got {count}")
        if re.search(r'[\s"%\\]', str(workdir)):
            raise ValueError(f"workdir {workdir}: sshd_config cannot hold this path")
        self.workdir = pathlib.Path(workdir).resolve()
        self.pid = os.getpid()
        self.serial = next(_run_counter)
        self.run_id = f"{self.pid}-{self.serial}"
        self.switch_namespace = switch_namespace_name(self.pid, self.serial)
        self.root_link = root_link_name(self.pid, self.serial)
        self._count = count
        self._ssh_port = ssh_port
        self._sshd_binary = sshd
        self.subnet: ipaddress.IPv4Network | None = None
        self.nodes: list[NamespaceNode] = []
        self._created_namespaces: list[str] = []
        self._namespace_inodes: dict[str, int] = {}
        self._closed = False

    # --- public --------------------------------------------------------------------------------

    @property
    def client_key(self) -> pathlib.Path:
        """Private half of the per-run ed25519 key root accepts on every node (no passphrase)."""
        return self.workdir / "client_ed25519"

    @property
    def client_public_key(self) -> pathlib.Path:
        return self.workdir / "client_ed25519.pub"

    @property
    def authorized_keys(self) -> pathlib.Path:
        return self.workdir / "authorized_keys"

    @property
    def known_hosts(self) -> pathlib.Path:
        """Every node's address with its host key."""
        return self.workdir / "known_hosts"

    @property
    def empty_known_hosts(self) -> pathlib.Path:
        """A known_hosts file that knows no host: strict checking must refuse every node."""
        return self.workdir / "known_hosts.empty"

    @property
    def hosts_file(self) -> pathlib.Path:
        """The /etc/hosts every node sees: localhost and every node's host name."""
        return self.workdir / "hosts"

    @property
    def bridge_address(self) -> str:
        """The root namespace's address on the cluster subnet (nodes reach the root here)."""
        if self.subnet is None:
            raise NetnsError("the cluster is not started")
        return str(self.subnet[BRIDGE_HOST])

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this run: the switch and one per node."""
        return [self.switch_namespace, *(node.namespace for node in self.nodes)]

    def node(self, name: str) -> NamespaceNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r}: nodes are {[n.name for n in self.nodes]}")

    def __getitem__(self, index: int | str) -> NamespaceNode:
        return self.node(index) if isinstance(index, str) else self.nodes[index]

    def __iter__(self) -> Iterator[NamespaceNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __enter__(self) -> NamespaceCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Builds the cluster; on any failure removes what was built and re-raises."""
        if self._closed or self.nodes:
            raise NetnsError("a NamespaceCluster starts once")
        _open_clusters.add(self)
        try:
            sweep_leftovers()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._build_network()
            self._write_files()
            for node in self.nodes:
                node.spawn_sshd()
            for node in self.nodes:
                node.wait_for_sshd()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    def close(self) -> None:
        """Removes every process, namespace and interface of this run. Safe to call twice.

        Raises :class:`NetnsError` naming whatever could not be removed.
        """
        if self._closed:
            return
        self._closed = True
        _open_clusters.discard(self)
        problems = []
        for node in self.nodes:
            try:
                survivors = node.kill_all()
            except (OSError, subprocess.SubprocessError, NetnsError) as error:
                problems.append(f"{node.name}: {error}")
            else:
                if survivors:
                    problems.append(f"{node.name}: processes {survivors} did not die")
        for namespace in self._created_namespaces:
            _kill_namespace_processes(namespace)
        # Deleting one end of a veth pair deletes the other; the node ends would also go with
        # their namespaces, but the kernel frees namespaces asynchronously.
        if self.root_link in link_names():
            result = _ip("link", "delete", self.root_link, check=False)
            if result.returncode != 0:
                problems.append(f"interface {self.root_link}: {result.stderr.strip()}")
        for namespace in reversed(self._created_namespaces):
            result = _ip("netns", "delete", namespace, check=False)
            if result.returncode != 0:
                problems.append(f"namespace {namespace}: {result.stderr.strip()}")
        problems += self.leftovers()
        if problems:
            raise NetnsError("netns cluster teardown left things behind: " + "; ".join(problems))

    def leftovers(self) -> list[str]:
        """What of this run still exists: namespaces, the root interface, processes in them."""
        found = [
            f"namespace {name}" for name in namespace_names() if name in self._created_namespaces
        ]
        if self.root_link in link_names():
            found.append(f"interface {self.root_link}")
        found += [f"process {pid} {argv}" for pid, argv in self._processes_in_run().items()]
        return found

    # --- building ------------------------------------------------------------------------------

    def _add_namespace(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self._created_namespaces.append(namespace)
        self._namespace_inodes[namespace] = os.stat(f"/run/netns/{namespace}").st_ino
        _ip("-n", namespace, "link", "set", "lo", "up")

    def _build_network(self) -> None:
        switch = self.switch_namespace
        self._add_namespace(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        with _subnet_lock():
            self.subnet = _free_subnet(self.pid * 7919 + self.serial)
            _ip("link", "add", self.root_link, "type", "veth", "peer", "name", "uplink",
                "netns", switch)  # fmt: skip
            _ip("addr", "add", f"{self.bridge_address}/{self.subnet.prefixlen}",
                "dev", self.root_link)  # fmt: skip
        _ip("link", "set", self.root_link, "up")
        _ip("-n", switch, "link", "set", "uplink", "master", "br0", "up")

        for index in range(self._count):
            name = f"node-{chr(ord('a') + index)}"
            node = NamespaceNode(
                name=name,
                namespace=f"{switch}-{name}",
                address=str(self.subnet[FIRST_NODE_HOST + index]),
                ssh_port=self._ssh_port,
                hostname=name,
                workdir=self.workdir / name,
                client_key=self.client_key,
                known_hosts=self.known_hosts,
                hosts_file=self.hosts_file,
                sshd_binary=self._sshd_binary,
            )
            self.nodes.append(node)
            self._add_namespace(node.namespace)
            port = f"n{index}"
            _ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", node.namespace)  # fmt: skip
            _ip("-n", switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", node.namespace, "addr", "add",
                f"{node.address}/{self.subnet.prefixlen}", "dev", "eth0")  # fmt: skip
            _ip("-n", node.namespace, "link", "set", "eth0", "up")

    def _write_files(self) -> None:
        _keygen(self.client_key, f"ugro-test-client-{self.run_id}")
        self.authorized_keys.write_text(self.client_public_key.read_text())
        hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        hosts += [f"{node.address}\t{node.hostname}" for node in self.nodes]
        self.hosts_file.write_text("\n".join(hosts) + "\n")
        for node in self.nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)
            _keygen(node.host_key, f"{node.hostname}-{self.run_id}")
            node.sshd_config.write_text(self._sshd_config(node))
        self.known_hosts.write_text("".join(f"{n.known_hosts_entry}\n" for n in self.nodes))
        self.empty_known_hosts.write_text("")

    def _sshd_config(self, node: NamespaceNode) -> str:
        return "\n".join(
            [
                f"ListenAddress {node.address}:{node.ssh_port}",
                f'HostKey "{node.host_key}"',
                f'PidFile "{node.workdir / "sshd.pid"}"',
                f'AuthorizedKeysFile "{self.authorized_keys}"',
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                # The key files live under pytest's tmp_path, not in ~root/.ssh.
                "StrictModes no",
                # The launcher opens sessions to every node in parallel.
                "MaxStartups 100:30:200",
                "MaxSessions 100",
                "UseDNS no",
                "PrintMotd no",
                "PrintLastLog no",
                # Fabric's put/get speak SFTP; the built-in server needs no binary.
                "Subsystem sftp internal-sftp",
                "",
            ]
        )

    def _processes_in_run(self) -> dict[int, list[str]]:
        """Processes whose network namespace is one of this run's (found by inode)."""
        wanted = {f"net:[{inode}]" for inode in self._namespace_inodes.values()}
        found = {}
        for entry in pathlib.Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "net") not in wanted:
                    continue
            except OSError:
                continue
            argv = command_line(int(entry.name))
            if argv is not None:
                found[int(entry.name)] = argv
        return found


def _keygen(path: pathlib.Path, comment: str) -> None:
    for stale in (path, path.with_suffix(".pub")):
        stale.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


@contextlib.contextmanager
def _subnet_lock() -> Iterator[None]:
    with SUBNET_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine routes or has an address in, default routes left out."""
    words = []
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        parts = line.split()
        # Lines of the local table start with their type: "local 10.0.0.1 dev …".
        if len(parts) > 1 and parts[0] in ("local", "broadcast", "unicast", "multicast", "anycast"):
            words.append(parts[1])
        elif parts:
            words.append(parts[0])
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        parts = line.split()
        if len(parts) > 3:
            words.append(parts[3])
    in_use = []
    for word in words:
        with contextlib.suppress(ValueError):
            network = ipaddress.IPv4Network(word, strict=False)
            if network.prefixlen > 0:
                in_use.append(network)
    return in_use


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    candidates = list(SUBNET_POOL.subnets(new_prefix=24))
    in_use = _networks_in_use()
    start = seed % len(candidates)
    for candidate in candidates[start:] + candidates[:start]:
        if not any(candidate.overlaps(network) for network in in_use):
            return candidate
    raise NetnsError(f"no free /24 left in {SUBNET_POOL}")


def _close_forgotten_clusters() -> None:
    for cluster in list(_open_clusters):
        with contextlib.suppress(Exception):
            cluster.close()


atexit.register(_close_forgotten_clusters)


def preflight() -> str | None:
    """Why namespace clusters cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "the launcher tests build network namespaces and run sshd: run them as root"
    missing = [
        binary
        for binary in ("ip", "ssh", "ssh-keygen", "unshare", "hostname", "mount")
        if shutil.which(binary) is None
    ]
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD)
    if missing:
        return (
            f"missing {', '.join(missing)}: run `make setup` "
            "(Debian packages openssh-server, openssh-client, iproute2, util-linux)"
        )
    probe = f"{PREFIX}-{os.getpid()}-{next(_run_counter)}-probe"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` fails here: {result.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None
