"""``invoke launch``, ``supervise``, ``status``, ``logs``, ``stop``: the serving job across the nodes."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from invoke import Context, task
from invoke.exceptions import Exit

from trtllm_deploy import console, push
from trtllm_deploy.artifact import verify
from trtllm_deploy.artifact.manifest import MANIFEST
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.cli import supervisors
from trtllm_deploy.cli import (DRY_RUN_HELP, ENV_HELP, HOSTS_HELP, JSON_HELP, MIN_RATE_HELP, STALL_HELP,
                               env_pairs, show_plan, user_errors)
from trtllm_deploy.hosts import inventory
from trtllm_deploy.runtimes import runtime as runtimes
from trtllm_deploy.serving import (containers, delivery, gate, handover, install, jobs, launch, plans,
                                   servicefiles, supervise)
from trtllm_deploy.serving.state import Deployment, current, last_good
from trtllm_deploy.source import digest
from trtllm_deploy.source import lock as locks
from trtllm_deploy.urls import http_url

ROLLBACK = runtimes.rollback()
LOCK_HELP = ("the TensorRT-LLM lock: its fixes gate serving across nodes, and an image it pins by digest "
             "runs as that digest (default: requirements/tensorrt-llm.lock.toml, where it exists)")


def _lockfile(lock: str) -> locks.LockFile | None:
    """The lock given, else the default one where it exists (launch works without one)."""
    if lock or locks.DEFAULT_PATH.exists():
        return locks.load(lock or locks.DEFAULT_PATH)
    return None


def _warn(lines: list[str]) -> None:
    for line in lines:
        console.err.print(line, style="yellow", highlight=False, markup=False)


STORE_HELP = ("a folder on this machine holding the artifact, to read its backend from its manifest; "
              "where it is not there, the head's store is read (default: engines/)")


def _backend(cluster, store: Path, artifact: str, runtime: str) -> tuple[str, ...]:
    """The runtime's options for the artifact, by its manifest: in ``store`` here if it is there,
    else in the head's store (where engine.build makes it and push puts it)."""
    inside = f"{containers.ARTIFACTS}/{artifact}"
    if (store / artifact / MANIFEST).is_file():
        return launch.serve_backend(store / artifact, inside, runtime)
    try:
        format = delivery.backend(push.source_on(cluster.head, artifact))
    except CheckFailed as exc:
        raise CheckFailed(f"{exc}; push it to the nodes first (invoke push --name {artifact})") from None
    return runtimes.get(runtime).options(format, inside)


@task(name="launch", iterable=["env"], help={
    "artifact": "the artifact to serve (its name in every node's artifact store; invoke push puts it there)",
    "tp": "tensor-parallel size (one GPU per node; default: every node)", "pp": "pipeline-parallel size",
    "job": "the job's name (default: serve)",
    "image": "the runtime image (default: hosts.toml container.image)",
    "port": "the HTTP port on the head (default: 8355)", "runtime": runtimes.choices(),
    "env": ENV_HELP, "stall_s": STALL_HELP, "min_rate": MIN_RATE_HELP,
    "store": STORE_HELP, "lock": LOCK_HELP, "dry_run": DRY_RUN_HELP, "hosts": HOSTS_HELP, "json": JSON_HELP})
