"""Look before acting: what a node has for a job's container (its HOME, the image and its labels,
the NVIDIA runtime, InfiniBand, and the job's container if one runs), gathered before anything
changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.targets import Target

# HOME, the image "$1" (id, labels), the NVIDIA runtime, InfiniBand, the container "$2": a line each.
LOOK = Script("look at the node's image and containers", """
printf '%s\\n' "$HOME"
one() { out=$("$@" 2>/dev/null) && test -n "$out" && echo "$out" || echo none; }
one docker image inspect --format '{{.Id}} {{json .Config.Labels}}' "$1"
docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"nvidia"' && echo nvidia || echo no-nvidia
test -e /dev/infiniband && echo infiniband || echo no-infiniband
one docker container inspect --format '{{.State.Status}} {{json .Config.Labels}}' "$2"
""")


@dataclass(frozen=True)
class Facts:
    """What one node has, gathered before anything changes."""

    home: str
    image_id: str | None
    image_labels: dict[str, str]
    nvidia_runtime: bool
    infiniband: bool
    running: dict | None  # the job's container there: {"state": ..., "labels": {...}} or None


def gather(target: Target, image: str, container: str) -> Facts:
    """What the node has for a job's ``container`` of ``image``, in one round trip."""
    lines = scripts.run(target, LOOK, image, container).lines()
    home, image_line, runtime, infiniband, running_line = (lines + ["none"] * 5)[:5]
    image_id, labels = None, {}
    if image_line != "none":
        image_id, _, labels_text = image_line.partition(" ")
        labels = json.loads(labels_text or "null") or {}
    running = None
    if running_line != "none":
        state, _, labels_text = running_line.partition(" ")
        running = {"state": state, "labels": json.loads(labels_text or "null") or {}}
    return Facts(home, image_id, labels, runtime == "nvidia", infiniband == "infiniband", running)
