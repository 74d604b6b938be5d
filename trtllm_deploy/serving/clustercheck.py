"""``invoke cluster.check``: every node, seen from inside its runtime container by an MPI rank.

The job's containers start on every node (trtllm_deploy/serving/containers.py), ``mpirun`` runs the probe
(trtllm_deploy/serving/probe.py) once per node, and rank 0's gathered report is compared: what must be the
same everywhere (image, TensorRT-LLM, artifact manifest, driver, GPU) against the majority, what
is each node's own (its fabric variables and interfaces) against hosts.toml. The containers are
removed afterwards, whatever happened.

With the lock, two checks come first and need no container: an image named by digest must be that
digest on every node (trtllm_deploy/source/digest.py; a node whose tag moved is drift, and the probe
does not run), and the pin must have the fixes a job across this many nodes needs (launch.unfixed).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trtllm_deploy.artifact.manifest import MANIFEST
from trtllm_deploy.artifact.verify import check_name
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts.inventory import Cluster
from trtllm_deploy.runtimes import runtime
from trtllm_deploy.serving import containers, fabric, launch, probe
from trtllm_deploy.source import digest
from trtllm_deploy.source.lock import LockFile

JOB = "check"
TIMEOUT_S = 180.0
# The image's python that has mpi4py: python3 where it does (a TensorRT-LLM image), else a venv
# under /opt (the stand-in's).
FIND_PYTHON = ["sh", "-c", 'for p in python3 /opt/*/venv/bin/python3; do "$p" -c "import mpi4py" '
               '2>/dev/null && exec "$p" "$@"; done; echo "probe: no python with mpi4py on '
               '$(hostname)" >&2; exit 127', "find-python"]


def _joined(values: list) -> str | None:
    return ", ".join(str(v) for v in values) or None


# What must be the same on every node: (name, how to read it from one rank's report).
MUST_AGREE: tuple[tuple[str, Callable[[dict], object]], ...] = (
    ("image", lambda r: r["image"]["id"]),
    ("TensorRT-LLM version", lambda r: r["runtime"]["version"]),
    ("TensorRT-LLM commit", lambda r: r["runtime"]["commit"]),
    ("artifact manifest", lambda r: r["manifest"]["sha256"]),
    ("driver", lambda r: r["driver"]),
    ("compute capability", lambda r: _joined(r["gpu"]["compute_capability"])),
    ("GPU model", lambda r: _joined(r["gpu"]["names"])),
)


@dataclass(frozen=True)
class Drift:
    """One field on which the nodes disagree: the majority's value, and each node that differs."""

    field: str
    majority: object          # None when no value has more than half of the nodes
    majority_nodes: list[str]
    odd: dict[str, object]    # node -> its value

    def as_json(self) -> dict:
        return {"field": self.field, "majority": self.majority, "majority_nodes": self.majority_nodes,
                "odd": self.odd}


def node_of(rank: dict, cluster: Cluster) -> str:
    return rank.get("node") or (cluster.nodes[rank["rank"]].name
                                if rank["rank"] < len(cluster.nodes) else rank["host"])


def compare(values: dict[str, dict[str, object]]) -> list[Drift]:
    """``{field: {node: value}}`` → the fields that differ, each against its majority (pure)."""
    drifts = []
    for name, by_node in values.items():
        counts = Counter(repr(value) for value in by_node.values())
        if len(counts) <= 1:
            continue
        top, top_count = counts.most_common(1)[0]
        if top_count * 2 > len(by_node):
            majority = next(v for v in by_node.values() if repr(v) == top)
            drifts.append(Drift(name, majority, [n for n, v in by_node.items() if repr(v) == top],
                                {n: v for n, v in by_node.items() if repr(v) != top}))
        else:
            drifts.append(Drift(name, None, [], dict(by_node)))
    return drifts


def node_problems(cluster: Cluster, ranks: list[dict]) -> dict[str, list[str]]:
    """Each node's own checks: its communication variables are its hosts.toml values (not the
    head's), and every interface they name exists, is up and has an IPv4 address."""
    problems: dict[str, list[str]] = {}
    for rank in ranks:
        name = node_of(rank, cluster)
        mine = problems.setdefault(name, [])
        expected = fabric.fabric_env(cluster.node(name), runtime.default())   # as the check's containers
        for key, value in expected.items():
            seen = rank["env"].get(key)
            if seen != value:
                mine.append(f"{key}={seen!r}, hosts.toml says {value!r}")
        for iface in rank["interfaces"]:
            if not iface["exists"]:
                mine.append(f"interface {iface['name']} does not exist")
            elif iface["operstate"] not in ("up", "unknown"):
                mine.append(f"interface {iface['name']} is {iface['operstate']}")
            elif not iface["ipv4"] and not iface.get("ipv6"):
                mine.append(f"interface {iface['name']} has no IP address")
    return problems


