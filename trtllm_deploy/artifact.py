"""``invoke engine.plan`` and ``invoke engine.build``: the deployable artifact, on this machine.

At every TensorRT-LLM pin the artifact is what the PyTorch backend serves: the checkpoint's files at
a pinned Hub revision, the LLM-API YAML that suits DGX Spark, and a manifest (every file's size
and hash, plus provenance). It is named from model, precision, tp and the TensorRT-LLM lock, made
in a hidden folder beside its final place and renamed into it whole. The fit check runs before any
download; the same inputs with a verified manifest mean nothing to do.
"""

from __future__ import annotations

import os
import secrets as _random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from trtllm_deploy import __version__, fit, hub, manifest, models
from trtllm_deploy.errors import DeployError, InputError
from trtllm_deploy.group import fan_out
from trtllm_deploy.inventory import Cluster
from trtllm_deploy.source.image import image_ref
from trtllm_deploy.source.lock import LockFile

LLM_API_FILE = "llm-api.yaml"
BACKENDS = ("pytorch", "tensorrt")


@dataclass(frozen=True)
class Request:
    model: str
    precision: str | None = None
    tp: int | None = None
    backend: str = "pytorch"
    kv_gb: float | None = None


@dataclass
class Planned:
    variant: models.Variant
    tp: int
    fit: fit.Fit
    name: str
    nodes: int

    def as_json(self) -> dict:
        return {"artifact": self.name, "model": self.variant.model, "precision": self.variant.precision,
                "repo": self.variant.repo, "revision": self.variant.revision_text, "tp": self.tp,
                "fit": self.fit.as_dict()}


def node_memory(cluster: Cluster) -> tuple[fit.NodeMemory, ...]:
    """Each node's MemTotal, read over SSH from ``/proc/meminfo`` (head first)."""
    seen = fan_out(cluster.nodes, lambda node, target: target.run(["cat", "/proc/meminfo"],
                                                                   timeout=60).stdout)
    seen.raise_for_failures()
    return tuple(fit.NodeMemory.from_meminfo(outcome.node.name, outcome.value) for outcome in seen)


def plan(cluster: Cluster, lockfile: LockFile, catalog: models.Catalog, request: Request,
         nodes: tuple[fit.NodeMemory, ...] | None = None) -> Planned:
    """Everything that can refuse the build, before anything is downloaded."""
    if request.backend not in BACKENDS:
        raise InputError(f"--backend {request.backend!r}: expected one of {', '.join(BACKENDS)}")
    if request.backend == "tensorrt":
        if lockfile.lock.source.trtllm_build is False:
            raise InputError(
                "--backend tensorrt: the pinned TensorRT-LLM has no trtllm-build; the TensorRT-engine "
                "backend was removed from main in mid-2026 (FACTS.md). Serve the checkpoint with the "
                "PyTorch backend (the default), or pin an older commit that still has it")
        raise DeployError("--backend tensorrt: building TensorRT engines (convert_checkpoint.py, "
                          "trtllm-build) is not done by this version; use the PyTorch backend")
    variant = catalog.get(request.model).variant(request.precision)
    memory = nodes or node_memory(cluster)
    tp = request.tp or variant.recommended_tp(len(memory)) or 1
    if tp > len(memory):
        raise InputError(f"--tp {tp}: the cluster has {len(memory)} node(s) (one GPU each); "
                         f"use at most --tp {len(memory)}")
    result = fit.check(variant, tp, memory, kv_gb=request.kv_gb)
    name = f"{variant.model}-{variant.precision}-tp{tp}-{lockfile.hash[:8]}"
    return Planned(variant, tp, result, name, len(memory))


@dataclass
class Built:
    path: Path
    action: str                 # "built" | "up to date"
    revision: str
    files: int
    bytes: int
    seconds: float

    def as_json(self) -> dict:
        return {"path": str(self.path), "action": self.action, "revision": self.revision,
                "files": self.files, "bytes": self.bytes, "seconds": round(self.seconds, 2)}


def provenance(planned: Planned, lockfile: LockFile, revision: str, backend: str) -> dict:
    lock = lockfile.lock
    return {"model": planned.variant.model, "repo": planned.variant.repo, "revision": revision,
            "precision": planned.variant.precision, "tp": planned.tp, "backend": backend,
            "trtllm_commit": lock.source.commit, "trtllm_version": lock.source.version,
            "lock_hash": lockfile.hash, "cuda_archs": lock.build.cuda_archs,
            "image": image_ref(lockfile),  # the image `invoke image` makes from this lock
            "llm_api": planned.variant.llm_api(planned.nodes),
            "builder": f"trtllm-deploy {__version__}"}


def build(planned: Planned, lockfile: LockFile, store: Path, backend: str = "pytorch",
          cache_dir: Path | None = None, progress=None) -> Built:
    """Fetch, assemble, write the YAML and the manifest, then rename the artifact into place."""
    started = time.monotonic()
    planned.fit.require()
    variant = planned.variant
    revision = variant.revision or hub.resolve(variant.repo, "main")
    wanted = provenance(planned, lockfile, revision, backend)
    final = store / planned.name
    current = _current(final, wanted)
    if current is not None:
        return Built(final, "up to date", revision, len(current["files"]), current["total_bytes"],
                     time.monotonic() - started)
    snapshot = hub.fetch(variant.repo, revision, cache_dir=cache_dir, progress=progress)
    store.mkdir(parents=True, exist_ok=True)
    scratch = store / f".{planned.name}.partial-{_random.token_hex(4)}"
    try:
        _assemble(snapshot, scratch)
        (scratch / LLM_API_FILE).write_text(yaml.safe_dump(variant.llm_api(planned.nodes),
                                                           sort_keys=True))
        made = manifest.create(scratch, wanted | {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                             time.gmtime())})
        manifest.write(scratch, made)
        _swap_into_place(scratch, final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return Built(final, "built", revision, len(made["files"]), made["total_bytes"],
                 time.monotonic() - started)


def _current(final: Path, wanted: dict) -> dict | None:
    """The artifact's manifest if it was made from the same inputs and still verifies."""
    if not final.is_dir():
        return None
    try:
        found = manifest.load(final)
    except (manifest.ManifestError, OSError):
        return None
    same = {key: found.get("provenance", {}).get(key) for key in wanted} == wanted
    if not same or manifest.verify(final, found):
        return None
    return found


def _assemble(snapshot: Path, scratch: Path) -> None:
    """The snapshot's files, hard-linked from the Hub cache's blobs where the filesystem allows
    (no second copy of 100 GB of weights), copied otherwise."""
    for source in sorted(snapshot.rglob("*")):
        if source.is_dir():
            continue
        dest = scratch / source.relative_to(snapshot)
        dest.parent.mkdir(parents=True, exist_ok=True)
        blob = source.resolve()
        try:
            os.link(blob, dest)
        except OSError:
            shutil.copy2(blob, dest)


def _swap_into_place(scratch: Path, final: Path) -> None:
    """The new artifact takes the name in one rename; an old one is moved aside first and removed
    after, so the name always holds a whole artifact or none."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{_random.token_hex(4)}")
        os.rename(final, old)
    try:
        os.rename(scratch, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
