"""``invoke launch``: serve an artifact across the nodes, gated; ``stop`` and ``rollback``.

A deployment is one *job*: a runtime container on each of its nodes (containers.py), and ``mpirun``
in the head's container running the runtime's serving program on every rank (for TensorRT-LLM,
``trtllm-llmapi-launch trtllm-serve <artifact> --tp_size N [--pp_size M] --config
<artifact>/llm-api.yaml``; see runtimes/), each rank writing ``rank-<N>.log`` (and its pid) in its
node's job log folder. It is ready when it passes the gate (gate.py).

Before the previous deployment is stopped, everything that can be checked is: the new image is on
every node and the containers start; only then is the old job stopped and the new one launched (a
DGX Spark has no memory for two large models at once). Passing the gate makes a deployment current,
not good: good is what supervise saw serve healthily for a while (state.py). ``roll_back`` is the
one meaning of rollback for deploy, supervise and ``invoke rollback``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from trtllm_deploy.artifact import manifest
from trtllm_deploy.artifact.manifest import MANIFEST
from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import expand
from trtllm_deploy.runtimes import runtime
from trtllm_deploy.runtimes.runtime import FORMATS, Serve
from trtllm_deploy.serving import containers
from trtllm_deploy.serving.gate import ask, wait_ready
from trtllm_deploy.serving.state import Deployment, current, last_good, record, rollback_target
from trtllm_deploy.source import digest
from trtllm_deploy.source.lock import LockFile
from trtllm_deploy.urls import is_ipv6

# Programs mpirun starts (argv, not scripts run on a node): each rank records its pid, then becomes
# the program with its output in its own log file; mpirun itself, detached in the head's container,
# leaves its exit status beside its log.
RANK_WRAPPER = ('log=$TRTLLM_DEPLOY_LOG_DIR/rank-${OMPI_COMM_WORLD_RANK:-0}; echo $$ > "$log.pid"; '
                'exec "$@" >>"$log.log" 2>&1')
MPIRUN_WRAPPER = ('cd "$TRTLLM_DEPLOY_LOG_DIR" && echo $$ > mpirun.pid && '
                  '"$@" >mpirun.log 2>&1; echo $? > mpirun.exit')
# Before a start, each node's logs of the job's previous run move to previous/ (pids and exit
# status included, so nothing stale is read as this run's).
ROTATE = Script("set the job's previous logs aside", """
cd "$1" 2>/dev/null || exit 0
rm -rf previous; mkdir previous
mv -f rank-* mpirun.* previous/ 2>/dev/null
exit 0
""")


def program(deployment: Deployment, listen: str = "0.0.0.0") -> list[str]:
    """The serving command every rank runs (inside its container): its runtime's."""
    return runtime.get(deployment.runtime).program(Serve(
        model=f"{containers.ARTIFACTS}/{deployment.artifact}", tp=deployment.tp, pp=deployment.pp,
        port=deployment.port, head=deployment.master_addr or "127.0.0.1", options=deployment.backend,
        listen=listen))


def listen_address(head: Node) -> str:
    """Where the endpoint listens on the head: every IPv4 address, or both families ("::") where the
    head is reached by an IPv6 address, which an IPv4-only listener would refuse."""
    return "::" if is_ipv6(head.host) else "0.0.0.0"


def serve_backend(artifact: Path, inside: str, serves: str = "") -> tuple[str, ...]:
    """The runtime's options (default: launch's runtime) for the artifact, seen at ``inside`` in
    the container, as its manifest describes it (TensorRT engines or a checkpoint)."""
    try:
        format = manifest.load(artifact).get("provenance", {}).get("backend", "pytorch")
    except (manifest.ManifestError, OSError):
        format = "pytorch"
    return (runtime.get(serves) if serves else runtime.default()).options(format, inside)


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


