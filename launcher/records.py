"""The launcher's own memory of jobs: one JSON file per job on the machine that launched it.

The nodes hold the truth about processes (the agent's job directories); a record holds what is
needed to find them again (inventory, nodes, command) and the job's last known state.
Location: ``$UGRO_STATE_DIR``, else ``$XDG_STATE_HOME/ugro/jobs``, else
``~/.local/state/ugro/jobs``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from .targets import write_atomically

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
JOB_ID_EXPECTED = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"

# A job's states, as `status` and `list` show them.
RUNNING, FINISHED, FAILED, STOPPED = "running", "finished", "failed", "stopped"
LOST = "lost"  # its nodes stopped answering before it ended
# Written before anything starts on a node, so that a launcher killed half-way leaves a record
# that `ugro-launch stop` can act on. Shown as INTERRUPTED once that launcher is gone.
LAUNCHING, INTERRUPTED = "launching", "interrupted"


def state_dir() -> pathlib.Path:
    if os.environ.get("UGRO_STATE_DIR"):
        return pathlib.Path(os.environ["UGRO_STATE_DIR"]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or "~/.local/state"
    return pathlib.Path(base).expanduser() / "ugro" / "jobs"


@dataclass
class JobRecord:
    job_id: str
    inventory: str  # absolute path of the inventory the job was launched with
    nodes: list[str]
    nproc_per_node: int
    command: list[str]
    rdzv_port: int
    started_at: float
    state: str = RUNNING
    node_states: dict[str, Any] = field(default_factory=dict)  # the agent's last status
    watcher_pid: int | None = None
    ended_at: float | None = None
    # [pid, create_time] of the ugro-launch process that is starting the job (LAUNCHING only).
    launcher: list[float] | None = None
    chdir: str | None = None  # the job's working directory on its nodes (None: the default)
    known_hosts: str | None = None  # the --known-hosts the job was launched with

    @property
    def path(self) -> pathlib.Path:
        return record_path(self.job_id)

    @property
    def shown_state(self) -> str:
        """``state``, except that a launch whose launcher died half-way is INTERRUPTED."""
        if self.state == LAUNCHING and not process_alive(self.launcher):
            return INTERRUPTED
        return self.state

    def save(self) -> None:
        write_atomically(self.path, self._text())

    def create(self) -> None:
        """Save a new record; RecordExists if the job id is taken (two launches, one id)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Reserve the name first: of two launches with one id, exactly one gets it.
            with open(self.path, "x"):
                pass
        except FileExistsError:
            raise RecordExists(self.path) from None
        self.save()

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _text(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def process_ref(pid: int) -> list[float]:
    """``[pid, create_time]``: names one process, not whatever reuses its pid later."""
    return [pid, psutil.Process(pid).create_time()]


def process_alive(ref: list[float] | None) -> bool:
    if not ref:
        return False
    try:
        process = psutil.Process(int(ref[0]))
        return (
            abs(process.create_time() - ref[1]) < 0.01 and process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def record_path(job_id: str) -> pathlib.Path:
    return state_dir() / f"{job_id}.json"


class RecordError(LookupError):
    pass


class RecordExists(FileExistsError):
    pass


def load_record(job_id: str) -> JobRecord:
    if not JOB_ID.fullmatch(job_id):
        raise RecordError(f"job id {job_id!r}: expected {JOB_ID_EXPECTED}")
    path = record_path(job_id)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(
            f"no job {job_id!r} in {state_dir()} (`ugro-launch list` shows the known jobs)"
        ) from None
    except (OSError, ValueError) as error:
        raise RecordError(f"{path}: unreadable job record: {error}") from error
    return JobRecord(**data)


def all_records() -> list[JobRecord]:
    records = []
    directory = state_dir()
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            try:
                records.append(JobRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # a record being written, or not ours
    return sorted(records, key=lambda r: r.started_at)
