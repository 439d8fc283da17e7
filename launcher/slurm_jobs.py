"""Jobs submitted through Slurm: submit, follow, stop, and find their logs.

With a ``slurm`` section in the inventory, ``ugro-launch run`` does not reach nodes over SSH:

1. preflight asks ``sinfo`` for the partition (it exists, is up, has enough usable nodes);
2. the job's record is written, then ``sbatch`` gets a batch script whose only step is
   ``srun`` running :mod:`ugro.launcher.agent.slurm_node` once per node (which execs torchrun
   with ugro's environment, rendezvous on the allocation's first node);
3. the job's watcher (:func:`follow`, started detached like an SSH job's) waits for the
   allocation, then registers the ranks and the nodes' exporters with Prometheus, the ranks
   labelled with ``scheduler_job_id`` so that an alert leads to ``squeue``/``sacct``; when the
   job ends it removes the rank targets if Slurm says COMPLETED and keeps them otherwise, so
   that the dead ranks raise ``TrainingRanksDown``, exactly as for an SSH job. A watcher that
   died is restarted by the next ``ugro-launch`` command that reads the job (watchers.py); the
   new one takes the job wherever it stands: still waiting, running (registered now if it was
   not yet), ended meanwhile (settled as above; a job that ran and ended unseen was never
   registered and is not now), or already forgotten by the controller (see
   :func:`_settle_forgotten`).

``ugro-launch stop`` is ``scancel`` followed by the removal of the targets once Slurm says the
job ended. Each node's torchrun output goes to ``LOG_DIR/JOB/node-N.log`` (N: the node's
index in the allocation), the batch script's own to ``LOG_DIR/JOB/batch.log``; ``LOG_DIR``
(``slurm.log_dir``) must be a directory that the nodes and this machine share.
ugro-exporter is not started per job under Slurm: it would be killed with the job's step and
its node would page NodeExporterDown between jobs. It runs on every node as a service.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import records, slurm
from .inventory import Inventory, PrometheusTargets
from .launch import LaunchError, start_watcher, stop_watcher, targets_at
from .remote import RemoteError, SshOptions
from .targets import rank_endpoints

log = logging.getLogger("ugro.launcher.slurm_jobs")
Print = Callable[[str], None]
SCHEDULER_LABEL = "scheduler_job_id"  # the rank targets' label naming the Slurm job
STOP_WAIT_SECONDS = 120.0  # scancel's SIGTERM, the cluster's KillWait, then SIGKILL


@dataclass(frozen=True)
class SlurmPlan:
    job_id: str
    inventory: Inventory
    nodes: int
    nproc_per_node: int
    command: tuple[str, ...]
    rdzv_port: int
    chdir: str | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def log_dir(self) -> pathlib.Path:
        assert self.inventory.slurm is not None
        return pathlib.Path(self.inventory.slurm.log_dir).expanduser() / self.job_id

    def node_argv(self) -> list[str]:
        """What srun runs on every node."""
        defaults = self.inventory.defaults
        return [
            defaults.python, "-m", "ugro.launcher.agent.slurm_node",
            f"--job-id={self.job_id}",
            f"--nproc-per-node={self.nproc_per_node}",
            f"--rdzv-port={self.rdzv_port}",
            f"--metrics-base-port={defaults.metrics_base_port}",
            *([f"--chdir={self.chdir}"] if self.chdir is not None else []),
            *([f"--web-config={defaults.web_config}"] if defaults.web_config is not None else []),
            *(f"--env={name}={value}" for name, value in defaults.env.items()),
            "--", *self.command,
        ]  # fmt: skip

    def batch_script(self) -> str:
        srun = [
            "srun",
            f"--nodes={self.nodes}",
            f"--ntasks={self.nodes}",
            "--ntasks-per-node=1",
            # One node's torchrun failing ends the others', whose ranks would otherwise
            # wait in a collective until NCCL's timeout.
            "--kill-on-bad-exit=1",
            f"--output={self.log_dir}/node-%n.log",
            "--",
            *self.node_argv(),
        ]
        # Every value is quoted: the script is shell, its words come from the command line.
        return (
            "#!/bin/sh\n"
            f"# ugro-launch job {self.job_id}: one torchrun per node, {self.nproc_per_node} "
            "rank(s) each\n"
            f"exec {shlex.join(srun)}\n"
        )

    def sbatch_argv(self) -> list[str]:
        settings = self.inventory.slurm
        assert settings is not None
        return [
            f"--job-name={self.job_id}",
            f"--nodes={self.nodes}",
            "--ntasks-per-node=1",
            f"--output={self.log_dir}/batch.log",
            *([f"--partition={settings.partition}"] if settings.partition else []),
            *([f"--gpus-per-node={settings.gpus_per_node}"] if settings.gpus_per_node else []),
            *([f"--time={settings.time_limit}"] if settings.time_limit else []),
            *([f"--account={settings.account}"] if settings.account else []),
            *settings.sbatch_args,
        ]


def preflight(plan: SlurmPlan) -> slurm.PartitionInfo:
    """The partition as sinfo sees it; LaunchError if the job cannot run there."""
    settings = plan.inventory.slurm
    assert settings is not None
    where = f"{plan.inventory.path}: slurm.partition"
    try:
        info = slurm.partition(settings.partition)
    except slurm.SlurmError as error:
        raise LaunchError(f"preflight: {error} ({where})") from None
    if info.available != "up":
        raise LaunchError(f"preflight: partition {info.name} is {info.available}, not up ({where})")
    if plan.nodes > info.nodes:
        raise LaunchError(
            f"preflight: --nodes {plan.nodes}: partition {info.name} has {info.nodes} node(s)"
        )
    return info


def submit(plan: SlurmPlan, options: SshOptions, say: Print) -> records.JobRecord:
    """Preflight, record, sbatch, watcher; nothing is left behind when any step fails."""
    info = preflight(plan)
    say(f"preflight: partition {info.name} is up, {info.usable_nodes} of {info.nodes} "
        "node(s) usable")  # fmt: skip
    record = records.JobRecord(
        job_id=plan.job_id,
        inventory=str(plan.inventory.path.resolve()),
        nodes=[],
        nproc_per_node=plan.nproc_per_node,
        command=list(plan.command),
        rdzv_port=plan.rdzv_port,
        started_at=time.time(),
        chdir=plan.chdir,
        known_hosts=str(options.known_hosts),
        access=_access_of(plan),
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
        plan.log_dir.mkdir(parents=True, exist_ok=True)
        job_id = slurm.submit(plan.sbatch_argv(), plan.batch_script())
    except (OSError, slurm.SlurmError) as error:
        record.delete()
        raise LaunchError(f"not submitted: {error}") from None
    record.slurm = {
        "job_id": job_id,
        "partition": info.name,
        "nodes": plan.nodes,
        "log_dir": str(plan.log_dir),
        "state": "PENDING",
        "exit_code": None,
    }
    record.state = records.PENDING
    record.launcher = None
    record.save()
    record.watcher_pid = start_watcher(record, options)
    record.save()
    return record


# -- following the job ------------------------------------------------------------------------


def follow(job_id: str, options: SshOptions, poll_seconds: float = 2.0) -> str:
    """The watcher of a Slurm job: registers its targets when its allocation starts and settles
    them when it ends; returns the job's final state."""
    while True:
        record = records.load_record(job_id)
        if record.state not in records.GOING:  # stopped by `ugro-launch stop`
            return record.state
        assert record.slurm is not None
        try:
            job = slurm.job(record.slurm["job_id"])
        except slurm.SlurmError as error:
            log.warning("job %s: %s", job_id, error)
            time.sleep(poll_seconds)
            continue
        if job is None:  # the controller forgot it before this watcher saw its end
            return _settle_forgotten(record, options)
        if job.ended:
            if job.nodes and not record.nodes:
                # It ran and ended while no watcher followed it (this one was started after
                # the watcher before it died): its ranks were never registered, and ranks
                # registered now would only be scraped dead. Its nodes are recorded all the
                # same, for `logs --node`.
                record = _record_allocation(record, job)
            state = records.FINISHED if job.state in slurm.FINISHED_STATES else records.FAILED
            _settle(record, state, job, options)
            log.info("job %s: Slurm says %s (%s)", job_id, job.state, job.reason)
            return state
        if job.nodes and not record.nodes:
            record = _register(record, job, options)
        if job.state != record.slurm["state"]:
            record = records.load_record(job_id)
            if record.state in records.GOING:
                record.slurm = {**record.slurm, "state": job.state}
                record.save()
        time.sleep(poll_seconds)


