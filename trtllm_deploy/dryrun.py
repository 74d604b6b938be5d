"""What a task would do, for ``--dry-run``: one line per node (or for this machine), printed as a
table or given as data with ``--json``. Building a plan may look at the nodes; it changes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

HERE = "this machine"


@dataclass
class Plan:
    task: str
    steps: list[tuple[str, str]] = field(default_factory=list)   # (node, what would be done there)
    notes: list[str] = field(default_factory=list)

    def add(self, node: str, what: str) -> Plan:
        self.steps.append((node, what))
        return self

    def as_json(self) -> dict:
        return {"task": self.task, "dry_run": True,
                "steps": [{"node": node, "action": what} for node, what in self.steps],
                "notes": self.notes}
