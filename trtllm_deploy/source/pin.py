"""The pin: ``invoke source.update`` resolves a ref to a commit on the build node and rewrites the
lock; ``invoke source`` puts the build node's tree at exactly that commit."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from trtllm_deploy import atomic
from trtllm_deploy.dryrun import Plan
from trtllm_deploy.errors import CheckFailed, DeployError
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Cluster
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import Target, expand
from trtllm_deploy.source import cuda, wheel
from trtllm_deploy.source import lock as locks
from trtllm_deploy.source.plan import node_facts
from trtllm_deploy.source.tree import Checkout, lock_from, require_fixes


def checkout_for(cluster: Cluster, target: Target, repository: str) -> Checkout:
    """The TensorRT-LLM clone in the build node's build directory."""
    build_dir = expand(cluster.build_node.paths.build, target.home())
    return Checkout(target, posixpath.join(build_dir, "TensorRT-LLM"), repository)


@dataclass
class UpdateReport:
    path: Path
    before: locks.Lock | None
    after: locks.Lock
    changed: bool
    fixes_checked: int
    warnings: list[str] = field(default_factory=list)   # e.g. a fix only several nodes need, missing
    interface_gaps: list[str] = field(default_factory=list)   # accepted with --accept-interface-changes
    interface_data: Path | None = None   # the folder refreshed from the checkout, where it was

    def as_json(self) -> dict:
        source = self.after.source
        return {"lock": str(self.path), "changed": self.changed, "commit": source.commit,
                "previous_commit": self.before.source.commit if self.before else None,
                "ref": source.ref, "version": source.version, "trtllm_build": source.trtllm_build,
                "submodules": {s.path: s.commit for s in source.submodules},
                "base_image": self.after.build.base_image, "fixes_verified": self.fixes_checked,
                "lock_hash": self.after.lock_hash, "warnings": self.warnings,
                "missing_fixes": {fix.name: fix.missing for fix in self.after.fixes if fix.missing},
                "interface_gaps": self.interface_gaps,
                "interface_data": str(self.interface_data) if self.interface_data else None}


class InterfaceCheck(Protocol):
    """What source.update asks of the project about a new commit's interface (the serving
    runtimes and the project's own generators know it; see cli/pinned_interface.py)."""

    paths: tuple[str, ...]   # the files of the TensorRT-LLM tree that say the interface

    def gaps(self, texts: dict[str, str | None], version: str, commit: str,
             trtllm_build: bool | None) -> tuple[list[str], list[str]]:
        """(every flag or key the project uses that the commit lacks, what could not be checked)"""

    def record(self, directory: Path, texts: dict[str, str | None], version: str, commit: str,
               repository: str) -> bool:
        """Make ``directory`` the commit's recorded interface; False where the texts cannot say it."""

    def recorded_commit(self, directory: Path) -> str | None:
        """The commit whose interface ``directory`` holds, or None."""


def interface_dir(lock_path: Path) -> Path:
    """Where the pinned TensorRT-LLM's interface data lives beside a lock: for the project's own
    ``requirements/tensorrt-llm.lock.toml``, ``requirements/interface/tensorrt-llm``."""
    return lock_path.resolve().parent / "interface" / "tensorrt-llm"


