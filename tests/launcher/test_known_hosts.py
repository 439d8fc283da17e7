"""Host keys and identity files of the real SshShell, against a real sshd in a namespace.

known_hosts is the user's own file, shared with OpenSSH: ugro reads it tolerantly, honours
``@revoked``, and only ever appends the one line of a key it was told to accept.
"""

from __future__ import annotations

import base64
import pathlib
from collections.abc import Iterator

import paramiko
import pytest

from ugro.launcher.inventory import Node
from ugro.launcher.remote import RemoteError, SshOptions, SshShell

from .netns import NamespaceCluster, NamespaceNode


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, _netns_usable) -> Iterator[NamespaceCluster]:
    # One node for the whole module: the tests only connect, and building one takes seconds.
    with NamespaceCluster(1, tmp_path_factory.mktemp("cluster")) as built:
        yield built


@pytest.fixture
def node(cluster) -> NamespaceNode:
    return cluster[0]


def shell(cluster, known_hosts: pathlib.Path, accept_new: bool = False, **node_fields):
    target = cluster[0]
    fields = {
        "name": target.name,
        "host": target.address,
        "ssh_port": target.ssh_port,
        "user": "root",
        "identity_file": str(cluster.client_key),
        "gpus": None,
        **node_fields,
    }
    return SshShell(Node(**fields), SshOptions(known_hosts, accept_new_host_keys=accept_new))


def connects(cluster, known_hosts: pathlib.Path, accept_new: bool = False) -> bool:
    remote = shell(cluster, known_hosts, accept_new)
    try:
        return remote.run(["true"]).exit_code == 0
    finally:
        remote.close()


def other_key(cluster) -> str:
    """``keytype base64`` of a real ed25519 key that is no node's host key."""
    return " ".join(cluster.client_public_key.read_text().split()[:2])


def fido_key() -> str:
    """``keytype base64`` of a FIDO key as OpenSSH writes it; paramiko cannot read the type."""
    blob = paramiko.Message()
    blob.add_string("sk-ssh-ed25519@openssh.com")
    blob.add_string(bytes(range(32)))
    blob.add_string("ssh:")
    return f"sk-ssh-ed25519@openssh.com {base64.b64encode(blob.asbytes()).decode()}"


def test_accepting_a_new_key_appends_exactly_its_line_and_keeps_the_rest(cluster, node, tmp_path):
    hashed = paramiko.HostKeys.hash_host("other.example")
    original = (
        "# fleet hosts, kept by hand\n"
        f"{hashed} {other_key(cluster)}\n"
        f"fido.example {fido_key()}\n"
        f"alpha.example,beta.example,10.0.0.9 {other_key(cluster)} a comment\n"
        "\n"
        "# last line without a newline"
    ).encode()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_bytes(original)
    known_hosts.chmod(0o644)

    assert connects(cluster, known_hosts, accept_new=True)
    expected = original + f"\n{node.known_hosts_entry}\n".encode()
    assert known_hosts.read_bytes() == expected
    assert known_hosts.stat().st_mode & 0o777 == 0o644  # the user's file keeps its mode

    # Known now: a second connection, even one that accepts nothing new, adds nothing.
    assert connects(cluster, known_hosts, accept_new=False)
    assert connects(cluster, known_hosts, accept_new=True)
    assert known_hosts.read_bytes() == expected


def test_accepting_a_new_key_creates_a_missing_file_privately(cluster, node, tmp_path):
    known_hosts = tmp_path / "new-dir" / "known_hosts"
    assert connects(cluster, known_hosts, accept_new=True)
    assert known_hosts.read_text() == f"{node.known_hosts_entry}\n"
    assert known_hosts.stat().st_mode & 0o777 == 0o600
    assert known_hosts.parent.stat().st_mode & 0o777 == 0o700


def test_a_managed_fleet_file_with_certificates_and_revocations_works(
    cluster, node, tmp_path, capsys
):
    fleet = (
        "# managed\n"
        f"@cert-authority *.example {other_key(cluster)}\n"
        f"@revoked * {fido_key()}\n"
        f"@revoked old.example {other_key(cluster)}\n"
        "@cert-authority *.corp.example ssh-ed25519 AAAAnot-even-base64\n"
    )
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(fleet + f"{node.known_hosts_entry}\n")
    before = known_hosts.read_bytes()

    assert connects(cluster, known_hosts)
    assert connects(cluster, known_hosts, accept_new=True)
    warnings = capsys.readouterr().err
    assert f"warning: {known_hosts}:2 (and 1 more line(s)): @cert-authority skipped" in warnings
    assert warnings.count("@cert-authority") == 1  # once per file, not once per connection
    assert known_hosts.read_bytes() == before

    # A changed key is still refused in such a file, and accepting new keys does not add it.
    changed = tmp_path / "known_hosts.changed"
    changed.write_text(fleet + f"{node.address} {other_key(cluster)}\n")
    before = changed.read_bytes()
    with pytest.raises(RemoteError, match="host key CHANGED") as refused:
        connects(cluster, changed, accept_new=True)
    assert node.host_key_fingerprint in str(refused.value)
    assert changed.read_bytes() == before


@pytest.mark.parametrize("also_listed", [True, False], ids=["also-listed", "only-revoked"])
def test_a_revoked_host_key_is_refused_with_the_line_named(cluster, node, tmp_path, also_listed):
    key = " ".join(node.known_hosts_entry.split()[1:])
    lines = ["# fleet", f"@revoked * {key}"]
    if also_listed:
        lines.append(node.known_hosts_entry)  # a revoked key stays revoked where it is listed
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("\n".join(lines) + "\n")
    before = known_hosts.read_bytes()

    with pytest.raises(RemoteError) as refused:
        connects(cluster, known_hosts, accept_new=True)
    message = str(refused.value)
    assert message.startswith(f"{node.name} ({node.address}:{node.ssh_port}): ")
    assert f"{known_hosts}:2 marks @revoked" in message
    assert node.host_key_fingerprint in message
    assert known_hosts.read_bytes() == before


def test_a_missing_identity_file_is_named_with_its_node(cluster, node, tmp_path):
    missing = tmp_path / "keys" / "id_missing"
    remote = shell(cluster, cluster.known_hosts, identity_file=str(missing))
    with pytest.raises(RemoteError) as refused:
        remote.run(["true"])
    remote.close()
    assert str(refused.value) == (
        f"{node.name} ({node.address}:{node.ssh_port}): identity_file {missing} (inventory) "
        "cannot be read: No such file or directory"
    )
