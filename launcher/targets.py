"""Prometheus file_sd target files: what should be scraped, written atomically.

Layout under the targets directory (``prometheus/prometheus.yml`` reads both):
``ranks/<job_id>.json``, one target per rank with labels ``job_id``, ``rank``, ``node``;
``nodes/<node>.json``, the node's exporter with the label ``node``. Prometheus may read a file
at any moment, so each is written to a temporary file in the same folder and renamed over.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable
from dataclasses import dataclass

from ugro.common.files import write_atomically
from ugro.common.ports import host_port


@dataclass(frozen=True)
class RankEndpoint:
    host: str
    port: int
    rank: int
    node: str


def target_text(groups: list[dict]) -> str:
    return json.dumps(groups, indent=2, sort_keys=True) + "\n"


def rank_endpoints(
    nodes: Iterable[tuple[str, str]], nproc_per_node: int, metrics_base_port: int
) -> list[RankEndpoint]:
    """Every rank of a job on ``nodes`` ((name, host) in node-rank order): torchrun numbers
    ranks node by node, and each rank serves on the base port + its local rank."""
    return [
        RankEndpoint(host, metrics_base_port + local_rank, node_rank * nproc_per_node + local_rank,
                     name)
        for node_rank, (name, host) in enumerate(nodes)
        for local_rank in range(nproc_per_node)
    ]  # fmt: skip


def rank_targets(
    job_id: str, endpoints: Iterable[RankEndpoint], labels: dict[str, str] | None = None
) -> str:
    """``labels``: more target labels for every rank, e.g. the scheduler's job id."""
    return target_text(
        [
            {
                "targets": [host_port(e.host, e.port)],
                "labels": {**(labels or {}), "job_id": job_id, "rank": str(e.rank),
                           "node": e.node},
            }
            for e in sorted(endpoints, key=lambda e: e.rank)
        ]
    )  # fmt: skip


def node_target(node: str, host: str, port: int) -> str:
    return target_text([{"targets": [host_port(host, port)], "labels": {"node": node}}])


class LocalTargets:
    """Target files in a directory on this machine."""

    def __init__(self, directory: str | pathlib.Path) -> None:
        self.directory = pathlib.Path(directory).expanduser()

    def job_file(self, job_id: str) -> pathlib.Path:
        return self.directory / "ranks" / f"{job_id}.json"

    def node_file(self, node: str) -> pathlib.Path:
        return self.directory / "nodes" / f"{node}.json"

    def register_job(
        self, job_id: str, endpoints: Iterable[RankEndpoint], labels: dict[str, str] | None = None
    ) -> None:
        write_atomically(self.job_file(job_id), rank_targets(job_id, endpoints, labels))

    def register_node(self, node: str, host: str, port: int) -> None:
        write_atomically(self.node_file(node), node_target(node, host, port))

    def remove_job(self, job_id: str) -> bool:
        """Forget a job's ranks; True when there was something to remove."""
        try:
            self.job_file(job_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def remove_node(self, node: str) -> bool:
        """Forget a node's exporter; True when there was something to remove."""
        try:
            self.node_file(node).unlink()
        except FileNotFoundError:
            return False
        return True


class RemoteTargets:
    """Target files in a directory on the Prometheus host, written over SSH (SFTP + rename)."""

    def __init__(self, directory: str, shell) -> None:  # shell: remote.SshShell
        self.directory = directory.rstrip("/")
        self.shell = shell

    def job_file(self, job_id: str) -> str:
        return f"{self.directory}/ranks/{job_id}.json"

    def node_file(self, node: str) -> str:
        return f"{self.directory}/nodes/{node}.json"

    def register_job(
        self, job_id: str, endpoints: Iterable[RankEndpoint], labels: dict[str, str] | None = None
    ) -> None:
        self.shell.put_text(self.job_file(job_id), rank_targets(job_id, endpoints, labels))

    def register_node(self, node: str, host: str, port: int) -> None:
        self.shell.put_text(self.node_file(node), node_target(node, host, port))

    def remove_job(self, job_id: str) -> bool:
        return self.shell.remove(self.job_file(job_id))

    def remove_node(self, node: str) -> bool:
        return self.shell.remove(self.node_file(node))
