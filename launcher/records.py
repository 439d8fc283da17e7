"""The launcher's own memory of jobs: one JSON file per job on the machine that launched it.

The nodes hold the truth about processes (the agent's job directories); a record holds what is
needed to find them again (inventory, nodes, command) and the job's last known state.
Location: ``$UGRO_STATE_DIR``, else ``$XDG_STATE_HOME/ugro/jobs``, else
``~/.local/state/ugro/jobs``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .targets import write_atomically

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
JOB_ID_EXPECTED = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"

# A job's states, as `status` and `list` show them.
RUNNING, FINISHED, FAILED, STOPPED = "running", "finished", "failed", "stopped"
LOST = "lost"  # its nodes stopped answering before it ended


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

    @property
    def path(self) -> pathlib.Path:
        return record_path(self.job_id)

    def save(self) -> None:
        write_atomically(self.path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")


def record_path(job_id: str) -> pathlib.Path:
    return state_dir() / f"{job_id}.json"


class RecordError(LookupError):
    pass


def load_record(job_id: str) -> JobRecord:
    if not JOB_ID.match(job_id):
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