@user_errors
def launch_(c: Context, artifact: str = "", tp: int = 0, pp: int = 1, job: str = "serve", image: str = "",
            port: int = 8355, runtime: str = runtimes.default().name, env: list[str] | None = None,
            stall_s: float = 120.0, min_rate: float = 1.0, store: str = "engines", lock: str = "",
            dry_run: bool = False, hosts: str = "hosts.toml", json: bool = False) -> None:
    """Serve an artifact across the nodes: containers, mpirun, ready by progress, a gate prompt."""
    verify.check_name(artifact)
    runtimes.get(runtime)   # a name it does not know is bad input (exit 2)
    pairs = env_pairs(env)  # bad input too, before any node is asked for the artifact's backend
    cluster = inventory.load(hosts)
    lockfile = _lockfile(lock)
    tp = tp or len(cluster.nodes) // max(pp, 1)
    # Refused before any node is asked anything (the artifact's backend included).
    launch.unfixed(lockfile, runtime, tp * pp)
    named = digest.pinned_reference(lockfile, image or cluster.head.container.image or "")
    wanted = Deployment(job=job, runtime=runtime, image=named, artifact=artifact, tp=tp, pp=pp, port=port,
                        backend=_backend(cluster, Path(store), artifact, runtime), env=pairs)
    if dry_run:
        return show_plan(plans.launch_plan(cluster, wanted, lockfile, min_rate=min_rate), json)
    with tempfile.TemporaryDirectory(prefix="trtllm-deploy-") as tmp, \
            console.err.status(f"launching {job}…") as spinner, \
            handover.steps_aside(cluster, f"invoke launch {job}", report=console.err.print):
        done = launch.launch(cluster, wanted, Path(tmp), stall_s=stall_s, min_tokens_per_s=min_rate,
                             report=lambda line: spinner.update(line), lockfile=lockfile)
    _warn(done.warnings)
    if json:
        console.print_json(done.as_json())
        return
    console.out.print(console.table(f"launch: {job}", ["", "value"], [
        ["serving", f"{done.deployment.artifact} ({done.deployment.runtime}, tp {done.deployment.tp}"
                    f" x pp {done.deployment.pp}) on {', '.join(done.deployment.nodes)}"],
        ["endpoint", http_url(cluster.head.host, port, "/v1")],
        ["containers", ", ".join(f"{n}: {a}" for n, a in done.containers.items())],
        ["ready", f"after {done.ready_s:.0f} s"],
        ["gate", f"{done.tokens_per_s:.1f} tokens/s: {done.answer[:60]!r}"]]))


@task(name="supervise", help={
            "on_failure": "stop (default); restart (backing off, until --restarts failures within "
                          "--restart-window-min make a crash loop, then rollback); or rollback (to the "
                          "last deployment that served well and differs, else the lock's "
                          f"{ROLLBACK.product} fallback)",
            "interval": "seconds between looks (default: 1)",
            "hang_s": "no progress this long (no iteration, no token) while a request waits and every "
                      "rank lives is a hang (default: 8)",
            "good_after_s": "watched healthy this long, the deployment is recorded as good, a rollback "
                            "target (default: 300)",
            "restarts": "restart gives up after this many failures ... (default: 3)",
            "restart_window_min": "... within this many minutes (default: 10)",
            "dry_run": "show what would be watched (or installed) and done on a failure; change nothing",
            "install": "run the supervisor on the head instead, kept running there (systemd, else a "
                       "container Docker restarts): it outlives this terminal and reboots",
            "uninstall": "remove the head's supervisor (checked: nothing of it is left)",
            "build": "--install: where its image is built: head (default; the head's architecture) or "
                     "here (then sent to the head: the testbed, whose nodes reach no registry)",
            "base": f"--install: the image's base (default: {install.DEFAULT_BASE})",
            "wait_s": "--install: how long to wait for a node that went away (a reboot) before acting anyway "
                      "(default: 600)",
            "lock": LOCK_HELP, "hosts": HOSTS_HELP, "json": JSON_HELP})
@user_errors
def supervise_(c: Context, on_failure: str = "stop", interval: float = 1.0, hang_s: float = 8.0,
               good_after_s: float = supervise.GOOD_AFTER_S, restarts: int = 3,
               restart_window_min: float = 10.0, lock: str = "", dry_run: bool = False,
               install_: bool = False, uninstall: bool = False, build: str = "head",
               base: str = install.DEFAULT_BASE, wait_s: float = 600.0,
               hosts: str = "hosts.toml", json: bool = False) -> None:
    """Watch the current deployment; on a dead rank, dead mpirun or hang: explain, tear down, apply
    the policy, and watch again. Ctrl-C stops watching (the deployment keeps serving)."""
    if on_failure not in supervise.POLICIES:
        raise Exit(f"--on-failure {on_failure!r}: expected one of {', '.join(supervise.POLICIES)}", code=2)
    if restarts < 1 or restart_window_min <= 0 or wait_s <= 0:
        raise Exit("--restarts must be at least 1, --restart-window-min and --wait-s above 0", code=2)
    if build not in install.BUILDS:
        raise Exit(f"--build {build!r}: expected one of {', '.join(install.BUILDS)}", code=2)
    if install_ and uninstall:
        raise Exit("--install and --uninstall: pass one of them", code=2)
    cluster = inventory.load(hosts)
    if install_ or uninstall:
        return supervisors.install_or_remove(
            cluster, uninstall, dry_run, json, build, base, lock,
            servicefiles.Options(on_failure, interval, hang_s, good_after_s, restarts, restart_window_min,
                                 wait_s))
    lockfile = _lockfile(lock)
    if not dry_run:
        supervisors.refuse_second(cluster)
    loop = supervise.CrashLoop(limit=restarts, window_s=restart_window_min * 60)
    while True:
        deployment = current(cluster)
        if deployment is None:
            raise Exit("supervise: nothing is deployed (invoke launch)", code=1)
        if dry_run:
            return show_plan(plans.supervise_plan(cluster, deployment, on_failure, interval, hang_s), json)
        console.err.print(f"supervising {deployment.job} on {', '.join(deployment.nodes)}")
        try:
            failure = supervise.watch(cluster, deployment, interval=interval, hang_s=hang_s,
                                      good_after_s=good_after_s,
                                      on_good=supervise.promote(cluster, deployment))
        except KeyboardInterrupt:
            console.err.print("stopped watching; the deployment keeps serving")
            return
        console.err.print(failure.explanation)
        with tempfile.TemporaryDirectory(prefix="trtllm-deploy-") as tmp:
            handled = supervise.handle(cluster, deployment, failure, on_failure, Path(tmp),
                                       report=console.err.print, loop=loop, lockfile=lockfile)
        if json:
            console.print_json(handled.as_json())
        if handled.relaunched is None:
            raise Exit(f"supervise: {deployment.job} failed ({handled.failure.what}) and was stopped: "
                       f"{handled.gave_up}", code=1)


