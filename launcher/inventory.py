"""The inventory: which nodes a job may use and how to reach them, loaded into typed objects.

Every error names the file, the field (``nodes[1].host``) and what was expected, so a typo
fails before anything is started anywhere. Values that end up in remote shell commands are
checked against strict patterns here and quoted again where they are used.
"""

from __future__ import annotations

import functools
import ipaddress
import pathlib
import re
import socket
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

from ugro.common.config_files import ConfigFileError, load_yaml
from ugro.common.identifiers import NODE_NAME
from ugro.common.messages import shown
from ugro.common.ports import DEFAULT_EXPORTER_PORT, DEFAULT_METRICS_BASE_PORT

DEFAULT_SSH_PORT = 22
# Per user: a shared one (/tmp/ugro) would let one user plant files that another user's
# agent then writes to. Expanded on each node, for the user the launcher logs in as.
DEFAULT_WORKDIR = "~/.local/state/ugro/node"

# DNS name, IPv4 or IPv6 (``::1`` too); never a leading "-", which ssh would take for an option
HOST = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9.:-]{0,252}|::[A-Fa-f0-9.:]{0,250})$")
USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
WEB_CONFIG_ENV = "UGRO_WEB_CONFIG"  # how a rank is told its web configuration


class InventoryError(ValueError):
    """The inventory file is missing, malformed, or has a field with a bad value."""


@dataclass(frozen=True)
class Node:
    name: str
    host: str
    ssh_port: int
    user: str | None
    identity_file: str | None
    gpus: int | None  # None: not declared, so preflight does not check it
    # The web configuration (TLS, client certificates, basic auth) of the node's endpoints, a
    # path on the node: the ranks get it as UGRO_WEB_CONFIG, an exporter the launcher starts as
    # --web.config.file, and preflight checks it there. None: plain HTTP.
    web_config: str | None = None

    @property
    def is_local(self) -> bool:
        """A node on this machine runs its commands without SSH."""
        return self.host in LOCAL_HOSTS


@dataclass(frozen=True)
class Defaults:
    python: str  # the Python with ugro installed, on every node
    workdir: str  # logs, process ids and exit codes of each job, on every node
    exporter_port: int
    metrics_base_port: int
    min_free_disk_bytes: int
    env: dict[str, str] = field(default_factory=dict)
    # Where torchrun and the ranks run, on every node: a script's own directory, for its
    # relative paths and local imports. None: the SSH login directory (localhost: the
    # directory ugro-launch runs in).
    chdir: str | None = None
    web_config: str | None = None  # every node's, unless a node names its own (see Node)


@dataclass(frozen=True)
class PrometheusTargets:
    targets_dir: str  # where the file_sd target files go
    host: str | None  # None: a local directory; else the host that holds it (over SSH)
    ssh_port: int
    user: str | None
    identity_file: str | None
    grafana_url: str | None


@dataclass(frozen=True)
class SlurmSettings:
    """An inventory with a ``slurm`` section submits through Slurm: the allocation picks the
    nodes, so the inventory lists none."""

    partition: str | None  # None: Slurm's default partition
    nodes: int  # how many nodes a job gets unless --nodes says otherwise
    gpus_per_node: int | None  # sbatch --gpus-per-node; None: not asked for
    time_limit: str | None  # sbatch --time, e.g. "04:00:00"; None: the partition's default
    account: str | None
    # Where the job's batch output and each node's torchrun output go: a directory the nodes
    # and this machine share (a home or project file system), so `ugro-launch logs` reads it.
    log_dir: str
    sbatch_args: tuple[str, ...] = ()  # more sbatch options, each "--name=value"


@dataclass(frozen=True)
class Inventory:
    path: pathlib.Path
    nodes: tuple[Node, ...]
    defaults: Defaults
    prometheus: PrometheusTargets
    slurm: SlurmSettings | None = None

    @functools.cached_property
    def _by_name(self) -> dict[str, Node]:
        # A dict, so that picking every node of a large inventory by name stays linear.
        return {node.name: node for node in self.nodes}

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            pass
        known = ", ".join(n.name for n in self.nodes[:KNOWN_SHOWN])
        if len(self.nodes) > KNOWN_SHOWN:
            known += f", … {len(self.nodes) - KNOWN_SHOWN} more"
        raise InventoryError(f"{self.path}: no node named {name!r} (known: {known})") from None


