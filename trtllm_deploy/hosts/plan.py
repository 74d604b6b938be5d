"""Look, then act: a phase turns facts into a plan of changes per node, shows it, then applies it.

A step whose facts already match has no changes and says "up to date"; ``--dry-run`` stops after
showing the plan, so nothing changes on any host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from trtllm_deploy import console
from trtllm_deploy.hosts import shell
from trtllm_deploy.hosts.fanout import GroupResult, fan_out
from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import Target


@dataclass(frozen=True)
class Change:
    """One command that brings a node closer to what it should be."""

    description: str
    argv: tuple[str, ...]


@dataclass
class Step:
    node: Node
    name: str
    changes: list[Change] = field(default_factory=list)
    state: str = ""  # what the facts showed, for the report

    @property
    def up_to_date(self) -> bool:
        return not self.changes


@dataclass
class Plan:
    steps: list[Step]

    @property
    def up_to_date(self) -> bool:
        return all(step.up_to_date for step in self.steps)

    def show(self, title: str) -> None:
        rows = []
        for step in self.steps:
            if step.up_to_date:
                rows.append([step.node.name, step.name, console.status_cell("skip", "up to date"),
                             step.state])
            for change in step.changes:
                rows.append([step.node.name, step.name,
                             console.status_cell("warn", change.description),
                             shell.join(change.argv)])
        console.out.print(console.table(title, ["node", "step", "change", "command"], rows))

    def as_json(self) -> list[dict]:
        return [{"node": step.node.name, "step": step.name, "up_to_date": step.up_to_date,
                 "state": step.state,
                 "changes": [{"description": c.description, "argv": list(c.argv)}
                             for c in step.changes]}
                for step in self.steps]


def apply(plan: Plan, reach: Callable[[Node], Target] = connect) -> GroupResult[int]:
    """Run every change, node by node in parallel; a node stops at its first failed change."""
    by_node: dict[str, list[Step]] = {}
    for step in plan.steps:
        by_node.setdefault(step.node.name, []).append(step)
    nodes = [steps[0].node for steps in by_node.values() if any(s.changes for s in steps)]

    def work(node: Node, target: Target) -> int:
        done = 0
        for step in by_node[node.name]:
            for change in step.changes:
                target.run(change.argv)
                done += 1
        return done

    return fan_out(nodes, work, reach=reach)