def _register(record: records.JobRecord, job: slurm.SlurmJob, options: SshOptions):
    """The allocation started: its nodes' addresses into the record, targets for Prometheus."""
    assert record.slurm is not None and record.access is not None
    addresses = slurm.node_addresses(job.nodes)
    targets = targets_at(_prometheus(record), options)
    for name in job.nodes:
        targets.register_node(name, addresses[name], record.access["exporter_port"])
    targets.register_job(
        record.job_id,
        rank_endpoints(
            [(name, addresses[name]) for name in job.nodes],
            record.nproc_per_node,
            record.access["metrics_base_port"],
        ),
        {SCHEDULER_LABEL: record.slurm["job_id"]},
    )
    log.info("job %s: allocation %s, targets registered", record.job_id, ",".join(job.nodes))
    return _record_allocation(record, job, addresses)


def _record_allocation(
    record: records.JobRecord, job: slurm.SlurmJob, addresses: dict[str, str] | None = None
) -> records.JobRecord:
    """The allocation's nodes and their addresses into the record."""
    assert record.slurm is not None and record.access is not None
    if addresses is None:
        try:
            addresses = slurm.node_addresses(job.nodes)
        except slurm.SlurmError as error:  # the nodes are for `logs`; the end matters more
            log.warning("job %s: its nodes are not recorded: %s", record.job_id, error)
            return record
    current = records.load_record(record.job_id)
    if current.state not in records.GOING:
        return current  # stopped meanwhile: `stop` removes the targets after scancel
    current.nodes = list(job.nodes)
    current.access = {**record.access, "nodes": {name: {"host": addresses[name]}
                                                 for name in job.nodes}}  # fmt: skip
    current.slurm = {**record.slurm, "state": job.state}
    current.state = records.RUNNING
    current.save()
    return current


