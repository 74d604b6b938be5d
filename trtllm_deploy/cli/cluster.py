"""``invoke cluster.*``: phase 5, the nodes as one cluster: mpirun across their runtime containers."""

from __future__ import annotations

from invoke import Collection, Context, task
from invoke.exceptions import Exit

from trtllm_deploy import console
from trtllm_deploy.cli import HOSTS_HELP, JSON_HELP, user_errors
from trtllm_deploy.hosts import inventory
from trtllm_deploy.serving import clustercheck
from trtllm_deploy.source import lock as locks

VALUE_WIDTH = 24  # long values (image IDs, hashes) are cut in the table; --json has them whole


def _short(value: object) -> str:
    if value is None:
        return "–"
    text = str(value)
    return text if len(text) <= VALUE_WIDTH else text[:VALUE_WIDTH - 1] + "…"


def _interfaces(rank: dict) -> str:
    cells = []
    for iface in rank["interfaces"]:
        if not iface["exists"]:
            cells.append(f"{iface['name']} missing")
            continue
        speed = f" {iface['speed_mbps'] // 1000} Gb/s" if iface.get("speed_mbps") else ""
        cells.append(f"{iface['name']} {iface['operstate']} mtu {iface['mtu']}{speed} "
                     f"{','.join(iface['ipv4'] + iface.get('ipv6', [])) or 'no address'}")
    return "\n".join(cells) or "–"


def drift_table(drifts: list[clustercheck.Drift]):
    """The odd one out: each field that differs, the majority's value, and who differs how."""
    rows = []
    for drift in drifts:
        majority = (f"{_short(drift.majority)} ({', '.join(drift.majority_nodes)})"
                    if drift.majority_nodes else "no majority")
        odd = "\n".join(f"{node}: {_short(value)}" for node, value in drift.odd.items())
        rows.append([drift.field, majority, console.status_cell("fail", odd)])
    return console.table("drift: the nodes disagree", ["what", "majority", "differs"], rows)


def digest_table(report: clustercheck.CheckReport):
    """The image named by digest, per node: the pinned one, the same image ID, or drift."""
    rows = [[v.node, console.status_cell("pass" if v.ok else "fail", v.state), v.detail]
            for v in report.digests]
    return console.table(f"image by digest: {report.digests[0].image}", ["node", "state", "detail"], rows)


def _show(report: clustercheck.CheckReport) -> None:
    if report.digests:
        console.out.print(digest_table(report))
    if report.fixes:
        console.out.print(console.table("the pinned TensorRT-LLM", ["check", "result"], [
            ["fixes across nodes", console.status_cell("fail", report.fixes)]]))
    for line in report.warnings:
        console.err.print(line, style="yellow", highlight=False, markup=False)
    if not report.ranks:
        console.out.print("FAILED before the probe: the image is not the pinned one on every node; "
                          "nothing was started")
        return
    rows = []
    for rank in report.ranks:
        node = report.nodes[report.ranks.index(rank)]
        problems = report.problems.get(node, [])
        gpu = rank["gpu"]
        runtime = rank["runtime"]
        rows.append([
            node, str(rank["rank"]),
            f"{gpu['count']}× {', '.join(gpu['names'])}" if gpu["count"] else "none",
            _short(", ".join(gpu["compute_capability"]) or None), _short(rank["driver"]),
            f"{runtime['version'] or '–'}" + (" (stand-in)" if runtime.get("standin") else ""),
            _short(rank["image"]["id"]), _short(rank["manifest"]["sha256"]), _interfaces(rank),
            console.status_cell("fail" if problems else "pass", "\n".join(problems) or "ok")])
    console.out.print(console.table(
        "cluster.check", ["node", "rank", "GPUs", "cc", "driver", "TensorRT-LLM", "image",
                          "manifest", "interfaces", "node checks"], rows))
    if any(rank["runtime"].get("standin") for rank in report.ranks):
        console.out.print("STAND-IN: the runtime is trtllm-deploy's test double (no GPU, no inference).")
    if report.drifts:
        console.out.print(drift_table(report.drifts))
    console.out.print(f"{'passed' if report.ok else 'FAILED'} on {len(report.ranks)} node(s) "
                      f"in {report.seconds:.1f} s")


@task(help={"hosts": HOSTS_HELP,
            "name": "the artifact whose manifest every node must have the same (default: none)",
            "image": "the runtime image to check (default: each node's container.image)",
            "timeout": "seconds the probe may take across all nodes (default: 180)",
            "lock": "the TensorRT-LLM lock: the fixes a job across the nodes needs, and the image's "
                    "pinned digest (default: requirements/tensorrt-llm.lock.toml, where it exists)",
            "json": JSON_HELP})
@user_errors
def check(c: Context, hosts: str = "hosts.toml", name: str = "", image: str = "",
          timeout: float = clustercheck.TIMEOUT_S, lock: str = "", json: bool = False) -> None:
    """Run a probe on every node through mpirun in the runtime containers; stop on any drift."""
    if timeout <= 0:
        raise Exit(f"--timeout {timeout:g}: expected a number of seconds above 0", code=2)
    cluster = inventory.load(hosts)
    lockfile = locks.load(lock or locks.DEFAULT_PATH) if lock or locks.DEFAULT_PATH.exists() else None
    with console.err.status(f"probing {len(cluster.nodes)} node(s) through mpirun…", spinner="dots"):
        report = clustercheck.run(cluster, image=image or None, artifact=name or None, timeout=timeout,
                                  lockfile=lockfile)
    if json:
        console.print_json(report.as_json())
    else:
        _show(report)
    if not report.ok:
        odd = sorted({node for drift in report.drifts for node in drift.odd}
                     | {node for node, problems in report.problems.items() if problems}
                     | {v.node for v in report.digests if not v.ok})
        what = ", ".join([drift.field for drift in report.drifts]
                         + (["image digest"] if any(not v.ok for v in report.digests) else [])
                         + (["fixes across nodes"] if report.fixes else [])) or "node checks"
        if not odd:
            odd = ["the pin"]
        raise Exit(f"cluster.check: {what} differ or failed on {', '.join(odd)}", code=1)


ns = Collection("cluster", check)
