"""``invoke launch``: serve an artifact across the nodes, gated; and ``status``, ``logs``, ``stop``.

A deployment is one *job*: a runtime container on each of its nodes (containers.py), and ``mpirun``
in the head's container running ``trtllm-llmapi-launch trtllm-serve <artifact> --tp_size N
[--pp_size M] --config <artifact>/llm-api.yaml`` (or ``vllm serve`` for the rollback runtime), each
rank writing ``rank-<N>.log`` (and its pid) in its node's job log folder.

Ready means: the endpoint's /health answers (the wait goes on while the ranks' logs move, and ends
on a stall, a dead rank or a dead mpirun, not on a clock), and then a fixed prompt at temperature 0
is answered with at least the minimum token rate.

Before the previous deployment is stopped, everything that can be checked is: the new image is on
every node and the containers start; only then is the old job stopped and the new one launched (a
DGX Spark has no memory for two large models at once). The last deployment that passed its gate is
recorded on this machine as *last known good*, for rollback.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from trtllm_deploy import secrets
from trtllm_deploy.artifact import manifest
from trtllm_deploy.artifact.manifest import MANIFEST
from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import expand
from trtllm_deploy.runtimes import failures
from trtllm_deploy.serving import containers

PROMPT = "The capital of France is"
RUNTIMES = ("trtllm", "vllm")
STATE_DIR = "~/.local/state/trtllm-deploy/clusters"   # <cluster name>/deployments.json
# Each rank records its pid, then becomes the program with its output in its own log file.
RANK_WRAPPER = ('log=$TRTLLM_DEPLOY_LOG_DIR/rank-${OMPI_COMM_WORLD_RANK:-0}; echo $$ > "$log.pid"; '
                'exec "$@" >>"$log.log" 2>&1')
# vLLM: the node rank is the MPI rank; every node but the first runs headless (no API server).
VLLM_NODE_RANK = ('rank=${OMPI_COMM_WORLD_RANK:-0}; if [ "$rank" -gt 0 ]; then set -- "$@" --headless; fi; '
                  'exec "$@" --node-rank "$rank"')
VLLM_MASTER_PORT = 29501
# mpirun, detached in the head's container; its exit status is left beside its log.
MPIRUN_WRAPPER = ('cd "$TRTLLM_DEPLOY_LOG_DIR" && echo $$ > mpirun.pid && '
                  '"$@" >mpirun.log 2>&1; echo $? > mpirun.exit')
# Before a start, each node's logs of the job's previous run move to previous/ (pids and exit
# status included, so nothing stale is read as this run's).
ROTATE = ('cd "$1" 2>/dev/null || exit 0; rm -rf previous; mkdir previous; '
          'mv -f rank-* mpirun.* previous/ 2>/dev/null; exit 0')


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
    backend: tuple[str, ...] = ("--backend", "pytorch")
    env: tuple[tuple[str, str], ...] = ()
    nodes: tuple[str, ...] = ()
    master_addr: str | None = None   # vLLM: where the nodes meet (the head's fabric address)
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


def program(deployment: Deployment) -> list[str]:
    """The serving command every rank runs (inside its container)."""
    model = f"{containers.ARTIFACTS}/{deployment.artifact}"
    port = str(deployment.port)
    if deployment.runtime == "vllm":
        # vLLM's own multi-node mode: one process per node (node 0 serves HTTP, the others run
        # --headless), meeting at the head's address; mpirun only starts them and hands out ranks.
        return ["sh", "-c", VLLM_NODE_RANK, "vllm-node", "vllm", "serve", model,
                "--tensor-parallel-size", str(deployment.tp),
                "--pipeline-parallel-size", str(deployment.pp), "--distributed-executor-backend", "mp",
                "--nnodes", str(deployment.ranks), "--master-addr", deployment.master_addr or "127.0.0.1",
                "--master-port", str(VLLM_MASTER_PORT), "--host", "0.0.0.0", "--port", port]
    return ["trtllm-llmapi-launch", "trtllm-serve", model, *deployment.backend,
            "--tp_size", str(deployment.tp), "--pp_size", str(deployment.pp),
            "--host", "0.0.0.0", "--port", port, "--config", f"{model}/llm-api.yaml"]


def serve_backend(artifact: Path, inside: str) -> tuple[str, ...]:
    """trtllm-serve's backend options for the artifact (seen at ``inside`` in the container) as its
    manifest describes it: TensorRT engines take the tokenizer kept beside them; anything else is a
    checkpoint for the PyTorch backend."""
    try:
        backend = manifest.load(artifact).get("provenance", {}).get("backend", "pytorch")
    except (manifest.ManifestError, OSError):
        backend = "pytorch"
    if backend == "tensorrt":
        return ("--backend", "tensorrt", "--tokenizer", f"{inside}/tokenizer")
    return ("--backend", "pytorch")


def job_cluster(cluster: Cluster, deployment: Deployment) -> Cluster:
    """The nodes the job runs on: the named ones, else the first tp x pp (head first)."""
    if deployment.nodes:
        chosen = tuple(cluster.node(name) for name in deployment.nodes)
    else:
        chosen = cluster.nodes[:deployment.ranks]
    if len(chosen) != deployment.ranks:
        raise InputError(f"tp {deployment.tp} x pp {deployment.pp} = {deployment.ranks} ranks, one GPU per "
                         f"node, but {len(chosen)} node(s) are given: pass --tp/--pp to match the nodes")
    if not chosen[0].is_head:
        raise InputError(f"the job's first node must be the head ({cluster.head.name}): it runs mpirun "
                         "and serves HTTP")
    return replace(cluster, nodes=chosen)


# --- state on this machine ---------------------------------------------------------------------

def _state_path(cluster: Cluster) -> Path:
    return Path(os.path.expanduser(STATE_DIR)) / cluster.name / "deployments.json"


def state(cluster: Cluster) -> dict:
    """What this machine recorded about the cluster's deployments (one file per cluster name)."""
    try:
        return json.loads(_state_path(cluster).read_text())
    except (OSError, ValueError):
        return {}


