"""Starting, watching and stopping one job on its nodes.

A launch is: preflight every node (in parallel) → make sure every node's ugro-exporter runs →
start torchrun on every node (static rendezvous on the first node, so rank numbers follow
node order) → register the rank and exporter endpoints with Prometheus → save the job record
and start its watcher. If any step fails, what was started is stopped again and the job's
targets are removed.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from . import records
from .inventory import Defaults, Inventory, Node, PrometheusTargets, load_inventory
from .nodes import AgentError, NodeSet
from .remote import RemoteError, SshOptions, SshShell
from .targets import LocalTargets, RankEndpoint, RemoteTargets, rank_endpoints
from .torchrun import job_environment, torchrun_argv

Print = Callable[[str], None]
STOP_GRACE_SECONDS = 10.0
# The job's watcher runs as ``python -m WATCHER_MODULE JOB``. A watcher started by a version
# before the module's rename runs as the older name and may still follow a job after an
# upgrade: stopping it must find it under either.
WATCHER_MODULE = "ugro.launcher.follower"
WATCHER_MODULES = (WATCHER_MODULE, "ugro.launcher.watch")


class LaunchError(RuntimeError):
    """The launch did not happen; the message says why, per node where it applies."""


@dataclass(frozen=True)
class JobPlan:
    job_id: str
    inventory: Inventory
    nodes: tuple[Node, ...]
    nproc_per_node: int
    command: tuple[str, ...]  # what torchrun runs: ("-m", "module", ...) or ("train.py", ...)
    rdzv_port: int
    chdir: str | None = None  # where it runs on every node (None: see Defaults.chdir)

    @property
    def world_size(self) -> int:
        return len(self.nodes) * self.nproc_per_node

    def metrics_ports(self) -> list[int]:
        base = self.inventory.defaults.metrics_base_port
        return list(range(base, base + self.nproc_per_node))

    def rank_endpoints(self) -> list[RankEndpoint]:
        return rank_endpoints(
            [(node.name, node.host) for node in self.nodes],
            self.nproc_per_node,
            self.inventory.defaults.metrics_base_port,
        )

    def torchrun_argv(self, node_rank: int) -> list[str]:
        return torchrun_argv(
            self.inventory.defaults.python,
            nnodes=len(self.nodes),
            nproc_per_node=self.nproc_per_node,
            node_rank=node_rank,
            master_addr=self.nodes[0].host,
            master_port=self.rdzv_port,
            command=self.command,
        )

    def environment(self, node: Node) -> dict[str, str]:
        return job_environment(
            self.job_id,
            node.name,
            self.inventory.defaults.metrics_base_port,
            self.inventory.defaults.env,
            node.web_config,
        )


def targets_for(inventory: Inventory, options: SshOptions) -> LocalTargets | RemoteTargets:
    """Where Prometheus reads its file_sd targets: here, or on its host over SSH."""
    return targets_at(inventory.prometheus, options)


def targets_at(config: PrometheusTargets, options: SshOptions) -> LocalTargets | RemoteTargets:
    if config.host is None or Node(config.host, config.host, 22, None, None, None).is_local:
        return LocalTargets(config.targets_dir)
    host = Node("prometheus", config.host, config.ssh_port, config.user, config.identity_file, None)
    return RemoteTargets(config.targets_dir, SshShell(host, options))


# -- preflight ------------------------------------------------------------------------------


def preflight(plan: JobPlan, nodes: NodeSet) -> dict[str, dict[str, Any] | Exception]:
    defaults = plan.inventory.defaults

    def check(node: Node) -> dict[str, Any]:
        ports = plan.metrics_ports()
        if node == plan.nodes[0]:
            ports.append(plan.rdzv_port)
        args = [
            f"--workdir={defaults.workdir}",
            f"--ports={','.join(map(str, ports))}",
            f"--min-free-bytes={defaults.min_free_disk_bytes}",
        ]
        if plan.chdir is not None:
            args.append(f"--chdir={plan.chdir}")
        if node.gpus is not None:
            args.append(f"--gpus={node.gpus}")
        if node.web_config is not None:
            args.append(f"--web-config={node.web_config}")
        return nodes.agent(node, "preflight", *args, timeout=60)

    return nodes.each(check)


def preflight_table(results: dict[str, dict[str, Any] | Exception], nodes: list[Node]) -> str:
    rows = [("node", "host", "check", "GPUs", "free disk", "details")]
    for node in nodes:
        result = results[node.name]
        if isinstance(result, Exception):
            rows.append((node.name, node.host, "FAILED", "-", "-", str(result)))
            continue
        free = result.get("workdir_free_bytes")
        rows.append(
            (
                node.name,
                node.host,
                "FAILED" if result.get("problems") else "ok",
                "-" if result.get("gpus") is None else str(result["gpus"]),
                "-" if free is None else f"{free / 1024**3:.1f} GB",
                "; ".join(
                    (result.get("problems") or [f"torch {result.get('torch_version')}"])
                    # Said, not failed: the node trains; only what the warning names is off.
                    + [f"warning: {warning}" for warning in result.get("warnings") or []]
                ),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in rows
    )


def failed_nodes(results: dict[str, dict[str, Any] | Exception]) -> list[str]:
    return [
        name
        for name, result in results.items()
        if isinstance(result, Exception) or result.get("problems")
    ]


# -- launch ---------------------------------------------------------------------------------


def launch(plan: JobPlan, options: SshOptions, say: Print) -> records.JobRecord:
    """Start the job everywhere, or nowhere.

    The job's record is written (state LAUNCHING) before anything starts on a node, so a
    launcher killed half-way leaves a record that ``ugro-launch status`` and ``stop`` find.
    Any failure or interruption (Ctrl-C, SIGTERM, SIGHUP) stops what was started, removes the
    job's targets and deletes the record; a rollback that cannot finish keeps the record.
    """
    record = records.JobRecord(
        job_id=plan.job_id,
        inventory=str(plan.inventory.path.resolve()),
        nodes=[node.name for node in plan.nodes],
        nproc_per_node=plan.nproc_per_node,
        command=list(plan.command),
        rdzv_port=plan.rdzv_port,
        started_at=time.time(),
        chdir=plan.chdir,
        known_hosts=str(options.known_hosts),
        access=access_of(plan),
        state=records.LAUNCHING,
        launcher=records.process_ref(os.getpid()),
    )
    try:
        record.create()
    except records.RecordExists:
        raise LaunchError(
            f"job {plan.job_id!r} already exists ({record.path}); choose "
            "another --job-id, or `ugro-launch stop` it first"
        ) from None
    try:
        targets = targets_for(plan.inventory, options)
        nodes = NodeSet(plan.inventory, plan.nodes, options)
    except BaseException:
        record.delete()
        raise
    with nodes:
        began = time.perf_counter()
        try:
            record.metrics_scheme = _prepare(plan, nodes, say)
        except BaseException:  # nothing of the job was started yet (exporters are the node's)
            record.delete()
            raise
        prepared = time.perf_counter()
        try:
            started = _start_everywhere(plan, nodes, targets)
        except BaseException:
            _roll_back(plan, nodes, targets, record)
            raise
        say(
            f"torchrun and targets {time.perf_counter() - prepared:.1f} s "
            f"(launch {time.perf_counter() - began:.1f} s)"
        )
    record.state = records.RUNNING
    record.launcher = None
    record.node_states = started
    record.save()
    record.watcher_pid = start_watcher(record, options)
    record.save()
    return record


def _prepare(plan: JobPlan, nodes: NodeSet, say: Print) -> str:
    """Preflight every node, then make sure its exporter runs; LaunchError names the nodes.
    Returns the scheme the job's endpoints serve ("https" or "http")."""
    began = time.perf_counter()
    checks = preflight(plan, nodes)
    say(preflight_table(checks, list(plan.nodes)))
    bad = failed_nodes(checks)
    if bad:
        raise LaunchError(f"preflight failed on {', '.join(bad)}: nothing was started")
    scheme = one_scheme(checks, list(plan.nodes))
    preflight_done = time.perf_counter()
    exporters = nodes.each(lambda node: _ensure_exporter(plan, nodes, node))
    problems = {name: r for name, r in exporters.items() if isinstance(r, Exception)}
    if problems:
        raise LaunchError(_per_node("ugro-exporter could not be started", problems))
    say(
        f"preflight {preflight_done - began:.1f} s, "
        f"exporters {time.perf_counter() - preflight_done:.1f} s"
    )
    return scheme


