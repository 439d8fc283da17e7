"""A real Slurm cluster on the launcher tests' namespace nodes: munged, slurmctld and one slurmd
per node, from Debian's slurm-wlm, without systemd or cgroups.

* munged runs in the root namespace as the ``munge`` user with a key made for the run; its
  socket is a file, so every node's daemons reach it through the shared filesystem;
* slurmctld runs in the root namespace, listening on the cluster subnet's bridge address (the
  "head node" where ``ugro-launch`` runs ``sbatch``);
* each node's slurmd runs inside the node (``slurmd -N node-a``), so job steps run in its
  network namespace and host name, as on a real node.

Settings that need neither systemd nor cgroups: ``ProctrackType=proctrack/linuxproc``,
``TaskPlugin=task/none``, ``JobAcctGatherType=jobacct_gather/none``, no accounting storage
(``sacct`` answers nothing). Every file lives under a directory of the run; the client commands
find the configuration through ``SLURM_CONF`` (:attr:`SlurmCluster.environment`).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
import secrets
import shutil
import socket
import subprocess
import time

from ugro.common.ports import free_ports

from .netns import _ENTER_SCRIPT, NamespaceCluster, NetnsError

MUNGE_USER = "munge"
SLURMD_PORT = 6818  # each node has its own network namespace: the default port is free there


class SlurmError(RuntimeError):
    """A Slurm daemon could not be started, or the cluster did not come up."""


def slurm_problem() -> str | None:
    """Why a Slurm cluster cannot run here, or None."""
    for binary in ("munged", "slurmctld", "slurmd", "sbatch"):
        if shutil.which(binary) is None and not os.path.exists(f"/usr/sbin/{binary}"):
            return f"{binary} is not installed (Debian packages slurm-wlm and munge)"
    try:
        pwd.getpwnam(MUNGE_USER)
    except KeyError:
        return f"no user {MUNGE_USER!r} (Debian package munge creates it)"
    return None


class SlurmCluster:
    """Slurm on the nodes of ``cluster``, partition ``PARTITION`` holding all of them."""

    PARTITION = "ugro"

    def __init__(self, cluster: NamespaceCluster, workdir: pathlib.Path) -> None:
        self.cluster = cluster
        # munged checks that every directory above its key and socket is not writable by
        # others and is reachable by the munge user: a directory of its own under /run.
        self.workdir = pathlib.Path(f"/run/ugro-slurm-{cluster.run_id}")
        self.logdir = pathlib.Path(workdir)
        self.controller_port = free_ports(1)[0]
        self._processes: list[subprocess.Popen] = []
        self._munged: subprocess.Popen | None = None

    @property
    def conf(self) -> pathlib.Path:
        return self.workdir / "slurm.conf"

    @property
    def munge_socket(self) -> pathlib.Path:
        return self.workdir / "munge" / "munge.socket"

    @property
    def environment(self) -> dict[str, str]:
        """What a Slurm client command (sbatch, squeue, …) needs to find this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def client(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Runs a Slurm client command against this cluster from the root namespace."""
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.environment},
            check=False,
        )

    def start(self, timeout: float = 60.0) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_munged()
            self._write_conf()
            self._start_controller()
            for node in self.cluster:
                self._start_slurmd(node)
            self._wait_for_idle_nodes(timeout)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self._processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._processes.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- daemons -------------------------------------------------------------------------------

    def _start_munged(self) -> None:
        munge = pwd.getpwnam(MUNGE_USER)
        directory = self.munge_socket.parent
        directory.mkdir(parents=True, mode=0o755)
        os.chmod(self.workdir, 0o755)
        key = directory / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        os.chmod(key, 0o400)
        for path in (directory, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        argv = [
            "runuser", "-u", MUNGE_USER, "--",
            _binary("munged"), "--foreground",
            f"--key-file={key}",
            f"--socket={self.munge_socket}",
            f"--pid-file={directory / 'munged.pid'}",
            f"--seed-file={directory / 'munged.seed'}",
            f"--log-file={directory / 'munged.log'}",
        ]  # fmt: skip
        self._munged = self._spawn(argv, "munged.log")
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if self._munged.poll() is not None or time.monotonic() > deadline:
                raise SlurmError(f"munged did not start:\n{self._log('munged.log')}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        head = socket.gethostname().split(".")[0]
        state = self.workdir / "state"
        spool = self.workdir / "spool"
        for directory in (state, spool):
            directory.mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        nodes = "\n".join(
            f"NodeName={node.name} NodeHostname={node.hostname} NodeAddr={node.address} "
            f"CPUs={cpus} State=UNKNOWN"
            for node in self.cluster
        )
        names = ",".join(node.name for node in self.cluster)
        self.conf.write_text(
            f"""\
ClusterName=ugrotest
SlurmctldHost={head}({self.cluster.bridge_address})
SlurmctldPort={self.controller_port}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={state}
SlurmdSpoolDir={spool}/%n
SlurmctldPidFile={self.workdir}/slurmctld.pid
SlurmdPidFile={spool}/slurmd-%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
SchedulerType=sched/backfill
{nodes}
PartitionName={self.PARTITION} Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start_controller(self) -> None:
        argv = [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)]
        process = self._spawn(argv, "slurmctld.log")
        deadline = time.monotonic() + 30
        while self.client("sinfo", "-h").returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SlurmError(f"slurmctld did not start:\n{self._log('slurmctld.log')}")
            time.sleep(0.2)

    def _start_slurmd(self, node) -> None:
        log = f"slurmd-{node.name}.log"
        (self.workdir / "spool" / node.name).mkdir(parents=True, exist_ok=True)
        # Not node.popen: `ip netns exec` mounts a sysfs of the namespace's own over /sys, which
        # hides the machine's cgroup mounts, and slurmd does not start without them (it reads
        # the cgroup hierarchy even with TaskPlugin=task/none). nsenter enters the network
        # namespace alone; the host name and /etc/hosts are the node's as with node.popen.
        argv = [
            "nsenter", f"--net=/run/netns/{node.namespace}",
            "unshare", "--uts", "--mount",
            "sh", "-c", _ENTER_SCRIPT, "sh", node.hostname, str(node.hosts_file),
            _binary("slurmd"), "-D", "-N", node.name, "-f", str(self.conf),
        ]  # fmt: skip
        with (self.logdir / log).open("ab") as out:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self._processes.append(process)

    def _wait_for_idle_nodes(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = self.client("sinfo", "-h", "-N", "-o", "%N %t")
            states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
            if (
                states
                and all(state == "idle" for state in states.values())
                and len(states) == len(self.cluster.nodes)
            ):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(self._log(f"slurmd-{node.name}.log") for node in self.cluster)
                raise SlurmError(
                    f"nodes not idle after {timeout:.0f} s: {states or result.stderr}\n"
                    f"{self._log('slurmctld.log')}\n{logs}"
                )
            time.sleep(0.3)

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        with (self.logdir / log).open("ab") as out:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self._processes.append(process)
        return process

    def _log(self, name: str, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = (self.logdir / name).read_text(errors="replace").splitlines()
            return f"--- {name}\n" + "\n".join(text[-lines:])
        return f"--- {name}: no log"


def _binary(name: str) -> str:
    found = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.path.exists(found):
        raise NetnsError(f"{name} is not installed")
    return found
