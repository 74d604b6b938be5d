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

from trtllm_deploy import __version__, buildlog
from trtllm_deploy.errors import CheckFailed, DeployError, InputError
from trtllm_deploy.group import fan_out
from trtllm_deploy.inventory import Cluster, Node
from trtllm_deploy.shell import join, quote
from trtllm_deploy.source import cuda
from trtllm_deploy.source.lock import LockFile
from trtllm_deploy.targets import Target, connect, expand

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
    version = lockfile.lock.source.version or "unversioned"
    return f"{IMAGE_NAME}:{re.sub(r'[^A-Za-z0-9_.-]', '_', version)}-{lockfile.hash[:12]}"


def jobs_for(mem_available_bytes: int, cpus: int) -> tuple[int, str]:
    """Parallel compile jobs that fit in memory (the commonest build failure is the OOM killer)."""
    usable = max(0.0, mem_available_bytes / GB - RESERVE_GB)
    by_memory = max(1, int(usable // PER_JOB_GB))
    jobs = max(1, min(cpus, by_memory))
    why = (f"{jobs} jobs: {mem_available_bytes / GB:.0f} GB available − {RESERVE_GB} GB reserve, "
           f"{PER_JOB_GB} GB per compile job → {by_memory}; {cpus} cores")
    return jobs, why


def labels(lockfile: LockFile, cuda_archs: str) -> dict[str, str]:
    """What the image says about itself (OCI keys where they fit)."""
    lock = lockfile.lock
    base = lock.build.base_image
    found = {
        "org.opencontainers.image.title": "TensorRT-LLM (built by trtllm-deploy)",
        "org.opencontainers.image.source": lock.source.repository,
        "org.opencontainers.image.revision": lock.source.commit,
        "org.opencontainers.image.version": lock.source.version or "",
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


def _facts(node: Node, target: Target) -> NodeFacts:
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
    make_argv: list[str]
    labels: dict[str, str]
    up_to_date: bool
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"node": self.node, "image": self.image, "lock_hash": self.lock_hash,
                "cuda_archs": self.cuda_archs, "jobs": self.jobs, "jobs_why": self.jobs_why,
                "command": join(self.make_argv), "labels": self.labels,
                "up_to_date": self.up_to_date, "notes": self.notes}


def plan(cluster: Cluster, lockfile: LockFile, tree: str, cuda_archs: str | None = None,
         jobs: int | None = None, ccache: bool = False,
         reach: Callable[[Node], Target] = connect) -> BuildPlan:
    """Every check that can refuse the build, before anything is built."""
    lock = lockfile.lock
    if lock.build.kind != "source":
        raise InputError(f"{lockfile.path}: build.kind = {lock.build.kind!r}: `invoke image` builds "
                         "kind \"source\" (the release and wheel kinds are not built here yet)")
    seen = fan_out(cluster.nodes, _facts, reach=reach)
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
    archs = cuda_archs or lock.build.cuda_archs
    notes = []
    capabilities = sorted({c for f in facts.values() for c in f.capabilities})
    if not capabilities:
        notes.append("no GPU answered nvidia-smi on any node: CUDA_ARCHS not checked against GPUs")
    for capability in capabilities:
        ok, how = cuda.covers(archs, capability)
        if not ok:
            raise CheckFailed(f"CUDA_ARCHS {archs!r} does not cover the cluster's GPUs (compute "
                              f"capability {capability}): {how}. Use {cuda.archs_for(capabilities)!r}"
                              f" (--cuda-archs, or [build] cuda_archs in {lockfile.path})")
        notes.append(f"compute capability {capability}: {how}")
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
        existing = target.run(["docker", "image", "inspect", "--format",
                               "{{json .Config.Labels}}", image], check=False, timeout=60)
    finally:
        target.close()
    current = json.loads(existing.stdout or "null") if existing.ok else None
    up_to_date = bool(current) and current.get(LABEL_LOCK) == lockfile.hash \
        and current.get(LABEL_ARCHS) == archs
    return BuildPlan(builder.name, image, lockfile.hash, archs, count, why,
                     make_argv(lockfile, tree, image, archs, count, found, use_ccache), found,
                     up_to_date, notes)


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
        script = f"{join(build_plan.make_argv)} >{quote(log)} 2>&1; echo $? >{quote(log + '.rc')}"
        target.run(["mkdir", "-p", directory], timeout=60)
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
        image_id = target.run(["docker", "image", "inspect", "--format", "{{.Id}}",
                               build_plan.image], timeout=60).stdout.strip()
        got = json.loads(target.run(["docker", "image", "inspect", "--format",
                                     "{{json .Config.Labels}}", build_plan.image],
                                    timeout=60).stdout or "{}") or {}
        wrong = {k: v for k, v in build_plan.labels.items() if got.get(k) != v}
        if wrong:
            raise DeployError(f"the build finished but {build_plan.image} lacks the labels "
                              f"{sorted(wrong)}: does the Makefile pass DOCKER_BUILD_OPTS to "
                              "docker build?")
        return BuildResult(build_plan.image, image_id, time.monotonic() - started, log)
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
    expected = {LABEL_LOCK: lockfile.hash,
                "org.opencontainers.image.revision": lockfile.lock.source.commit}

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
        return Verdict(node.name, image, True,
                       f"commit {lockfile.lock.source.commit[:12]}, CUDA_ARCHS {got.get(LABEL_ARCHS)}")

    results = fan_out(nodes or cluster.nodes, check, reach=reach)
    return [outcome.value if outcome.ok else Verdict(outcome.node.name, image, False, outcome.reason)
            for outcome in results]