def one_scheme(checks: dict[str, dict[str, Any] | Exception], nodes: list[Node]) -> str:
    """The scheme every node's endpoints serve, as preflight found their web configuration;
    LaunchError if they differ: Prometheus scrapes all of a job's ranks (and all exporters)
    in one scrape job, with one scheme."""
    schemes: dict[str, list[str]] = {}
    for node in nodes:
        check = checks[node.name]
        scheme = (check.get("metrics_scheme") if isinstance(check, dict) else None) or "http"
        schemes.setdefault(scheme, []).append(node.name)
    if len(schemes) > 1:
        serving = "; ".join(f"{scheme} on {', '.join(names)}" for scheme, names in schemes.items())
        raise LaunchError(
            f"the nodes' endpoints would not serve one scheme ({serving}): Prometheus scrapes "
            "them with one; give every node a web_config with tls_server_config, or none of "
            "them: nothing was started"
        )
    return next(iter(schemes))


def _start_everywhere(
    plan: JobPlan, nodes: NodeSet, targets: LocalTargets | RemoteTargets
) -> dict[str, Any]:
    """torchrun on every node, then the targets; LaunchError names the nodes."""
    started = nodes.each(lambda node: _start(plan, nodes, node))
    problems = {name: r for name, r in started.items() if isinstance(r, Exception)}
    if problems:
        others = len(plan.nodes) - len(problems)
        raise LaunchError(
            _per_node("torchrun could not be started", problems)
            + ("\nthe job was stopped on the other nodes" if others else "")
        )

    try:
        for node in plan.nodes:
            targets.register_node(node.name, node.host, plan.inventory.defaults.exporter_port)
        targets.register_job(plan.job_id, plan.rank_endpoints())
    except (OSError, RemoteError) as error:
        raise LaunchError(
            f"cannot write Prometheus targets in {plan.inventory.prometheus.targets_dir}: "
            f"{error}; the job was stopped"
        ) from error
    return started


