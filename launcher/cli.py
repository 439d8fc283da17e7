"""ugro-launch: start a torchrun job on every node over SSH or through Slurm, and find, follow or
stop it."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import re
import signal
import sys
import time
from collections import Counter

import psutil

from ugro.common.identifiers import JOB_ID, JOB_ID_EXPECTED

from . import records, slurm_jobs, watchers
from .inventory import THIS_MACHINE, Inventory, InventoryError, Node, load_inventory, same_machine
from .launch import (
    JobPlan,
    LaunchError,
    launch,
    node_statuses,
    plan_from_record,
    stop_recorded_job,
    targets_for,
)
from .nodes import NodeSet
from .remote import DEFAULT_KNOWN_HOSTS, RemoteError, SshOptions
from .slurm_jobs import SlurmPlan
from .stacks import collect_stacks, format_report

VERBS = ("run", "status", "stop", "logs", "stacks", "list", "stop-exporters")
DEFAULT_RDZV_PORT = 29500
DEFAULT_DUMP_SECONDS = 10.0

EPILOG = """\
verbs:
  run      (the default) preflight every node in parallel, start ugro-exporter where it is not
           running, start torchrun on every node, register the ranks with Prometheus
  status   [JOB]  per node: running, finished (exit 0), failed (exit code) or lost
  stop     JOB    terminate the job's processes everywhere (SIGTERM, SIGKILL after 10 s) and
                  remove its Prometheus targets; safe to repeat. A launch still under way is
                  interrupted and rolls back; one whose launcher was killed (state
                  "interrupted") is stopped like a running job
  logs     JOB    the end of a node's torchrun output (--node, --lines, --follow)
  stacks   JOB    a py-spy dump of every rank on every node, grouped by identical stack
                  (main thread, innermost frame last); a rank alone in its group among
                  larger ones is marked as the odd one out. --json for tools; -i INVENTORY
                  for a job not launched from here; exit 1 if any rank was not dumped
  list            the jobs this machine launched, newest last
  stop-exporters  -i INVENTORY [--nodes A,B]  stop the ugro-exporter that `run` started on
                  nodes, after removing their Prometheus targets (so NodeExporterDown stays
                  silent); refused for a node where a job launched from here runs, unless
                  --force; an exporter that `run` did not start is left alone

Ctrl-C, SIGTERM or SIGHUP during `run` stops what was started and forgets the job.

Each job has a watcher on this machine that records its end and, when it finished, removes its
Prometheus targets. If that watcher dies (a reboot, the OOM killer, a kill), status, list, logs,
stacks and run --wait start a new one, which settles a job that ended meanwhile, and say so.

the training command comes after --, as torchrun takes it:
  ugro-launch -i cluster.yml --nodes gpu-a,gpu-b --nproc-per-node 8 -- -m ugro.trainer.train

inventory (YAML; launcher/inventory.example.yml is a complete example):
  defaults:
    python: /opt/venv/bin/python   # the Python with ugro and torch, on every node (absolute)
    chdir: /home/train/nanogpt     # where torchrun runs (--chdir; default: the login directory)
    workdir: ~/.local/state/ugro/node   # logs, pids, exit codes (per user): WORKDIR/jobs/JOB/NODE/
    exporter_port: 9490            # ugro-exporter on every node
    metrics_base_port: 9500        # rank metrics: base + local rank
    min_free_disk_gb: 1            # preflight wants this much free in workdir
    user: train                    # SSH user, port and key for every node,
    ssh_port: 22                   #   unless a node says otherwise
    identity_file: ~/.ssh/id_ed25519
    env: {NCCL_DEBUG: WARN}        # extra environment for torchrun and the ranks
    web_config: /etc/ugro/web-config.yml  # TLS/basic auth of ranks and exporters (a path on
                                   #   every node; preflight loads it and wants mode 0600)
  prometheus:
    targets_dir: /srv/ugro/prometheus/targets   # file_sd files: ranks/JOB.json, nodes/NODE.json
    host: head-node                # omit when Prometheus runs on this machine; reached
                                   #   with the defaults' user, ssh_port, identity_file
    grafana_url: http://head-node:3000
  nodes:
    - {name: gpu-a, host: 10.0.0.11, gpus: 8}  # host localhost: run here, without SSH
    - {name: gpu-b, host: 10.0.0.12, gpus: 8}  # one node per machine in a job

