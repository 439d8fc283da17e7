"""``stacks``: a Python stack dump of every rank of a job on this node, taken with py-spy.

The ranks are the processes below the job's torchrun that carry ``RANK`` in their
environment (torchrun sets it for each worker); a rank's own children (data-loader workers)
inherit it and are left out. Each rank is dumped by ``py-spy dump --json --pid PID`` (argv,
never a shell), in parallel and with a time limit per rank, so one rank that py-spy cannot
read costs that rank its dump and nothing more.

py-spy reads another process's memory through ptrace: it needs the same user as the ranks
and ``kernel.yama.ptrace_scope`` 0 (at 1, only a process's ancestors may attach, and py-spy is
not the ranks' ancestor), or CAP_SYS_PTRACE. :func:`attach_problem` is the
quick check that ``preflight`` runs for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import psutil

from ..jobfiles import PID, read_process_ref
from .status import job_status, process_alive

DUMP_TIMEOUT_SECONDS = 10.0
# py-spy stops a rank while it reads it; a few at a time keeps a node with many ranks usable.
PARALLEL_DUMPS = 8
PTRACE_SCOPE = pathlib.Path("/proc/sys/kernel/yama/ptrace_scope")
# py-spy is a Rust program: without this it appends a Rust backtrace to every error.
_PY_SPY_ENV = {"RUST_BACKTRACE": "0"}


def find_py_spy() -> str | None:
    """py-spy beside this Python (installed with ugro in the same environment), else on PATH."""
    beside = pathlib.Path(sys.executable).parent / "py-spy"
    if os.access(beside, os.X_OK) and beside.is_file():
        return str(beside)
    return shutil.which("py-spy")


def py_spy_missing_message() -> str:
    return (
        f"py-spy is not installed beside {sys.executable} nor on PATH: "
        f"{pathlib.Path(sys.executable).parent / 'pip'} install py-spy"
    )


def ptrace_scope() -> int | None:
    """Yama's ptrace restriction (0 classic, 1 descendants only, 2 admin only, 3 none); None
    when Yama is not in this kernel (then only the usual same-user rule applies)."""
    try:
        return int(PTRACE_SCOPE.read_text().strip())
    except (OSError, ValueError):
        return None


def permission_advice() -> str:
    """What to do when py-spy may not attach, for this node's settings."""
    scope = ptrace_scope()
    advice = [
        "run the job and the agent as the same user",
        "or give py-spy CAP_SYS_PTRACE (sudo setcap cap_sys_ptrace+ep "
        f"{find_py_spy() or 'py-spy'}; in a container: --cap-add SYS_PTRACE)",
    ]
    if scope is not None and scope >= 1:
        advice.insert(
            1,
            f"kernel.yama.ptrace_scope is {scope}: "
            + (
                "set it to 0 (sudo sysctl kernel.yama.ptrace_scope=0)"
                if scope < 3
                else "3 forbids ptrace until reboot"
            ),
        )
    return "; ".join(advice)


# -- the ranks ------------------------------------------------------------------------------


def rank_processes(leader_pid: int) -> list[dict[str, Any]]:
    """``{"pid", "rank", "local_rank"}`` for each rank below torchrun ``leader_pid``, by rank."""
    try:
        descendants = psutil.Process(leader_pid).children(recursive=True)
    except psutil.Error:
        return []
    ranks: dict[int, dict[str, Any]] = {}
    for process in descendants:
        environment = _environment(process)
        if environment is None or "RANK" not in environment:
            continue
        ranks[process.pid] = {
            "pid": process.pid,
            "rank": _int_or_none(environment.get("RANK")),
            "local_rank": _int_or_none(environment.get("LOCAL_RANK")),
            "parent": _parent_pid(process),
        }
    # A process whose parent is a rank too is that rank's child (a data-loader worker).
    found = [
        {key: value for key, value in rank.items() if key != "parent"}
        for rank in ranks.values()
        if rank["parent"] not in ranks
    ]
    return sorted(found, key=lambda rank: (rank["rank"] is None, rank["rank"] or 0, rank["pid"]))


def _environment(process: psutil.Process) -> dict[str, str] | None:
    try:
        return process.environ()
    except psutil.Error:  # gone, a zombie, or another user's
        return None


def _parent_pid(process: psutil.Process) -> int | None:
    try:
        return process.ppid()
    except psutil.Error:
        return None


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


# -- dumping --------------------------------------------------------------------------------