def _roll_back(
    plan: JobPlan,
    nodes: NodeSet,
    targets: LocalTargets | RemoteTargets,
    record: records.JobRecord,
) -> None:
    """Undo a launch that failed or was interrupted at any point: stop the job on every node
    (a node where it never started answers "unknown"), remove its targets, forget the record.
    If a node cannot be told, the record stays, so ``ugro-launch stop`` can try again."""
    results = stop_nodes(plan, nodes, list(plan.nodes))
    unreached = [name for name, result in results.items() if isinstance(result, Exception)]
    try:
        targets.remove_job(plan.job_id)
    except (OSError, RemoteError):
        unreached.append("the Prometheus targets")
    if unreached:
        record.state = records.FAILED
        record.launcher = None
        record.ended_at = time.time()
        record.node_states = {name: {"state": "unreachable", "reason": str(result)}
                              for name, result in results.items()
                              if isinstance(result, Exception)}  # fmt: skip
        record.save()
    else:
        record.delete()


def _ensure_exporter(plan: JobPlan, nodes: NodeSet, node: Node) -> dict[str, Any]:
    answer = nodes.agent(
        node,
        "ensure-exporter",
        f"--port={plan.inventory.defaults.exporter_port}",
        f"--node={node.name}",
        f"--workdir={plan.inventory.defaults.workdir}",
        *([f"--web-config={node.web_config}"] if node.web_config is not None else []),
    )
    if answer.get("state") not in ("running", "started"):
        raise AgentError(f"{node.name}: {answer.get('reason', answer)}")
    return answer


