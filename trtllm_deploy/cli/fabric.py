"""``invoke fabric.setup``: from cabled nodes to a checked fabric, written into hosts.toml."""

from __future__ import annotations

import dataclasses

from invoke import Collection, Context, task

from trtllm_deploy import console
from trtllm_deploy.cli import DRY_RUN_HELP, HOSTS_HELP, JSON_HELP, user_errors
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts import inventory
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.measure.diagnose import link as link_diag
from trtllm_deploy.measure.diagnose import nccl as nccl_diag
from trtllm_deploy.network import apply as applying
from trtllm_deploy.network import plan as planner
from trtllm_deploy.network import write as writing
from trtllm_deploy.network.model import Plan


def _with_fabric(cluster: inventory.Cluster, plan: Plan) -> inventory.Cluster:
    """The cluster as hosts.toml will say once the plan is written (diagnose.link checks that)."""
    by_name = {node.node: node for node in plan.nodes}
    nodes = []
    for node in cluster.nodes:
        mine = by_name.get(node.name)
        if mine is not None:
            fabric = inventory.Fabric(interfaces=list(mine.interfaces), rdma_devices=list(mine.rdma_devices),
                                      address=mine.address)
            node = node.model_copy(update={"fabric": fabric})
        nodes.append(node)
    return dataclasses.replace(cluster, nodes=tuple(nodes))


def _plan_json(plan: Plan) -> dict:
    return {"topology": plan.topology, "subnet": plan.subnet, "mtu": plan.mtu,
            "links": [{"a": dataclasses.asdict(link.a), "b": dataclasses.asdict(link.b) if link.b else None}
                      for link in plan.links],
            "nodes": {node.node: {**dataclasses.asdict(node),
                                  "netplan": applying.netplan_file(node, plan)} for node in plan.nodes}}


def _show_plan(plan: Plan) -> None:
    console.out.print(console.table(
        f"fabric.setup: {plan.topology} in {plan.subnet}, mtu {plan.mtu}",
        ["node", "port", "address", "mtu", "peer", "routes", "NCCL/UCX/Gloo/OpenMPI use"],
        planner.describe(plan)))


@task(help={"topology": "auto (default: what the cables say), pair, ring or switch; refused when the"
                        " cables say otherwise",
            "subnet": "the private IPv4 range the fabric's addresses come from (default: the first of"
                      f" {', '.join(planner.DEFAULT_SUBNETS)} no node uses)",
            "mtu": "the MTU of every fabric port (default: 9000)",
            "min_speed": "the link speed each fabric port must report in the check, Mb/s"
                         " (default: 200000; 0: any)",
            "confirm": "seconds a change waits for a new SSH connection before the node reverts it"
                       " (default: 30)",
            "nccl": "after the link check, measure NCCL across the nodes (diagnose.nccl) where every node"
                    " has a GPU and its runtime image (default); --no-nccl skips it",
            "dry_run": DRY_RUN_HELP, "json": JSON_HELP, "hosts": HOSTS_HELP})
@user_errors
def setup(c: Context, topology: str = "auto", subnet: str = "", mtu: int = planner.DEFAULT_MTU,
          min_speed: int = link_diag.SPARK_SPEED_MBPS, confirm: int = applying.CONFIRM_S,
          nccl: bool = True, dry_run: bool = False, json: bool = False, hosts: str = "hosts.toml") -> None:
    """Find how the nodes are cabled, address the fabric, apply it (reverted if SSH breaks), check it,
    write it into hosts.toml."""
    from trtllm_deploy.network.look import look

    if topology not in planner.TOPOLOGIES:
        raise planner.InputError(f"--topology {topology!r}: expected one of {', '.join(planner.TOPOLOGIES)}")
    planner.check_mtu(mtu)
    if subnet:
        planner.parse_subnet(subnet)
    if not 5 <= confirm <= 600:
        raise planner.InputError(f"--confirm {confirm}: expected 5 to 600 seconds")
    cluster = inventory.load(hosts)
    with console.err.status(f"looking at the fabric of {len(cluster.nodes)} node(s)…", spinner="dots"):
        looks = look(cluster)
    in_order = {node.name: looks[node.name] for node in cluster.nodes}
    plan = planner.plan(in_order, topology, subnet or None, mtu)
    report = _plan_json(plan)
    if not json:
        _show_plan(plan)
    if dry_run:
        return _dry_run(cluster, plan, report, json)
    with console.err.status("applying on every node (each waits for a new SSH login to confirm)…",
                            spinner="dots"):
        applied = applying.apply_all(cluster.nodes, plan, confirm_s=confirm)
    report["applied"] = {o.node.name: (dataclasses.asdict(o.value) if o.ok else {"error": o.reason})
                         for o in applied}
    if applied.failed:
        _finish(report, json, applied, None, False)
        raise CheckFailed(f"fabric.setup: {applied.summary()}\nhosts.toml was not changed; the nodes that"
                          " applied keep their part, and a re-run after the fix finishes the rest")
    checked = link_diag.run(_with_fabric(cluster, plan), min_speed or None)
    report["link_check"] = checked.as_json()
    if not checked.ok:
        _finish(report, json, applied, checked, False)
        raise CheckFailed("fabric.setup: the fabric is applied but diagnose.link finds problems (above);"
                          " hosts.toml was not changed")
    measured = _nccl(_with_fabric(cluster, plan), nccl)
    report["nccl"] = measured
    if measured["run"] and not measured["passed"]:
        _finish(report, json, applied, checked, False)
        raise CheckFailed(f"fabric.setup: the links pass but diagnose.nccl does not: {measured['why']};"
                          " hosts.toml was not changed")
    written = writing.write(hosts, plan)
    report["hosts_written"] = written
    _finish(report, json, applied, checked, written)