def dump_process(pid: int, py_spy: str, timeout: float = DUMP_TIMEOUT_SECONDS) -> dict[str, Any]:
    """``{"threads": [...]}`` for one process, or ``{"error": sentence}``.

    Each thread: ``name``, ``thread_id`` (the OS thread id), ``main`` (the process's first
    thread), ``active``, ``owns_gil`` and ``frames``, each ``{"function", "file", "line"}``,
    outermost first and innermost last (as a traceback reads; py-spy lists them the other
    way round).
    """
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        return {"error": f"pid {pid} has exited"}
    try:
        done = subprocess.run(
            [py_spy, "dump", "--json", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **_PY_SPY_ENV},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"py-spy did not answer within {timeout:g} s"}
    except OSError as error:
        return {"error": f"{py_spy} cannot be run: {error.strerror or error}"}
    if done.returncode != 0:
        return {"error": _explain_failure(pid, created, done.stderr)}
    try:
        threads = json.loads(done.stdout)
    except ValueError:
        return {"error": f"py-spy gave no JSON: {_first_line(done.stdout) or 'no output'}"}
    return {"threads": [_thread(pid, thread) for thread in threads]}


def _explain_failure(pid: int, created: float, stderr: str) -> str:
    if not process_alive((pid, created)):
        return f"pid {pid} exited while it was being dumped"
    if "permission denied" in stderr.lower() or "operation not permitted" in stderr.lower():
        return f"py-spy may not attach to pid {pid} (permission denied): {permission_advice()}"
    return f"py-spy failed: {_first_line(stderr) or 'no output'}"


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip().removeprefix("Error: ")
    return ""


def _thread(pid: int, thread: dict[str, Any]) -> dict[str, Any]:
    frames = [
        {
            "function": frame.get("name"),
            "file": frame.get("filename"),
            "line": frame.get("line"),
        }
        for frame in reversed(thread.get("frames") or [])
    ]
    return {
        "name": thread.get("thread_name"),
        "thread_id": thread.get("os_thread_id"),
        # On Linux the first thread's id is the pid; py-spy only knows the name "MainThread"
        # once the threading module is loaded.
        "main": thread.get("os_thread_id") == pid or thread.get("thread_name") == "MainThread",
        "active": thread.get("active"),
        "owns_gil": thread.get("owns_gil"),
        "frames": frames,
    }


def job_stacks(directory: pathlib.Path, timeout: float = DUMP_TIMEOUT_SECONDS) -> dict[str, Any]:
    """The stacks of the job's ranks on this node.

    ``state`` is the job's (see :func:`~.status.job_status`); ``ranks`` lists each rank found
    with ``rank``, ``local_rank``, ``pid`` and either ``threads`` or ``error``; ``error`` at
    the top says why no rank could be dumped at all (py-spy missing, job not running).
    """
    status = job_status(directory)
    answer: dict[str, Any] = {
        "state": status["state"],
        "dir": str(directory),
        "pid": status["pid"],
        "py_spy": find_py_spy(),
        "ranks": [],
        "error": None,
    }
    if status["state"] != "running":
        answer["error"] = (
            f"no job directory {directory}"
            if status["state"] == "unknown"
            else f"the job is not running here ({status['state']})"
        )
        return answer
    leader = read_process_ref(directory / PID)
    ranks = rank_processes(leader[0]) if leader and process_alive(leader) else []
    if not ranks:
        answer["error"] = f"torchrun (pid {answer['pid']}) has no rank processes"
        return answer
    py_spy = answer["py_spy"]
    if py_spy is None:
        answer["error"] = py_spy_missing_message()
        answer["ranks"] = [{**rank, "error": answer["error"]} for rank in ranks]
        return answer
    # Imported here: every verb of the agent imports this module, only this one needs threads.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(PARALLEL_DUMPS, len(ranks))) as pool:
        dumps = list(pool.map(lambda rank: dump_process(rank["pid"], py_spy, timeout), ranks))
    answer["ranks"] = [{**rank, **dump} for rank, dump in zip(ranks, dumps, strict=True)]
    return answer


# -- preflight ------------------------------------------------------------------------------

# Started by attach_problem: a Python that says it is ready and waits to be read.
_PROBE = "import time; print('ready', flush=True); time.sleep(60)"


def attach_problem(timeout: float = 5.0) -> str | None:
    """None if py-spy is here and can dump a Python process of this user, else a sentence.

    It dumps a short-lived Python this agent starts: that is a sibling of py-spy, not its
    child, as a rank is, so Yama's "descendants only" rule applies to it as it would to ranks.
    """
    py_spy = find_py_spy()
    if py_spy is None:
        return f"{py_spy_missing_message()}; `ugro-launch stacks` cannot dump ranks here"
    with subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _PROBE],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    ) as probe:
        try:
            if probe.stdout is None or probe.stdout.readline().strip() != "ready":
                return None  # no Python to try it on: not py-spy's problem
            result = dump_process(probe.pid, py_spy, timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                probe.kill()
    if "error" in result:
        return f"py-spy cannot dump a Python process here: {result['error']}"
    return None
