"""``invoke engine.*``: phase 3, the deployable artifact on every node."""

from __future__ import annotations

from invoke import Collection, Context, task
from invoke.exceptions import Exit

from trtllm_deploy import console, engines, inventory
from trtllm_deploy.cli import HOSTS_HELP, JSON_HELP, NODES_HELP, user_errors

NAME_HELP = "the artifact's directory name in each node's artifact store (paths.artifacts)"
SHOWN_PROBLEMS = 5  # per node in the table; --json has them all


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


@task(help={"name": NAME_HELP, "hosts": HOSTS_HELP, "nodes": NODES_HELP, "json": JSON_HELP})
@user_errors
def verify(c: Context, name: str = "", hosts: str = "hosts.toml", nodes: str = "",
           json: bool = False) -> None:
    """Check an artifact against its manifest on every node at once (sizes, hashes, extra files)."""
    engines.check_name(name)
    cluster = inventory.load(hosts)
    selected = cluster.select(nodes)
    with console.err.status(f"verifying {name} on {len(selected)} node(s)…", spinner="dots"):
        results = engines.verify(cluster, selected, name)
    bad = [o.node.name for o in results if not (o.ok and o.value.ok)]
    if json:
        console.print_json({"artifact": name, "ok": not bad, "nodes": {
            o.node.name: o.value.as_json() if o.ok else {"ok": False, "error": o.reason}
            for o in results}})
    else:
        rows = []
        for o in results:
            if not o.ok:
                rows.append([o.node.name, console.status_cell("fail", "unreachable"), "", "", "",
                             o.reason])
                continue
            v = o.value
            problems = [f"{p['path']}: {p['kind']} ({p['detail']})" for p in v.problems]
            if len(problems) > SHOWN_PROBLEMS:
                problems = problems[:SHOWN_PROBLEMS] + [f"… {len(v.problems) - SHOWN_PROBLEMS} more"]
            rows.append([o.node.name, console.status_cell("pass" if v.ok else "fail",
                                                          "ok" if v.ok else "FAILED"),
                         f"{v.files} ({v.cached} cached)", _size(v.bytes), f"{v.seconds:.2f} s",
                         "\n".join(problems)])
        console.out.print(console.table(f"engine.verify: {name}",
                                        ["node", "result", "files", "size", "time", "problems"], rows))
    if bad:
        raise Exit(f"engine.verify: {name} failed on {', '.join(bad)}", code=1)


ns = Collection("engine", verify)