def _settle_forgotten(record: records.JobRecord, options: SshOptions) -> str:
    """The controller no longer knows the job (it forgets an ended job after ``MinJobAge``):
    it ended while no watcher asked. Slurm's accounting (sacct), where the cluster keeps it,
    says how; the job is then settled as any other. Without it the end is unknown: LOST, and
    the rank targets stay. A job that finished leaves no page behind that way (the recording
    rules count a rank whose end marker was scraped as ended, not down), while a job that
    crashed keeps paging TrainingRanksDown until `ugro-launch stop` clears it; removing them
    would end that page without anyone having looked."""
    assert record.slurm is not None
    slurm_id = record.slurm["job_id"]
    try:
        job = accounted_end(slurm_id)
    except slurm.SlurmError as error:
        log.warning("job %s: %s", record.job_id, error)
        job = None
    if job is None:
        log.warning("job %s: Slurm's controller forgot Slurm job %s and its accounting does "
                    "not say how it ended: lost; its targets stay until `ugro-launch stop`",
                    record.job_id, slurm_id)  # fmt: skip
        _settle(record, records.LOST, None, options)
        return records.LOST
    state = records.FINISHED if job.state in slurm.FINISHED_STATES else records.FAILED
    _settle(record, state, job, options)
    log.info("job %s: Slurm's accounting says %s", record.job_id, job.state)
    return state


SACCT_FORMAT = "JobID,State,ExitCode"


def accounted_end(slurm_id: str) -> slurm.SlurmJob | None:
    """How the job ended, from Slurm's accounting (``sacct``, where ``AccountingStorageType``
    keeps it); None if accounting does not know it or it has not ended there either.
    SlurmError if sacct cannot be asked (no accounting storage: it fails)."""
    text = slurm.run(
        "sacct", f"--jobs={slurm_id}", "--allocations", "--noheader", "--parsable2",
        f"--format={SACCT_FORMAT}",
    )  # fmt: skip
    return parse_sacct(slurm_id, text)


def parse_sacct(slurm_id: str, text: str) -> slurm.SlurmJob | None:
    """The allocation's line of ``sacct --parsable2 --format=JobID,State,ExitCode``, e.g.
    ``123|CANCELLED by 0|0:15``, as a SlurmJob if it has ended."""
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 3 or fields[0] != slurm_id:
            continue
        state = fields[1].split()[0] if fields[1].split() else ""
        if state not in slurm.ENDED_STATES:
            return None
        return slurm.SlurmJob(slurm_id, state, "accounting", fields[2], (), None)
    return None


def _settle(
    record: records.JobRecord, state: str, job: slurm.SlurmJob | None, options: SshOptions
) -> None:
    """The job ended: a finished job's rank targets go; a failed one's stay (its ranks are
    down, which is what TrainingRanksDown is for, until `ugro-launch stop`)."""
    if state == records.FINISHED:
        try:
            targets_at(_prometheus(record), options).remove_job(record.job_id)
        except (OSError, RemoteError) as error:
            log.error("job %s finished but its targets stay: %s", record.job_id, error)
    current = records.load_record(record.job_id)
    if current.state not in records.GOING:
        return
    assert current.slurm is not None
    current.state = state
    current.ended_at = time.time()
    if job is not None:
        current.slurm = {**current.slurm, "state": job.state, "exit_code": job.exit_code}
    current.save()


# -- stop, status, logs -----------------------------------------------------------------------