Slurm: an inventory with a `slurm` section (launcher/inventory.slurm.example.yml) and no nodes
submits with sbatch instead (--nodes is then a node count); the watcher registers the ranks,
labelled scheduler_job_id, when the allocation starts. status, stop (scancel), logs (from
slurm.log_dir, shared with the nodes) and list work for it.

SSH host keys are checked against ~/.ssh/known_hosts (--known-hosts); an unknown key is
refused with its fingerprint unless --accept-new-host-keys is given. Jobs are recorded in
$UGRO_STATE_DIR (default ~/.local/state/ugro/jobs).
"""


class UsageError(ValueError):
    pass


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C must work even when SIGINT was inherited ignored (a background job of a
    # non-interactive shell), in which case Python would not raise KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    else:
        command = []
    if not argv or argv[0] not in (*VERBS, "-h", "--help"):
        argv.insert(0, "run")
    args = parser().parse_args(argv)
    try:
        return args.handler(args, command)
    except (UsageError, InventoryError, records.RecordError) as error:
        print(f"ugro-launch: {error}", file=sys.stderr)
        return 2
    except (LaunchError, RemoteError) as error:
        print(f"ugro-launch: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ugro-launch: interrupted", file=sys.stderr)
        return 130


def interrupt_once() -> None:
    """Ctrl-C, SIGTERM (``kill``, a CI timeout) and SIGHUP (a closed terminal) raise
    KeyboardInterrupt once, so that a launch rolls back; a second signal must not cut that
    rollback short, and is only acknowledged."""

    def interrupted(signum: int, _frame: object) -> None:
        for each in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(each, acknowledge)
        raise KeyboardInterrupt

    def acknowledge(signum: int, _frame: object) -> None:
        os.write(2, b"ugro-launch: still stopping what was started; please wait\n")

    for each in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(each, interrupted)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="ugro-launch",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = top.add_subparsers(dest="verb", metavar="VERB")

    ssh = argparse.ArgumentParser(add_help=False)
    ssh.add_argument(
        "--known-hosts",
        type=pathlib.Path,
        help="known_hosts file the nodes' SSH host keys are checked against (default: for "
        f"run {DEFAULT_KNOWN_HOSTS}, for a job's other verbs the file it was launched with)",
    )
    ssh.add_argument(
        "--accept-new-host-keys",
        action="store_true",
        help="accept and remember the key of a host not yet in known_hosts (never a changed one)",
    )

    run = verbs.add_parser("run", parents=[ssh], help="start a job (the default verb)")
    run.add_argument("-i", "--inventory", type=pathlib.Path, required=True)
    run.add_argument("--job-id", help="default: the command's name and the time")
    run.add_argument("--nodes", help="comma-separated node names (default: every node)")
    run.add_argument("--nproc-per-node", type=int, default=1, help="ranks per node (default 1)")
    run.add_argument(
        "--rdzv-port",
        type=int,
        default=DEFAULT_RDZV_PORT,
        help=f"torchrun's port on the first node (default {DEFAULT_RDZV_PORT})",
    )
    run.add_argument(
        "--chdir",
        metavar="DIR",
        help="run torchrun and the ranks in DIR on every node, e.g. the script's own directory "
        "(absolute, or ~/...; default: the inventory's defaults.chdir, else the SSH login "
        "directory, or for a localhost node the current directory)",
    )
    run.add_argument(
        "--wait", action="store_true", help="wait for the job to end; exit 0 if it finished"
    )
    run.set_defaults(handler=run_job)

    status = verbs.add_parser("status", parents=[ssh], help="where a job stands, per node")
    status.add_argument("job_id", nargs="?")
    status.set_defaults(handler=show_status)

    stop = verbs.add_parser("stop", parents=[ssh], help="stop a job and remove its targets")
    stop.add_argument("job_id")
    stop.set_defaults(handler=stop_command)

    logs = verbs.add_parser("logs", parents=[ssh], help="a node's torchrun output")
    logs.add_argument("job_id")
    logs.add_argument("--node", help="default: the job's first node")
    logs.add_argument("--lines", type=int, default=100)
    logs.add_argument("--follow", "-f", action="store_true")
    logs.set_defaults(handler=show_logs)

    stacks = verbs.add_parser(
        "stacks", parents=[ssh], help="every rank's Python stack (py-spy), grouped"
    )
    stacks.add_argument("job_id")
    stacks.add_argument(
        "-i",
        "--inventory",
        type=pathlib.Path,
        help="reach the nodes as this inventory says (default: as the job's record says); "
        "for a job launched from another machine",
    )
    stacks.add_argument(
        "--nodes", help="comma-separated node names (default: every node of the job)"
    )
    stacks.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_DUMP_SECONDS,
        metavar="SECONDS",
        help=f"per rank (default {DEFAULT_DUMP_SECONDS:g})",
    )
    stacks.add_argument("--json", action="store_true", help="the dumps and groups as JSON")
    stacks.set_defaults(handler=show_stacks)

    listing = verbs.add_parser("list", help="the jobs launched from this machine")
    listing.set_defaults(handler=list_jobs)

    exporters = verbs.add_parser(
        "stop-exporters", parents=[ssh], help="stop the exporters that run started on nodes"
    )
    exporters.add_argument("-i", "--inventory", type=pathlib.Path, required=True)
    exporters.add_argument("--nodes", help="comma-separated node names (default: every node)")
    exporters.add_argument(
        "--force", action="store_true", help="also on nodes where a job launched from here runs"
    )
    exporters.set_defaults(handler=stop_exporters)
    return top


def ssh_options(args: argparse.Namespace, record: records.JobRecord | None = None) -> SshOptions:
    """--known-hosts if given, else the one the job was launched with, else the default."""
    known_hosts = getattr(args, "known_hosts", None)  # `list` takes no SSH options
    if known_hosts is None and record is not None and record.known_hosts:
        known_hosts = pathlib.Path(record.known_hosts)
    accept_new = getattr(args, "accept_new_host_keys", False)
    return SshOptions(known_hosts or DEFAULT_KNOWN_HOSTS, accept_new)


def revive_watchers(args: argparse.Namespace, jobs: list[records.JobRecord]) -> None:
    """Restart the watcher of every job in ``jobs`` that is still going and whose watcher died
    (see watchers.py); one line on stderr for each."""
    for revival in watchers.revive(jobs, lambda record: ssh_options(args, record)):
        print(f"ugro-launch: {revival.message()}", file=sys.stderr, flush=True)


# -- run --------------------------------------------------------------------------------------


def build_plan(args: argparse.Namespace, command: list[str], inventory: Inventory) -> JobPlan:
    job_id, chdir = _checked_job(args, command, inventory)
    nodes = selected_nodes(inventory, args.nodes)
    clash = same_machine(nodes)
    if clash is not None:
        first, second, shared = clash
        where = "both this machine" if shared == THIS_MACHINE else f"the same machine ({shared})"
        raise UsageError(
            f"nodes {first.name} ({first.host}) and {second.name} ({second.host}) are {where}: "
            f"their ranks would serve metrics on the same ports {plan_ports(inventory, args)} "
            "and Prometheus would scrape one for both; give each machine once (more ranks on "
            "it: --nproc-per-node)"
        )
    return JobPlan(
        job_id, inventory, nodes, args.nproc_per_node, tuple(command), args.rdzv_port, chdir
    )


def build_slurm_plan(
    args: argparse.Namespace, command: list[str], inventory: Inventory
) -> SlurmPlan:
    """A job for Slurm: --nodes is a node count there (the allocation picks the nodes)."""
    assert inventory.slurm is not None
    job_id, chdir = _checked_job(args, command, inventory)
    count = inventory.slurm.nodes
    if args.nodes is not None:
        if not re.fullmatch(r"[0-9]{1,4}", args.nodes.strip()) or int(args.nodes) < 1:
            raise UsageError(
                f"--nodes {args.nodes!r}: expected a node count (1 or more) for a Slurm "
                f"inventory ({inventory.path}): Slurm's allocation picks the nodes"
            )
        count = int(args.nodes)
    return SlurmPlan(
        job_id, inventory, count, args.nproc_per_node, tuple(command), args.rdzv_port, chdir
    )


def _checked_job(
    args: argparse.Namespace, command: list[str], inventory: Inventory
) -> tuple[str, str | None]:
    """The job id and working directory of a run, every flag checked."""
    if not command:
        raise UsageError(
            "no training command: give it after --, as torchrun takes it, "
            "e.g. -- -m ugro.trainer.train --steps 100"
        )
    if not 1 <= args.nproc_per_node <= 64:
        raise UsageError(f"--nproc-per-node {args.nproc_per_node}: expected 1..64")
    if not 1 <= args.rdzv_port <= 65535:
        raise UsageError(f"--rdzv-port {args.rdzv_port}: expected a port in 1..65535")
    last_port = inventory.defaults.metrics_base_port + args.nproc_per_node - 1
    if last_port > 65535:
        raise UsageError(
            f"{inventory.path}: defaults.metrics_base_port "
            f"{inventory.defaults.metrics_base_port} + {args.nproc_per_node} ranks passes 65535"
        )
    job_id = args.job_id if args.job_id is not None else default_job_id(command)
    if not JOB_ID.fullmatch(job_id):
        raise UsageError(f"--job-id {job_id!r}: expected {JOB_ID_EXPECTED}")
    chdir = args.chdir if args.chdir is not None else inventory.defaults.chdir
    if chdir is not None and not re.fullmatch(r"(/|~/)[^\0\n]*", chdir):
        raise UsageError(
            f"--chdir {chdir!r}: expected an absolute path (or ~/...), the same on every node"
        )
    return job_id, chdir


def selected_nodes(inventory: Inventory, names: str | None) -> tuple[Node, ...]:
    """The nodes ``--nodes`` names, in its order; every node when it is not given."""
    if names is None:
        return inventory.nodes
    listed = [name.strip() for name in names.split(",")]
    if not all(listed):
        example = ",".join(node.name for node in inventory.nodes[:2])
        raise UsageError(
            f"--nodes {names!r}: expected node names separated by commas, none empty, e.g. "
            f"--nodes {example}; leave --nodes out for every node"
        )
    twice = sorted(name for name, count in Counter(listed).items() if count > 1)
    if twice:
        raise UsageError(f"--nodes {names!r}: {', '.join(twice)} named twice")
    return tuple(inventory.node(name) for name in listed)


def plan_ports(inventory: Inventory, args: argparse.Namespace) -> str:
    base = inventory.defaults.metrics_base_port
    return f"{base}..{base + args.nproc_per_node - 1}" if args.nproc_per_node > 1 else str(base)


def default_job_id(command: list[str]) -> str:
    """``train-20261123-124501`` from ``-m ugro.trainer.train ...`` or ``train.py ...``."""
    program = command[1] if command[0] == "-m" and len(command) > 1 else command[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", program.rsplit(".", 1)[-1].rsplit("/", 1)[-1])
    if program.endswith(".py"):
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", pathlib.Path(program).stem)
    stem = stem.strip("-_")[:64] or "job"
    return f"{stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def run_job(args: argparse.Namespace, command: list[str]) -> int:
    interrupt_once()
    inventory = load_inventory(args.inventory)
    if inventory.slurm is not None:
        return submit_to_slurm(args, build_slurm_plan(args, command, inventory))
    plan = build_plan(args, command, inventory)
    print(
        f"launching {plan.job_id}: {len(plan.nodes)} node(s) × {plan.nproc_per_node} "
        f"= {plan.world_size} rank(s)",
        flush=True,
    )
    record = launch(plan, ssh_options(args), lambda line: print(line, flush=True))
    endpoints = plan.rank_endpoints()
    scheme = record.metrics_scheme or "http"
    print(f"job {plan.job_id} started on {', '.join(n.name for n in plan.nodes)}")
    print(f"  rank metrics  {scheme}://{endpoints[0].host}:{endpoints[0].port}/metrics (rank 0)"
          f"{f' … {len(endpoints)} endpoints' if len(endpoints) > 1 else ''}")  # fmt: skip
    if inventory.prometheus.grafana_url:
        print(f"  Grafana       {inventory.prometheus.grafana_url}/d/ugro-training"
              f"?var-job_id={plan.job_id}")  # fmt: skip
    print(f"  status        ugro-launch status {plan.job_id}")
    print(f"  logs          ugro-launch logs {plan.job_id} --follow")
    print(f"  stop          ugro-launch stop {plan.job_id}")
    return wait_for_end(args, plan.job_id) if args.wait else 0


def submit_to_slurm(args: argparse.Namespace, plan: SlurmPlan) -> int:
    print(
        f"submitting {plan.job_id} to Slurm: {plan.nodes} node(s) × {plan.nproc_per_node} "
        f"= {plan.world_size} rank(s)",
        flush=True,
    )
    record = slurm_jobs.submit(plan, ssh_options(args), lambda line: print(line, flush=True))
    assert record.slurm is not None
    print(f"job {plan.job_id} submitted as Slurm job {record.slurm['job_id']}; its ranks are "
          "registered with Prometheus when its allocation starts")  # fmt: skip
    if plan.inventory.prometheus.grafana_url:
        print(f"  Grafana       {plan.inventory.prometheus.grafana_url}/d/ugro-training"
              f"?var-job_id={plan.job_id}")  # fmt: skip
    print(f"  status        ugro-launch status {plan.job_id}")
    print(f"  logs          ugro-launch logs {plan.job_id} --follow")
    print(f"  stop          ugro-launch stop {plan.job_id}")
    return wait_for_end(args, plan.job_id) if args.wait else 0


def wait_for_end(args: argparse.Namespace, job_id: str) -> int:
    """--wait: until the job's watcher records its end (a new one if it dies); 0 if it
    finished."""
    while (record := records.load_record(job_id)).state in records.GOING:
        revive_watchers(args, [record])
        time.sleep(1)
    print(f"job {job_id}: {record.state}")
    return 0 if record.state == records.FINISHED else 1


# -- status, stop, logs, list ----------------------------------------------------------------


def show_status(args: argparse.Namespace, command: list[str]) -> int:
    if args.job_id is None:
        return list_jobs(args, command)
    record = records.load_record(args.job_id)
    revive_watchers(args, [record])
    record = records.load_record(args.job_id)  # as the watcher may have changed it
    if record.slurm is not None:
        shown, lines = slurm_jobs.status_lines(record)
        print(f"job {record.job_id}: {shown} (started {_when(record.started_at)})")
        print("\n".join(lines))
        return 0
    plan = plan_from_record(record)
    with NodeSet(plan.inventory, plan.nodes, ssh_options(args, record)) as nodes:
        answers = node_statuses(plan, nodes)
    unreachable = [name for name, answer in answers.items() if isinstance(answer, Exception)]
    shown = record.shown_state
    if record.state == records.RUNNING and not unreachable:
        # What the nodes say now, ahead of the watcher that will record it.
        states = {answer.get("state") for answer in answers.values()}
        if states == {"finished"}:
            shown = records.FINISHED
        elif states & {"failed", "lost", "unknown"}:
            shown = records.FAILED
    print(f"job {record.job_id}: {shown} (started {_when(record.started_at)})")
    if shown == records.INTERRUPTED:
        print(f"  its launch was interrupted: `ugro-launch stop {record.job_id}` stops it")
    for node in plan.nodes:
        answer = answers[node.name]
        if isinstance(answer, Exception):
            print(f"  {node.name:<16} unreachable: {answer}")
            continue
        state = answer.get("state", "?")
        if record.state == records.STOPPED and state in ("failed", "finished"):
            state = "stopped"  # torchrun exits 1 on the SIGTERM of `stop`: not a failure
        detail = "" if answer.get("exit_code") is None else f" (exit code {answer['exit_code']})"
        print(f"  {node.name:<16} {state}{detail}")
    if unreachable:
        print(f"ugro-launch: cannot reach {', '.join(unreachable)}", file=sys.stderr)
        return 1
    return 0


def stop_command(args: argparse.Namespace, command: list[str]) -> int:
    record = records.load_record(args.job_id)
    if record.state == records.LAUNCHING and records.process_alive(record.launcher):
        # Its launcher is still starting it: interrupted, it rolls back everything it started
        # (stopping the nodes behind its back could race a start still under way).
        print(f"job {record.job_id} is being launched: interrupting its launcher", flush=True)
        if not interrupt_launcher(record.launcher):
            raise LaunchError(
                f"the launcher of job {record.job_id} (pid {int(record.launcher[0])}) did not "
                f"end within {LAUNCHER_STOP_SECONDS:g} s; try again"
            )
        try:
            record = records.load_record(args.job_id)
        except records.RecordError:
            print(f"job {args.job_id}: its launch was rolled back; nothing is left")
            return 0
    if record.slurm is not None:
        record = slurm_jobs.stop(record, ssh_options(args, record), print)
        print(f"job {record.job_id}: targets removed")
        return 0
    record, results = stop_recorded_job(record, ssh_options(args, record))
    if print_stop_results(results):
        not_stopped = [name for name, result in results.items() if isinstance(result, Exception)]
        print(
            f"ugro-launch: job {record.job_id} was NOT stopped on {', '.join(not_stopped)}: "
            f"it stays {record.shown_state}, with its watcher and Prometheus targets; "
            f"`ugro-launch stop {record.job_id}` again once the node can be reached",
            file=sys.stderr,
        )
        return 1
    print(f"job {record.job_id}: targets removed")
    return 0


def print_stop_results(results: dict[str, dict | Exception]) -> bool:
    """One line per node: what its agent answered, or why it was not stopped. True if any
    node was not stopped."""
    for name, result in results.items():
        if isinstance(result, Exception):
            print(f"  {name:<16} NOT stopped: {result}")
        else:
            print(f"  {name:<16} {result.get('state')}")
    return any(isinstance(result, Exception) for result in results.values())


LAUNCHER_STOP_SECONDS = 120.0  # a rollback stops every node, with the agent's grace period


def interrupt_launcher(ref: list[float]) -> bool:
    """SIGTERM the launcher of ``ref`` and wait for its rollback; True once it has ended."""
    try:
        psutil.Process(int(ref[0])).terminate()
    except psutil.NoSuchProcess:
        return True
    deadline = time.monotonic() + LAUNCHER_STOP_SECONDS
    # Not psutil's wait(): an exited launcher stays a zombie until its own parent reaps it.
    while records.process_alive(ref):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def show_logs(args: argparse.Namespace, command: list[str]) -> int:
    record = records.load_record(args.job_id)
    if args.lines < 0:
        raise UsageError(f"--lines {args.lines}: expected a count >= 0")
    revive_watchers(args, [record])
    record = records.load_record(args.job_id)  # a new watcher records a Slurm job's nodes
    if record.slurm is not None:
        path = slurm_jobs.log_file(record, args.node)
        return slurm_jobs.print_log(path, args.lines, args.follow, record.job_id)
    plan = plan_from_record(record)
    node = plan.inventory.node(args.node) if args.node else plan.nodes[0]
    if node.name not in record.nodes:
        raise UsageError(
            f"--node {node.name}: job {record.job_id} ran on {', '.join(record.nodes)}"
        )
    with NodeSet(plan.inventory, [node], ssh_options(args, record)) as nodes:
        argv = nodes.agent_argv(
            "logs",
            f"--job-id={record.job_id}",
            f"--node={node.name}",
            f"--workdir={plan.inventory.defaults.workdir}",
            f"--lines={args.lines}",
            *(["--follow"] if args.follow else []),
        )
        return nodes.shells[node.name].stream(argv)


def show_stacks(args: argparse.Namespace, command: list[str]) -> int:
    if not JOB_ID.fullmatch(args.job_id):
        raise UsageError(f"job id {args.job_id!r}: expected {JOB_ID_EXPECTED}")
    if not 1 <= args.timeout <= 300:
        raise UsageError(f"--timeout {args.timeout:g}: expected 1 to 300 seconds per rank")
    record: records.JobRecord | None = None
    if args.inventory is None:
        try:
            record = records.load_record(args.job_id)
        except records.RecordError as error:
            raise records.RecordError(
                f"{error}; for a job launched from another machine give its inventory: "
                f"ugro-launch stacks {args.job_id} -i INVENTORY"
            ) from None
        if record.slurm is not None:
            raise UsageError(
                f"stacks: job {args.job_id} runs under Slurm, whose nodes ugro-launch does not "
                f"reach over SSH; on a node of it: srun --jobid={record.slurm['job_id']} "
                "--overlap py-spy dump --pid PID"
            )
        plan = plan_from_record(record)
        revive_watchers(args, [record])
        inventory, job_nodes, ranks_per_node = plan.inventory, plan.nodes, plan.nproc_per_node
    else:
        inventory = load_inventory(args.inventory)
        with contextlib.suppress(records.RecordError):
            record = records.load_record(args.job_id)
        known = {node.name for node in inventory.nodes}
        if record is not None and set(record.nodes) <= known:
            job_nodes = tuple(inventory.node(name) for name in record.nodes)
        else:
            job_nodes = inventory.nodes
        ranks_per_node = record.nproc_per_node if record is not None else 64
    if args.nodes is not None:
        nodes = selected_nodes(inventory, args.nodes)
        outside = [node.name for node in nodes if node not in job_nodes]
        if record is not None and outside:
            raise UsageError(
                f"--nodes: job {args.job_id} ran on {', '.join(record.nodes)}, not on "
                f"{', '.join(outside)}"
            )
    else:
        nodes = job_nodes
    workdir = inventory.defaults.workdir
    with NodeSet(inventory, nodes, ssh_options(args, record)) as shells:
        report = collect_stacks(
            args.job_id,
            shells,
            workdir,
            list(nodes),
            timeout=args.timeout,
            ranks_per_node=ranks_per_node,
        )
    answers = report.node_answers.values()
    if len(answers) == len(nodes) and all(answer.get("state") == "unknown" for answer in answers):
        print(
            f"ugro-launch: no job {args.job_id!r} on {', '.join(n.name for n in nodes)}: "
            f"looked in {workdir}/jobs/{args.job_id}/<node> on each",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.complete else 1


def stop_exporters(args: argparse.Namespace, command: list[str]) -> int:
    inventory = load_inventory(args.inventory)
    nodes = list(selected_nodes(inventory, args.nodes))
    busy = {
        name: job.job_id
        for job in records.all_records()
        if job.state in records.GOING
        for name in job.nodes
    }
    in_use = [node.name for node in nodes if node.name in busy]
    if in_use and not args.force:
        raise UsageError(
            "jobs launched from here run on "
            + ", ".join(f"{name} ({busy[name]})" for name in in_use)
            + ": stop them first, or give --force"
        )
    targets = targets_for(inventory, ssh_options(args))
    for node in nodes:  # first: Prometheus must not page about an exporter stopped on purpose
        targets.remove_node(node.name)
    with NodeSet(inventory, nodes, ssh_options(args)) as shells:
        results = shells.each(
            lambda node: shells.agent(
                node,
                "stop-exporter",
                f"--node={node.name}",
                f"--workdir={inventory.defaults.workdir}",
                timeout=60,
            )
        )
    return 1 if print_stop_results(results) else 0


def list_jobs(args: argparse.Namespace, command: list[str]) -> int:
    jobs, unreadable = records.scan_records()
    if any(job.state in watchers.WATCHED for job in jobs):
        revive_watchers(args, jobs)
        jobs, unreadable = records.scan_records()  # as the new watchers may have changed them
    for error in unreadable:
        print(f"ugro-launch: {error}", file=sys.stderr)
    if not jobs:
        print(f"no jobs recorded in {records.state_dir()}")
        return 1 if unreadable else 0
    print(f"{'job':<40} {'state':<11} {'started':<19} nodes × ranks per node")
    for job in jobs:
        nodes = ",".join(job.nodes)
        if job.slurm is not None:
            nodes = f"Slurm job {job.slurm['job_id']}: {nodes or 'not allocated'}"
        print(f"{job.job_id:<40} {job.shown_state:<11} {_when(job.started_at):<19} "
              f"{nodes} × {job.nproc_per_node}")  # fmt: skip
    return 1 if unreadable else 0


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


if __name__ == "__main__":
    sys.exit(main())
