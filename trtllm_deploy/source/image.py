"""``invoke image``: the upstream image build at the locked commit, on the build node, labelled.

Look first (the build node's architecture, cores and memory; every node's architecture and GPU
compute capability; an image already carrying this lock's hash), decide (refuse a cross-architecture
build, check CUDA_ARCHS covers every GPU, size the parallel compile jobs from memory), then run
``make -C docker release_build ...`` detached on the build node with the whole log in a file,
following it for a progress bar, and explain a failure from the log.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trtllm_deploy import __version__
from trtllm_deploy.errors import CheckFailed, DeployError, InputError
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.shell import join, quote
from trtllm_deploy.hosts.targets import Target, connect, expand
from trtllm_deploy.source import buildlog, cuda
from trtllm_deploy.source.lock import LockFile

ROOT = Path(__file__).resolve().parents[2]
IMAGE_NAME = "trtllm-deploy/tensorrt-llm"
LABEL_LOCK = "io.trtllm-deploy.lock-hash"
LABEL_ARCHS = "io.trtllm-deploy.cuda-archs"
LABEL_OPTIONS = "io.trtllm-deploy.build-options"
LABEL_BUILDER = "io.trtllm-deploy.builder"
LABEL_KIND = "io.trtllm-deploy.source-kind"
GB = 1024 ** 3
PER_JOB_GB = 8      # a CUDA compile job of TensorRT-LLM's kernels peaks at several GB
RESERVE_GB = 8      # left to the OS (and, on a Spark, the GPU: the memory is shared)


def image_ref(lockfile: LockFile) -> str:
    lock = lockfile.lock
    if lock.build.kind == "release" and lock.release.image:
        version = "release-" + lock.release.image.split("@")[0].rsplit(":", 1)[-1]
    elif lock.build.kind == "wheel":
        version = f"wheel-{lock.wheel.version}"
    else:
        version = lock.source.version or "unversioned"
    return f"{IMAGE_NAME}:{re.sub(r'[^A-Za-z0-9_.-]', '_', version)}-{lockfile.hash[:12]}"


def jobs_for(mem_available_bytes: int, cpus: int) -> tuple[int, str]:
    """Parallel compile jobs that fit in memory (the commonest build failure is the OOM killer)."""
    usable = max(0.0, mem_available_bytes / GB - RESERVE_GB)
    by_memory = max(1, int(usable // PER_JOB_GB))
    jobs = max(1, min(cpus, by_memory))
    why = (f"{jobs} jobs: {mem_available_bytes / GB:.0f} GB available − {RESERVE_GB} GB reserve, "
           f"{PER_JOB_GB} GB per compile job → {by_memory}; {cpus} cores")
    return jobs, why


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


# --- looking -----------------------------------------------------------------------------------

_FACTS = ("uname -m; nproc; grep MemAvailable /proc/meminfo; "
          "nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true")


@dataclass
class NodeFacts:
    arch: str
    cpus: int
    mem_available: int
    capabilities: list[str]


def node_facts(node: Node, target: Target) -> NodeFacts:
    lines = target.run(["sh", "-c", _FACTS], timeout=60).stdout.splitlines()
    mem_kb = int(lines[2].split()[1]) if len(lines) > 2 and "MemAvailable" in lines[2] else 0
    return NodeFacts(lines[0].strip(), int(lines[1]), mem_kb * 1024,
                     [line.strip() for line in lines[3:] if re.fullmatch(r"\d+\.\d+", line.strip())])


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


def _labels_on(target: Target, image: str) -> dict | None:
    seen = target.run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", image],
                      check=False, timeout=60)
    return (json.loads(seen.stdout or "null") or {}) if seen.ok else None


def plan(cluster: Cluster, lockfile: LockFile, tree: str = "", cuda_archs: str | None = None,
         jobs: int | None = None, ccache: bool = False,
         reach: Callable[[Node], Target] = connect) -> BuildPlan:
    """Every check that can refuse the build, before anything is built."""
    kind = lockfile.lock.build.kind
    if kind == "release":
        return plan_release(cluster, lockfile, reach)
    if kind == "wheel":
        return plan_wheel(cluster, lockfile, reach)
    lock = lockfile.lock
    facts = look(cluster, reach)
    builder = cluster.build_node
    mine = facts[builder.name]
    archs = cuda_archs or lock.build.cuda_archs
    notes = coverage(facts, archs, f"--cuda-archs, or [build] cuda_archs in {lockfile.path}")
    if jobs or lock.build.jobs:
        count = jobs or lock.build.jobs
        why = f"{count} jobs, as asked ({'--jobs' if jobs else 'build.jobs in the lock'})"
    else:
        count, why = jobs_for(mine.mem_available, mine.cpus)
    wheel_opts = lock.build.options.get("BUILD_WHEEL_OPTS", "")
    use_ccache = ccache and "ccache" not in wheel_opts
    if "ccache" in wheel_opts:
        notes.append("ccache: as the lock's BUILD_WHEEL_OPTS says")
    else:
        notes.append("ccache: used (the pinned tree's image build sets it up)" if use_ccache else
                     "ccache: not available at this pin (its Dockerfile.multi does not set it up)")
    image = image_ref(lockfile)
    found = labels(lockfile, archs)
    target = reach(builder)
    try:
        current = _labels_on(target, image)
    finally:
        target.close()
    up_to_date = bool(current) and current.get(LABEL_LOCK) == lockfile.hash \
        and current.get(LABEL_ARCHS) == archs
    return BuildPlan(builder.name, image, lockfile.hash, archs, count, why,
                     [make_argv(lockfile, tree, image, archs, count, found, use_ccache)], found,
                     up_to_date, notes)


# The upstream Makefile's default for arm64 when CUDA_ARCHS is not given (FACTS.md): what a
# release image is assumed to carry, since it does not say.
RELEASE_ARCHS = {"aarch64": "90-real;100-real;120-real"}
OVERLAY = ROOT / "docker" / "release-overlay"


WHEEL_CONTEXT = ROOT / "docker" / "wheel"


def plan_wheel(cluster: Cluster, lockfile: LockFile,
               reach: Callable[[Node], Target] = connect) -> BuildPlan:
    """The ``wheel`` kind: the lock's hash-pinned requirements installed onto its base image."""
    lock = lockfile.lock
    requirements = lockfile.requirements_path
    if not requirements or not requirements.exists():
        raise InputError(f"{lockfile.path}: the wheel kind needs its requirements file "
                         f"({requirements or 'wheel.requirements'}); run `invoke source.update`")
    look(cluster, reach)
    builder = cluster.build_node
    image = image_ref(lockfile)
    target = reach(builder)
    try:
        current = _labels_on(target, image)
        context = posixpath.join(expand(builder.paths.state, target.home()), "wheel-build")
        wheels = expand(lock.wheel.find_links, target.home()) if lock.wheel.find_links else None
    finally:
        target.close()
    found = labels(lockfile, "", None, lock.wheel.version, lock.build.base_image)
    commands = [["mkdir", "-p", f"{context}/wheels"]]
    if wheels:
        commands.append(["cp", "-a", f"{wheels}/.", f"{context}/wheels/"])
    commands.append(["docker", "build", "--force-rm", "--build-arg", f"BASE_IMAGE={lock.build.base_image}",
                     *(["--build-arg", "LOCAL_WHEELS=1"] if wheels else []),
                     *(word for key, value in found.items() for word in ("--label", f"{key}={value}")),
                     "--tag", image, context])
    notes = [f"tensorrt-llm {lock.wheel.version} from "
             + (f"the wheel folder {lock.wheel.find_links} on {builder.name}" if wheels
                else "the package index") + f", hash-pinned by {requirements.name}",
             "CUDA architectures: the ones upstream built the wheel for"]
    up_to_date = bool(current) and current.get(LABEL_LOCK) == lockfile.hash
    return BuildPlan(builder.name, image, lockfile.hash, "", 0, "no compile: a published wheel",
                     commands, found, up_to_date, notes,
                     upload=[(WHEEL_CONTEXT, context),
                             (requirements, posixpath.join(context, "requirements.txt"))])


