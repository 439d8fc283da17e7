"""The launcher's side of the node agent: one agent command per action, on many nodes at once.

Every action on a node is ``<python> -m ugro.launcher.agent <verb> ...`` run through the
node's shell (remote.py); the agent answers with one JSON object. Actions on several nodes run
in parallel threads, one per node, so a launch on 4 nodes takes about as long as on 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from .inventory import Inventory, Node
from .remote import LocalShell, RemoteError, SshOptions, SshShell, shell_for

T = TypeVar("T")


class AgentError(RuntimeError):
    """The agent could not be run on a node, or gave no answer; the message names the node."""


class NodeSet:
    """Open shells to some nodes of an inventory, closed together."""

    def __init__(self, inventory: Inventory, nodes: Iterable[Node], options: SshOptions) -> None:
        self.inventory = inventory
        self.nodes = list(nodes)
        self.shells: dict[str, LocalShell | SshShell] = {
            node.name: shell_for(node, options) for node in self.nodes
        }

    def __enter__(self) -> NodeSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for shell in self.shells.values():
            shell.close()

    def agent_argv(self, verb: str, *args: str) -> list[str]:
        return [self.inventory.defaults.python, "-m", "ugro.launcher.agent", verb, *args]

    def agent(self, node: Node, verb: str, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run one agent verb on one node and return its JSON answer."""
        shell = self.shells[node.name]
        try:
            result = shell.run(self.agent_argv(verb, *args), timeout=timeout)
        except RemoteError as error:
            raise AgentError(str(error)) from error
        lines = result.stdout.strip().splitlines()
        if result.exit_code == 0 and lines:
            try:
                answer = json.loads(lines[-1])
            except ValueError:
                answer = None
            if isinstance(answer, dict):
                return answer
        raise AgentError(f"{node.name}: {_explain(result.exit_code, result.stderr, self)}")

    def each(
        self, action: Callable[[Node], T], which: list[Node] | None = None
    ) -> dict[str, T | Exception]:
        """``action`` on every node (or those in ``which``) in parallel; a node's exception
        is its result."""
        targets = self.nodes if which is None else which

        def guarded(node: Node) -> T | Exception:
            try:
                return action(node)
            except (AgentError, RemoteError) as error:
                return error

        if not targets:
            return {}
        pool = ThreadPoolExecutor(max_workers=len(targets))
        futures = [pool.submit(guarded, node) for node in targets]
        try:
            results = [future.result() for future in futures]
        finally:
            # An interrupt (Ctrl-C) still lets every node's action finish: a rollback must
            # not race a start that is still under way on some node.
            _wait_uninterrupted(futures)
            pool.shutdown(wait=True)
        return {node.name: result for node, result in zip(targets, results, strict=True)}


def _wait_uninterrupted(futures: list[Future]) -> None:
    pending = list(futures)
    while pending:
        try:
            wait(pending)
            return
        except KeyboardInterrupt:
            continue


def _explain(exit_code: int, stderr: str, nodes: NodeSet) -> str:
    python = nodes.inventory.defaults.python
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if exit_code == 127:
        return f"{python} not found (defaults.python in the inventory)"
    if "No module named" in last and "ugro" in last:
        return f"ugro is not installed for {python}: {last}"
    return f"the agent failed (exit code {exit_code}): {last or 'no output'}"