def _start(plan: JobPlan, nodes: NodeSet, node: Node) -> dict[str, Any]:
    env = [f"--env={name}={value}" for name, value in plan.environment(node).items()]
    answer = nodes.agent(
        node,
        "start",
        f"--job-id={plan.job_id}",
        f"--node={node.name}",
        f"--workdir={plan.inventory.defaults.workdir}",
        *env,
        *([f"--cwd={plan.chdir}"] if plan.chdir is not None else []),
        "--",
        *plan.torchrun_argv(plan.nodes.index(node)),
    )
    if answer.get("state") != "started":
        raise AgentError(f"{node.name}: {answer.get('reason', answer)}")
    return answer


def stop_nodes(plan: JobPlan, nodes: NodeSet, which: list[Node]) -> dict[str, Any]:
    def stop(node: Node) -> dict[str, Any]:
        return nodes.agent(
            node,
            "stop",
            f"--job-id={plan.job_id}",
            f"--node={node.name}",
            f"--workdir={plan.inventory.defaults.workdir}",
            f"--grace={STOP_GRACE_SECONDS}",
            timeout=STOP_GRACE_SECONDS + 60,
        )

    return nodes.each(stop, which)


def _per_node(what: str, problems: dict[str, Exception]) -> str:
    lines = [f"{what} on {', '.join(problems)}:"]
    lines += [f"  {error}" for error in problems.values()]
    return "\n".join(lines)


# -- after the launch -----------------------------------------------------------------------


def start_watcher(record: records.JobRecord, options: SshOptions) -> int:
    """A detached local process that follows the job to its end (see follower.py)."""
    log = records.state_dir() / f"{record.job_id}.watch.log"
    args = [sys.executable, "-m", WATCHER_MODULE, record.job_id]
    args += [f"--known-hosts={options.known_hosts}"]
    if options.accept_new_host_keys:
        args.append("--accept-new-host-keys")
    with open(log, "ab") as out:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "UGRO_STATE_DIR": str(records.state_dir())},
        )
    return process.pid


def node_statuses(
    plan: JobPlan, nodes: NodeSet
) -> dict[str, dict[str, Any] | Exception]:  # per node: the agent's status answer
    return nodes.each(
        lambda node: nodes.agent(
            node,
            "status",
            f"--job-id={plan.job_id}",
            f"--node={node.name}",
            f"--workdir={plan.inventory.defaults.workdir}",
        )
    )


def stop_job(
    plan: JobPlan, options: SshOptions, *, unknown_ok: bool = False
) -> dict[str, dict[str, Any] | Exception]:
    """Stop the job everywhere, then forget its targets; safe to repeat.

    A node whose agent finds no job directory ("unknown") has not been stopped: the job may
    run there in a directory this launcher does not look in. It counts as a failure, like an
    unreachable node, unless ``unknown_ok`` (a launch cut short before it reached the node).
    The targets are only removed once every node has been stopped.
    """
    with NodeSet(plan.inventory, plan.nodes, options) as nodes:
        results = stop_nodes(plan, nodes, list(plan.nodes))
    for name, result in results.items():
        if not unknown_ok and isinstance(result, dict) and result.get("state") == "unknown":
            workdir = plan.inventory.defaults.workdir
            results[name] = AgentError(
                f"{name}: no job {plan.job_id} in {workdir}/jobs there: it may still run "
                "elsewhere; check the node by hand"
            )
    if not any(isinstance(result, Exception) for result in results.values()):
        targets_for(plan.inventory, options).remove_job(plan.job_id)
    return results