def plan_release(cluster: Cluster, lockfile: LockFile,
                 reach: Callable[[Node], Target] = connect) -> BuildPlan:
    """The ``release`` kind: NVIDIA's release image, pinned by digest, under a thin overlay."""
    lock = lockfile.lock
    release = lock.release.image or ""
    facts = look(cluster, reach)
    builder = cluster.build_node
    notes = []
    archs = RELEASE_ARCHS.get(facts[builder.name].arch, "")
    if archs:
        notes += coverage(facts, archs, "a release image's architectures cannot be chosen: use "
                                        "the source kind")
        notes.append(f"CUDA_ARCHS of the release assumed to be upstream's arm64 default {archs!r}")
    image = image_ref(lockfile)
    target = reach(builder)
    try:
        # Looked up by name and tag: an image pulled by digest answers to that too, and one
        # with another digest must be found to be refused.
        env = target.run(["docker", "image", "inspect", "--format",
                          "{{json .Config.Env}}|{{json .RepoDigests}}", release.split("@")[0]],
                         check=False, timeout=60)
        current = _labels_on(target, image)
        context = posixpath.join(expand(builder.paths.state, target.home()), "release-overlay")
    finally:
        target.close()
    commands = []
    revision = version = None
    if env.ok:
        variables, digests = (json.loads(part or "null") or [] for part in env.stdout.split("|", 1))
        values = dict(item.split("=", 1) for item in variables if "=" in item)
        revision, version = values.get("TRT_LLM_GIT_COMMIT"), values.get("TRT_LLM_VERSION")
        if "@sha256:" in release and not any(d.endswith(release.split("@", 1)[1]) for d in digests):
            raise CheckFailed(f"{builder.name} has {release.split('@')[0]} but not with the locked "
                              f"digest (it has {digests or 'no registry digest'}); remove it there "
                              "(docker rmi) so the pinned one is pulled")
        notes.append(f"release image present on {builder.name}"
                     + (f": TensorRT-LLM {version} at {revision[:12]}" if revision and version else ""))
    else:
        commands.append(["docker", "pull", release])
        notes.append(f"{release} will be pulled on {builder.name}")
    if "@sha256:" not in release:
        notes.append("the release image is not pinned by digest: run `invoke source.update` once it "
                     "is on the build node to record its digest")
    found = labels(lockfile, "", revision, version, release)
    commands.append(["docker", "build", "--force-rm", "--build-arg", f"RELEASE_IMAGE={release}",
                     *(word for key, value in found.items() for word in ("--label", f"{key}={value}")),
                     "--tag", image, context])
    up_to_date = bool(current) and current.get(LABEL_LOCK) == lockfile.hash
    return BuildPlan(builder.name, image, lockfile.hash, archs, 0, "no compile: a release image",
                     commands, found, up_to_date, notes, upload=[(OVERLAY, context)])


