"""``invoke push``: phase 4, the artifact and the image to every node, only what each one lacks."""

from __future__ import annotations

from invoke import Context, task
from invoke.exceptions import Exit
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from trtllm_deploy import console
from trtllm_deploy import push as pushing
from trtllm_deploy.errors import InputError
from trtllm_deploy.cli import DRY_RUN_HELP, HOSTS_HELP, JSON_HELP, NODES_HELP, user_errors
from trtllm_deploy.hosts import inventory


def _plan_rows(plans) -> list[list]:
    rows = []
    for o in plans:
        if not o.ok:
            rows.append([o.node.name, console.status_cell("fail", o.reason), ""])
            continue
        p = o.value
        rows.append([o.node.name,
                     _cell(p.artifact.up_to_date, p.artifact.describe()) if p.artifact else "",
                     _cell(p.image.up_to_date, p.image.describe()) if p.image else ""])
    return rows


def _cell(up_to_date: bool, text: str):
    return console.status_cell("pass" if up_to_date else "warn", text)


def _came_from(result) -> str:
    """Where a node's bytes came from: the artifact's upstream node, and the image's holder."""
    parts = [result.received_from or "", f"image: {result.image_from}" if result.image_from else ""]
    return ", ".join(part for part in parts if part) or "–"


def _summary_rows(results) -> list[list]:
    rows = []
    for o in results:
        if not o.ok:
            rows.append([o.node.name, console.status_cell("fail", "FAILED"), "", "", "", "", "",
                         o.reason])
            continue
        r = o.value
        actions = [part.action for part in (r.artifact, r.image) if part]
        if r.artifact and r.artifact.streams > 1:
            actions[0] += f" ({r.artifact.streams} streams)"
        rate = f"{console.size(r.bytes_sent / r.seconds)}/s" if r.bytes_sent and r.seconds else "–"
        rows.append([o.node.name, console.status_cell("pass", ", ".join(actions)),
                     _came_from(r), console.size(r.bytes_sent), console.size(r.bytes_skipped),
                     f"{r.seconds:.2f} s", rate, ""])
    return rows


@task(help={"name": "the artifact's directory name in --store (sent to paths.artifacts/NAME)",
            "store": "where artifacts are on this machine (default: engines/)",
            "image": "an image to send too, from the node that holds it (the build node first, then the "
                     "head, then any) through a registry there; from this machine's engine only "
                     "where no node has it. Only missing layers travel; ID and labels are checked",
            "transport": "ssh (default: encrypted) or fabric: the artifact's bytes as plain TCP to each"
                         " node's fabric address, for private direct links (token and checks over SSH)",
            "streams": "connections per node (per hop of a chain) at once, each taking the next file "
                       f"(default {pushing.files.STREAMS})",
            "from": "where the artifact is: this machine's --store (default), or a node's store "
                    "(its paths.artifacts/NAME): `head` or a node name",
            "image_from": "where the image is: a node's name, or `here` for this machine's engine "
                          "(default: found on the nodes, the build node first, else here)",
            "route": "chain (node to node, the default when several nodes need the artifact) or star "
                     "(every node straight from the source)",
            "hosts": HOSTS_HELP, "nodes": NODES_HELP, "json": JSON_HELP, "dry_run": DRY_RUN_HELP})
@user_errors
def push(c: Context, name: str = "", store: str = "engines", image: str = "", hosts: str = "hosts.toml",
         nodes: str = "", transport: str = "ssh", streams: int = pushing.files.STREAMS, json: bool = False,
         dry_run: bool = False, from_: str = "", route: str = "", image_from: str = "") -> None:
    """Send every node what it lacks of an artifact and an image, verified there, node to node."""
    pushing.check_transport(transport)
    pushing.check_streams(streams)
    pushing.check_route(route or None)
    if from_ and not name:
        raise InputError("--from NODE: give --name, the artifact in that node's store")
    if not name and not image:
        raise InputError("nothing to push: give --name ARTIFACT, --image REF, or both")
    local = pushing.source(store, name) if name and not from_ else None  # bad input: exit 2 first
    if image:
        pushing.registry.repository_and_tag(image)  # a name a registry can hold, or exit 2 here
    cluster = inventory.load(hosts)
    if from_:
        src = pushing.source_on(cluster.head if from_ == "head" else cluster.node(from_), name)
    else:
        src = local or pushing.Source()
    if image_from and not image:
        raise InputError("--image-from: give --image REF too")
    if image:
        with console.err.status(f"looking for {image}…", spinner="dots"):
            holding = (pushing.holder.at(cluster.nodes, image, image_from) if image_from else
                       pushing.holder.locate(cluster.nodes, image,
                                             prefer=(cluster.build_node_name, cluster.head.name)))
        src = pushing.with_image(src, holding)
    selected = cluster.select(nodes)
    what = " and ".join(x for x in (name, image) if x)
    with console.err.status(f"asking {len(selected)} node(s) what they have of {what}…",
                            spinner="dots"):
        plans = pushing.look(selected, src)
    way = pushing.route_of(plans, src, route or None) if name else None
    image_way = pushing.image_route_of(plans, src)
    if dry_run:
        if json:
            console.print_json({"dry_run": True, "artifact": name or None, "image": image or None,
                                "from": src.label if name else None, "route": way,
                                "image_from": src.image_label if image else None,
                                "image_route": image_way,
                                "nodes": {o.node.name: o.value.as_json() if o.ok else
                                          {"ok": False, "error": o.reason} for o in plans}})
        else:
            console.out.print(console.table(f"push: plan for {what} (dry run: nothing will change)",
                                            ["node", "artifact", "image"], _plan_rows(plans)))
            if way:
                console.out.print(f"route of {name}: {way}")
            if image_way:
                console.out.print(f"route of {image}: {image_way}")
        if plans.failed:
            raise Exit(plans.summary(), code=1)
        return
    pushing.require_room(plans)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=console.err, transient=True,
                  disable=json) as bar:
        tasks = {}
        carried = pushing.expected_bytes(plans, route or None)
        for o in plans:
            if o.ok and not o.value.up_to_date:
                tasks[o.node.name] = bar.add_task(o.node.name, total=carried.get(o.node.name) or None)

        def advance(node: str, count: int) -> None:
            bar.advance(tasks[node], count)

        results = pushing.send(plans, src, progress=advance, transport=transport, streams=streams,
                               route=route or None)
    if json:
        console.print_json({"artifact": name or None, "image": image or None,
                            "from": src.label if name else None, "route": way,
                            "image_from": src.image_label if image else None, "image_route": image_way,
                            "ok": not results.failed,
                            "nodes": {o.node.name: o.value.as_json() if o.ok else
                                      {"ok": False, "error": o.reason} for o in results}})
    else:
        console.out.print(console.table(f"push: {what}" + (f" ({way})" if way else ""),
                                        ["node", "result", "from", "sent", "skipped", "time", "rate",
                                         "problem"], _summary_rows(results)))
    if results.failed:
        raise Exit(f"push: {results.summary()}", code=1)