def unfixed(lockfile: LockFile | None, serves: str, nodes: int) -> list[str]:
    """The lock's fixes against a job of runtime ``serves`` on ``nodes`` node(s), before anything
    runs: refused (CheckFailed) when its ranks span nodes and the pin lacks a fix that needs; for
    one node, a warning per fix it lacks. The fixes are TensorRT-LLM's, so they bind only the
    runtime the lock pins (the default one), not the rollback runtime's own image."""
    if lockfile is None or serves != runtime.default().name:
        return []
    across = nodes > 1
    missing = lockfile.missing_fixes(across)
    if across and missing:
        lines = "\n".join(f"  {fix.name}: {fix.missing}" for fix in missing)
        raise CheckFailed(
            f"refused: this deployment's ranks span {nodes} nodes, and the TensorRT-LLM pinned by "
            f"{lockfile.path} lacks {len(missing)} fix(es) that serving across nodes needs; nothing "
            f"was started on any node:\n{lines}\n  what to do: pin a release that contains them "
            "(`invoke source.update --ref <tag>`, then invoke image), or serve on one node (--tp 1)")
    return [f"warning: the pinned TensorRT-LLM lacks {fix.name} ({fix.missing}); it is needed only "
            "across nodes, so this one-node deployment goes ahead; pin a release with it "
            "(`invoke source.update --ref <tag>`) before serving across nodes"
            for fix in lockfile.missing_fixes(True) if fix not in missing]


@dataclass
class Launched:
    deployment: Deployment
    ready_s: float = 0.0
    answer: str = ""
    tokens_per_s: float = 0.0
    containers: dict[str, str] = field(default_factory=dict)  # node -> started/replaced/kept
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"deployment": self.deployment.as_json(), "ready_s": round(self.ready_s, 2),
                "answer": self.answer, "tokens_per_s": round(self.tokens_per_s, 2),
                "containers": self.containers, "warnings": self.warnings}


def launch(cluster: Cluster, deployment: Deployment, tmp: Path, *, stall_s: float = 120.0,
           min_tokens_per_s: float = 1.0, report=lambda line: None,
           lockfile: LockFile | None = None) -> Launched:
    """Start ``deployment`` and gate it; on any failure its job is removed from every node (and the
    failure raised, explained from the ranks' logs). With ``lockfile``, a job across nodes on a pin
    that lacks a multi-node fix is refused first, and an image named by digest runs as the pinned
    image on every node (refused where a node has another)."""
    nodes = job_cluster(cluster, deployment)
    warnings = unfixed(lockfile, deployment.runtime, len(nodes.nodes))
    for line in warnings:
        report(line)
    pinned = digest.resolve(nodes, deployment.image) if deployment.image else {}
    job = containers.Job(deployment.job, deployment.image, deployment.artifact, env=deployment.env,
                         runtime=runtime.get(deployment.runtime), pinned=tuple(sorted(pinned.items())))
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
    result = Launched(deployment, containers={o.node.name: o.value.action for o in started},
                      warnings=warnings)
    record(cluster, current=deployment)
    try:
        report(f"mpirun: {deployment.ranks} rank(s) of {deployment.runtime}")
        start_mpirun(nodes, deployment)
        result.ready_s = wait_ready(nodes, deployment, stall_s)
        report(f"ready after {result.ready_s:.0f} s; asking the gate prompt")
        result.answer, _, result.tokens_per_s = ask(nodes.head, deployment.port,
                                                    models=runtime.get(deployment.runtime).ready)
        if not result.answer:
            raise CheckFailed("the gate prompt got an empty answer")
        if result.tokens_per_s < min_tokens_per_s:
            raise CheckFailed(f"the gate prompt came at {result.tokens_per_s:.1f} tokens/s, under the "
                              f"minimum {min_tokens_per_s:g}")
    except BaseException:
        stop(cluster, deployment.job)
        record(cluster, current=None)
        raise
    record(cluster, current=deployment)
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
    rotated = fan_out(cluster.nodes, lambda node, target: scripts.run(
        target, ROTATE, f"{containers.job_dir(node, target.home(), deployment.job)}/logs"))
    rotated.raise_for_failures()
    names = tuple(key for key, _ in deployment.env)
    argv = containers.mpirun_argv(cluster, ["sh", "-c", RANK_WRAPPER, "rank",
                                                    *program(deployment, listen_address(cluster.head))],
                                  forward_env=names)
    name = containers.container_name(cluster, deployment.job)
    target = connect(cluster.head)
    try:
        target.run(["docker", "exec", "--detach", name, "sh", "-c", MPIRUN_WRAPPER, "mpirun", *argv],
                   timeout=120)
    finally:
        target.close()


