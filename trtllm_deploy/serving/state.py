"""What this machine records about a cluster's deployments: the current one and the good ones.

One JSON file per cluster name (``~/.local/state/trtllm-deploy/clusters/<name>/deployments.json``),
replaced whole on every change. A :class:`Deployment` holds enough to start it again. *Good* means
served healthily for a while under supervision (supervise.GOOD_AFTER_S), not merely gated: ``good``
lists them newest first, ``last_good`` is the newest, and a rollback takes the newest that differs
from the failing deployment in what it serves (:func:`rollback_target`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from trtllm_deploy import atomic
from trtllm_deploy.hosts.inventory import Cluster

STATE_DIR = "~/.local/state/trtllm-deploy/clusters"   # <cluster name>/deployments.json
KEEP_GOOD = 5
# What a rollback target must differ in: what runs (artifact, image, runtime) and how (parallelism,
# options, environment); a deployment that differs only in its job name or port is the same again.
SERVES = ("artifact", "image", "runtime", "tp", "pp", "backend", "env")


@dataclass(frozen=True)
class Deployment:
    """What serves: runtime, image, artifact, parallelism, port — enough to start it again."""

    job: str
    runtime: str
    image: str
    artifact: str
    tp: int
    pp: int = 1
    port: int = 8355
    backend: tuple[str, ...] = ("--backend", "pytorch")   # the runtime's options for the artifact
    env: tuple[tuple[str, str], ...] = ()
    nodes: tuple[str, ...] = ()
    master_addr: str | None = None   # where the nodes meet (the head's fabric address)
    image_id: str | None = None
    manifest_sha256: str | None = None
    started: str | None = None

    @property
    def ranks(self) -> int:
        return self.tp * self.pp

    def as_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Deployment:
        fields = {key: tuple(tuple(v) if isinstance(v, list) else v for v in value)
                  if isinstance(value, list) else value for key, value in data.items()}
        return cls(**fields)


def _path(cluster: Cluster) -> Path:
    return Path(os.path.expanduser(STATE_DIR)) / cluster.name / "deployments.json"


def state(cluster: Cluster) -> dict:
    """What this machine recorded about the cluster's deployments (one file per cluster name)."""
    try:
        return json.loads(_path(cluster).read_text())
    except (OSError, ValueError):
        return {}


def record(cluster: Cluster, **changes) -> None:
    """Record ``current`` and/or ``last_good`` (a Deployment, or None), keeping the rest."""
    path = _path(cluster)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = state(cluster) | {key: value.as_json() if isinstance(value, Deployment) else value
                             for key, value in changes.items()}
    atomic.write_text(path, json.dumps(data, indent=2, sort_keys=True))


def current(cluster: Cluster) -> Deployment | None:
    found = state(cluster).get("current")
    return Deployment.from_json(found) if found else None


def last_good(cluster: Cluster) -> Deployment | None:
    found = state(cluster).get("last_good")
    return Deployment.from_json(found) if found else None


def good(cluster: Cluster) -> list[Deployment]:
    """The deployments that served healthily for a while, newest first."""
    found = state(cluster).get("good")
    if found is None:
        found = [state(cluster)["last_good"]] if state(cluster).get("last_good") else []
    return [Deployment.from_json(item) for item in found]


def promote(cluster: Cluster, deployment: Deployment) -> None:
    """Record ``deployment`` as good: first in ``good`` (a same-serving entry moves up), and last_good."""
    kept = [d for d in good(cluster) if differs(d, deployment)]
    listed = [deployment, *kept][:KEEP_GOOD]
    record(cluster, last_good=deployment, good=[d.as_json() for d in listed])


def differs(one: Deployment, other: Deployment) -> bool:
    """Whether the two run something different (SERVES: artifact, image, runtime, their options)."""
    return any(getattr(one, key) != getattr(other, key) for key in SERVES)


def rollback_target(cluster: Cluster, failing: Deployment) -> Deployment | None:
    """The newest good deployment that differs from ``failing`` in what it runs (SERVES)."""
    return next((d for d in good(cluster) if differs(d, failing)), None)
