"""Measured against the ceiling: each level's output tokens/s beside what the hardware allows at that
many streams (``expect.ceiling``), so a result says how far from the possible it is, not only how fast."""

from __future__ import annotations

import json
from pathlib import Path

from trtllm_deploy.errors import DeployError
from trtllm_deploy.measure import expect


def served_model(store: str | Path, artifact: str | None) -> tuple[str | None, str | None]:
    """The model and precision an artifact was made from, from its manifest in the local store."""
    if not artifact:
        return None, None
    try:
        provenance = json.loads((Path(store) / artifact / "trtllm-deploy-manifest.json").read_text())
    except (OSError, ValueError):
        return None, None
    found = provenance.get("provenance") or {}
    return found.get("model"), found.get("precision")


def against_ceiling(result: dict, model: str, precision: str | None, tp: int, hardware: str) -> dict:
    """Per concurrency: measured aggregate output tokens/s, the decode ceiling at that batch, and their
    ratio; or the reason there is none (a model the hardware tables do not know)."""
    rows = []
    if any("request_rate" in level for level in result["levels"]):
        return {"model": model, "precision": precision, "tp": tp, "hardware": hardware,
                "unavailable": "an open-loop request-rate run has no fixed batch, and the decode ceiling "
                               "is per batch: measure with --concurrency to see it"}
    for level in result["levels"]:
        batch = level["concurrency"]
        try:
            bound = expect.ceiling(model, precision, tp, hardware, batch=batch)
        except DeployError as exc:
            return {"model": model, "precision": precision, "tp": tp, "hardware": hardware,
                    "unavailable": str(exc).splitlines()[0]}
        measured = level["summary"]["output_tokens_per_s"]
        rows.append({"concurrency": batch, "measured_tokens_per_s": round(measured, 2),
                     "ceiling_tokens_per_s": round(bound.decode_tokens_per_s_bound, 2),
                     "efficiency": round(bound.efficiency(measured), 4)})
    return {"model": model, "precision": precision, "tp": tp, "hardware": hardware, "levels": rows}
