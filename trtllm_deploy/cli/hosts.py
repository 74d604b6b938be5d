"""``invoke hosts.*``: the inventory as trtllm-deploy reads it."""

from __future__ import annotations

from invoke import Collection, Context, task

from trtllm_deploy import console
from trtllm_deploy.cli import HOSTS_HELP, JSON_HELP, user_errors
from trtllm_deploy.hosts import inventory


@task(help={"hosts": HOSTS_HELP, "json": JSON_HELP})
@user_errors
def show(c: Context, hosts: str = "hosts.toml", json: bool = False) -> None:
    """Show the validated inventory: every node with its defaults applied."""
    cluster = inventory.load(hosts)
    if json:
        console.print_json({
            "cluster": cluster.name, "source": str(cluster.source),
            "head": cluster.head.name, "build_node": cluster.build_node_name,
            "nodes": [node.model_dump() for node in cluster.nodes],
            "preflight": cluster.preflight.model_dump(),
        })
        return
    rows = [[node.name, node.role or "worker", node.login, node.gpus,
             ", ".join(node.fabric.interfaces) or "–", ", ".join(node.fabric.rdma_devices) or "–",
             node.paths.artifacts]
            for node in cluster.nodes]
    console.out.print(console.table(
        f"{cluster.name}: {len(cluster.nodes)} node(s) from {cluster.source}"
        f" (build node: {cluster.build_node_name})",
        ["node", "role", "reached as", "GPUs", "fabric interfaces", "RDMA devices", "artifacts"],
        rows))


ns = Collection("hosts", show)
