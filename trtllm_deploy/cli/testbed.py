"""``invoke testbed.*``: a simulated cluster on this machine to try every phase on (no GPUs needed)."""

from __future__ import annotations

from pathlib import Path

from invoke import Collection, Context, task
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trtllm_deploy import console
from trtllm_deploy.cli import JSON_HELP, user_errors
from trtllm_deploy.hosts.dockercli import require_engine
from trtllm_deploy.testbed import cluster, images, layout

NAME_HELP = f"the testbed's name; several can run side by side (default: {layout.DEFAULT_NAME})"
STATE_HELP = "folder for the testbed's keys, known_hosts and hosts.toml " \
             "(default: ~/.local/state/trtllm-deploy/testbed/NAME)"


def _layout(name: str, nodes: int = 3, subnet: str = layout.DEFAULT_SUBNET,
            state_dir: str = "", fabric: str = "") -> layout.Layout:
    return layout.Layout(name=name, nodes=nodes, subnet=subnet,
                         state_dir=Path(state_dir).expanduser() if state_dir else None,
                         fabric=fabric or None)


@task(help={
    "nodes": "how many nodes (1-16); node 1 is the head",
    "name": NAME_HELP,
    "subnet": f"the testbed network's fixed IPv4 subnet (default: {layout.DEFAULT_SUBNET})",
    "base": "base image: auto (debian:bookworm-slim if it can be had, else debootstrap), "
            "debootstrap, or an image reference",
    "mirror": f"Debian mirror for debootstrap (default: {images.DEFAULT_MIRROR})",
    "fabric": "cable the nodes: pair (2 nodes back to back), ring (3 nodes, each on two cables) or "
              "switch (2 or more nodes on one network); fabric ports have Spark names and no address "
              "until `invoke fabric.setup` (default: no fabric)",
    "runtime": "build the stand-in runtime image and load it into every node (default: yes)",
    "state_dir": STATE_HELP,
    "json": JSON_HELP,
})
@user_errors
def up(c: Context, nodes: int = 3, name: str = layout.DEFAULT_NAME,
       subnet: str = layout.DEFAULT_SUBNET, base: str = "auto", mirror: str = images.DEFAULT_MIRROR,
       runtime: bool = True, state_dir: str = "", fabric: str = "", json: bool = False) -> None:
    """Start a testbed: N simulated nodes with sshd, Docker and mpirun, and a hosts.toml for them."""
    bed = cluster.Testbed(_layout(name, nodes, subnet, state_dir, fabric), base=base, mirror=mirror,
                          report=lambda line: console.err.print(line, soft_wrap=True))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console.err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(title: str, step: int, steps: int, what: str) -> None:
            if title not in tasks:
                tasks[title] = bar.add_task(f"building the {title}", total=steps)
            bar.update(tasks[title], completed=step - 1, total=steps,
                       description=f"building the {title}: {what}")

        report = bed.up(runtime=runtime, progress=progress)
    if json:
        console.print_json(report.as_json())
        return
    rows = [[n.name, n.address, n.container, n.action, n.storage_driver, n.runtime or "–",
             n.fingerprint] for n in report.nodes]
    console.out.print(console.table(
        f"testbed {name!r}: {nodes} node(s) on {report.layout.network} ({subnet})",
        ["node", "address", "container", "container action", "inner Docker", "stand-in image",
         "host key"], rows))
    cables = fabric_rows(report)
    if cables:
        console.out.print(console.table(f"fabric: {fabric}", ["network", "subnet (flushed)", "ends"],
                                        cables))
    built = [report.image] + ([report.runtime] if report.runtime else [])
    for image in built:
        console.out.print(f"image {image.tag}: {'cached' if image.cached else 'built'}")
    console.out.print(("up to date" if not report.changed else "ready")
                      + f" in {report.seconds:.1f} s. Use it with:\n"
                      f"  invoke preflight --hosts {report.layout.hosts_file}", soft_wrap=True)


def fabric_rows(report: cluster.UpReport) -> list[list[str]]:
    return [[cable["network"], cable["subnet"],
             ", ".join(f"{end['node']} {end['interface']} ({end['rdma']})" for end in cable["ends"])]
            for cable in report.as_json()["cables"]]


@task(help={"name": NAME_HELP, "state_dir": STATE_HELP, "json": JSON_HELP})
@user_errors
def status(c: Context, name: str = layout.DEFAULT_NAME, state_dir: str = "",
           json: bool = False) -> None:
    """Show the testbed's containers, network and volumes, and where its hosts.toml is."""
    bed = cluster.Testbed(_layout(name, state_dir=state_dir))
    require_engine()
    containers = bed.containers()
    if json:
        console.print_json({"name": name, "containers": containers, "networks": bed.networks(),
                            "volumes": bed.volumes(),
                            "hosts_file": str(bed.layout.hosts_file)
                            if bed.layout.hosts_file.exists() else None})
        return
    if not containers:
        console.out.print(f"testbed {name!r} is not running")
        return
    rows = [[container, info["node"], info["state"], info["image"]]
            for container, info in sorted(containers.items())]
    console.out.print(console.table(f"testbed {name!r}", ["container", "node", "state", "image"], rows))
    console.out.print(f"hosts file: {bed.layout.hosts_file}", soft_wrap=True)


@task(help={"name": NAME_HELP, "purge": "also delete the testbed's keys and files",
            "state_dir": STATE_HELP, "json": JSON_HELP})
@user_errors
def down(c: Context, name: str = layout.DEFAULT_NAME, purge: bool = False, state_dir: str = "",
         json: bool = False) -> None:
    """Remove every container, network and volume of the testbed, and only those."""
    removed = cluster.Testbed(_layout(name, state_dir=state_dir)).down(purge=purge)
    if json:
        console.print_json({"name": name, "removed": removed, "purged": purge})
        return
    count = sum(len(items) for items in removed.values())
    if not count:
        console.out.print(f"testbed {name!r}: nothing to remove")
        return
    for kind, items in removed.items():
        if items:
            console.out.print(f"removed {len(items)} {kind}: {', '.join(items)}")


ns = Collection("testbed", up, status, down)
