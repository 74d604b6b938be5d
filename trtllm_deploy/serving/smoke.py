"""``invoke smoke``: phase 3 on one node — the runtime image serves an artifact and answers.

Checks the image against the lock (TensorRT-LLM commit, compiled architectures against the node's
GPU), puts the artifact on the node (verified there), starts the runtime with the flags serving
needs, waits for readiness by progress (the wait goes on while the log moves, and ends on a
stall, not on a clock), sends a fixed prompt at temperature 0, checks a non-empty answer and a
minimum token rate, and stops everything it started, whatever happened.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path

from trtllm_deploy.dryrun import Plan
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import Target, expand
from trtllm_deploy.runtimes import failures, trtllm
from trtllm_deploy.serving import gate, launch
from trtllm_deploy.source import cuda
from trtllm_deploy.source.plan import LABEL_ARCHS, image_ref
from trtllm_deploy.source.lock import LockFile

CONTAINER = "trtllm-deploy-smoke"
SERVE_FLAGS = ("--ipc", "host", "--network", "host")  # plus the node's ulimits (hosts.toml)
GPU = Script("read the GPU's compute capability",
             "nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true\n")
NVIDIA_RUNTIME = Script("look for Docker's NVIDIA runtime",
                        "docker info --format '{{json .Runtimes}}' | grep -q nvidia\n")

@dataclass
class Step:
    name: str
    ok: bool | None        # None: not applicable here (said why)
    detail: str


@dataclass
class SmokeReport:
    node: str
    image: str
    standin: bool
    steps: list[Step] = field(default_factory=list)
    answer: str = ""
    tokens_per_s: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(step.ok is not False for step in self.steps) and bool(self.answer)

    def add(self, name: str, ok: bool | None, detail: str) -> None:
        self.steps.append(Step(name, ok, detail))

    def as_json(self) -> dict:
        return {"node": self.node, "image": self.image, "standin": self.standin, "ok": self.ok,
                "answer": self.answer, "tokens_per_s": round(self.tokens_per_s, 2),
                "seconds": round(self.seconds, 2),
                "steps": [{"name": s.name, "ok": s.ok, "detail": s.detail} for s in self.steps]}


def run(cluster: Cluster, lockfile: LockFile, artifact: Path, port: int = 8355,
        stall_s: float = 120.0, min_tokens_per_s: float = 1.0, max_tokens: int = 16) -> SmokeReport:
    node = cluster.head
    image = node.container.image or image_ref(lockfile)
    target = connect(node)
    started = time.monotonic()
    try:
        labels = _inspect(target, image)
        report = SmokeReport(node.name, image, labels.get("io.trtllm-deploy.standin") == "true")
        _check_image(report, target, labels, lockfile)
        remote = _place(report, node, target, artifact)
        config = (artifact / trtllm.CONFIG).exists()
        backend = list(launch.serve_backend(artifact, "/model"))
        try:
            _start(report, node, target, image, remote, port, config, backend)
            _wait_ready(report, target, node, port, stall_s)
            _ask(report, node, port, min_tokens_per_s, max_tokens)
        finally:
            target.run(["docker", "rm", "--force", CONTAINER], check=False, timeout=120)
            report.add("stop", True, f"container {CONTAINER} removed")
    finally:
        target.close()
    report.seconds = time.monotonic() - started
    return report


def plan(cluster: Cluster, lockfile: LockFile, artifact: Path, port: int = 8355,
         min_tokens_per_s: float = 1.0) -> Plan:
    """What :func:`run` would do on the head (``--dry-run``); nothing is looked at or changed."""
    node = cluster.head
    image = node.container.image or image_ref(lockfile)
    steps = Plan("smoke")
    steps.add(node.name, f"check {image} against the lock (its labels, CUDA_ARCHS)")
    steps.add(node.name, f"copy what it lacks of {artifact} into {node.paths.artifacts}/{artifact.name}, "
                         "verify it there")
    steps.add(node.name, f"start container {CONTAINER} from {image}: trtllm-serve on port {port}, tp 1")
    steps.add(node.name, f"ask one question (at least {min_tokens_per_s:g} tokens/s), then remove "
                         f"{CONTAINER}")
    return steps


def _inspect(target: Target, image: str) -> dict:
    seen = target.run(["docker", "image", "inspect", "--format",
                       "{{json .Config.Labels}}|{{json .Config.Env}}", image], check=False, timeout=60)
    if not seen.ok:
        raise CheckFailed(f"{target.name} has no image {image}: build it (invoke image) or load it")
    labels_text, env_text = seen.stdout.strip().split("|", 1)
    labels = json.loads(labels_text or "null") or {}
    for item in json.loads(env_text or "null") or []:
        key, _, value = item.partition("=")
        labels.setdefault(f"env:{key}", value)
    return labels


def _check_image(report: SmokeReport, target: Target, labels: dict, lockfile: LockFile) -> None:
    if report.standin:
        report.add("image", None, "the stand-in runtime (no GPU, no inference): TensorRT-LLM version "
                                  "and kernels are not checked")
    else:
        commit = labels.get("org.opencontainers.image.revision") or labels.get("env:TRT_LLM_GIT_COMMIT")
        wanted = lockfile.lock.source.commit
        if wanted and commit:
            report.add("image commit", commit == wanted,
                       f"{commit[:12]}" + ("" if commit == wanted else f", the lock says {wanted[:12]}"))
        else:
            report.add("image commit", None, "the image or the lock names no commit")
        version = labels.get("org.opencontainers.image.version") or labels.get("env:TRT_LLM_VERSION")
        wanted_version = lockfile.lock.source.version
        if version and wanted_version:
            report.add("image version", version == wanted_version, f"TensorRT-LLM {version}" + (
                "" if version == wanted_version else f", the lock says {wanted_version}"))
    archs = labels.get(LABEL_ARCHS, "")
    gpu = scripts.run(target, GPU).stdout.split()
    if not gpu:
        report.add("kernels", None, "no GPU on this node: not checked")
    elif archs:
        covered, how = cuda.covers(archs, gpu[0])
        report.add("kernels", covered, how)
    else:
        report.add("kernels", None, f"the image does not say its CUDA_ARCHS (GPU {gpu[0]})")


def _place(report: SmokeReport, node: Node, target: Target, artifact: Path) -> str:
    """The artifact in the node's artifact store, verified there against its manifest (push sends
    only what the node lacks; an artifact already there and whole costs one command)."""
    from trtllm_deploy import push

    remote = posixpath.join(expand(node.paths.artifacts, target.home()), artifact.name)
    sent = push.push([node], push.source(artifact.parent, artifact.name))
    sent.raise_for_failures()
    moved = sent[node.name].value.bytes_sent
    report.add("artifact", True, f"{artifact.name} " + (f"copied to {node.name}" if moved else
                                                          f"already on {node.name}") + ", verified there")
    return remote


def _start(report: SmokeReport, node: Node, target: Target, image: str, remote: str, port: int,
           config: bool, backend: list[str]) -> None:
    target.run(["docker", "rm", "--force", CONTAINER], check=False, timeout=120)
    gpus = scripts.run(target, NVIDIA_RUNTIME, check=False).ok
    argv = ["docker", "run", "--detach", "--name", CONTAINER, *(["--gpus", "all"] if gpus else []),
            *SERVE_FLAGS, *(arg for key, value in node.container.ulimits.items()
                            for arg in ("--ulimit", f"{key}={value}")),
            *(arg for key, value in node.container.env.items() for arg in ("--env", f"{key}={value}")),
            "--volume", f"{remote}:/model:ro", image,
            "trtllm-serve", "/model", *backend, "--host", launch.listen_address(node), "--port", str(port),
            "--tp_size", "1", *(["--config", f"/model/{trtllm.CONFIG}"] if config else [])]
    target.run(argv, timeout=300)
    report.add("start", True, f"{CONTAINER} on {node.name}" + ("" if gpus else " (no GPU runtime)"))


def _wait_ready(report: SmokeReport, target: Target, node: Node, port: int, stall_s: float) -> None:
    """Ready when /health answers. The wait goes on as long as the log keeps moving; a log that
    stands still for ``stall_s`` (or a container that stopped) ends it."""
    seen, started, last_change = "", time.monotonic(), time.monotonic()
    while True:
        if gate.healthy(node, port, path=trtllm.RUNTIME.health):
            logs = target.run(["docker", "logs", "--tail", "50", CONTAINER], check=False, timeout=60)
            last = _progress(logs.stdout + logs.stderr)
            report.add("ready", True, f"after {time.monotonic() - started:.0f} s"
                       + (f"; {last.split(']')[-1].strip()}" if last else ""))
            return
        logs = target.run(["docker", "logs", "--tail", "200", CONTAINER], check=False, timeout=60)
        text = logs.stdout + logs.stderr
        if text != seen:
            seen, last_change = text, time.monotonic()
        state = target.run(["docker", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}",
                            CONTAINER], check=False, timeout=60).stdout.split()
        if state and state[0] != "running":
            # Its last words may have come after the read above: read the log once more.
            final = target.run(["docker", "logs", "--tail", "200", CONTAINER], check=False, timeout=60)
            seen = final.stdout + final.stderr or seen
            raise CheckFailed(failures.explain(f"the runtime stopped (exit {state[1]}) before it was ready",
                                               seen, runtime=trtllm.RUNTIME.name))
        if time.monotonic() - last_change > stall_s:
            raise CheckFailed(failures.explain(f"no progress for {stall_s:.0f} s and not ready", seen,
                                               runtime=trtllm.RUNTIME.name))
        time.sleep(1)


def _progress(log: str) -> str:
    lines = [line for line in log.splitlines() if "Loading" in line or "startup complete" in line]
    return lines[-1].strip() if lines else ""


def _ask(report: SmokeReport, node: Node, port: int, min_rate: float, max_tokens: int) -> None:
    answer = gate.ask(node, port, max_tokens)
    report.answer, report.tokens_per_s = answer.text, answer.tokens_per_s
    report.add("answer", bool(report.answer), f"{answer.tokens} tokens: {report.answer[:60]!r}")
    report.add("token rate", report.tokens_per_s >= min_rate,
               f"{report.tokens_per_s:.1f} tokens/s (at least {min_rate:g})")
