"""What every node of a job runs, whichever way it is started (SSH or Slurm): torchrun's
command line and the environment ugro gives it and the ranks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .inventory import WEB_CONFIG_ENV


def torchrun_argv(
    python: str,
    *,
    nnodes: int,
    nproc_per_node: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
    command: Sequence[str],
) -> list[str]:
    """Static rendezvous on the first node, so that rank numbers follow node order."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        f"--node-rank={node_rank}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
        *command,
    ]


def job_environment(
    job_id: str,
    node: str,
    metrics_base_port: int,
    extra: Mapping[str, str],
    web_config: str | None = None,
) -> dict[str, str]:
    """What torchrun and every rank get on top of the node's environment.

    ``web_config`` is the path of the node's web configuration file: a path only, never what it
    holds, so that no key or password hash shows in any process's environment or command line.
    """
    return {
        # The ranks write to a log file, where Python would block-buffer a script's progress
        # lines for minutes; the inventory's env may say otherwise.
        "PYTHONUNBUFFERED": "1",
        **extra,
        # Registered with Prometheus: a rank waits at its end for the scrape that takes its
        # final values, even when the job is shorter than the first scrape.
        "UGRO_REGISTERED_TARGET": "1",
        "UGRO_JOB_ID": job_id,
        "UGRO_NODE": node,
        "UGRO_METRICS_PORT": str(metrics_base_port),
        **({WEB_CONFIG_ENV: web_config} if web_config is not None else {}),
    }