@task(help={"job": "the job (default: the current deployment)", "hosts": HOSTS_HELP, "json": JSON_HELP})
@user_errors
def status(c: Context, job: str = "", hosts: str = "hosts.toml", json: bool = False) -> None:
    """Per node: the job's container, its ranks, the artifact and image; the endpoint's health; and
    the head's supervisor, where one is installed (then the deployment is the head's record's)."""
    cluster = inventory.load(hosts)
    deployment, supervisor = supervisors.owned(cluster)
    if job and deployment is not None and deployment.job != job:
        deployment = None
    if deployment is None:
        if json:
            console.print_json({"job": job or None, "deployed": False, "last_good": (
                last_good(cluster).as_json() if last_good(cluster) else None), "supervisor": supervisor})
        else:
            console.out.print("nothing is deployed")
            supervisors.show(supervisor)
        return
    nodes = launch.job_cluster(cluster, deployment)
    looks = jobs.look(nodes, deployment)
    healthy = gate.serving(nodes.head, deployment)
    wrong = jobs.trouble(looks, deployment, nodes.head.name)
    report = {"job": deployment.job, "deployed": True, "healthy": healthy and wrong is None,
              "trouble": wrong, "endpoint": http_url(nodes.head.host, deployment.port, "/v1"),
              "deployment": deployment.as_json(),
              "nodes": {name: {"container": seen.container,
                               "ranks": {rank: "alive" if alive else "dead"
                                         for rank, (alive, _) in sorted(seen.ranks.items())},
                               "mpirun_exit": seen.mpirun_exit} for name, seen in looks.items()},
              "supervisor": supervisor}
    if json:
        console.print_json(report)
        return
    rows = [[name, console.status_cell("pass" if info["container"] else "fail",
                                       "running" if info["container"] else "gone"),
             ", ".join(f"{rank} {state}" for rank, state in info["ranks"].items()),
             deployment.artifact, deployment.image] for name, info in report["nodes"].items()]
    console.out.print(console.table(f"status: {deployment.job} ({deployment.runtime})",
                                    ["node", "container", "ranks", "artifact", "image"], rows))
    console.out.print(f"endpoint {report['endpoint']}: "
                      + ("healthy" if report["healthy"] else f"NOT healthy ({wrong or 'no answer'})"))
    supervisors.show(supervisor)


@task(help={"rank": "only this rank's log", "lines": "lines per log (default: 40)",
            "follow": "keep printing new lines until Ctrl-C", "job": "the job (default: the current one)",
            "supervisor": "the history of the head's supervisor instead (what it saw and did)",
            "hosts": HOSTS_HELP})
