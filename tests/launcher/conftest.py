"""Fixtures of the launcher tests: SSH nodes made of network namespaces (see netns.py)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator

import psutil
import pytest

from .netns import NamespaceCluster, NetnsError, preflight


@pytest.fixture(scope="session")
def _netns_usable() -> None:
    reason = preflight()
    if reason is not None:
        pytest.fail(f"cannot build SSH test nodes: {reason}", pytrace=False)


@pytest.fixture
def namespace_cluster(
    tmp_path: pathlib.Path, _netns_usable: None
) -> Iterator[Callable[..., NamespaceCluster]]:
    """Builds ``namespace_cluster(count=2)`` nodes with running sshds; removes them afterwards.

    Each call makes a separate cluster (own subnet, keys under ``tmp_path``); keyword
    arguments go to :class:`NamespaceCluster` (``ssh_port=``, ``sshd=``).
    """
    clusters: list[NamespaceCluster] = []

    def build(count: int = 2, **kwargs) -> NamespaceCluster:
        cluster = NamespaceCluster(count, tmp_path / f"cluster-{len(clusters)}", **kwargs)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield build
    problems = []
    for cluster in clusters:
        try:
            cluster.close()
        except NetnsError as error:
            problems.append(str(error))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def launcher(tmp_path: pathlib.Path, namespace_cluster):
    """``ugro-launch`` against two SSH nodes, targets in a local folder nobody scrapes."""
    from .test_launch import Launcher

    cluster = namespace_cluster(2)
    launcher = Launcher(tmp_path, cluster, tmp_path / "targets", scraped=False)
    yield launcher
    launcher.kill_watchers()


@pytest.fixture
def exporters() -> Iterator[list[int]]:
    """Pids of exporters a test started; each is killed at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if "ugro.exporter" in process.cmdline():
                process.kill()
                process.wait(10)
        except psutil.Error:
            pass