def stop_recorded_job(
    record: records.JobRecord, options: SshOptions
) -> tuple[records.JobRecord, dict[str, dict[str, Any] | Exception]]:
    """``ugro-launch stop``: the record marked stopped, its watcher ended, the job stopped on
    every node and its targets removed. If a node cannot be confirmed stopped, the record's
    state, its watcher and the targets are all kept (the job may still train), and the node's
    result is an exception; ``stop`` may then be repeated."""
    plan = plan_from_record(record)
    before = record
    if record.state in records.GOING:
        # First, so that the watcher does not take the stop for a failure of the job.
        record = replace_state(record, state=records.STOPPED, ended_at=time.time(), launcher=None)
    watcher_ended = stop_watcher(record)
    # A launch that never completed (still LAUNCHING, or rolled back only in part: no watcher
    # was started) may not have reached some nodes: no job directory there is normal.
    never_launched = before.state == records.LAUNCHING or before.watcher_pid is None
    results = stop_job(plan, options, unknown_ok=never_launched)
    if all(not isinstance(result, Exception) for result in results.values()):
        return record, results
    record = before
    if watcher_ended and record.state == records.RUNNING:
        record.watcher_pid = start_watcher(record, options)
    record.save()
    return record, results


def stop_watcher(record: records.JobRecord) -> bool:
    """End the job's watcher, if it still runs (it would notice the stop within seconds);
    True if it did run."""
    if record.watcher_pid is None:
        return False
    try:
        process = psutil.Process(record.watcher_pid)
        cmdline = process.cmdline()
        if any(name in cmdline for name in WATCHER_MODULES) and record.job_id in cmdline:
            process.terminate()
            return True
    except psutil.Error:
        pass
    return False


def access_of(plan: JobPlan) -> dict[str, Any]:
    """How to reach the job's nodes and targets later, for the record (see records.py)."""
    defaults, prometheus = plan.inventory.defaults, plan.inventory.prometheus
    return {
        "python": defaults.python,
        "workdir": defaults.workdir,
        "exporter_port": defaults.exporter_port,
        "metrics_base_port": defaults.metrics_base_port,
        "nodes": {
            node.name: {
                "host": node.host,
                "ssh_port": node.ssh_port,
                "user": node.user,
                "identity_file": node.identity_file,
            }
            for node in plan.nodes
        },
        "prometheus": {
            "targets_dir": prometheus.targets_dir,
            "host": prometheus.host,
            "ssh_port": prometheus.ssh_port,
            "user": prometheus.user,
            "identity_file": prometheus.identity_file,
        },
    }


def plan_from_record(record: records.JobRecord) -> JobPlan:
    """The job as it was launched: its nodes are reached as its record says, never as the
    inventory says now (it may have been edited or deleted). Only a record written before
    ``access`` was kept falls back to reading the inventory (InventoryError if it cannot)."""
    inventory = (
        load_inventory(record.inventory)
        if record.access is None
        else _inventory_at_launch(record, record.access)
    )
    return JobPlan(
        job_id=record.job_id,
        inventory=inventory,
        nodes=tuple(inventory.node(name) for name in record.nodes),
        nproc_per_node=record.nproc_per_node,
        command=tuple(record.command),
        rdzv_port=record.rdzv_port,
        chdir=record.chdir,
    )


def _inventory_at_launch(record: records.JobRecord, access: dict[str, Any]) -> Inventory:
    nodes = []
    for name in record.nodes:
        reach = access["nodes"][name]
        nodes.append(
            Node(
                name, reach["host"], reach["ssh_port"], reach["user"], reach["identity_file"], None
            )
        )
    prometheus = access["prometheus"]
    return Inventory(
        path=pathlib.Path(record.inventory),
        nodes=tuple(nodes),
        defaults=Defaults(
            python=access["python"],
            workdir=access["workdir"],
            exporter_port=access["exporter_port"],
            metrics_base_port=access["metrics_base_port"],
            min_free_disk_bytes=0,  # preflight only, at launch
            chdir=record.chdir,
        ),
        prometheus=PrometheusTargets(
            targets_dir=prometheus["targets_dir"],
            host=prometheus["host"],
            ssh_port=prometheus["ssh_port"],
            user=prometheus["user"],
            identity_file=prometheus["identity_file"],
            grafana_url=None,
        ),
    )


def replace_state(record: records.JobRecord, **changes: Any) -> records.JobRecord:
    updated = dataclasses.replace(record, **changes)
    updated.save()
    return updated
