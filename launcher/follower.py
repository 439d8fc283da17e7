"""A job's watcher: follows it to its end from the machine that launched it.

Named ``follower``, not ``watch``, so that it is not taken for ``ugro watch`` (the terminal view,
:mod:`ugro.console.watch`); the record and ``ugro-launch`` still call it the job's watcher.
Started detached by ``ugro-launch`` (one per job). Every few seconds it asks each node's agent
for the job's state. When every node's torchrun exited 0, it removes the job's Prometheus
targets: a job that finished normally leaves nothing to alert on. When a node fails (non-zero
exit, or its processes vanished), it stops the job on the other nodes, whose ranks would
otherwise hang in a collective, and leaves the targets in place, so the dead ranks raise
``TrainingRanksDown`` until ``ugro-launch stop`` clears them. While the job runs, it also takes
one stack dump of every rank when Prometheus says the job stalled (see stall_dumps.py).
A job submitted through Slurm is followed by asking Slurm instead (slurm_jobs.follow).
One watcher per job: it holds the job's watcher lock while it runs, and one that finds the lock
held gives way; a watcher that died is restarted by the next ``ugro-launch`` command that reads
the job (watchers.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import time

from . import records, slurm_jobs, watchers
from .inventory import InventoryError
from .launch import node_statuses, plan_from_record, replace_state, stop_nodes, targets_for
from .nodes import NodeSet
from .remote import DEFAULT_KNOWN_HOSTS, RemoteError, SshOptions
from .stall_dumps import StallDumper

log = logging.getLogger("ugro.launcher.follower")
ENDED_BADLY = {"failed", "lost", "unknown"}


def follow(
    job_id: str, options: SshOptions, poll_seconds: float = 2.0, give_up_seconds: float = 3600.0
) -> str:
    """Follow the job until it ends; returns its final state.

    Nodes that cannot be reached for ``give_up_seconds`` in a row make the job "lost": the
    watcher stops asking (the alerts still see the dead ranks).
    """
    record = records.load_record(job_id)
    reachable_at = time.monotonic()
    plan = plan_from_record(record)  # where it was launched, whatever the inventory says now
    dumper = StallDumper(plan)
    with NodeSet(plan.inventory, plan.nodes, options) as nodes:
        while True:
            record = records.load_record(job_id)
            if record.state != records.RUNNING:  # stopped by `ugro-launch stop`
                return record.state
            answers = node_statuses(plan, nodes)
            states = {
                name: {"state": "unreachable", "reason": str(answer)}
                if isinstance(answer, Exception)
                else answer
                for name, answer in answers.items()
            }
            names = {name: state["state"] for name, state in states.items()}
            if all(state == "finished" for state in names.values()):
                try:
                    targets_for(plan.inventory, options).remove_job(job_id)
                except (OSError, RemoteError) as error:
                    log.error("job %s finished but its targets stay: %s", job_id, error)
                replace_state(record, state=records.FINISHED, node_states=states,
                              ended_at=time.time())  # fmt: skip
                log.info("job %s finished on every node", job_id)
                return records.FINISHED
            failed = [name for name, state in names.items() if state in ENDED_BADLY]
            if failed:
                log.warning("job %s failed on %s; stopping the other nodes", job_id, failed)
                still = [n for n in plan.nodes if names[n.name] == "running"]
                for name, answer in stop_nodes(plan, nodes, still).items():
                    states[name] = {**states[name], "stopped_after_failure": str(answer)}
                replace_state(record, state=records.FAILED, node_states=states,
                              ended_at=time.time())  # fmt: skip
                return records.FAILED
            if not any(state == "unreachable" for state in names.values()):
                reachable_at = time.monotonic()
            elif time.monotonic() - reachable_at > give_up_seconds:
                replace_state(record, state=records.LOST, node_states=states,
                              ended_at=time.time())  # fmt: skip
                return records.LOST
            if states != record.node_states:
                replace_state(record, node_states=states)
            if all(state == "running" for state in names.values()):
                try:
                    dumper.check(nodes)
                except Exception:  # a dump is a help; following the job is the watcher's job
                    log.exception("job %s: no stack dump", job_id)
            time.sleep(poll_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ugro.launcher.follower", description=__doc__)
    parser.add_argument("job_id")
    parser.add_argument("--known-hosts", type=pathlib.Path, default=DEFAULT_KNOWN_HOSTS)
    parser.add_argument("--accept-new-host-keys", action="store_true")
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    parser.add_argument("--give-up-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    options = SshOptions(args.known_hosts, args.accept_new_host_keys)
    lock = watchers.WatcherLock(args.job_id)
    try:
        records.load_record(args.job_id)  # the job id checked before it names a file
        lock.acquire()
    except records.RecordError as error:
        log.error("%s", error)
        return 1
    except watchers.WatcherRunning as error:
        log.info("%s; this one ends", error)
        return 0
    except OSError as error:
        log.error("job %s: cannot take the watcher lock: %s", args.job_id, error)
        return 1
    try:
        record = watchers.claim(args.job_id)
        if record is None:
            state = records.load_record(args.job_id).state
            log.info("job %s is %s: nothing to follow", args.job_id, state)
            return 0
        log.info("job %s: followed by this watcher (pid %d)", args.job_id, os.getpid())
        if record.slurm is not None:
            state = slurm_jobs.follow(args.job_id, options, args.poll_seconds)
        else:
            state = follow(args.job_id, options, args.poll_seconds, args.give_up_seconds)
    except (records.RecordError, InventoryError) as error:
        log.error("%s", error)
        return 1
    finally:
        lock.release()
    log.info("job %s: %s", args.job_id, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
