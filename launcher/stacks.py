"""``ugro-launch stacks``: every rank's Python stack, grouped so that the odd rank stands out.

Each node's agent dumps the job's ranks there with py-spy (see :mod:`.agent.stacks`); the
nodes are asked in parallel. Ranks whose main thread shows the same frames form one group: in
a hung job every healthy rank waits in the same collective, and the rank that holds them up
is the one whose stack differs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .inventory import Node
from .nodes import NodeSet

# The agent dumps this many ranks of a node at a time (agent/stacks.py PARALLEL_DUMPS).
_AGENT_PARALLEL_DUMPS = 8
_AGENT_START_SECONDS = 30.0  # Python, psutil and the job's status, before the first dump


@dataclass(frozen=True)
class StacksReport:
    """What the nodes answered: every rank found (dumped or not) and the problems per node."""

    job_id: str
    ranks: list[dict[str, Any]]  # the agent's rank entries, with "node" added
    node_errors: dict[str, str]  # node name → why none of its ranks were dumped
    node_answers: dict[str, dict[str, Any]]

    @property
    def failed_ranks(self) -> list[dict[str, Any]]:
        return [rank for rank in self.ranks if rank.get("error") or "threads" not in rank]

    @property
    def complete(self) -> bool:
        return not self.node_errors and not self.failed_ranks and bool(self.ranks)

    def groups(self) -> list[dict[str, Any]]:
        return group_ranks(rank for rank in self.ranks if rank not in self.failed_ranks)

    def as_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "complete": self.complete,
            "nodes": {
                name: {"error": self.node_errors.get(name), **answer}
                for name, answer in self.node_answers.items()
            }
            | {
                name: {"error": error}
                for name, error in self.node_errors.items()
                if name not in self.node_answers
            },
            "ranks": self.ranks,
            "groups": self.groups(),
        }


def collect_stacks(
    job_id: str,
    nodes: NodeSet,
    workdir: str,
    which: Sequence[Node],
    *,
    timeout: float,
    ranks_per_node: int,
) -> StacksReport:
    """Ask the agent of every node in ``which`` for the job's stacks, in parallel."""
    batches = math.ceil(max(ranks_per_node, 1) / _AGENT_PARALLEL_DUMPS)

    def ask(node: Node) -> dict[str, Any]:
        return nodes.agent(
            node,
            "stacks",
            f"--job-id={job_id}",
            f"--node={node.name}",
            f"--workdir={workdir}",
            f"--timeout={timeout:g}",
            timeout=batches * timeout + _AGENT_START_SECONDS,
        )

    answers = nodes.each(ask, list(which))
    ranks: list[dict[str, Any]] = []
    node_errors: dict[str, str] = {}
    node_answers: dict[str, dict[str, Any]] = {}
    for node in which:
        answer = answers[node.name]
        if isinstance(answer, Exception):
            # The agent's and SSH's errors start with the node, which the report shows anyway.
            message = str(answer)
            if message.startswith(node.name):
                message = message.split(": ", 1)[-1]
            node_errors[node.name] = message
            continue
        node_answers[node.name] = {k: v for k, v in answer.items() if k != "ranks"}
        found = answer.get("ranks") or []
        ranks += [{"node": node.name, **rank} for rank in found]
        if answer.get("error") and not found:
            node_errors[node.name] = str(answer["error"])
    return StacksReport(job_id, ranks, node_errors, node_answers)


def main_thread(rank: dict[str, Any]) -> dict[str, Any] | None:
    threads = rank.get("threads") or []
    for thread in threads:
        if thread.get("main"):
            return thread
    return threads[0] if threads else None


def group_ranks(ranks: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ranks with identical main-thread frames, largest group first (then by lowest rank).

    Each group: ``frames`` (outermost first), ``ranks`` (rank numbers, or pids where a rank
    number is unknown), ``nodes`` (in the order first seen), ``members`` (node, rank, pid) and
    ``odd_one_out``: a group of one rank when some other group has more.
    """
    by_stack: dict[tuple, dict[str, Any]] = {}
    for rank in ranks:
        thread = main_thread(rank)
        frames = thread["frames"] if thread else []
        key = tuple((f.get("function"), f.get("file"), f.get("line")) for f in frames)
        group = by_stack.setdefault(
            key, {"frames": frames, "ranks": [], "nodes": [], "members": []}
        )
        group["ranks"].append(rank.get("rank"))
        group["members"].append({k: rank.get(k) for k in ("node", "rank", "pid")})
        if rank["node"] not in group["nodes"]:
            group["nodes"].append(rank["node"])
    groups = sorted(
        by_stack.values(),
        key=lambda g: (-len(g["members"]), min(_rank_order(m) for m in g["members"])),
    )
    largest = max((len(g["members"]) for g in groups), default=0)
    for group in groups:
        group["odd_one_out"] = len(group["members"]) == 1 and largest > 1
    return groups


def _rank_order(member: dict[str, Any]) -> tuple[int, int]:
    rank = member.get("rank")
    return (0, rank) if isinstance(rank, int) else (1, member.get("pid") or 0)


def rank_ranges(ranks: Sequence[int | None]) -> str:
    """``0,2-3`` for ranks 0, 2 and 3; an unknown rank is ``?``."""
    numbers = sorted({rank for rank in ranks if isinstance(rank, int)})
    parts: list[str] = []
    start = previous = None
    for number in numbers:
        if previous is not None and number == previous + 1:
            previous = number
            continue
        if start is not None:
            parts.append(_span(start, previous))
        start = previous = number
    if start is not None:
        parts.append(_span(start, previous))
    if any(not isinstance(rank, int) for rank in ranks):
        parts.append("?")
    return ",".join(parts)


def _span(start: int, end: int | None) -> str:
    return str(start) if end in (None, start) else f"{start}-{end}"


_INSTALLED = re.compile(r"^.*/(?:site|dist)-packages/")


def frame_text(frame: dict[str, Any]) -> str:
    """``function (file:line)``, a file in site-packages shortened to its import path."""
    file = _INSTALLED.sub("", str(frame.get("file")))
    return f"{frame.get('function')} ({file}:{frame.get('line')})"


def format_report(report: StacksReport) -> str:
    """The human-readable report: groups, then what could not be dumped."""
    groups = report.groups()
    dumped = sum(len(group["members"]) for group in groups)
    nodes = list(dict.fromkeys(node for group in groups for node in group["nodes"]))
    if dumped:
        lines = [
            f"job {report.job_id}: {dumped} rank(s) dumped on {', '.join(nodes)} in "
            f"{len(groups)} group(s) of identical stacks (main thread, innermost frame last)"
        ]
    else:
        lines = [f"job {report.job_id}: no rank dumped"]
    for group in groups:
        count = len(group["members"])
        which = "rank" if count == 1 else "ranks"
        lines.append("")
        pid = f", pid {group['members'][0]['pid']}" if count == 1 else ""
        lines.append(
            f"{which} {rank_ranges(group['ranks'])} on {', '.join(group['nodes'])} "
            f"({count} of {dumped}{pid})"
            + ("   <-- the odd one out" if group["odd_one_out"] else "")
        )
        lines += [f"    {frame_text(frame)}" for frame in group["frames"]] or ["    (no frames)"]
    problems = [f"  {name}: {error}" for name, error in report.node_errors.items()] + [
        f"  rank {rank.get('rank', '?')} on {rank['node']} (pid {rank.get('pid')}): "
        f"{rank.get('error') or 'no threads in its dump'}"
        for rank in report.failed_ranks
    ]
    if problems:
        lines += ["", "not dumped:", *problems]
    return "\n".join(lines)