def update(cluster: Cluster, path: Path, ref: str | None = None, repository: str | None = None,
           base_image: str | None = None, dry_run: bool = False,
           interface: InterfaceCheck | None = None, accept_interface_changes: bool = False) -> UpdateReport:
    """Resolve ``ref`` to a SHA on the build node, describe that commit, check the required fixes
    and (given ``interface``) that the commit's interface has every flag and key the project uses,
    and rewrite the lock (like pip-compile: kept choices stay, facts are refreshed). A commit that
    lacks a fix every deployment needs, or a flag or key the project uses (unless
    ``accept_interface_changes``), is refused with every reason at once and nothing written."""
    before = locks.load(path).lock if path.exists() else None
    repository = repository or (before.source.repository if before else
                                "https://github.com/NVIDIA/TensorRT-LLM.git")
    ref = ref or (before.source.ref if before else "main")
    target = connect(cluster.build_node)
    try:
        tree = checkout_for(cluster, target, repository)
        tree.ensure_repository()
        commit = tree.resolve(ref)
        if not tree.fetch(commit):
            raise DeployError(f"{repository} advertises {commit} for {ref!r} but will not serve it")
        described = tree.describe(commit)
        after = lock_from(described, before, repository, ref, base_image)
        fixes = tree.resolve_fixes(commit, after.fixes)
        texts = tree.read(commit, interface.paths) if interface else {}
        refused, warnings, gaps = [], [], []
        try:   # every reason to refuse the pin at once: the fixes it lacks and the interface
            warnings += require_fixes(fixes, commit)
        except CheckFailed as error:
            refused.append(str(error))
        if interface:
            gaps, unchecked = interface.gaps(texts, described.version or "", commit, described.trtllm_build)
            warnings += unchecked
            if gaps and not accept_interface_changes:
                refused.append(refuse_interface(gaps, described))
        if refused:
            raise CheckFailed("\n".join(refused))
        after = after.model_copy(update={"fixes": fixes})
        requirements = None
        if after.build.kind == "wheel":
            requirements = wheel.resolve(target, after.build.base_image, after.wheel.version,
                                         after.wheel.find_links)
            after = after.model_copy(update={"wheel": after.wheel.model_copy(
                update={"requirements": after.wheel.requirements or wheel.REQUIREMENTS_NAME})})
        if after.release.image and "@sha256:" not in after.release.image:
            pinned = pin_digest(target, after.release.image)
            if pinned:
                after = after.model_copy(update={"release": after.release.model_copy(
                    update={"image": pinned})})
        build = after.build
        if build.base_image and "@sha256:" not in build.base_image:
            build = build.model_copy(update={"base_image": pin_digest(target, build.base_image)
                                             or build.base_image})
        if before is None or "cuda_archs" not in before.build.model_fields_set:
            derived = derive_cuda_archs(cluster)
            if derived:
                build = build.model_copy(update={"cuda_archs": derived})
        after = after.model_copy(update={"build": build})
        after = after.model_copy(update={"lock_hash": locks.lock_hash(after, locks.digest(requirements))})
    finally:
        target.close()
    written = path.parent / after.wheel.requirements if requirements else None
    changed = before != after or bool(written and (not written.exists()
                                                   or written.read_text() != requirements))
    refreshed = None
    if not dry_run:
        if changed:
            if written:
                atomic.write_text(written, requirements)
            locks.write(path, after)
        source, folder = after.source, interface_dir(path)
        if interface and interface.recorded_commit(folder) != source.commit and interface.record(
                folder, texts, source.version or "", source.commit, source.repository):
            refreshed = folder
    return UpdateReport(path, before, after, changed, len(after.fixes), warnings, gaps, refreshed)


def refuse_interface(gaps: list[str], described) -> str:
    lines = [f"{len(gaps)} flag(s) or key(s) the project uses are not in TensorRT-LLM "
             f"{described.version or '?'} at {described.commit[:12]}:"]
    lines += [f"  {gap}" for gap in gaps]
    lines.append("  what to do: keep the pin you have, update the project for the new interface, or "
                 "pass --accept-interface-changes to pin it anyway (the lock was not written)")
    return "\n".join(lines)


def derive_cuda_archs(cluster: Cluster) -> str | None:
    """CUDA_ARCHS for the GPUs the nodes have (12.1 → 121-real), or None where none answers."""
    seen = fan_out(cluster.nodes, node_facts)  # the facts `invoke image` looks at
    capabilities = [c for outcome in seen if outcome.ok for c in outcome.value.capabilities]
    return cuda.archs_for(capabilities) if capabilities else None


def pin_digest(target: Target, reference: str) -> str | None:
    """``name:tag@sha256:...`` from the registry digest of an image the node has, else None."""
    seen = target.run(["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", reference],
                      check=False, timeout=60)
    if not seen.ok:
        return None
    name = reference.rsplit(":", 1)[0] if ":" in reference.rsplit("/", 1)[-1] else reference
    for digest in json.loads(seen.stdout or "null") or []:
        if digest.split("@", 1)[0] == name:
            return f"{reference}@{digest.split('@', 1)[1]}"
    return None