def make_argv(lockfile: LockFile, tree: str, image: str, archs: str, jobs: int,
              image_labels: dict[str, str], ccache: bool = False) -> list[str]:
    """``make -C <tree>/docker release_build VAR=value ...`` with the lock's options."""
    options = dict(lockfile.lock.build.options)
    wheel_opts = " ".join(filter(None, [options.pop("BUILD_WHEEL_OPTS", ""), f"--job_count {jobs}",
                                        "--use_ccache" if ccache else ""]))
    name, tag = image.rsplit(":", 1)
    # The Makefile's own default (--pull --load: buildx must load the image into the engine),
    # then the labels, quoted for the recipe's shell.
    docker_opts = join(["--pull", "--load", *(word for key, value in image_labels.items()
                                              for word in ("--label", f"{key}={value}"))])
    return ["make", "-C", posixpath.join(tree, "docker"), lockfile.lock.build.make_target,
            f"CUDA_ARCHS={archs}", f"IMAGE_NAME={name}", f"IMAGE_TAG={tag}",
            f"IMAGE_WITH_TAG={image}",
            f"BUILD_WHEEL_OPTS={wheel_opts}", f"DOCKER_BUILD_OPTS={docker_opts}",
            *(f"{key}={value}" for key, value in sorted(options.items()))]


# --- building ----------------------------------------------------------------------------------

@dataclass
class BuildResult:
    image: str
    image_id: str
    seconds: float
    log: str            # the log file on the build node


Progress = Callable[[buildlog.Progress], None]


def last_source_build(target: Target, log_dir: str) -> dict | None:
    """The newest finished source build recorded on the build node (seconds, jobs), if any."""
    found = target.run(["sh", "-c", 'cat $(ls -t "$1"/image-*.log.json 2>/dev/null) 2>/dev/null || true',
                        "sh", expand(log_dir, target.home())], check=False, timeout=60)
    for line in found.stdout.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "source" and record.get("seconds"):
            return record
    return None


