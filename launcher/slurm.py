"""Talking to Slurm: its client commands, run with argument lists, and their output parsed.

Everything ugro needs from Slurm goes through the commands a user has on a login node
(``sinfo``, ``sbatch``, ``squeue``, ``scontrol``, ``scancel``); none needs a database
(``sacct`` works only where accounting storage is configured, so nothing here depends on it).
A job's state comes from ``scontrol show job``, which the controller answers for
``MinJobAge`` seconds (300 by default) after the job ended; later the record's last state
stands. ``sacct`` is asked only about a job the controller has forgotten before a watcher saw
its end (slurm_jobs.accounted_end); where accounting is off it fails and the job is recorded
lost. The configuration is found as the commands find it (``SLURM_CONF``, else
``/etc/slurm/slurm.conf``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

COMMAND_SECONDS = 30.0

# Slurm's job states (squeue --help, "JOB STATE CODES") grouped by what they mean for ugro.
WAITING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
                            "CONFIGURING", "SUSPENDED", "STOPPED"})  # fmt: skip
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"})
FINISHED_STATES = frozenset({"COMPLETED"})
FAILED_STATES = frozenset({"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                           "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"})  # fmt: skip
CANCELLED_STATES = frozenset({"CANCELLED"})
ENDED_STATES = FINISHED_STATES | FAILED_STATES | CANCELLED_STATES

SLURM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # partition, account, node names
SLURM_JOB_ID = re.compile(r"^[0-9]+(?:_[0-9]+)?$")


class SlurmError(RuntimeError):
    """A Slurm command is missing, failed or answered something unexpected; says which."""


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    state: str  # Slurm's JobState, e.g. PENDING, RUNNING, COMPLETED, FAILED
    reason: str  # why it waits or ended ("None" when there is nothing to say)
    exit_code: str  # "0:0": the batch script's exit status and the signal that ended it
    nodes: tuple[str, ...]  # the allocation's nodes in Slurm's order (node id 0 first)
    batch_host: str | None

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES


def run(*argv: str, timeout: float = COMMAND_SECONDS) -> str:
    """``argv``'s standard output; SlurmError naming the command when it cannot run or fails."""
    if shutil.which(argv[0]) is None:
        raise SlurmError(
            f"{argv[0]} not found on PATH: a Slurm inventory needs Slurm's client commands "
            "(sinfo, sbatch, squeue, scontrol, scancel) where ugro-launch runs"
        )
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(argv)}` did not answer within {timeout:g} s") from None
    if result.returncode != 0:
        message = result.stderr.strip() or result.stdout.strip() or f"exit {result.returncode}"
        raise SlurmError(f"`{' '.join(argv)}` failed: {message}")
    return result.stdout


def parse_fields(text: str) -> dict[str, str]:
    """``scontrol show -o``'s one line of ``Key=Value`` pairs (values hold no spaces, except
    the last few free-text ones, which ugro does not read)."""
    fields = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def expand_hostlist(hostlist: str) -> tuple[str, ...]:
    """``node-[a-b],gpu[01-03]`` → the node names, through ``scontrol show hostnames``."""
    if not hostlist or hostlist == "(null)":
        return ()
    return tuple(run("scontrol", "show", "hostnames", hostlist).split())


def job(job_id: str) -> SlurmJob | None:
    """The job as the controller knows it; None once it has forgotten it (``MinJobAge``)."""
    try:
        text = run("scontrol", "show", "job", "-o", job_id)
    except SlurmError as error:
        if "Invalid job id" in str(error):
            return None
        raise
    fields = parse_fields(text)
    if fields.get("JobId") != job_id.split("_")[0] and fields.get("JobId") != job_id:
        raise SlurmError(f"`scontrol show job {job_id}` answered {text.strip()[:200]!r}")
    state = fields.get("JobState", "UNKNOWN")
    return SlurmJob(
        job_id=job_id,
        state=state,
        reason=fields.get("Reason", "None"),
        exit_code=fields.get("ExitCode", ""),
        nodes=expand_hostlist(fields.get("NodeList", "")) if state not in WAITING_STATES else (),
        batch_host=fields.get("BatchHost"),
    )


def node_addresses(names: tuple[str, ...]) -> dict[str, str]:
    """Each node's ``NodeAddr``, where its daemons (and so its ranks) are reached."""
    addresses = {}
    for name in names:
        fields = parse_fields(run("scontrol", "show", "node", "-o", name))
        addresses[name] = fields.get("NodeAddr") or name
    return addresses


@dataclass(frozen=True)
class PartitionInfo:
    name: str
    available: str  # "up", "down", "drain", "inact"
    nodes: int
    usable_nodes: int  # idle, mixed, allocated or completing: not down, drained or failing


_USABLE = ("idle", "mix", "alloc", "comp", "plnd")


def partition(name: str | None) -> PartitionInfo:
    """What ``sinfo`` says of partition ``name`` (None: the default partition)."""
    argv = ["sinfo", "--noheader", "--format=%P|%a|%D|%t"]
    if name is not None:
        argv.append(f"--partition={name}")
    lines = [line.split("|") for line in run(*argv).splitlines() if line.strip()]
    if name is None:
        lines = [line for line in lines if line[0].endswith("*")]
        if not lines:
            raise SlurmError("Slurm has no default partition: set slurm.partition")
    if not lines:
        raise SlurmError(f"Slurm has no partition {name!r} (`sinfo` lists the partitions)")
    found = lines[0][0].rstrip("*")
    total = sum(int(line[2]) for line in lines)
    usable = sum(int(line[2]) for line in lines if line[3].rstrip("*~#!%$@^-").startswith(_USABLE))
    return PartitionInfo(found, lines[0][1], total, usable)


def submit(argv: list[str], script: str) -> str:
    """``sbatch --parsable ARGV`` with ``script`` on its standard input; the new job's id."""
    if shutil.which("sbatch") is None:
        run("sbatch")  # the one clear "not found" error
    try:
        result = subprocess.run(
            ["sbatch", "--parsable", *argv],
            input=script,
            capture_output=True,
            text=True,
            timeout=COMMAND_SECONDS,
        )
    except subprocess.TimeoutExpired:
        raise SlurmError(f"sbatch did not answer within {COMMAND_SECONDS:g} s") from None
    if result.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {result.stderr.strip() or result.stdout}")
    job_id = result.stdout.strip().split(";")[0]  # "ID" or "ID;cluster"
    if not SLURM_JOB_ID.fullmatch(job_id):
        raise SlurmError(f"sbatch answered {result.stdout.strip()!r}, not a job id")
    return job_id


def cancel(job_id: str) -> None:
    """``scancel``: every step gets SIGTERM, then SIGKILL after the cluster's ``KillWait``."""
    run("scancel", job_id)