def _record(cluster: Cluster, **changes) -> None:
    path = _state_path(cluster)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = state(cluster) | {key: value.as_json() if isinstance(value, Deployment) else value
                      for key, value in changes.items()}
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(temporary, path)


def current(cluster: Cluster) -> Deployment | None:
    found = state(cluster).get("current")
    return Deployment.from_json(found) if found else None


def last_good(cluster: Cluster) -> Deployment | None:
    found = state(cluster).get("last_good")
    return Deployment.from_json(found) if found else None


# --- launching -----------------------------------------------------------------------------------

@dataclass
class Launched:
    deployment: Deployment
    ready_s: float = 0.0
    answer: str = ""
    tokens_per_s: float = 0.0
    containers: dict[str, str] = field(default_factory=dict)  # node -> started/replaced/kept

    def as_json(self) -> dict:
        return {"deployment": self.deployment.as_json(), "ready_s": round(self.ready_s, 2),
                "answer": self.answer, "tokens_per_s": round(self.tokens_per_s, 2),
                "containers": self.containers}


def launch(cluster: Cluster, deployment: Deployment, tmp: Path, *, stall_s: float = 120.0,
           min_tokens_per_s: float = 1.0, report=lambda line: None) -> Launched:
    """Start ``deployment`` and gate it; on any failure its job is removed from every node (and the
    failure raised, explained from the ranks' logs)."""
    nodes = job_cluster(cluster, deployment)
    job = containers.Job(deployment.job, deployment.image, deployment.artifact, env=deployment.env)
    report(f"starting the runtime containers of {deployment.job} on {len(nodes.nodes)} node(s)")
    # The new job's containers start (idle) while the previous deployment still serves; a start
    # that fails anywhere is removed everywhere and leaves the previous one serving.
    started = containers.up(nodes, job, tmp)
    previous = current(cluster)
    if previous is not None and previous.job != deployment.job:
        report(f"stopping the previous deployment {previous.job}")
        try:
            stop(cluster, previous.job)
        except BaseException:
            containers.down(nodes, deployment.job)
            raise
    image_ids = {outcome.value.image_id for outcome in started}
    head = nodes.head
    deployment = replace(deployment, nodes=tuple(node.name for node in nodes.nodes),
                         master_addr=str(head.fabric.address or head.address or head.host),
                         image_id=image_ids.pop() if len(image_ids) == 1 else None,
                         manifest_sha256=deployment.manifest_sha256 or _manifest_hash(head, deployment),
                         started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    result = Launched(deployment, containers={o.node.name: o.value.action for o in started})
    _record(cluster, current=deployment)
    try:
        report(f"mpirun: {deployment.ranks} rank(s) of {deployment.runtime}")
        start_mpirun(nodes, deployment)
        result.ready_s = wait_ready(nodes, deployment, stall_s)
        report(f"ready after {result.ready_s:.0f} s; asking the gate prompt")
        result.answer, _, result.tokens_per_s = ask(nodes.head, deployment.port)
        if not result.answer:
            raise CheckFailed("the gate prompt got an empty answer")
        if result.tokens_per_s < min_tokens_per_s:
            raise CheckFailed(f"the gate prompt came at {result.tokens_per_s:.1f} tokens/s, under the "
                              f"minimum {min_tokens_per_s:g}")
    except BaseException:
        stop(cluster, deployment.job)
        _record(cluster, current=None)
        raise
    _record(cluster, current=deployment, last_good=deployment)
    return result


def _manifest_hash(node: Node, deployment: Deployment) -> str | None:
    """The SHA-256 of the served artifact's manifest on ``node`` (what results and status record)."""
    target = connect(node)
    try:
        store = expand(node.paths.artifacts, target.home())
        done = target.run(["sha256sum", f"{store}/{deployment.artifact}/{MANIFEST}"], check=False, timeout=60)
        return done.stdout.split()[0] if done.ok and done.stdout.split() else None
    finally:
        target.close()


def start_mpirun(cluster: Cluster, deployment: Deployment) -> None:
    """mpirun, detached, in the head's container; ``env`` (the same on every rank) forwarded."""
    rotated = fan_out(cluster.nodes, lambda node, target: target.run(
        ["sh", "-c", ROTATE, "sh", f"{containers.job_dir(node, target.home(), deployment.job)}/logs"],
        timeout=60))
    rotated.raise_for_failures()
    names = tuple(key for key, _ in deployment.env)
    argv = containers.mpirun_argv(cluster, ["sh", "-c", RANK_WRAPPER, "rank", *program(deployment)],
                                  forward_env=names)
    name = containers.container_name(cluster, deployment.job)
    target = connect(cluster.head)
    try:
        target.run(["docker", "exec", "--detach", name, "sh", "-c", MPIRUN_WRAPPER, "mpirun", *argv],
                   timeout=120)
    finally:
        target.close()


def healthy(node: Node, port: int, timeout: float = 3.0) -> bool:
    """Whether the endpoint on ``node`` answers /health with 200."""
    try:
        with urllib.request.urlopen(f"http://{node.host}:{port}/health", timeout=timeout) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


# One look at a node's job: each rank's pid alive or not and its log's size; on the head, mpirun's
# exit status once it has one.
_LOOK = """
cd "$TRTLLM_DEPLOY_LOG_DIR" 2>/dev/null || exit 0
for pid in rank-*.pid; do
  test -f "$pid" || continue
  rank=${pid%.pid}
  if kill -0 "$(cat "$pid")" 2>/dev/null; then state=alive; else state=dead; fi
  echo "$rank $state $(stat -c %s "$rank.log" 2>/dev/null || echo 0)"
done
test -f mpirun.exit && echo "mpirun exited $(cat mpirun.exit)"
exit 0
"""


@dataclass(frozen=True)
class Look:
    """What one node's job looks like now."""

    node: str
    ranks: dict[str, tuple[bool, int]]  # rank-N -> (alive, log bytes)
    mpirun_exit: int | None
    container: bool


def look(cluster: Cluster, deployment: Deployment) -> dict[str, Look]:
    name = containers.container_name(cluster, deployment.job)

    def one(node: Node, target) -> Look:
        seen = target.run(["docker", "exec", name, "sh", "-c", _LOOK], check=False, timeout=30)
        if not seen.ok:
            return Look(node.name, {}, None, False)
        ranks, code = {}, None
        for line in seen.stdout.splitlines():
            words = line.split()
            if words[:2] == ["mpirun", "exited"]:
                code = int(words[2]) if words[2:] and words[2].lstrip("-").isdigit() else -1
            elif len(words) == 3:
                ranks[words[0]] = (words[1] == "alive", int(words[2]) if words[2].isdigit() else 0)
        return Look(node.name, ranks, code, True)

    seen = fan_out(cluster.nodes, one)
    return {o.node.name: o.value if o.ok else Look(o.node.name, {}, None, False) for o in seen}


def trouble(looks: dict[str, Look], deployment: Deployment, head: str) -> str | None:
    """What is wrong with the job, in a sentence, or None when every part of it runs."""
    for name, seen in looks.items():
        if not seen.container:
            return f"the job's container on {name} is gone (or the node cannot be reached)"
        dead = [rank for rank, (alive, _) in seen.ranks.items() if not alive]
        if dead:
            return f"{', '.join(sorted(dead))} on {name} died"
    if looks[head].mpirun_exit is not None:
        return f"mpirun exited with status {looks[head].mpirun_exit}"
    return None


def wait_ready(cluster: Cluster, deployment: Deployment, stall_s: float, poll_s: float = 1.0) -> float:
    """Seconds until /health answers. Waits while the ranks' logs grow; gives up on a stall of
    ``stall_s``, a dead rank or mpirun (explained from the logs)."""
    started = last_change = time.monotonic()
    sizes: dict = {}
    while True:
        if healthy(cluster.head, deployment.port):
            return time.monotonic() - started
        looks = look(cluster, deployment)
        wrong = trouble(looks, deployment, cluster.head.name)
        if wrong:
            raise CheckFailed(explain(cluster, deployment, f"{wrong} before serving was ready"))
        now_sizes = {(node, rank): size for node, seen in looks.items()
                     for rank, (_, size) in seen.ranks.items()}
        if now_sizes != sizes:
            sizes, last_change = now_sizes, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            raise CheckFailed(explain(cluster, deployment,
                                      f"no progress in the ranks' logs for {stall_s:.0f} s and not ready"))
        time.sleep(poll_s)


class Answer(NamedTuple):
    text: str
    tokens: int
    tokens_per_s: float


def ask(node: Node, port: int, max_tokens: int = 16, timeout: float = 300.0) -> Answer:
    """The fixed prompt at temperature 0: the answer, its tokens and their rate (the gate of launch,
    deploy's verify and smoke)."""
    with urllib.request.urlopen(f"http://{node.host}:{port}/v1/models", timeout=10) as answer:
        model = json.load(answer)["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"http://{node.host}:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        reply = json.load(answer)
    seconds = time.monotonic() - started
    tokens = (reply.get("usage") or {}).get("completion_tokens") or 0
    return Answer(reply["choices"][0]["text"].strip(), tokens, tokens / seconds if seconds else 0.0)


# --- logs, explanation, stop ---------------------------------------------------------------------

def tails(cluster: Cluster, job: str, lines: int = 30, rank: int | None = None) -> dict[str, str]:
    """The last lines of every rank's log (and mpirun's, on the head), read on each node; kept after
    the containers are gone (they live in the node's state folder)."""
    pattern = "rank-*.log mpirun.log" if rank is None else f"rank-{rank}.log"

    def one(node: Node, target) -> dict[str, str]:
        folder = f"{containers.job_dir(node, target.home(), job)}/logs"
        out = target.run(["sh", "-c", f'cd "$1" 2>/dev/null || exit 0; for f in {pattern}; do '
                          'test -f "$f" && { echo "==> $f <=="; tail -n "$2" "$f"; }; done; exit 0',
                          "sh", folder, str(lines)], check=False, timeout=60).stdout
        found, name = {}, None
        for line in out.splitlines():
            if line.startswith("==> ") and line.endswith(" <=="):
                name = line[4:-4]
                found[name] = ""
            elif name:
                found[name] += line + "\n"
        return found

    seen = fan_out(cluster.nodes, one)
    return {f"{o.node.name}/{name}": text for o in seen if o.ok for name, text in o.value.items()}


def explain(cluster: Cluster, deployment: Deployment, what: str) -> str:
    """``what``, the known failure the ranks' logs show (with its remedy), and where each log ends."""
    logs = tails(cluster, deployment.job)
    everything = "\n".join(logs.values())
    known = failures.match(everything)
    lines = [what if known is None else f"{what}: {known.name}"]
    for name, text in sorted(logs.items()):
        last = [line for line in text.splitlines() if line.strip()][-3:]
        if last:
            lines.append(f"  {name}:")
            lines += [f"    {line}" for line in last]
    if known is not None:
        lines.append(f"  what to do: {known.remedy}")
    return secrets.redact("\n".join(lines))


def stop(cluster: Cluster, job: str):
    """Remove the job from every node, then check that nothing of it runs anywhere."""
    stopped = containers.down(cluster, job)
    bad = [o for o in stopped if not o.ok or not o.value.clean]
    if bad:
        where = [f"{o.node.name} ({o.reason if not o.ok else '; '.join(o.value.leftovers)})" for o in bad]
        raise CheckFailed("stop: the job still runs (or could not be checked) on " + ", ".join(where))
    found = current(cluster)
    if found is not None and found.job == job:
        _record(cluster, current=None)
    return stopped


def rollback(cluster: Cluster, image: str, tmp: Path, report=lambda line: None, **gate) -> Launched:
    """Stop TensorRT-LLM and serve the same checkpoint with vLLM from ``image``, gated the same way."""
    source = current(cluster) or last_good(cluster)
    if source is None:
        raise InputError("rollback: nothing is deployed or recorded, so there is no model to serve with vLLM")
    if source.runtime == "vllm":
        raise InputError(f"rollback: {source.job} already serves with vLLM")
    if "tensorrt" in source.backend:
        raise InputError(f"rollback: {source.artifact} holds TensorRT engines, which vLLM cannot serve; "
                         "build the checkpoint artifact (engine.build without --backend tensorrt) first")
    target = replace(source, job=f"{source.job[:35]}-vllm", runtime="vllm", image=image, backend=(),
                     image_id=None, manifest_sha256=None, started=None)
    report(f"rollback: serving {source.artifact} with vLLM ({image}) instead of {source.job}")
    return launch(cluster, target, tmp, report=report, **gate)