@user_errors
def logs(c: Context, rank: int = -1, lines: int = 40, follow: bool = False, job: str = "",
         supervisor: bool = False, hosts: str = "hosts.toml") -> None:
    """The last lines of every rank's log (kept on each node after the job ends); with --supervisor,
    the history of the head's supervisor."""
    cluster = inventory.load(hosts)
    if supervisor:
        found = install.look(cluster, lines=lines)
        if not found.history:
            console.out.print("the head's supervisor has no history (invoke supervise --install)")
        for event in found.history:
            console.out.print(supervisors.event_line(event), highlight=False, markup=False)
            if event.get("explanation"):
                console.out.print(event["explanation"], highlight=False, markup=False)
        return
    owned = None if job else supervisors.owned(cluster)[0]
    name = job or (owned.job if owned else "")
    if not name:
        raise Exit("logs: nothing is deployed; pass --job NAME", code=2)
    seen: dict[str, str] = {}
    while True:
        found = jobs.tails(cluster, name, lines, None if rank < 0 else rank)
        for log, text in sorted(found.items()):
            old = seen.get(log, "")
            new = text[len(old):] if text.startswith(old) else text
            if new.strip():
                console.out.print(f"==> {log} <==\n{new.rstrip()}", highlight=False, markup=False)
        seen = found
        if not follow:
            return
        try:
            time.sleep(1.0)
        except KeyboardInterrupt:
            return


@task(help={"job": "the job (default: the current deployment)", "dry_run": DRY_RUN_HELP, "hosts": HOSTS_HELP,
            "json": JSON_HELP})
@user_errors
def stop(c: Context, job: str = "", dry_run: bool = False, hosts: str = "hosts.toml",
         json: bool = False) -> None:
    """Stop the job on every node; succeeds only after checking that nothing of it runs anywhere."""
    cluster = inventory.load(hosts)
    name = job or (current(cluster).job if current(cluster) else "")
    if not name:
        raise Exit("stop: nothing is deployed; pass --job NAME to stop one by name", code=2)
    if dry_run:
        return show_plan(plans.stop_plan(cluster, name), json)
    with handover.steps_aside(cluster, f"invoke stop {name}", report=console.err.print):
        stopped = launch.stop(cluster, name)
    report = {"job": name, "nodes": {o.node.name: o.value.as_json() for o in stopped}}
    if json:
        console.print_json(report)
        return
    console.out.print(console.table(f"stop: {name}", ["node", "removed", "still running"], [
        [n, ", ".join(info["removed"]) or "-", ", ".join(info["leftovers"]) or "nothing"]
        for n, info in report["nodes"].items()]))


@task(help={"image": f"the {ROLLBACK.product} image where it falls back to {ROLLBACK.product} (default: "
                     f"the lock's [{ROLLBACK.name}] image)",
            "lock": f"the lock that pins the {ROLLBACK.product} image (default: "
                    "requirements/tensorrt-llm.lock.toml)",
            "stall_s": STALL_HELP, "min_rate": MIN_RATE_HELP, "dry_run": DRY_RUN_HELP,
            "hosts": HOSTS_HELP, "json": JSON_HELP})
@user_errors
def rollback(c: Context, image: str = "", lock: str = "requirements/tensorrt-llm.lock.toml",
             stall_s: float = 120.0, min_rate: float = 1.0, dry_run: bool = False, hosts: str = "hosts.toml",
             json: bool = False) -> None:
    cluster = inventory.load(hosts)
    lockfile = locks.load(lock)
    failing = current(cluster) or last_good(cluster)
    if failing is None:
        raise Exit("rollback: nothing is deployed or recorded, so there is nothing to roll back from", code=2)
    image = digest.pinned_reference(lockfile, image) if image else None
    if dry_run:
        return show_plan(plans.rollback_plan(cluster, failing, image, lockfile, min_rate), json)
    with tempfile.TemporaryDirectory(prefix="trtllm-deploy-") as tmp, \
            console.err.status(f"rolling back from {failing.job}…") as spinner, \
            handover.steps_aside(cluster, f"invoke rollback from {failing.job}", report=console.err.print):
        done = launch.roll_back(cluster, failing, Path(tmp), report=lambda line: spinner.update(line),
                                lockfile=lockfile, image=image, stall_s=stall_s, min_tokens_per_s=min_rate)
    _warn(done.warnings)
    if json:
        console.print_json(done.as_json())
        return
    where = http_url(cluster.head.host, done.deployment.port, "/v1")
    console.out.print(f"{runtimes.get(done.deployment.runtime).product} serves {done.deployment.artifact} "
                      f"on {', '.join(done.deployment.nodes)} at {where} "
                      f"(gate: {done.tokens_per_s:.1f} tokens/s)")


# The task's first line for `invoke --list`.
rollback.__doc__ = (f"Roll back: to the last deployment that served well and differs from this one, else "
                    f"{ROLLBACK.product} on the same model (the lock's image), health gated.")