KNOWN_SHOWN = 20  # node names an "unknown node" error lists


class _Fields:
    """Reads one mapping of the file, naming ``where`` in every error."""

    def __init__(self, path: pathlib.Path, where: str, data: Any, allowed: set[str]) -> None:
        if not isinstance(data, Mapping):
            raise InventoryError(f"{path}: {where}: expected a mapping")
        unknown = set(data) - allowed
        if unknown:
            raise InventoryError(
                f"{path}: {where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                f"expected some of {', '.join(sorted(allowed))}"
            )
        self.path, self.where, self.data = path, where, data

    def _error(self, name: str, expected: str, value: Any) -> InventoryError:
        return InventoryError(
            f"{self.path}: {self.where}.{name}: expected {expected}, got {shown(value)}"
        )

    def text(self, name: str, pattern: re.Pattern[str], expected: str, default: Any = ...) -> Any:
        if name not in self.data:
            if default is ...:
                raise InventoryError(f"{self.path}: {self.where}.{name}: missing ({expected})")
            return default
        value = self.data[name]
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise self._error(name, expected, value)
        return value

    def integer(self, name: str, low: int, high: int, default: Any = ...) -> Any:
        if name not in self.data:
            if default is ...:
                raise InventoryError(f"{self.path}: {self.where}.{name}: missing")
            return default
        value = self.data[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._error(name, f"an integer in {low}..{high}", value)
        return value

    def path_text(self, name: str, default: Any = ...) -> Any:
        """An absolute path (or ~/...) without characters that would need shell care."""
        return self.text(name, _SAFE_PATH, "an absolute path of plain characters", default)


_SAFE_PATH = re.compile(r"^(/|~/)[A-Za-z0-9._+/@-]*$")
_URL = re.compile(r"^https?://[^\s'\"`$\\]+$")


def load_inventory(path: str | pathlib.Path) -> Inventory:
    path = pathlib.Path(path)
    try:
        data = load_yaml(path, "the inventory")
    except ConfigFileError as error:
        raise InventoryError(str(error)) from error
    return inventory_from_data(path, data)


def inventory_from_data(path: pathlib.Path, data: Any) -> Inventory:
    """The inventory that the parsed YAML ``data`` of ``path`` describes."""
    top = _Fields(path, "inventory", data, {"defaults", "prometheus", "nodes", "slurm"})
    defaults = _load_defaults(path, top.data.get("defaults", {}))
    prometheus = _load_prometheus(path, top.data.get("prometheus"), top.data.get("defaults", {}))
    raw_nodes = top.data.get("nodes")
    if "slurm" in top.data:
        if raw_nodes is not None:
            raise InventoryError(
                f"{path}: nodes: not with a slurm section: Slurm's allocation picks the nodes; "
                "remove nodes (or the slurm section, to launch over SSH)"
            )
        return Inventory(path, (), defaults, prometheus, _load_slurm(path, top.data["slurm"]))
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise InventoryError(f"{path}: nodes: expected a non-empty list of nodes")
    nodes = tuple(_load_node(path, i, raw, top.data.get("defaults", {})) for i, raw in
                  enumerate(raw_nodes))  # fmt: skip
    duplicates = sorted(name for name, count in Counter(n.name for n in nodes).items() if count > 1)
    if duplicates:
        raise InventoryError(f"{path}: nodes: duplicate name(s) {', '.join(duplicates)}")
    return Inventory(path, nodes, defaults, prometheus)


def _load_defaults(path: pathlib.Path, data: Any) -> Defaults:
    fields = _Fields(
        path,
        "defaults",
        data,
        {
            "python", "workdir", "exporter_port", "metrics_base_port", "env", "user",
            "ssh_port", "identity_file", "min_free_disk_gb", "chdir", "web_config",
        },
    )  # fmt: skip
    env = fields.data.get("env", {})
    if not isinstance(env, Mapping):
        raise InventoryError(f"{path}: defaults.env: expected a mapping of NAME: value")
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise InventoryError(f"{path}: defaults.env: {name!r} is not an environment name")
        if name == WEB_CONFIG_ENV:
            # Set here, it would reach the ranks unchecked and the exporters not at all.
            raise InventoryError(
                f"{path}: defaults.env.{name}: not here: name the file as defaults.web_config "
                "(or nodes[].web_config), which preflight checks on every node and which the "
                "exporters get too"
            )
        if not isinstance(value, str | int | float) or "\n" in str(value):
            raise InventoryError(f"{path}: defaults.env.{name}: expected a one-line value")
    min_free_gb = fields.integer("min_free_disk_gb", 0, 1_000_000, 1)
    return Defaults(
        python=_python_path(fields),
        workdir=fields.path_text("workdir", DEFAULT_WORKDIR),
        exporter_port=fields.integer("exporter_port", 1, 65535, DEFAULT_EXPORTER_PORT),
        metrics_base_port=fields.integer("metrics_base_port", 1, 65535, DEFAULT_METRICS_BASE_PORT),
        min_free_disk_bytes=min_free_gb * 1024**3,
        env={str(k): str(v) for k, v in env.items()},
        chdir=fields.path_text("chdir", None),
        web_config=_web_config_path(fields, None),
    )


def _python_path(fields: _Fields) -> str:
    python = fields.path_text("python", "/usr/bin/python3")
    if python.startswith("~"):
        # It is the program of every command on the nodes, run without a shell (locally) or
        # quoted (over SSH): nothing would expand ~, and the local home is not the nodes'.
        raise InventoryError(
            f"{fields.path}: defaults.python: expected an absolute path, got {shown(python)}: "
            "~ is not expanded there; write the full path, e.g. /home/USER/venv/bin/python"
        )
    return python


def _web_config_path(fields: _Fields, default: str | None) -> str | None:
    web_config = fields.path_text("web_config", default)
    if web_config is not None and web_config.startswith("~"):
        # It reaches the ranks as an environment value, where nothing expands ~.
        raise InventoryError(
            f"{fields.path}: {fields.where}.web_config: expected an absolute path, got "
            f"{shown(web_config)}: ~ is not expanded there; write the full path, e.g. "
            "/etc/ugro/web-config.yml"
        )
    return web_config


def _load_node(path: pathlib.Path, index: int, data: Any, defaults: Mapping[str, Any]) -> Node:
    where = f"nodes[{index}]"
    fields = _Fields(path, where, data, {"name", "host", "ssh_port", "user", "identity_file",
                                         "gpus", "web_config"})  # fmt: skip
    name = fields.text("name", NODE_NAME, "a node name of letters, digits, '.', '_' or '-'")
    inherited = _Fields(path, "defaults", defaults, set(defaults))
    return Node(
        name=name,
        host=fields.text("host", HOST, "a host name or IP address"),
        ssh_port=fields.integer(
            "ssh_port", 1, 65535, inherited.integer("ssh_port", 1, 65535, DEFAULT_SSH_PORT)
        ),
        user=fields.text("user", USER, "a user name", inherited.text("user", USER, "a user", None)),
        identity_file=fields.path_text("identity_file", inherited.path_text("identity_file", None)),
        gpus=fields.integer("gpus", 0, 64, None),
        web_config=_web_config_path(fields, _web_config_path(inherited, None)),
    )


_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SLURM_TIME = re.compile(r"^(?:\d+-)?\d+(?::\d+){0,2}$")  # sbatch --time: [D-]H[:M[:S]], M
_SBATCH_OPTION = re.compile(r"^--[a-z][a-z-]*(?:=[^\n]*)?$")
DEFAULT_SLURM_LOG_DIR = "~/.local/state/ugro/slurm"


def _load_slurm(path: pathlib.Path, data: Any) -> SlurmSettings:
    fields = _Fields(path, "slurm", data or {}, {"partition", "nodes", "gpus_per_node", "time",
                                                 "account", "log_dir", "sbatch_args"})  # fmt: skip
    extra = fields.data.get("sbatch_args", [])
    if not isinstance(extra, list) or not all(
        isinstance(option, str) and _SBATCH_OPTION.fullmatch(option) for option in extra
    ):
        raise fields._error(
            "sbatch_args", 'a list of sbatch long options, e.g. ["--qos=high"]', extra
        )
    return SlurmSettings(
        partition=fields.text("partition", _SLURM_NAME, "a Slurm partition name", None),
        nodes=fields.integer("nodes", 1, 4096, 1),
        gpus_per_node=fields.integer("gpus_per_node", 0, 64, None),
        time_limit=fields.text("time", _SLURM_TIME, "a time limit like 04:00:00 or 1-00:00", None),
        account=fields.text("account", _SLURM_NAME, "a Slurm account name", None),
        log_dir=fields.path_text("log_dir", DEFAULT_SLURM_LOG_DIR),
        sbatch_args=tuple(extra),
    )


def _load_prometheus(
    path: pathlib.Path, data: Any, defaults: Mapping[str, Any]
) -> PrometheusTargets:
    if data is None:
        raise InventoryError(
            f"{path}: prometheus: missing; expected at least prometheus.targets_dir, the folder "
            "Prometheus reads file_sd targets from"
        )
    fields = _Fields(path, "prometheus", data, {"targets_dir", "host", "ssh_port", "user",
                                                "identity_file", "grafana_url"})  # fmt: skip
    # Reached like the nodes unless it says otherwise.
    inherited = _Fields(path, "defaults", defaults, set(defaults))
    targets_dir = fields.path_text("targets_dir")
    host = fields.text("host", HOST, "a host name or IP address", None)
    if targets_dir.startswith("~") and host is not None and host not in LOCAL_HOSTS:
        # Written there over SFTP and a quoted mkdir: ~ would become a directory named "~".
        raise InventoryError(
            f"{path}: prometheus.targets_dir: expected an absolute path on {host}, got "
            f"{shown(targets_dir)}: ~ is not expanded there; write the full path"
        )
    return PrometheusTargets(
        targets_dir=targets_dir,
        host=host,
        ssh_port=fields.integer(
            "ssh_port", 1, 65535, inherited.integer("ssh_port", 1, 65535, DEFAULT_SSH_PORT)
        ),
        user=fields.text("user", USER, "a user name", inherited.text("user", USER, "a user", None)),
        identity_file=fields.path_text("identity_file", inherited.path_text("identity_file", None)),
        grafana_url=fields.text("grafana_url", _URL, "an http(s) URL", None),
    )


# -- one machine, one node --------------------------------------------------------------------

THIS_MACHINE = "this machine"


def same_machine(nodes: Iterable[Node]) -> tuple[Node, Node, str] | None:
    """The first two of ``nodes`` that are one machine, and the address they share (or
    THIS_MACHINE), else None.

    Every rank of a job serves metrics on the same ports of its node and Prometheus scrapes
    them at the node's host, so two nodes on one machine (``localhost`` and ``127.0.0.1``, or
    one host name twice) would fight over those ports and be scraped as one. A node is known
    by its host as written and every address it resolves to; loopback and this machine's own
    addresses all count as this machine. A host that does not resolve is left to SSH to report.
    """
    own = _own_addresses()
    seen: dict[str, Node] = {}
    for node in nodes:
        keys = _machine_keys(node, own)
        for key in sorted(keys, key=_shown_first):
            other = seen.get(key)
            if other is not None and other is not node:
                return other, node, key
        for key in keys:
            seen.setdefault(key, node)
    return None


def _machine_keys(node: Node, own: frozenset[str]) -> set[str]:
    keys = {node.host.lower()}
    if node.is_local:
        keys.add(THIS_MACHINE)
    try:
        found = socket.getaddrinfo(node.host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        found = []
    for *_, sockaddr in found:
        address = _normal_address(str(sockaddr[0]))
        if address is None:
            continue
        is_loopback = ipaddress.ip_address(address).is_loopback
        keys.add(THIS_MACHINE if is_loopback or address in own else address)
    return keys


def _own_addresses() -> frozenset[str]:
    """Every address of this machine's network interfaces."""
    found = set()
    for addresses in psutil.net_if_addrs().values():
        for each in addresses:
            if each.family in (socket.AF_INET, socket.AF_INET6):
                address = _normal_address(each.address)
                if address is not None:
                    found.add(address)
    return frozenset(found)


def _normal_address(text: str) -> str | None:
    """``fe80::1%eth0`` → ``fe80::1``; one spelling per address; None if not an address."""
    try:
        return str(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        return None


def _shown_first(key: str) -> tuple[int, str]:
    """This machine, then addresses, then host names: the most telling shared key first."""
    if key == THIS_MACHINE:
        return 0, key
    return (1 if _normal_address(key) is not None else 2), key
