"""One node of a Slurm job: becomes torchrun, with ugro's environment.

``srun`` runs this once per allocated node (one task per node) from the batch script that
``ugro-launch`` submits::

    <python> -m ugro.launcher.agent.slurm_node --job-id J --nproc-per-node N --rdzv-port P \\
        --metrics-base-port B [--chdir DIR] [--web-config FILE] [--env K=V ...] -- COMMAND...

The node's rank is Slurm's node id (``SLURM_NODEID``: the allocation's nodes in order, the
order in which ``ugro-launch`` registers the ranks with Prometheus) and the rendezvous runs
on the allocation's first node, at the address Slurm reaches it by (``NodeAddr``). It then
execs torchrun, so that Slurm signals, tracks and times torchrun itself: ``scancel`` reaches
it directly, and the step's exit status is torchrun's.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from ..slurm import SlurmError, expand_hostlist, node_addresses
from ..torchrun import job_environment, torchrun_argv
from .preflight import check_web_config


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ugro.launcher.agent.slurm_node")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("--rdzv-port", type=int, required=True)
    parser.add_argument("--metrics-base-port", type=int, required=True)
    parser.add_argument("--chdir")
    parser.add_argument("--web-config", help="the node's web configuration file (a path)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.web_config is not None:
        # As preflight checks it on an SSH launch's nodes: here, before any rank starts.
        problems = check_web_config(args.web_config)[1]
        for problem in problems:
            here = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
            print(f"ugro: {here}: {problem}", file=sys.stderr)
        if problems:
            return 2
    try:
        node_rank = int(os.environ["SLURM_NODEID"])
        nnodes = int(os.environ["SLURM_JOB_NUM_NODES"])
        node = os.environ["SLURMD_NODENAME"]
        first = expand_hostlist(os.environ["SLURM_JOB_NODELIST"])[0]
        master = node_addresses((first,))[first]
    except KeyError as error:
        print(f"ugro: {error.args[0]} is not set: run under srun in a Slurm job", file=sys.stderr)
        return 2
    except (SlurmError, IndexError) as error:
        print(f"ugro: cannot find the job's first node: {error}", file=sys.stderr)
        return 2
    extra = dict(item.split("=", 1) for item in args.env)
    environment = {
        **os.environ,
        **job_environment(args.job_id, node, args.metrics_base_port, extra, args.web_config),
    }
    if args.chdir:
        try:
            os.chdir(os.path.expanduser(args.chdir))
        except OSError as error:
            print(f"ugro: --chdir {args.chdir} on {node}: {error.strerror}", file=sys.stderr)
            return 2
    torchrun = torchrun_argv(
        sys.executable,
        nnodes=nnodes,
        nproc_per_node=args.nproc_per_node,
        node_rank=node_rank,
        master_addr=master,
        master_port=args.rdzv_port,
        command=command,
    )
    print(f"ugro: {node} is node {node_rank} of {nnodes}; rendezvous at {master}", flush=True)
    os.execve(torchrun[0], torchrun, environment)
    return 1  # not reached: execve replaces this process or raises


if __name__ == "__main__":
    sys.exit(main())