def stop(record: records.JobRecord, options: SshOptions, say: Print) -> records.JobRecord:
    """``scancel``, then, once Slurm says the job ended, its rank targets removed; LaunchError
    (record, watcher and targets kept) if Slurm does not confirm the end."""
    assert record.slurm is not None
    before = record
    if record.state in records.GOING:
        record.state = records.STOPPED
        record.ended_at = time.time()
        record.launcher = None
        record.save()
    stop_watcher(record)
    slurm_id = record.slurm["job_id"]
    try:
        job = slurm.job(slurm_id)
        if job is not None and not job.ended:  # scancel refuses a job that has ended
            slurm.cancel(slurm_id)
            job = _wait_for_end(slurm_id, STOP_WAIT_SECONDS)
    except slurm.SlurmError as error:
        _restore(before, options)
        message = f"job {record.job_id} (Slurm job {slurm_id}) NOT stopped: {error}"
        raise LaunchError(message) from None
    if job is not None and not job.ended:
        _restore(before, options)
        raise LaunchError(
            f"job {record.job_id}: Slurm job {slurm_id} still {job.state} "
            f"{STOP_WAIT_SECONDS:g} s after scancel; it keeps its targets; try again"
        )
    say(f"  Slurm job {slurm_id}: {job.state if job else 'ended'}")
    targets_at(_prometheus(record), options).remove_job(record.job_id)
    if job is not None:
        record.slurm = {**record.slurm, "state": job.state, "exit_code": job.exit_code}
        record.save()
    return record


def _wait_for_end(slurm_id: str, seconds: float) -> slurm.SlurmJob | None:
    deadline = time.monotonic() + seconds
    while True:
        job = slurm.job(slurm_id)
        # COMPLETING: processes may still be running on a node; not ended yet.
        if job is None or job.ended or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def _restore(before: records.JobRecord, options: SshOptions) -> None:
    before.save()
    if before.state in records.GOING:
        before.watcher_pid = start_watcher(before, options)
        before.save()


def status_lines(record: records.JobRecord) -> tuple[str, list[str]]:
    """The job's state as Slurm sees it now (the record's when Slurm has forgotten it), and a
    line per node."""
    assert record.slurm is not None
    slurm_id = record.slurm["job_id"]
    try:
        job = slurm.job(slurm_id)
    except slurm.SlurmError as error:
        return record.shown_state, [f"  Slurm job {slurm_id}: cannot ask Slurm: {error}"]
    if job is None:
        return record.shown_state, [
            f"  Slurm job {slurm_id}: {record.slurm['state']} (Slurm no longer shows it; "
            f"`sacct -j {slurm_id}` where accounting is kept)"
        ]
    shown = record.shown_state
    if record.state in records.GOING:
        if job.state in slurm.WAITING_STATES:
            shown = records.PENDING
        elif job.ended:
            shown = records.FINISHED if job.state in slurm.FINISHED_STATES else records.FAILED
        else:
            shown = records.RUNNING
    reason = "" if job.reason in ("None", "") else f", reason {job.reason}"
    exit_code = f", exit code {job.exit_code}" if job.ended else ""
    lines = [f"  Slurm job {slurm_id}: {job.state}{reason}{exit_code}"]
    lines += [f"  {name:<16} node {index}" for index, name in enumerate(job.nodes)]
    return shown, lines


def log_file(record: records.JobRecord, node: str | None) -> pathlib.Path:
    """The torchrun output of ``node`` (default: the first), or the batch script's own output
    while the job has no nodes yet."""
    assert record.slurm is not None
    directory = pathlib.Path(record.slurm["log_dir"])
    if node is None:
        return directory / ("node-0.log" if record.nodes else "batch.log")
    if node not in record.nodes:
        raise LaunchError(
            f"--node {node}: job {record.job_id} runs on "
            f"{', '.join(record.nodes) or 'no node yet (pending)'}"
        )
    return directory / f"node-{record.nodes.index(node)}.log"


def print_log(path: pathlib.Path, lines: int, follow_it: bool, job_id: str) -> int:
    if not path.exists():
        raise LaunchError(
            f"{path}: no such log on this machine; the nodes write it there, so slurm.log_dir "
            f"must be a directory they share with this one (job {job_id})"
        )
    with path.open("rb") as stream:
        tail = stream.read().decode(errors="replace").splitlines()[-lines:] if lines else []
        for line in tail:
            print(line)
        sys.stdout.flush()
        while follow_it:
            chunk = stream.read()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.5)
    return 0


# -- the record ---------------------------------------------------------------------------


def _access_of(plan: SlurmPlan) -> dict[str, Any]:
    defaults, prometheus = plan.inventory.defaults, plan.inventory.prometheus
    return {
        "python": defaults.python,
        "workdir": None,
        "exporter_port": defaults.exporter_port,
        "metrics_base_port": defaults.metrics_base_port,
        "nodes": {},
        "prometheus": {
            "targets_dir": prometheus.targets_dir,
            "host": prometheus.host,
            "ssh_port": prometheus.ssh_port,
            "user": prometheus.user,
            "identity_file": prometheus.identity_file,
        },
    }


def _prometheus(record: records.JobRecord) -> PrometheusTargets:
    assert record.access is not None
    return PrometheusTargets(**record.access["prometheus"], grafana_url=None)
