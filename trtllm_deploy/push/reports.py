"""What the push agent says on a node, read back here: its report (a JSON object on its last line),
and which of several streams' reports says why a push stopped."""

from __future__ import annotations

import json


def reason_in(reports: list[dict] | None) -> dict | None:
    """The first of the parts' reports that says why it stopped, other than being cut short."""
    return next((r for r in reports or () if not r.get("ok") and r.get("kind") != "truncated"), None)


def report_in(out: str) -> dict | None:
    """The agent's report on the last line of ``out``, or None."""
    try:
        answer = json.loads((out.strip().splitlines() or [""])[-1])
    except ValueError:
        return None
    return answer if isinstance(answer, dict) and "ok" in answer else None