@dataclass
class FetchReport:
    node: str
    directory: str
    commit: str
    action: str                  # "up to date" | "fetched"
    reasons: list[str] = field(default_factory=list)   # why it was not up to date
    trtllm_build: bool = False
    version: str | None = None
    ccache: bool = False
    warnings: list[str] = field(default_factory=list)   # a fix only several nodes need, missing

    def as_json(self) -> dict:
        return {"node": self.node, "directory": self.directory, "commit": self.commit,
                "action": self.action, "reasons": self.reasons, "trtllm_build": self.trtllm_build,
                "version": self.version, "ccache": self.ccache, "warnings": self.warnings}


def fetch(cluster: Cluster, lockfile: locks.LockFile) -> FetchReport:
    """The build node's tree at exactly the locked commit; up to date → no network, no work."""
    lockfile.require_resolved()
    source = lockfile.lock.source
    target = connect(cluster.build_node)
    try:
        tree = checkout_for(cluster, target, source.repository)
        state = tree.state(source)
        if state.matches(source.commit):
            warnings = require_fixes(tree.resolve_fixes(source.commit, lockfile.lock.fixes), source.commit)
            described = tree.describe(source.commit)
            return FetchReport(cluster.build_node.name, tree.directory, source.commit, "up to date",
                               trtllm_build=described.trtllm_build, version=described.version,
                               ccache=described.ccache, warnings=warnings)
        reasons = _why_not(state, source.commit)
        tree.ensure_repository()
        tree.check_out(source)
        described = tree.describe(source.commit)
        _check_against_lock(described, source, lockfile.path)
        after = tree.state(source)
        if not after.matches(source.commit):
            raise locks.LockError(lockfile.path, lockfile.path.read_text(), [locks.Problem(
                ("source",), "after the checkout the tree still differs from the lock: "
                + "; ".join(_why_not(after, source.commit)), "see the build node's tree")])
        warnings = require_fixes(tree.resolve_fixes(source.commit, lockfile.lock.fixes), source.commit)
    finally:
        target.close()
    return FetchReport(cluster.build_node.name, tree.directory, source.commit, "fetched", reasons,
                       described.trtllm_build, described.version, described.ccache, warnings)


def fetch_plan(cluster: Cluster, lockfile: locks.LockFile) -> Plan:
    """What :func:`fetch` would do, from the tree's state alone (no network, nothing written)."""
    lockfile.require_resolved()
    source = lockfile.lock.source
    target = connect(cluster.build_node)
    try:
        tree = checkout_for(cluster, target, source.repository)
        state = tree.state(source)
    finally:
        target.close()
    plan = Plan("source.fetch")
    where = cluster.build_node.name
    if state.matches(source.commit):
        return plan.add(where, f"nothing: {tree.directory} is at {source.commit[:12]} (up to date)")
    plan.add(where, f"{'clone' if not state.exists else 'fetch'} {source.repository} into {tree.directory}"
                    f" and check out {source.commit} with its submodules and LFS objects")
    plan.notes.append(f"because: {'; '.join(_why_not(state, source.commit))}")
    return plan


def _why_not(state, commit: str) -> list[str]:
    if not state.exists:
        return ["no clone yet"]
    reasons = []
    if state.head != commit:
        reasons.append(f"at {state.head[:12] if state.head else 'no commit'}, not {commit[:12]}")
    if not state.clean:
        reasons.append("local changes in the tree")
    if not state.submodules_ok:
        reasons.append("submodules not at their locked SHAs")
    if state.lfs_missing:
        reasons.append(f"{len(state.lfs_missing)} LFS object(s) missing, e.g. {state.lfs_missing[0]}")
    return reasons


def _check_against_lock(described, source: locks.Source, path: Path) -> None:
    """The commit's own submodule SHAs must be the locked ones (the lock was made from it)."""
    recorded = {s.path: s.commit for s in source.submodules}
    actual = {s.path: s.commit for s in described.submodules}
    if recorded != actual:
        differ = sorted(set(recorded.items()) ^ set(actual.items()))
        raise locks.LockError(path, path.read_text(), [locks.Problem(
            ("source", "submodules"),
            f"the lock's submodules differ from commit {source.commit[:12]}'s own: {differ[:4]}",
            "run `invoke source.update` to record them again")])
