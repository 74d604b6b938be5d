"""``invoke deploy``: every phase in order, each skipped when the facts say it is done.

preflight → source → image → engine → push → check → launch → verify. Every phase looks before it
acts and reports one of: ``done`` (it changed something), ``up to date`` (the facts say nothing is
needed), ``skipped`` (not this deployment's business, with why), or, with ``dry_run``, what it
``would`` do per node. A failure stops the pipeline with the phase named; with
``on_failure="rollback"`` a deployment that fails its gate is rolled back (launch.roll_back: the last
deployment that served healthily and differs from it, else the fallback runtime the lock pins).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from trtllm_deploy import console, push
from trtllm_deploy.source import pin as sources
from trtllm_deploy.artifact import build as artifact
from trtllm_deploy.artifact import manifest, models
from trtllm_deploy.errors import CheckFailed, DeployError, InputError
from trtllm_deploy.hosts import preflight
from trtllm_deploy.hosts.connections import Connections
from trtllm_deploy.hosts.inventory import Cluster
from trtllm_deploy.runtimes import runtime as runtimes
from trtllm_deploy.serving import clustercheck, containers, delivery, gate, handover, jobs, launch
from trtllm_deploy.serving.state import Deployment, current
from trtllm_deploy.source import digest
from trtllm_deploy.source import image as images
from trtllm_deploy.source.lock import LockFile
from trtllm_deploy.urls import http_url

PHASES = ("preflight", "source", "image", "engine", "push", "check", "launch", "verify")
POLICIES = ("stop", "rollback")


@dataclass(frozen=True)
class Request:
    model: str | None = None           # engine.build this model (with precision, tp) ...
    precision: str | None = None
    artifact_dir: Path | None = None   # ... or deploy this artifact as it is
    tp: int | None = None
    image: str | None = None           # the runtime image (default: hosts.toml's, else the lock's)
    job: str = "serve"
    port: int = 8355
    env: tuple[tuple[str, str], ...] = ()
    store: Path = Path("engines")
    on_failure: str = "stop"
    dry_run: bool = False
    stall_s: float = 120.0
    min_tokens_per_s: float = 1.0
    transport: str = "ssh"


@dataclass
class Phase:
    name: str
    action: str              # done | up to date | skipped | would … | failed
    detail: str
    seconds: float = 0.0
    nodes: dict[str, str] = field(default_factory=dict)   # per-node words, where they differ
    data: dict = field(default_factory=dict)              # the same for machines, where a phase has it

    def as_json(self) -> dict:
        return {"phase": self.name, "action": self.action, "detail": self.detail,
                "seconds": round(self.seconds, 3), "nodes": self.nodes, **self.data}


@dataclass
class Report:
    phases: list[Phase] = field(default_factory=list)
    deployment: Deployment | None = None
    failed: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed is None

    def as_json(self) -> dict:
        return {"ok": self.ok, "failed": self.failed, "phases": [p.as_json() for p in self.phases],
                "deployment": self.deployment.as_json() if self.deployment else None,
                "warnings": self.warnings}


Progress = Callable[[str, str], None]   # (phase, what it is doing now)


def run(cluster: Cluster, lockfile: LockFile, catalog: models.Catalog, request: Request,
        progress: Progress = lambda phase, line: None) -> Report:
    """The pipeline; raises DeployError (with the phase in the message) after recording it."""
    if request.on_failure not in POLICIES:
        raise InputError(f"--on-failure {request.on_failure!r}: expected one of {', '.join(POLICIES)}")
    if bool(request.model) == bool(request.artifact_dir):
        raise InputError("deploy needs exactly one of --model (engine.build makes the artifact) or "
                         "--artifact-dir (an artifact made already)")
    push.check_transport(request.transport)
    # A job across nodes on a pin without a multi-node fix is refused before any node is touched,
    # where the tp is known already (given, or in the artifact's manifest); else once engine plans it.
    known_tp = request.tp or (_manifest_tp(Path(request.artifact_dir)) if request.artifact_dir
                              and (Path(request.artifact_dir) / manifest.MANIFEST).is_file() else None)
    if known_tp:
        launch.unfixed(lockfile, runtimes.default().name, known_tp)
    with Connections() as shared:  # one SSH connection per node for every phase, closed at the end
        return _run(shared.share(cluster), lockfile, catalog, request, progress)


def _run(cluster: Cluster, lockfile: LockFile, catalog: models.Catalog, request: Request,
         progress: Progress) -> Report:
    report = Report()
    state: dict = {"warnings": report.warnings}
    steps = {"preflight": _preflight, "source": _source, "image": _image, "engine": _engine,
             "push": _push, "check": _check, "launch": _launch, "verify": _verify}
    for name in PHASES:
        progress(name, "looking")
        started = time.monotonic()
        try:
            phase = steps[name](cluster, lockfile, catalog, request, state,
                                lambda line, name=name: progress(name, line))
        except BaseException as exc:
            report.phases.append(Phase(name, "failed", str(exc).splitlines()[0] if str(exc) else
                                       type(exc).__name__, time.monotonic() - started))
            report.failed = name
            report.deployment = current(cluster)
            if isinstance(exc, DeployError):
                raise type(exc)(f"deploy stopped at {name}: {exc}") from exc
            raise
        phase.seconds = time.monotonic() - started
        report.phases.append(phase)
    report.deployment = state.get("deployment")
    return report


# --- the phases ------------------------------------------------------------------------------

def _preflight(cluster, lockfile, catalog, request, state, say) -> Phase:
    seen = preflight.run(cluster, cluster.nodes)
    checks = [check for observation in seen for check in preflight.evaluate(observation, cluster)]
    checks += preflight.driver_checks(cluster, cluster.nodes)
    failed = [check for check in checks if check.status == preflight.FAIL]
    warned = [check for check in checks if check.status == preflight.WARN]
    if failed:
        lines = "\n".join(f"  {c.node}: {c.name}: {c.detail}" + (f"\n    what to do: {c.remedy}"
                                                                  if c.remedy else "") for c in failed)
        raise CheckFailed(f"{len(failed)} check(s) failed; nothing was changed on any node\n{lines}")
    return Phase("preflight", "done", f"{len(cluster.nodes)} node(s) ready"
                 + (f", {len(warned)} warning(s): " + "; ".join(f"{c.node} {c.name}" for c in warned[:3])
                    if warned else ""))


def _named_image(cluster: Cluster, request: Request) -> str | None:
    return request.image or cluster.head.container.image


def _source(cluster, lockfile, catalog, request, state, say) -> Phase:
    named = _named_image(cluster, request)
    if named:
        return Phase("source", "skipped", f"the runtime image is named ({named}): nothing to build")
    if lockfile.lock.build.kind != "source":
        return Phase("source", "skipped", f"the lock's image kind is {lockfile.lock.build.kind}, not a "
                                          "source build")
    if request.dry_run:
        return Phase("source", "would check", f"the tree at {lockfile.lock.source.commit or '?'} on "
                                              f"{cluster.build_node.name}")
    fetched = sources.fetch(cluster, lockfile)
    state["tree"] = fetched
    action = "up to date" if fetched.action == "up to date" else "done"
    return Phase("source", action, f"{fetched.node}:{fetched.directory} at {fetched.commit[:12]} "
                                   f"({fetched.action})")


def _image(cluster, lockfile, catalog, request, state, say) -> Phase:
    named = _named_image(cluster, request)
    state["image"] = named or images.image_ref(lockfile)
    # Pushed by its name (a node that loads it keeps the ID, not the registry digest); run as the
    # digest the lock pins for that name, so a tag that moved since does not change what serves.
    state["run_image"] = digest.pinned_reference(lockfile, state["image"])
    if named:
        return Phase("image", "skipped", f"using {named} as named; push checks it on every node")
    tree = state.get("tree")
    plan = (images.plan(cluster, lockfile, tree.directory, None, None, tree.ccache) if tree
            else images.plan(cluster, lockfile))
    if plan.up_to_date:
        return Phase("image", "up to date", f"{plan.image} on {plan.node} carries this lock's hash")
    if request.dry_run:
        return Phase("image", "would build", f"{plan.image} on {plan.node} (hours; CUDA_ARCHS "
                                             f"{plan.cuda_archs})")
    say(f"building {plan.image} on {plan.node}")
    built = images.build(cluster, plan, f"{cluster.build_node.paths.state}/logs")
    return Phase("image", "done", f"built {built.image} in {built.seconds:.0f} s")


def _engine(cluster, lockfile, catalog, request, state, say) -> Phase:
    if request.artifact_dir is not None:
        folder = Path(request.artifact_dir)
        if not (folder / "trtllm-deploy-manifest.json").is_file():
            raise InputError(f"--artifact-dir {folder}: not an artifact (no trtllm-deploy-manifest.json); "
                             "make one with invoke engine.build")
        state["artifact"] = folder
        state["tp"] = request.tp or _manifest_tp(folder) or len(cluster.nodes)
        return Phase("engine", "skipped", f"deploying {folder.name} as given")
    planned = artifact.plan(cluster, lockfile, catalog,
                            artifact.Request(request.model, request.precision, request.tp,
                                             image=request.image))
    planned.fit.require()
    launch.unfixed(lockfile, runtimes.default().name, planned.tp)   # before anything is made
    state["tp"] = planned.tp
    # engine.build makes it in the head's store (paths.artifacts); push sends it from there.
    state["artifact_node"] = cluster.head
    state["artifact"] = Path(cluster.head.paths.artifacts).expanduser() / planned.name
    if request.dry_run:
        return Phase("engine", "would make", f"{planned.name} on {cluster.head.name} unless it is up "
                                             f"to date ({planned.fit.sentence})")
    say(f"making {planned.name} on {cluster.head.name}")
    built = artifact.build(planned, lockfile, cluster.head)
    state["artifact"] = Path(built.path)
    return Phase("engine", "up to date" if built.action == "up to date" else "done",
                 f"{planned.name}: {built.action} ({built.files} files)")


def _manifest_tp(folder: Path) -> int | None:
    return (manifest.load(folder).get("provenance") or {}).get("tp")


def _job_nodes(cluster: Cluster, tp: int) -> Cluster:
    if tp > len(cluster.nodes):
        raise InputError(f"tp {tp} needs {tp} nodes (one GPU each); hosts.toml has {len(cluster.nodes)}")
    return replace(cluster, nodes=cluster.nodes[:tp])


def _source_of(state: dict) -> push.Source:
    """The artifact as push takes it, read once: from this machine's folder or the head's store."""
    if "source" not in state:
        state["source"] = delivery.artifact_source(state["artifact"], state.get("artifact_node"))
    return state["source"]


def _push(cluster, lockfile, catalog, request, state, say) -> Phase:
    nodes = _job_nodes(cluster, state["tp"]).nodes
    name = state["artifact"].name
    try:
        src = _source_of(state)
    except CheckFailed:
        if not request.dry_run:
            raise
        return Phase("push", "would send", f"{name} from {cluster.head.name} along a chain to the other "
                                           "node(s) once engine.build has made it")
    try:
        holding = delivery.locate_image(cluster, state["image"])
    except CheckFailed:
        if not request.dry_run:
            raise
        return Phase("push", "would send", f"{name} ({src.label}) and {state['image']} from "
                                           f"{cluster.build_node_name} once it is built")
    src = push.with_image(src, holding)
    plans = push.look(nodes, src)
    plans.raise_for_failures()
    per_node = {o.node.name: "up to date" if o.value.up_to_date else _difference(o.value) for o in plans}
    if all(o.value.up_to_date for o in plans):
        return Phase("push", "up to date", f"{name} and {state['image']} on {len(nodes)} node(s)",
                     nodes=per_node)
    ways = delivery.routes(plans, src)
    if request.dry_run:
        return Phase("push", "would send", ways, nodes=per_node)
    push.require_room(plans)
    say(f"sending what each node lacks ({ways})")
    sent = push.send(plans, src, transport=request.transport)
    sent.raise_for_failures()
    total = sum(o.value.bytes_sent for o in sent)
    told = {o.node.name: delivery.came_from(o.value) for o in sent}
    return Phase("push", "done", f"{console.size(total)} sent; {ways}",
                 nodes={node: words for node, (words, _) in told.items()},
                 data={"from": {node: data for node, (_, data) in told.items()}})


def _difference(plan) -> str:
    parts = []
    if plan.artifact is not None and not plan.artifact.up_to_date:
        parts.append("artifact")
    if plan.image is not None and not plan.image.up_to_date:
        parts.append("image")
    return "lacks the " + " and the ".join(parts)


def _wanted(cluster: Cluster, request: Request, state: dict) -> Deployment:
    src = _source_of(state)
    backend = runtimes.default().options(delivery.backend(src), f"{containers.ARTIFACTS}/{src.name}")
    return Deployment(job=request.job, runtime=runtimes.default().name, image=state["run_image"],
                      artifact=src.name, tp=state["tp"], port=request.port, backend=backend,
                      env=request.env, manifest_sha256=src.manifest_sha256)


def _serving_as_wanted(cluster: Cluster, wanted: Deployment) -> Deployment | None:
    """The running deployment, when it is the wanted one and every part of it is alive and healthy."""
    found = current(cluster)
    same = ("job", "runtime", "image", "artifact", "tp", "pp", "port", "backend", "env", "manifest_sha256")
    if found is None or any(getattr(found, key) != getattr(wanted, key) for key in same):
        return None
    nodes = launch.job_cluster(cluster, found)
    if jobs.trouble(jobs.look(nodes, found), found, nodes.head.name) is not None:
        return None
    return found if gate.serving(nodes.head, found) else None


def _check(cluster, lockfile, catalog, request, state, say) -> Phase:
    try:
        wanted = _wanted(cluster, request, state)
    except CheckFailed:
        if not request.dry_run:
            raise
        return Phase("check", "would probe", "every node through mpirun, once the artifact is made")
    state["wanted"] = wanted
    running = _serving_as_wanted(cluster, wanted)
    state["running"] = running
    if running is not None:
        return Phase("check", "up to date", f"{running.job} serves this artifact and image on every node")
    nodes = _job_nodes(cluster, wanted.tp)
    if request.dry_run:
        return Phase("check", "would probe", f"{len(nodes.nodes)} node(s) through mpirun")
    say(f"probing {len(nodes.nodes)} node(s) through mpirun")
    checked = clustercheck.run(nodes, image=wanted.image, artifact=wanted.artifact)
    if not checked.ok:
        lines = [f"  {d.as_json()}" for d in checked.drifts]
        lines += [f"  {node}: {'; '.join(p)}" for node, p in checked.problems.items() if p]
        lines += [f"  {v.node}: {v.detail}" for v in checked.digests if not v.ok]
        raise CheckFailed("the nodes disagree (drift) or have problems; nothing was launched:\n"
                          + "\n".join(lines))
    return Phase("check", "done", f"{len(checked.nodes)} rank(s) agree: image, TensorRT-LLM, manifest, "
                                  "driver, GPU")


def _launch(cluster, lockfile, catalog, request, state, say) -> Phase:
    if request.dry_run and "wanted" not in state:
        return Phase("launch", "would start", f"{request.job}: {state['artifact'].name} once it is made")
    wanted: Deployment = state["wanted"]
    if state.get("running") is not None:
        state["deployment"] = state["running"]
        return Phase("launch", "up to date", f"{wanted.job} is serving")
    if request.dry_run:
        previous = current(cluster)
        warnings = launch.unfixed(lockfile, wanted.runtime, wanted.ranks)
        state["warnings"].extend(warnings)
        return Phase("launch", "would start", f"{wanted.job}: {wanted.artifact} with tp {wanted.tp}"
                     + (f", after stopping {previous.job}" if previous else "")
                     + "".join(f"\n{line}" for line in warnings))
    with tempfile.TemporaryDirectory(prefix="trtllm-deploy-") as tmp, \
            handover.steps_aside(cluster, "invoke deploy", report=say):
        try:
            done = launch.launch(cluster, wanted, Path(tmp), stall_s=request.stall_s,
                                 min_tokens_per_s=request.min_tokens_per_s, report=say, lockfile=lockfile)
        except DeployError as failure:
            if request.on_failure != "rollback":
                raise
            say("the new deployment failed its gate; rolling back")
            try:
                back = launch.roll_back(cluster, wanted, Path(tmp), report=say, lockfile=lockfile,
                                        stall_s=request.stall_s, min_tokens_per_s=request.min_tokens_per_s)
            except DeployError as exc:
                raise CheckFailed(f"{failure}\n  not rolled back: {exc}") from None
            state["deployment"] = back.deployment
            raise CheckFailed(f"{failure}\n  rolled back: {back.deployment.job} ({back.deployment.runtime}, "
                              f"{back.deployment.artifact}) serves again") from None
    state["deployment"], state["gate"] = done.deployment, done.tokens_per_s
    state["warnings"].extend(done.warnings)
    return Phase("launch", "done", f"{wanted.job} ready after {done.ready_s:.0f} s, gate "
                                   f"{done.tokens_per_s:.1f} tokens/s"
                 + "".join(f"\n{line}" for line in done.warnings))


def _verify(cluster, lockfile, catalog, request, state, say) -> Phase:
    """The endpoint answers the fixed prompt at the minimum rate. A deployment launched by this run
    passed that gate moments ago, and one found serving had every rank looked at by check: neither
    is looked at again."""
    if request.dry_run:
        return Phase("verify", "would ask", "the fixed prompt at temperature 0")
    deployment: Deployment = state["deployment"]
    head = launch.job_cluster(cluster, deployment).head
    where = http_url(head.host, deployment.port, "/v1")
    if "gate" in state:
        return Phase("verify", "done", f"{where} passed launch's gate at {state['gate']:.1f} tokens/s")
    answer, _, rate = gate.ask(head, deployment.port)
    if not answer or rate < request.min_tokens_per_s:
        raise CheckFailed(f"the endpoint answered {answer!r} at {rate:.1f} tokens/s")
    return Phase("verify", "done", f"{where} answers at {rate:.1f} tokens/s")
