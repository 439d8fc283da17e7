"""The namespace nodes the launcher tests run against, checked with real ssh, sshd and paramiko."""

from __future__ import annotations

import os
import pathlib
import subprocess

import paramiko
import pytest

from ..support import wait_for
from .netns import (
    NamespaceCluster,
    NetnsError,
    link_names,
    namespace_names,
    pids_in_namespace,
    root_link_name,
    sweep_leftovers,
    switch_namespace_name,
    tcp_probe,
)

TORCHRUN_PORT = 29500


def ssh(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def is_running(pid: int) -> bool:
    """False once the process is gone or a zombie (this machine's pid 1 reaps orphans late)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_ssh_reaches_every_node_under_its_own_host_name(namespace_cluster):
    cluster = namespace_cluster(3)
    assert [node.name for node in cluster] == ["node-a", "node-b", "node-c"]
    assert len({node.address for node in cluster}) == 3
    for node in cluster:
        result = ssh(node.ssh_argv("hostname && getent hosts node-a node-c"))
        assert result.returncode == 0, result.stderr
        hostname, *resolved = result.stdout.splitlines()
        assert hostname == node.hostname
        assert [line.split() for line in resolved] == [
            [cluster["node-a"].address, "node-a"],
            [cluster["node-c"].address, "node-c"],
        ]
        direct = node.run(["hostname"], capture_output=True, text=True, check=True)
        assert direct.stdout == f"{node.hostname}\n"


def test_strict_host_key_checking_refuses_unknown_and_changed_keys(namespace_cluster, tmp_path):
    cluster = namespace_cluster(2)
    node_a, node_b = cluster

    unknown = ssh(node_a.ssh_argv("true", known_hosts=cluster.empty_known_hosts))
    assert unknown.returncode == 255
    assert "Host key verification failed" in unknown.stderr

    # node-a's address listed with node-b's key: ssh names the key node-a really offered.
    swapped = tmp_path / "known_hosts.swapped"
    swapped.write_text(f"{node_a.address} {' '.join(node_b.host_public_key.split()[:2])}\n")
    changed = ssh(node_a.ssh_argv("true", known_hosts=swapped))
    assert changed.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in changed.stderr
    assert node_a.host_key_fingerprint in changed.stderr
    assert node_a.host_key_fingerprint.startswith("SHA256:")
    assert node_a.host_key_fingerprint != node_b.host_key_fingerprint


def test_a_port_of_one_node_is_reachable_from_the_others_and_from_the_root(namespace_cluster):
    node_a, node_b = namespace_cluster(2)
    assert node_b.tcp_probe(node_a.address, TORCHRUN_PORT) == "ECONNREFUSED"

    with node_a.listen_on(TORCHRUN_PORT):
        assert TORCHRUN_PORT in node_a.listening_ports()
        assert TORCHRUN_PORT not in node_b.listening_ports()
        assert node_b.tcp_probe(node_a.address, TORCHRUN_PORT) == "connected"
        assert tcp_probe(node_a.address, TORCHRUN_PORT) == "connected"
        # Taken in node-a only: every node has its own ports.
        with (
            pytest.raises(NetnsError, match="Address already in use"),
            node_a.listen_on(TORCHRUN_PORT),
        ):
            pass
        with node_b.listen_on(TORCHRUN_PORT):
            assert node_a.tcp_probe(node_b.address, TORCHRUN_PORT) == "connected"

    assert TORCHRUN_PORT not in node_a.listening_ports()


def test_stopping_sshd_refuses_connections_and_starting_it_brings_them_back(namespace_cluster):
    node_a, node_b = namespace_cluster(2)
    node_a.stop_sshd()
    assert not node_a.sshd_running
    assert tcp_probe(node_a.address, node_a.ssh_port) == "ECONNREFUSED"
    refused = ssh(node_a.ssh_argv("true"))
    assert refused.returncode == 255
    assert "Connection refused" in refused.stderr
    assert ssh(node_b.ssh_argv("true")).returncode == 0

    node_a.start_sshd()
    assert node_a.sshd_running
    assert ssh(node_a.ssh_argv("hostname")).stdout == "node-a\n"


def test_closing_the_cluster_leaves_nothing_behind(tmp_path):
    with NamespaceCluster(2, tmp_path) as cluster:
        node_a = cluster["node-a"]
        namespaces = cluster.namespaces
        # A process started over SSH that outlives its session, like a detached torchrun.
        started = ssh(node_a.ssh_argv("nohup sleep 300 >/dev/null 2>&1 & echo $!"))
        assert started.returncode == 0, started.stderr
        sleeper = node_a.find_processes("sleep 300")
        assert list(sleeper) == [int(started.stdout)]
        assert not cluster["node-b"].find_processes("sleep 300")
        assert node_a.find_processes(str(node_a.sshd_config))

    assert cluster.leftovers() == []
    assert not set(namespaces) & set(namespace_names())
    assert cluster.root_link not in link_names()
    assert processes_mentioning(str(tmp_path)) == []
    assert not is_running(int(started.stdout))
    cluster.close()  # a second close is harmless


def test_a_failed_start_removes_what_it_built(tmp_path):
    cluster = NamespaceCluster(2, tmp_path, sshd="/bin/false")
    with pytest.raises(NetnsError, match="node-a: sshd exited with status 1"):
        cluster.start()
    assert cluster.namespaces  # it got as far as making them
    assert not set(cluster.namespaces) & set(namespace_names())
    assert cluster.leftovers() == []


def test_leftovers_of_a_killed_run_are_swept():
    # Above the largest pid_max (2**22): no such process can exist, and it differs per test run.
    dead = 2**22 + os.getpid()
    namespace = switch_namespace_name(dead, 0)
    links = [root_link_name(dead, 0), root_link_name(dead, 1)]
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    orphan = subprocess.Popen(["ip", "netns", "exec", namespace, "sleep", "300"])
    try:
        subprocess.run(["ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1]],
                       check=True)  # fmt: skip
        wait_for(lambda: pids_in_namespace(namespace) == [orphan.pid], 10, "sleep in the namespace")

        sweep_leftovers()  # a test run beside this one may sweep them first: check the result

        assert namespace not in namespace_names()
        assert not set(links) & set(link_names())
        assert orphan.wait(timeout=10) == -9
    finally:
        orphan.kill()
        orphan.wait()
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        subprocess.run(["ip", "link", "delete", links[0]], capture_output=True)


def test_paramiko_connects_with_the_key_and_rejects_unknown_hosts(namespace_cluster):
    cluster = namespace_cluster(2)
    for node in cluster:
        client = paramiko.SSHClient()
        client.load_host_keys(str(cluster.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                node.address,
                port=node.ssh_port,
                username="root",
                key_filename=str(cluster.client_key),
                look_for_keys=False,
                allow_agent=False,
                timeout=10,
            )
            _, stdout, _ = client.exec_command("hostname")
            assert stdout.read().decode().strip() == node.hostname
            assert stdout.channel.recv_exit_status() == 0
        finally:
            client.close()

    client = paramiko.SSHClient()
    client.load_host_keys(str(cluster.empty_known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
            client.connect(
                cluster["node-a"].address,
                username="root",
                key_filename=str(cluster.client_key),
                look_for_keys=False,
                allow_agent=False,
                timeout=10,
            )
    finally:
        client.close()
