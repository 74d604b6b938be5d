"""What ``launch``, ``stop``, ``rollback`` and ``supervise`` would do (``--dry-run``): they look at the
nodes and this machine's record of the deployments, and change nothing."""

from __future__ import annotations

import shlex

from trtllm_deploy.dryrun import Plan
from trtllm_deploy.hosts.inventory import Cluster
from trtllm_deploy.serving import containers, launch
from trtllm_deploy.serving.state import Deployment, current, rollback_target
from trtllm_deploy.source.lock import LockFile


def launch_plan(cluster: Cluster, wanted: Deployment, lockfile: LockFile | None = None,
                task: str = "launch", min_rate: float = 1.0) -> Plan:
    """Each node's container, the previous job stopped, mpirun on the head, the gate — as
    :func:`launch.launch` would do them; refused the same way (a pin that lacks a multi-node fix)."""
    nodes = launch.job_cluster(cluster, wanted)
    plan = Plan(task, notes=launch.unfixed(lockfile, wanted.runtime, len(nodes.nodes)))
    name = containers.container_name(cluster, wanted.job)
    env = "".join(f" {key}={value}" for key, value in wanted.env)
    for rank, node in enumerate(nodes.nodes):
        plan.add(node.name, f"start container {name} from {wanted.image} (rank {rank}"
                            f"{', serves HTTP on port ' + str(wanted.port) if node.is_head else ''})"
                            + (f", env{env}" if env else ""))
    previous = current(cluster)
    if previous is not None and previous.job != wanted.job:
        plan.add(nodes.head.name, f"then stop the previous deployment {previous.job} on "
                                  f"{', '.join(previous.nodes) or 'its nodes'}")
    plan.add(nodes.head.name, f"mpirun {wanted.ranks} rank(s) of {wanted.runtime}: "
                              f"{shlex.join(launch.program(wanted, launch.listen_address(nodes.head)))}")
    plan.add(nodes.head.name, f"ask the fixed prompt (at least {min_rate:g} tokens/s), then record "
                              f"{wanted.job} as current and last good; on any failure remove it from "
                              "every node")
    return plan


def stop_plan(cluster: Cluster, job: str) -> Plan:
    """Each node's containers of ``job`` that ``stop`` would remove (found as ``stop`` finds them)."""
    plan = Plan("stop")
    for outcome in containers.status(cluster, job):
        if not outcome.ok:
            plan.add(outcome.node.name, f"cannot look: {outcome.reason}")
            continue
        found = [f"{c.name} ({c.state})" for c in outcome.value]
        plan.add(outcome.node.name, f"remove {', '.join(found)}" if found else f"nothing of {job} is here")
    found = current(cluster)
    if found is not None and found.job == job:
        plan.notes.append(f"{job} would no longer be recorded as the current deployment")
    return plan


def rollback_plan(cluster: Cluster, failing: Deployment, image: str | None = None,
                  lockfile: LockFile | None = None, min_rate: float = 1.0) -> Plan:
    """The job :func:`launch.roll_back` would start instead of ``failing``, and where: chosen by
    the same function the act uses."""
    good, target = launch.roll_back_target(cluster, failing, lockfile, image)
    plan = launch_plan(cluster, target, lockfile, "rollback", min_rate)
    why = "the last deployment that served well and differs" if good else f"the {target.runtime} fallback"
    plan.notes.insert(0, f"{failing.job} ({failing.runtime}, {failing.artifact}) would be replaced by "
                         f"{target.job} ({target.runtime}, {target.artifact}, {target.image}): {why}")
    return plan


def supervise_plan(cluster: Cluster, deployment: Deployment, policy: str, interval: float,
                   hang_s: float) -> Plan:
    """What supervise would watch, and what it would do on a failure under ``policy``."""
    nodes = launch.job_cluster(cluster, deployment)
    plan = Plan("supervise")
    for rank, node in enumerate(nodes.nodes):
        plan.add(node.name, f"watch rank {rank} of {deployment.job} every {interval:g} s")
    plan.add(nodes.head.name, f"call {hang_s:g} s without progress (no iteration, no token) while a request "
                              "waits and every rank lives a hang")
    if policy == "stop":
        then = "remove the job from every node and stop"
    elif policy == "restart":
        then = (f"remove the job from every node and launch {deployment.job} again, backing off; after "
                "repeated failures (a crash loop), roll back")
    else:
        good = rollback_target(cluster, deployment)
        then = ("remove the job from every node and launch the last good deployment that differs, "
                f"{good.job} ({good.runtime}, {good.artifact})" if good is not None else
                "remove the job from every node and serve its model with the fallback runtime where the "
                "lock names its image; else stop, saying why")
    plan.notes.append(f"on a dead rank, dead mpirun or hang (--on-failure {policy}): {then}")
    return plan