def _nccl(cluster: inventory.Cluster, wanted: bool) -> dict:
    """diagnose.nccl over the new fabric where every node has a GPU and its runtime image; else why
    not (the report says so: a fabric checked by ping alone is not one checked by NCCL)."""
    if not wanted:
        return {"run": False, "passed": None, "why": "--no-nccl"}

    def ready(node, target) -> str:
        if not target.run(["nvidia-smi", "-L"], check=False, timeout=60).ok:
            return "no GPU (nvidia-smi -L fails)"
        if not node.container.image:
            return "no container.image in hosts.toml"
        if not target.run(["docker", "image", "inspect", node.container.image], check=False, timeout=60).ok:
            return f"no image {node.container.image} yet (invoke push)"
        return ""

    seen = fan_out(cluster.nodes, ready)
    missing = {o.node.name: (o.value if o.ok else o.reason) for o in seen if not o.ok or o.value}
    if missing:
        why = "; ".join(f"{name}: {reason}" for name, reason in missing.items())
        return {"run": False, "passed": None, "why": why}
    with console.err.status("diagnose.nccl across the fabric…", spinner="dots"):
        measured = nccl_diag.run(cluster)
    return {"run": True, "passed": measured.verdict.passed, "why": measured.verdict.reason,
            "report": measured.as_json()}


def _dry_run(cluster, plan: Plan, report: dict, json: bool) -> None:
    by_name = {node.node: node for node in plan.nodes}

    def would(node, target) -> list[str]:
        mine = by_name[node.name]
        return applying.changes(mine, plan, applying.read_state(target, mine, plan))

    seen = fan_out([n for n in cluster.nodes if n.name in by_name], would)
    seen.raise_for_failures()
    report.update(dry_run=True, changes={o.node.name: o.value for o in seen})
    if json:
        return console.print_json(report)
    rows = [[o.node.name, "\n".join(o.value) or "nothing: up to date"] for o in seen]
    console.out.print(console.table("fabric.setup (dry run: nothing changed)", ["node", "would"], rows))
    for node in plan.nodes:
        console.out.print(f"{node.node}: {applying.NETPLAN_FILE}", highlight=False)
        console.out.print(applying.netplan_file(node, plan), highlight=False, markup=False, soft_wrap=True)


def _finish(report: dict, json: bool, applied, checked, written: bool) -> None:
    if json:
        return console.print_json(report)
    rows = []
    for outcome in applied:
        planned = report["nodes"][outcome.node.name]
        fabric = [planned["address"], "\n".join(planned["interfaces"])]
        if not outcome.ok:
            rows.append([outcome.node.name, *fabric, console.status_cell("fail", outcome.reason), "–"])
            continue
        done = outcome.value
        what = ("up to date" if done.status == "up to date" else
                f"applied ({done.mode}): " + "; ".join(done.changes))
        problems = (checked.problems.get(outcome.node.name, []) if checked else [])
        link = ("not checked" if checked is None else
                console.status_cell("fail" if problems else "pass", "\n".join(problems) or "ok"))
        rows.append([outcome.node.name, *fabric, what, link])
    columns = ["node", "fabric address", "interfaces", "change", "diagnose.link"]
    title = f"fabric.setup: {report['topology']} in {report['subnet']}"
    console.out.print(console.table(title, columns, rows))
    for line in (checked.across if checked else []):
        console.out.print(console.status_cell("fail", line))
    measured = report.get("nccl")
    if measured:
        state = "skip" if not measured["run"] else "pass" if measured["passed"] else "fail"
        said = measured["why"] if measured["run"] else f"not run: {measured['why']}"
        console.out.print(console.status_cell(state, f"diagnose.nccl: {said}"))
    if checked is not None and checked.ok:
        unchanged = all(o.ok and o.value.status == "up to date" for o in applied) and not written
        console.out.print("up to date: nothing changed" if unchanged else
                          "hosts.toml: " + ("[nodes.fabric] written" if written else "already says this"),
                          markup=False, highlight=False)


ns = Collection("fabric", setup)
