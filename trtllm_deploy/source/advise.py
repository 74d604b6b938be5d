"""``invoke source.advise``: which source to use — build at the pinned commit, NVIDIA's release
image, a published wheel, or stay with the rollback runtime — decided from the cluster's facts and
the lock.

The plan's decision matrix as data: each option is judged on what can be checked (does it contain
every required fix? does it run on these GPUs? does the build node have the disk and memory?) and
costed (disk, time, what is still missing). The cheapest option that passes every check wins.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field

from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import Target, expand
from trtllm_deploy.source import cuda
from trtllm_deploy.source.image import last_source_build
from trtllm_deploy.source.make import jobs_for
from trtllm_deploy.source.pin import checkout_for
from trtllm_deploy.source.plan import look
from trtllm_deploy.source.release import RELEASE_ARCHS
from trtllm_deploy.source.lock import Fix, LockFile
from trtllm_deploy.source.tree import Checkout, missing_from

# $1 a folder that may not exist yet: the bytes free on the file system it would be made on.
FREE_BYTES = Script("measure the free space for the build",
                    'p=$1; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; '
                    'df -B1 --output=avail "$p" | tail -1')
SOURCE_BUILD_GB = 63        # the TensorRT-LLM source build's disk need (docs/SOURCES.md#building-from-source)
GB = 1024 ** 3


@dataclass
class Option:
    kind: str                   # source | release | wheel | the rollback runtime's name
    usable: bool
    fixes: str                  # "all 2 present", "missing #8803", "unknown: ..."
    disk: str
    time: str
    reasons: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"kind": self.kind, "usable": self.usable, "fixes": self.fixes, "disk": self.disk,
                "time": self.time, "reasons": self.reasons}


@dataclass
class Advice:
    choice: str
    options: list[Option]

    def as_json(self) -> dict:
        return {"choice": self.choice, "options": [option.as_json() for option in self.options]}


PREFERENCE = ("release", "wheel", "source")   # cheapest first; the rollback runtime when none is usable


def _fixes_in(tree: Checkout | None, commit: str | None, fixes: list[Fix],
              what: str) -> tuple[bool | None, str]:
    """Usable when every fix any deployment needs is there, as source.update and source judge it;
    one that only a deployment across nodes needs, missing, is said, not refused."""
    if not fixes:
        return True, "none required"
    if tree is None or not commit:
        return None, f"unknown: {what}"
    missing = missing_from(tree.resolve_fixes(commit, fixes))
    refused = [fix for fix in missing if fix.needed_for == "any"]
    if refused:
        return False, "missing " + ", ".join(f"{fix.name} ({fix.missing})" for fix in refused)
    if missing:
        return True, ("serves on one node only: missing "
                      + ", ".join(f"{fix.name} ({fix.missing})" for fix in missing))
    return True, f"all {len(fixes)} present"


def _free_bytes(target: Target, path: str) -> int | None:
    probe = scripts.run(target, FREE_BYTES, path, check=False)
    return int(probe.stdout.strip()) if probe.ok and probe.stdout.strip().isdigit() else None


def advise(cluster: Cluster, lockfile: LockFile, reach: Callable[[Node], Target] = connect, *,
           fallback: str, product: str) -> Advice:
    """The options judged, and the choice; ``fallback`` names the rollback runtime (``product``
    in the user's words), the choice when no TensorRT-LLM option is usable."""
    lock = lockfile.lock
    facts = look(cluster, reach)
    builder = cluster.build_node
    mine = facts[builder.name]
    capabilities = sorted({c for f in facts.values() for c in f.capabilities})
    target = reach(builder)
    try:
        tree = checkout_for(cluster, target, lock.source.repository)
        has_tree = target.run(["test", "-d", posixpath.join(tree.directory, ".git")], check=False,
                              timeout=60).ok
        if has_tree:  # tags tell which commit a wheel version is; failing that, "unknown"
            tree.git("fetch", "--quiet", "--tags", "origin", check=False, timeout=600)
        clone = tree if has_tree else None
        free = _free_bytes(target, expand(builder.paths.build, target.home()))
        release = _release_facts(target, lock.release.image) if lock.release.image else None
        wheel_commit = None
        if clone and lock.wheel.version:
            found = clone.git("rev-parse", "--verify", "--quiet", f"v{lock.wheel.version}^{{commit}}",
                              check=False, timeout=60)
            wheel_commit = found.stdout.strip() if found.ok else None
        options = [
            _source_option(lockfile, clone, free, mine, capabilities,
                           last_source_build(target, f"{builder.paths.state}/logs")),
            _release_option(lockfile, clone, release, capabilities, mine.arch),
            _wheel_option(lockfile, clone, wheel_commit),
        ]
    finally:
        target.close()
    usable = {option.kind for option in options if option.usable}
    choice = next((kind for kind in PREFERENCE if kind in usable), fallback)
    options.append(Option(fallback, True, "not applicable", "its own image", "already known",
                          [f"the rollback target: stay with {product} until a TensorRT-LLM option passes"]
                          if choice == fallback else ["kept as the rollback target"]))
    return Advice(choice, options)


def _source_option(lockfile: LockFile, clone, free: int | None, mine, capabilities,
                   last: dict | None) -> Option:
    lock = lockfile.lock
    reasons = []
    ok_fixes, fixes = _fixes_in(clone, lock.source.commit, lock.fixes,
                                "no commit pinned or no clone yet (invoke source.update)")
    usable = ok_fixes is True
    if not lock.source.commit:
        reasons.append("no commit pinned: run invoke source.update")
    if free is not None and free < SOURCE_BUILD_GB * GB:
        usable = False
        reasons.append(f"the build path has {free / GB:.0f} GB free; the build needs about "
                       f"{SOURCE_BUILD_GB} GB")
    for capability in capabilities:
        covered, how = cuda.covers(lock.build.cuda_archs, capability)
        if not covered:
            usable = False
            reasons.append(how)
    jobs, why = jobs_for(mine.mem_available, mine.cpus)
    reasons.append(f"CUDA_ARCHS {lock.build.cuda_archs}; {why}")
    disk = f"about {SOURCE_BUILD_GB} GB" + (f" ({free / GB:.0f} GB free)" if free is not None else "")
    if last:
        # Compile time scales about inversely with the jobs that run at once.
        estimate = last["seconds"] * max(1, last.get("jobs") or 1) / jobs
        time = (f"about {_duration(estimate)} with {jobs} jobs (the last source build here took "
                f"{_duration(last['seconds'])} with {last.get('jobs')} jobs)")
    else:
        time = (f"the longest: compiles TensorRT-LLM's C++/CUDA with {jobs} parallel jobs (hours; "
                "no build measured on this node yet)")
    return Option("source", usable, fixes, disk, time, reasons)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{max(1, minutes)} min"


def _release_facts(target: Target, reference: str) -> dict | None:
    seen = target.run(["docker", "image", "inspect", "--format", "{{json .Config.Env}}|{{.Size}}",
                       reference.split("@")[0]], check=False, timeout=60)
    if not seen.ok:
        return None
    env, size = seen.stdout.strip().split("|", 1)
    values = dict(item.split("=", 1) for item in json.loads(env or "[]") or [] if "=" in item)
    return {"commit": values.get("TRT_LLM_GIT_COMMIT"), "version": values.get("TRT_LLM_VERSION"),
            "size": int(size)}


def _release_option(lockfile: LockFile, clone, release: dict | None, capabilities, arch) -> Option:
    lock = lockfile.lock
    if not lock.release.image:
        return Option("release", False, "unknown", "–", "–",
                      ["no release image in the lock ([release] image)"])
    reasons = [f"{lock.release.image}"]
    if "@sha256:" not in lock.release.image:
        reasons.append("not pinned by digest yet")
    if release is None:
        return Option("release", False, "unknown: the image is not on the build node",
                      "the image's size (known after a pull)", "a pull",
                      reasons + ["pull it on the build node, then advise again to check its fixes"])
    ok_fixes, fixes = _fixes_in(clone, release["commit"], lock.fixes,
                                "the image does not say its commit, or there is no clone")
    usable = ok_fixes is True
    archs = RELEASE_ARCHS.get(arch, "")
    for capability in capabilities:
        covered, how = cuda.covers(archs, capability) if archs else (False, "unknown architectures")
        reasons.append(f"compute capability {capability}: {how}")
        usable = usable and covered
    if release["version"]:
        reasons.append(f"reports TensorRT-LLM {release['version']}")
    return Option("release", usable, fixes, f"{release['size'] / GB:.1f} GB (already pulled)",
                  "minutes: a thin overlay on an image already here", reasons)


def _wheel_option(lockfile: LockFile, clone, commit: str | None) -> Option:
    lock = lockfile.lock
    if not lock.wheel.version:
        return Option("wheel", False, "unknown", "–", "–", ["no wheel version in the lock ([wheel])"])
    ok_fixes, fixes = _fixes_in(clone, commit, lock.fixes,
                                f"tag v{lock.wheel.version} not found in the clone")
    reasons = [f"tensorrt-llm {lock.wheel.version}"
               + (f" = tag v{lock.wheel.version} ({commit[:12]})" if commit else ""),
               "its CUDA architectures are the ones upstream built it for (not checked here)"]
    if not lockfile.requirements_path or not lockfile.requirements_path.exists():
        reasons.append("requirements not resolved yet: set [build] kind = \"wheel\" and run "
                       "invoke source.update")
    return Option("wheel", ok_fixes is True, fixes, "the base image plus the wheel's packages",
                  "minutes: a pip install onto the base image", reasons)
