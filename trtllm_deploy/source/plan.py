"""What every image kind's plan is made of: the image's name and labels, the look at the nodes
(architecture, cores, memory, GPUs) and the plan record itself.

The kinds (:mod:`.make` from source, :mod:`.release`, :mod:`.wheel`) each turn these into a
:class:`BuildPlan`; :mod:`.image` picks the lock's kind, runs the plan and verifies the result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trtllm_deploy import __version__
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts.facts import Fact, gather
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.parsers import parse_meminfo
from trtllm_deploy.hosts.shell import join
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import Target, TargetError
from trtllm_deploy.source import cuda
from trtllm_deploy.source.lock import LockFile

ROOT = Path(__file__).resolve().parents[2]
IMAGE_NAME = "trtllm-deploy/tensorrt-llm"
LABEL_LOCK = "io.trtllm-deploy.lock-hash"
LABEL_ARCHS = "io.trtllm-deploy.cuda-archs"
LABEL_OPTIONS = "io.trtllm-deploy.build-options"
LABEL_BUILDER = "io.trtllm-deploy.builder"
LABEL_KIND = "io.trtllm-deploy.source-kind"


def image_ref(lockfile: LockFile) -> str:
    lock = lockfile.lock
    if lock.build.kind == "release" and lock.release.image:
        version = "release-" + lock.release.image.split("@")[0].rsplit(":", 1)[-1]
    elif lock.build.kind == "wheel":
        version = f"wheel-{lock.wheel.version}"
    else:
        version = lock.source.version or "unversioned"
    return f"{IMAGE_NAME}:{re.sub(r'[^A-Za-z0-9_.-]', '_', version)}-{lockfile.hash[:12]}"


def labels(lockfile: LockFile, cuda_archs: str, revision: str | None = None,
           version: str | None = None, base: str | None = None) -> dict[str, str]:
    """What the image says about itself (OCI keys where they fit). The revision, version and base
    are the source pin's unless given (a release image brings its own)."""
    lock = lockfile.lock
    base = base or lock.build.base_image or ""
    found = {
        "org.opencontainers.image.title": "TensorRT-LLM (built by trtllm-deploy)",
        "org.opencontainers.image.source": lock.source.repository,
        "org.opencontainers.image.revision": revision or lock.source.commit or "",
        "org.opencontainers.image.version": version or lock.source.version or "",
        "org.opencontainers.image.base.name": base.split("@")[0],
        LABEL_LOCK: lockfile.hash,
        LABEL_ARCHS: cuda_archs,
        LABEL_OPTIONS: json.dumps(dict(sorted(lock.build.options.items())), separators=(",", ":")),
        LABEL_BUILDER: f"trtllm-deploy {__version__}",
        LABEL_KIND: lock.build.kind,
    }
    if "@sha256:" in base:
        found["org.opencontainers.image.base.digest"] = base.split("@", 1)[1]
    return found


def label_words(image_labels: dict[str, str]) -> list[str]:
    """``docker build``'s ``--label KEY=VALUE`` for every label."""
    return [word for key, value in image_labels.items() for word in ("--label", f"{key}={value}")]


# --- looking -----------------------------------------------------------------------------------

NODE_FACTS = (
    Fact("arch", ("uname", "-m")),
    Fact("cpus", ("nproc",)),
    Fact("meminfo", ("cat", "/proc/meminfo")),
    Fact("gpus", ("nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader")),  # none: no GPU
)


@dataclass
class NodeFacts:
    arch: str
    cpus: int
    mem_available: int
    capabilities: list[str]


def node_facts(node: Node, target: Target) -> NodeFacts:
    seen = gather(target, NODE_FACTS)
    for name in ("arch", "cpus"):
        if not seen[name].ok or not seen[name].stdout.strip():
            raise TargetError(target.name, f"could not read the node's {name}: "
                              f"{seen[name].stderr or 'no answer'}")
    gpus = seen["gpus"].stdout.splitlines() if seen["gpus"].ok else []
    return NodeFacts(seen["arch"].stdout.strip(), int(seen["cpus"].stdout.strip()),
                     parse_meminfo(seen["meminfo"].stdout).get("MemAvailable", 0),
                     [line.strip() for line in gpus if re.fullmatch(r"\d+\.\d+", line.strip())])


def look(cluster: Cluster, reach: Callable[[Node], Target] = connect) -> dict[str, NodeFacts]:
    """Every node's architecture, cores, memory and GPUs; a cross-architecture build is refused."""
    seen = fan_out(cluster.nodes, node_facts, reach=reach)
    seen.raise_for_failures()
    facts = {outcome.node.name: outcome.value for outcome in seen}
    builder = cluster.build_node
    mine = facts[builder.name]
    wanted = {cluster.preflight.arch} | {f.arch for f in facts.values()}
    if wanted != {mine.arch}:
        others = ", ".join(sorted(wanted - {mine.arch}))
        raise CheckFailed(f"cross-architecture build refused: the build node {builder.name} is "
                          f"{mine.arch}, the image must run on {others} (hosts.toml [preflight] arch "
                          f"and the nodes themselves). Build on a node of the cluster: set "
                          "[cluster] build_node to one of them (a DGX Spark builds arm64 natively)")
    return facts


def coverage(facts: dict[str, NodeFacts], archs: str, where: str) -> list[str]:
    """Notes on how ``archs`` covers every GPU seen; an error if one is not covered."""
    capabilities = sorted({c for f in facts.values() for c in f.capabilities})
    if not capabilities:
        return ["no GPU answered nvidia-smi on any node: CUDA_ARCHS not checked against GPUs"]
    notes = []
    for capability in capabilities:
        ok, how = cuda.covers(archs, capability)
        if not ok:
            raise CheckFailed(f"CUDA_ARCHS {archs!r} does not cover the cluster's GPUs (compute "
                              f"capability {capability}): {how}. Use {cuda.archs_for(capabilities)!r}"
                              f" ({where})")
        notes.append(f"compute capability {capability}: {how}")
    return notes


def labels_on(target: Target, image: str) -> dict | None:
    """The labels of ``image`` in the node's engine; None where it does not have the image."""
    seen = target.run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", image],
                      check=False, timeout=60)
    return (json.loads(seen.stdout or "null") or {}) if seen.ok else None


def up_to_date(current: dict | None, lockfile: LockFile) -> bool:
    """The node's image was built from this lock (its hash is in the labels)."""
    return bool(current) and current.get(LABEL_LOCK) == lockfile.hash


# --- the plan ----------------------------------------------------------------------------------

@dataclass
class BuildPlan:
    node: str
    image: str
    lock_hash: str
    cuda_archs: str
    jobs: int
    jobs_why: str
    commands: list[list[str]]          # run one after another on the build node
    labels: dict[str, str]
    up_to_date: bool
    notes: list[str] = field(default_factory=list)
    upload: list[tuple[Path, str]] = field(default_factory=list)  # local files → where on the node

    def as_json(self) -> dict:
        return {"node": self.node, "image": self.image, "lock_hash": self.lock_hash,
                "cuda_archs": self.cuda_archs, "jobs": self.jobs, "jobs_why": self.jobs_why,
                "command": " && ".join(join(argv) for argv in self.commands), "labels": self.labels,
                "up_to_date": self.up_to_date, "notes": self.notes}
