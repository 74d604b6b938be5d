"""``invoke preflight`` and ``invoke dirs``: phase 1, every node in parallel."""

from __future__ import annotations

from invoke import Context, task
from invoke.exceptions import Exit

from trtllm_deploy import console
from trtllm_deploy.cli import DRY_RUN_HELP, HOSTS_HELP, JSON_HELP, NODES_HELP, user_errors
from trtllm_deploy.hosts import dirs as node_dirs
from trtllm_deploy.hosts import inventory
from trtllm_deploy.hosts import plan as plans
from trtllm_deploy.hosts import preflight as pre


@task(help={"hosts": HOSTS_HELP, "nodes": NODES_HELP, "json": JSON_HELP})
@user_errors
def preflight(c: Context, hosts: str = "hosts.toml", nodes: str = "", json: bool = False) -> None:
    """Check every node: SSH, GPU, driver, CUDA, memory, disk, Docker, tools, clocks."""
    cluster = inventory.load(hosts)
    selected = cluster.select(nodes)
    with console.err.status(f"checking {len(selected)} node(s)…", spinner="dots"):
        observations = pre.run(cluster, selected)
    checks = [item for seen in observations for item in pre.evaluate(seen, cluster)]
    checks += pre.driver_checks(cluster, selected)
    summary = pre.summarize(checks)
    if json:
        console.print_json(pre.as_json(cluster, checks))
    else:
        _show(selected, checks, summary)
    if not summary["ok"]:
        failed_nodes = sorted({item.node for item in checks if item.status == pre.FAIL})
        raise Exit(f"preflight: {summary['fail']} check(s) failed on {', '.join(failed_nodes)}",
                   code=1)


def _show(nodes, checks, summary: dict) -> None:
    names = [node.name for node in nodes] + sorted({item.node for item in checks
                                                    if item.node == pre.THIS_MACHINE})
    order = list(dict.fromkeys(item.name for item in checks))
    cells = {(item.name, item.node): item for item in checks}
    rows = []
    for check_name in order:
        row = [check_name]
        for name in names:
            item = cells.get((check_name, name))
            row.append(console.status_cell(item.status, item.detail) if item else "")
        rows.append(row)
    console.out.print(console.table("preflight", ["check", *names], rows))
    todo = [item for item in checks if item.status in (pre.FAIL, pre.WARN) and item.remedy]
    if todo:
        console.out.print("\nWhat to do:")
        for item in todo:
            console.out.print(console.status_cell(item.status, f"{item.node} {item.name}: {item.remedy}"),
                              soft_wrap=True)  # a remedy is a command to copy: never cut it
    console.out.print(f"\n{summary['pass']} passed, {summary['warn']} warned, "
                      f"{summary['fail']} failed, {summary['skip']} skipped")


@task(help={"hosts": HOSTS_HELP, "nodes": NODES_HELP, "dry_run": DRY_RUN_HELP, "json": JSON_HELP})
@user_errors
def dirs(c: Context, hosts: str = "hosts.toml", nodes: str = "", dry_run: bool = False,
         json: bool = False) -> None:
    """Create the directories each node needs (model cache, artifacts, state, build)."""
    cluster = inventory.load(hosts)
    plan = node_dirs.make_plan(cluster, cluster.select(nodes))
    if json:
        console.print_json({"dry_run": dry_run, "up_to_date": plan.up_to_date,
                            "steps": plan.as_json()})
    else:
        plan.show("dirs: plan" + (" (dry run: nothing will change)" if dry_run else ""))
    if dry_run or plan.up_to_date:
        if not json:
            console.out.print("up to date" if plan.up_to_date else "dry run: nothing changed")
        return
    results = plans.apply(plan)
    results.raise_for_failures()
    if not json:
        console.out.print(f"done: {sum(o.value for o in results)} change(s) on "
                          f"{len(list(results))} node(s)")