def build(cluster: Cluster, build_plan: BuildPlan, log_dir: str, progress: Progress | None = None,
          poll_s: float = 1.0, reach: Callable[[Node], Target] = connect) -> BuildResult:
    """Run the build detached on the build node (an SSH hiccup does not kill it), follow its log,
    and stop it on Ctrl-C. A failure is explained from the log."""
    target = reach(cluster.build_node)
    started = time.monotonic()
    try:
        directory = expand(log_dir, target.home())
        stamp = time.strftime("%Y%m%d-%H%M%S")
        log = posixpath.join(directory, f"image-{stamp}-{build_plan.lock_hash[:12]}.log")
        steps = " && ".join(join(argv) for argv in build_plan.commands)
        script = f"{{ {steps}; }} >{quote(log)} 2>&1; echo $? >{quote(log + '.rc')}"
        target.run(["mkdir", "-p", directory], timeout=60)
        for local, remote in build_plan.upload:
            target.run(["rm", "-rf", remote], timeout=60)
            target.put(local, remote)
        pid = target.run(["sh", "-c", 'setsid sh -c "$1" </dev/null >/dev/null 2>&1 & echo $!',
                          "sh", script], timeout=60).stdout.strip()
        try:
            code = _follow(target, log, progress, poll_s)
        except BaseException:
            target.run(["kill", "-TERM", "--", f"-{pid}"], check=False, timeout=30)
            raise
        if code != 0:
            text = target.run(["cat", log], check=False, timeout=300).stdout
            raise CheckFailed(explain(text, code, log, cluster.build_node.name))
        image_id, _, labels_json = target.run(
            ["docker", "image", "inspect", "--format", "{{.Id}} {{json .Config.Labels}}",
             build_plan.image], timeout=60).stdout.strip().partition(" ")
        got = json.loads(labels_json or "null") or {}
        wrong = {k: v for k, v in build_plan.labels.items() if got.get(k) != v}
        if wrong:
            raise DeployError(f"the build finished but {build_plan.image} lacks the labels "
                              f"{sorted(wrong)}: does the Makefile pass DOCKER_BUILD_OPTS to "
                              "docker build?")
        seconds = time.monotonic() - started
        # What this build cost, for source.advise's time estimate of the next one.
        record = json.dumps({"image": build_plan.image, "kind": build_plan.labels.get(LABEL_KIND),
                             "jobs": build_plan.jobs, "seconds": round(seconds, 1),
                             "lock_hash": build_plan.lock_hash})
        target.run(["sh", "-c", 'printf "%s\\n" "$1" > "$2"', "sh", record, f"{log}.json"],
                   check=False, timeout=60)
        return BuildResult(build_plan.image, image_id, seconds, log)
    finally:
        target.close()


def _follow(target: Target, log: str, progress: Progress | None, poll_s: float) -> int:
    tracker = buildlog.StageTracker()
    offset, pending = 1, ""
    while True:
        chunk = target.run(["sh", "-c", 'tail -c +"$1" "$2" 2>/dev/null; printf "\\n@@rc@@"; '
                            'cat "$2.rc" 2>/dev/null || true', "sh", str(offset), log],
                           check=False, timeout=120).stdout
        body, _, rc = chunk.rpartition("\n@@rc@@")
        offset += len(body.encode())
        lines = (pending + body).split("\n")
        pending = lines.pop()
        for line in lines:
            step = tracker.feed(line)
            if step and progress:
                progress(step)
        if rc.strip():
            return int(rc.strip())
        time.sleep(poll_s)


def explain(text: str, code: int, log: str, node: str) -> str:
    failure = buildlog.classify(text)
    if failure is None:
        tail = "\n".join(f"    {line}" for line in text.strip().splitlines()[-15:])
        return f"the image build failed on {node} (exit {code}); the whole log: {log}\n{tail}"
    evidence = "\n".join(f"    {line}" for line in failure.evidence)
    return (f"the image build failed on {node}: {failure.title} ({failure.kind}); the whole log: "
            f"{log}\n  the lines that show it:\n{evidence}\n  what to do: {failure.remedy}")


# --- verifying ---------------------------------------------------------------------------------

@dataclass
class Verdict:
    node: str
    image: str
    ok: bool
    detail: str


def verify(cluster: Cluster, lockfile: LockFile, nodes=None,
           reach: Callable[[Node], Target] = connect) -> list[Verdict]:
    """Every node's image against the lock: present, and labelled with this lock's hash and commit."""
    image = image_ref(lockfile)
    expected = {LABEL_LOCK: lockfile.hash}
    if lockfile.lock.build.kind == "source":
        expected["org.opencontainers.image.revision"] = lockfile.lock.source.commit

    def check(node: Node, target: Target) -> Verdict:
        seen = target.run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}",
                           image], check=False, timeout=60)
        if not seen.ok:
            return Verdict(node.name, image, False, "missing: build it (invoke image) and push it")
        got = json.loads(seen.stdout or "null") or {}
        wrong = [f"{key}={got.get(key)!r} (lock: {value[:12]})" for key, value in expected.items()
                 if got.get(key) != value]
        if wrong:
            return Verdict(node.name, image, False, "differs from the lock: " + "; ".join(wrong))
        revision = got.get("org.opencontainers.image.revision") or "unknown"
        return Verdict(node.name, image, True, f"{got.get(LABEL_KIND)}: commit {revision[:12]}, "
                       f"CUDA_ARCHS {got.get(LABEL_ARCHS) or 'the release default'}")

    results = fan_out(nodes or cluster.nodes, check, reach=reach)
    return [outcome.value if outcome.ok else Verdict(outcome.node.name, image, False, outcome.reason)
            for outcome in results]

