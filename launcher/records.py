"""The launcher's own memory of jobs: one JSON file per job on the machine that launched it.

The nodes hold the truth about processes (the agent's job directories); a record holds what is
needed to find them again and the job's last known state. How to reach each node (host, SSH
port, user, key, the agent's Python and work directory) and the Prometheus targets is copied
into the record at launch (``access``): `status`, `stop` and `logs` must find the job where it
was started, whatever became of the inventory since.
Location: ``$UGRO_STATE_DIR``, else ``$XDG_STATE_HOME/ugro/jobs``, else
``~/.local/state/ugro/jobs``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from dataclasses import MISSING as _MISSING
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import psutil

from ugro.common.files import write_atomically
from ugro.common.identifiers import JOB_ID, JOB_ID_EXPECTED
from ugro.common.messages import shown

# JOB_ID and JOB_ID_EXPECTED stay importable from here too: the console's commands import them.

# A job's states, as `status` and `list` show them.
RUNNING, FINISHED, FAILED, STOPPED = "running", "finished", "failed", "stopped"
LOST = "lost"  # its nodes stopped answering before it ended
# Written before anything starts on a node, so that a launcher killed half-way leaves a record
# that `ugro-launch stop` can act on. Shown as INTERRUPTED once that launcher is gone.
LAUNCHING, INTERRUPTED = "launching", "interrupted"
PENDING = "pending"  # submitted to Slurm, waiting for its allocation
STATES = (RUNNING, FINISHED, FAILED, STOPPED, LOST, LAUNCHING, PENDING)
GOING = (RUNNING, LAUNCHING, PENDING)  # the states of a job that has not ended


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
    # Where the job runs, as the inventory said at launch (None in records from before it was
    # kept: the inventory is read then):
    #   {"python": P, "workdir": W, "exporter_port": N, "metrics_base_port": N,
    #    "nodes": {NAME: {"host": H, "ssh_port": N, "user": U|null, "identity_file": F|null}},
    #    "prometheus": {"targets_dir": D, "host": H|null, "ssh_port": N, "user": U|null,
    #                   "identity_file": F|null}}
    access: dict[str, Any] | None = None
    # A job submitted through Slurm (None: launched over SSH):
    #   {"job_id": "123", "partition": P|null, "nodes": N, "log_dir": D, "state": "RUNNING",
    #    "exit_code": "0:0"|null}
    # `nodes` above stays empty until the allocation starts; then it names the allocation's
    # nodes in node-rank order, and access.nodes holds each one's address.
    slurm: dict[str, Any] | None = None
    # "https" or "http": how the job's endpoints serve, as its nodes' web configuration says
    # (preflight reads it there). None: not known (a Slurm job, or a record from before).
    metrics_scheme: str | None = None

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
        text = path.read_text()
    except FileNotFoundError:
        raise RecordError(
            f"no job {job_id!r} in {state_dir()} (`ugro-launch list` shows the known jobs)"
        ) from None
    except (OSError, ValueError) as error:
        raise RecordError(f"{path}: unreadable job record: {error}") from error
    return record_from_text(path, text)


def all_records() -> list[JobRecord]:
    """Every readable record, oldest first; see :func:`scan_records` for the others."""
    return scan_records()[0]


def scan_records() -> tuple[list[JobRecord], list[RecordError]]:
    """The readable records, oldest first, and an error naming each record file that is not."""
    records, errors = [], []
    directory = state_dir()
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            try:
                text = path.read_text()
                if not text:
                    continue  # reserved by a launch that is about to write it (create)
                records.append(record_from_text(path, text))
            except FileNotFoundError:
                continue  # deleted meanwhile (a launch rolled back)
            except OSError as error:
                errors.append(RecordError(f"{path}: unreadable job record: {error}"))
            except (ValueError, RecordError) as error:
                errors.append(RecordError(str(error)))
    return sorted(records, key=lambda r: r.started_at), errors


# -- reading a record back: every field checked, so that a damaged file is one clear line ----

_NUMBER = (int, float)
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "job_id": ((str,), "a job id"),
    "inventory": ((str,), "a path"),
    "nodes": ((list,), "a non-empty list of node names"),
    "nproc_per_node": ((int,), "an integer >= 1"),
    "command": ((list,), "a list of strings"),
    "rdzv_port": ((int,), "a port number"),
    "started_at": (_NUMBER, "seconds since the epoch"),
    "state": ((str,), f"one of {', '.join(STATES)}"),
    "node_states": ((dict,), "a mapping of node name to the agent's answer"),
    "watcher_pid": ((int, type(None)), "a process id or null"),
    "ended_at": ((*_NUMBER, type(None)), "seconds since the epoch or null"),
    "launcher": ((list, type(None)), "[pid, create_time] or null"),
    "chdir": ((str, type(None)), "a path or null"),
    "known_hosts": ((str, type(None)), "a path or null"),
    "access": ((dict, type(None)), "a mapping or null"),
    "slurm": ((dict, type(None)), "a mapping or null"),
    "metrics_scheme": ((str, type(None)), '"https", "http" or null'),
}
_OPTIONAL_TEXT = ((str, type(None)), "a string or null")
_ACCESS = {
    "python": ((str,), "a path"),
    "workdir": ((str,), "a path"),
    "exporter_port": ((int,), "a port number"),
    "metrics_base_port": ((int,), "a port number"),
    "nodes": ((dict,), "a mapping of node name to how it is reached"),
    "prometheus": ((dict,), "a mapping"),
}
_REACH = {
    "host": ((str,), "a host name or address"),
    "ssh_port": ((int,), "a port number"),
    "user": _OPTIONAL_TEXT,
    "identity_file": _OPTIONAL_TEXT,
}
_PROMETHEUS = {"targets_dir": ((str,), "a path"), **{**_REACH, "host": _OPTIONAL_TEXT}}
_SLURM = {
    "job_id": ((str,), "a Slurm job id"),
    "partition": _OPTIONAL_TEXT,
    "nodes": ((int,), "a node count"),
    "log_dir": ((str,), "a path"),
    "state": ((str,), "Slurm's job state"),
    "exit_code": _OPTIONAL_TEXT,
}
# A Slurm job's nodes are reached by Slurm, not over SSH: its access names their addresses only.
_SLURM_ACCESS = {**_ACCESS, "workdir": _OPTIONAL_TEXT}
_SLURM_REACH = {"host": ((str,), "a host name or address")}


def record_from_text(path: pathlib.Path, text: str) -> JobRecord:
    """The record in ``text`` (the file ``path``); RecordError naming the file and the field."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise RecordError(f"{path}: not a job record (invalid JSON: {error})") from None
    _check_mapping(path, "", data, _TYPES, required={f.name for f in _required_fields()})
    where = f"{path}: "
    if not JOB_ID.fullmatch(data["job_id"]) or data["job_id"] != path.stem:
        raise RecordError(f"{where}job_id: expected {path.stem!r}, got {shown(data['job_id'])}")
    slurm = data.get("slurm")
    if slurm is not None:
        _check_mapping(path, "slurm.", slurm, _SLURM, required=set(_SLURM))
    # A Slurm job has no nodes until its allocation starts.
    if (not data["nodes"] and slurm is None) or not all(
        isinstance(name, str) for name in data["nodes"]
    ):
        raise RecordError(f"{where}nodes: expected a non-empty list of node names")
    if not all(isinstance(part, str) for part in data["command"]):
        raise RecordError(f"{where}command: expected a list of strings")
    if data["state"] not in STATES:
        raise RecordError(
            f"{where}state: expected one of {', '.join(STATES)}, got {shown(data['state'])}"
        )
    if data.get("metrics_scheme") not in (None, "http", "https"):
        raise RecordError(
            f'{where}metrics_scheme: expected "https", "http" or null, '
            f"got {shown(data['metrics_scheme'])}"
        )
    if data["nproc_per_node"] < 1:
        raise RecordError(f"{where}nproc_per_node: expected an integer >= 1")
    launcher = data.get("launcher")
    if launcher is not None and not (
        len(launcher) == 2 and all(_is_number(part) for part in launcher)
    ):
        raise RecordError(f"{where}launcher: expected [pid, create_time], got {shown(launcher)}")
    access = data.get("access")
    if access is not None:
        schema, reach_schema = (_ACCESS, _REACH) if slurm is None else (_SLURM_ACCESS, _SLURM_REACH)
        _check_mapping(path, "access.", access, schema, required=set(schema))
        if set(access["nodes"]) != set(data["nodes"]):
            raise RecordError(
                f"{where}access.nodes: expected exactly the job's nodes "
                f"{', '.join(data['nodes'])}, got {shown(sorted(access['nodes']))}"
            )
        for name, reach in access["nodes"].items():
            _check_mapping(
                path, f"access.nodes.{name}.", reach, reach_schema, required=set(reach_schema)
            )
        _check_mapping(
            path, "access.prometheus.", access["prometheus"], _PROMETHEUS, required=set(_PROMETHEUS)
        )
    return JobRecord(**data)


def _required_fields() -> list:
    return [f for f in fields(JobRecord) if f.default is _MISSING and f.default_factory is _MISSING]


def _is_number(value: Any) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def _check_mapping(
    path: pathlib.Path,
    prefix: str,
    data: Any,
    types: dict[str, tuple[tuple[type, ...], str]],
    required: set[str],
) -> None:
    if not isinstance(data, dict):
        what = prefix.rstrip(".") or "the record"
        raise RecordError(f"{path}: {what}: expected a JSON object, got {shown(data)}")
    missing = sorted(required - set(data))
    if missing:
        raise RecordError(f"{path}: {prefix}{missing[0]}: missing")
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise RecordError(
            f"{path}: {prefix}{unknown[0]}: unknown field (expected some of {', '.join(types)})"
        )
    for name, value in data.items():
        allowed, expected = types[name]
        # JSON true/false are Python bools, which are ints too: never a number here.
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise RecordError(f"{path}: {prefix}{name}: expected {expected}, got {shown(value)}")