@dataclass
class CheckReport:
    ranks: list[dict]
    drifts: list[Drift]
    problems: dict[str, list[str]]
    nodes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    digests: list[digest.Verdict] = field(default_factory=list)   # the image named by digest, per node
    fixes: str | None = None          # why the pin cannot serve across these nodes
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.drifts and not any(self.problems.values()) and self.fixes is None
                and all(verdict.ok for verdict in self.digests))

    def as_json(self) -> dict:
        return {"ok": self.ok, "nodes": self.nodes, "drift": [d.as_json() for d in self.drifts],
                "problems": self.problems, "digests": [v.as_json() for v in self.digests],
                "fixes": self.fixes, "warnings": self.warnings, "ranks": self.ranks,
                "seconds": round(self.seconds, 2)}


def evaluate(cluster: Cluster, gathered: dict) -> CheckReport:
    """The probe's gathered report judged: drift across nodes, and each node's own problems."""
    ranks = sorted(gathered["ranks"], key=lambda r: r["rank"])
    nodes = [node_of(rank, cluster) for rank in ranks]
    missing = [node.name for node in cluster.nodes if node.name not in nodes]
    values = {name: {node_of(rank, cluster): read(rank) for rank in ranks} for name, read in MUST_AGREE}
    problems = node_problems(cluster, ranks)
    for name in missing:
        problems[name] = ["no rank reported from this node"]
    return CheckReport(ranks, compare(values), problems, nodes)


def lock_checks(cluster: Cluster, image: str | None, lockfile: LockFile | None) -> CheckReport:
    """What is judged before any container starts: the pin's fixes for a job on these nodes, and
    the image (``image``, else the head's container.image) where it is named by digest."""
    report = CheckReport([], [], {}, [node.name for node in cluster.nodes])
    try:
        report.warnings = launch.unfixed(lockfile, runtime.default().name, len(cluster.nodes))
    except CheckFailed as refused:
        report.fixes = str(refused)
    reference = digest.pinned_reference(lockfile, image or cluster.head.container.image or "")
    pin = digest.pin_of(reference) if reference else None
    if pin is not None:
        report.digests = digest.look(list(cluster.nodes), pin)
    return report


def run(cluster: Cluster, image: str | None = None, artifact: str | None = None,
        timeout: float = TIMEOUT_S, lockfile: LockFile | None = None) -> CheckReport:
    """Judge the lock's part (:func:`lock_checks`); then, unless the image is not the pinned one
    somewhere, start the check's containers, run the probe across all nodes, judge, remove them."""
    import time

    if artifact:
        check_name(artifact)
    started = time.monotonic()
    first = lock_checks(cluster, image, lockfile)
    if not all(verdict.ok for verdict in first.digests):
        first.seconds = time.monotonic() - started
        return first  # the probe would not run the pinned image everywhere: nothing is started
    pinned = tuple(sorted((v.node, v.image_id) for v in first.digests if v.image_id))
    job = containers.Job(JOB, image=first.digests[0].image if first.digests else image,
                         artifact=artifact, pinned=pinned)
    manifest = f"{containers.ARTIFACTS}/{artifact}/{MANIFEST}" if artifact else None
    with tempfile.TemporaryDirectory(prefix="trtllm-deploy-check-") as tmp:
        try:
            containers.up(cluster, job, Path(tmp))
            # Rank 0 also writes the report into the head's log folder: mpirun's output forwarding
            # may cut a long report apart, a file does not.
            report_file = f"{containers.LOGS}/probe.json"
            argv = containers.mpirun_argv(cluster, [*FIND_PYTHON, containers.PROBE, "--out", report_file,
                                                    *(["--manifest", manifest] if manifest else [])])
            head = containers.enter(cluster, JOB)
            head.run(["rm", "-f", report_file], timeout=60, check=False)
            done = head.run(argv, timeout=timeout, check=False)
            written = head.run(["cat", report_file], timeout=60, check=False)
        finally:
            stopped = containers.down(cluster, JOB)
    try:
        gathered = json.loads(written.stdout) if written.ok else probe.parse_output(done.stdout)
    except ValueError:
        tail = "\n    ".join((done.stderr or done.stdout).strip().splitlines()[-12:])
        raise CheckFailed(f"the probe did not report (mpirun exited with {done.exit_code}):\n    {tail}"
                          ) from None
    report = evaluate(cluster, gathered)
    report.digests, report.fixes, report.warnings = first.digests, first.fixes, first.warnings
    for outcome in stopped:
        if not outcome.ok or not outcome.value.clean:
            report.problems.setdefault(outcome.node.name, []).append(
                "the check's container was not removed: "
                + (outcome.reason if not outcome.ok else "; ".join(outcome.value.leftovers)))
    report.seconds = time.monotonic() - started
    return report