def stop(cluster: Cluster, job: str):
    """Remove the job from every node, then check that nothing of it runs anywhere."""
    stopped = containers.down(cluster, job)
    bad = [o for o in stopped if not o.ok or not o.value.clean]
    if bad:
        where = [f"{o.node.name} ({o.reason if not o.ok else '; '.join(o.value.leftovers)})" for o in bad]
        raise CheckFailed("stop: the job still runs (or could not be checked) on " + ", ".join(where))
    found = current(cluster)
    if found is not None and found.job == job:
        record(cluster, current=None)
    return stopped


def roll_back(cluster: Cluster, failing: Deployment, tmp: Path, report=lambda line: None,
              lockfile: LockFile | None = None, image: str | None = None, **gate) -> Launched:
    """Rollback, one meaning everywhere: the newest deployment that served healthily for a while and
    differs from ``failing`` (artifact, image or runtime); where none does, ``failing``'s artifact
    with the fallback runtime (its image: ``image``, else the lock's); else CheckFailed, saying why."""
    good, target = roll_back_target(cluster, failing, lockfile, image)
    if good:
        report(f"rollback: launching {target.job} ({target.runtime}, {target.artifact}, {target.image}), "
               f"the last deployment that served well and differs from {failing.job}")
    else:
        report(f"rollback: serving {failing.artifact} with {runtime.rollback().product} ({target.image}) "
               f"instead of {failing.job}")
    return launch(cluster, target, tmp, report=report, lockfile=lockfile, **gate)


def roll_back_target(cluster: Cluster, failing: Deployment, lockfile: LockFile | None = None,
                     image: str | None = None) -> tuple[bool, Deployment]:
    """What :func:`roll_back` launches instead of ``failing``, chosen the same way for the act and
    for ``--dry-run``'s plan: (True, a good deployment) or (False, the fallback runtime's);
    CheckFailed where there is nothing."""
    good = rollback_target(cluster, failing)
    if good is not None:
        return True, good
    to = runtime.rollback()
    image = image or (lockfile.lock.runtime_image(to.name) if lockfile is not None else None)
    why = "no deployment that served healthily for a while differs from it"
    if failing.runtime == to.name:
        raise CheckFailed(f"nothing to roll back to from {failing.job}: {why}, and it already runs "
                          f"{to.product}, the fallback")
    if not image:
        raise CheckFailed(f"nothing to roll back to from {failing.job}: {why}, and the lock has no "
                          f"[{to.name}] image for the {to.product} fallback")
    try:
        return False, fallback_target(cluster, image, failing)[1]
    except InputError as exc:
        raise CheckFailed(f"nothing to roll back to from {failing.job}: {why}, and {exc}") from None


def rollback(cluster: Cluster, image: str, tmp: Path, report=lambda line: None,
             lockfile: LockFile | None = None, source: Deployment | None = None, **gate) -> Launched:
    """Stop the deployment and serve the same checkpoint (``source``'s, else the current or last
    good deployment's) with the rollback runtime from ``image``, gated the same way."""
    source, target = fallback_target(cluster, image, source)
    report(f"rollback: serving {source.artifact} with {runtime.rollback().product} ({image}) instead of "
           f"{source.job}")
    return launch(cluster, target, tmp, report=report, lockfile=lockfile, **gate)


def fallback_target(cluster: Cluster, image: str, source: Deployment | None = None
                    ) -> tuple[Deployment, Deployment]:
    """The deployment rolled back from (``source``, else the current one, else the last good) and
    the one the fallback runtime serves instead; refused (InputError) where there is none to serve
    with it."""
    to = runtime.rollback()
    source = source or current(cluster) or last_good(cluster)
    if source is None:
        raise InputError(f"rollback: nothing is deployed or recorded, so there is no model to serve with "
                         f"{to.product}")
    if source.runtime == to.name:
        raise InputError(f"rollback: {source.job} already serves with {to.product}")
    format = runtime.get(source.runtime).format_of(source.backend)
    if format not in to.formats:
        raise InputError(f"rollback: {source.artifact} holds {FORMATS.get(format, format)}, which "
                         f"{to.product} cannot serve; build the checkpoint artifact (engine.build without "
                         "--backend tensorrt) first")
    inside = f"{containers.ARTIFACTS}/{source.artifact}"
    target = replace(source, job=f"{source.job[:39 - len(to.name)]}-{to.name}", runtime=to.name, image=image,
                     backend=to.options(format, inside), image_id=None, manifest_sha256=None, started=None)
    return source, target
