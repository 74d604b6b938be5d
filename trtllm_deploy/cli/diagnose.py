"""``invoke diagnose.*``: what the GPUs, the collectives and the fabric actually do, and one archive
of it all for a bug report."""

from __future__ import annotations

import time
from pathlib import Path

from invoke import Collection, Context, task
from invoke.exceptions import Exit

from trtllm_deploy import console
from trtllm_deploy.cli import HOSTS_HELP, JSON_HELP, show_plan, user_errors
from trtllm_deploy.hosts import inventory
from trtllm_deploy.measure.diagnose import gpu as gpu_diag
from trtllm_deploy.measure.diagnose import link as link_diag
from trtllm_deploy.measure.diagnose import nccl as nccl_diag

OUT_HELP = "where the files go (default: diagnostics/<task>-<time>)"


def _out(out: str, what: str) -> Path:
    return Path(out or f"diagnostics/{what}-{time.strftime('%Y%m%d-%H%M%S')}")


@task(help={"hosts": HOSTS_HELP, "seconds": "how long to sample (default: 30)",
            "interval": "seconds between samples, at least 1 (default: 1)", "out": OUT_HELP,
            "json": JSON_HELP})
@user_errors
def gpu(c: Context, hosts: str = "hosts.toml", seconds: float = 30, interval: int = 1, out: str = "",
        json: bool = False) -> None:
    """Sample every node's GPUs (utilisation, memory, power, clocks, temperature) during a run."""
    if seconds <= 0 or interval < 1:
        raise Exit("--seconds must be above 0 and --interval at least 1", code=2)
    cluster = inventory.load(hosts)
    folder = _out(out, "gpu")
    with console.err.status(f"sampling {len(cluster.nodes)} node(s) for {seconds:g} s…", spinner="dots"):
        report = gpu_diag.sample_nodes(cluster, seconds, interval, folder)
    if json:
        console.print_json(report)
    else:
        rows = []
        for node, gpus in report["nodes"].items():
            for index, stats in gpus.items():
                rows.append([node, index, *(gpu_diag.cell(stats.get(metric), gpu_diag.UNITS[metric])
                                            if metric in stats else "–" for metric in gpu_diag.SHOWN)])
        console.out.print(console.table("diagnose.gpu: mean / max", ["node", "gpu", *gpu_diag.SHOWN], rows))
        for node, reason in report["failed"].items():
            console.out.print(console.status_cell("fail", f"{node}: {reason}"))
        if report["chart"]:
            legend = ", ".join(f"{name} {colour}" for name, colour in report["legend"].items())
            console.out.print(f"chart: {report['chart']} (panels: {', '.join(gpu_diag.CHARTED)}; {legend})")
        console.out.print(f"raw samples: {report['out']}/<node>.dmon.txt")
    if report["failed"]:
        raise Exit(f"diagnose.gpu: no samples from {', '.join(report['failed'])}", code=1)


@task(help={"hosts": HOSTS_HELP, "size": "message size, K/M/G (default: 16G, as NVIDIA's Spark check)",
            "gate_gbps": "the bus bandwidth a link must reach, GB/s (default: 21.875, a 200 Gb/s link)",
            "op": "all_gather (default) or all_reduce", "image": "runtime image (default: container.image)",
            "json": JSON_HELP})
@user_errors
def nccl(c: Context, hosts: str = "hosts.toml", size: str = nccl_diag.DEFAULT_SIZE,
         gate_gbps: float = nccl_diag.GATE_GBPS, op: str = "all_gather", image: str = "",
         json: bool = False) -> None:
    """Measure NCCL bus bandwidth across the nodes in their containers, gated; RDMA or sockets."""
    if op not in nccl_diag.NCCL_TESTS:
        raise Exit(f"--op {op}: expected all_gather or all_reduce", code=2)
    try:
        nccl_diag.nccl_bench.parse_size(size)
    except ValueError as exc:
        raise Exit(str(exc), code=2) from None
    cluster = inventory.load(hosts)
    with console.err.status(f"{op} of {size} across {len(cluster.nodes)} node(s)…", spinner="dots"):
        report = nccl_diag.run(cluster, op=op, size=size, gate_gbps=gate_gbps, image=image or None)
    if json:
        console.print_json(report.as_json())
    else:
        rows = [[m.op, console.size(m.size), f"{m.time_us:.0f}", f"{m.algbw:.2f}", f"{m.busbw:.2f}",
                 "yes" if m.correct else "NO"] for m in report.measurements]
        columns = ["op", "size", "time µs", "algbw GB/s", "busbw GB/s", "correct"]
        console.out.print(console.table(f"diagnose.nccl ({report.tool})", columns, rows))
        console.out.print(f"transport: {report.transport.describe()}")
        console.out.print(console.status_cell("pass" if report.verdict.passed else "fail",
                                              f"gate: {report.verdict.reason}"))
        if not report.measurements and report.tail:
            console.out.print(report.tail)
    if not report.verdict.passed:
        raise Exit(f"diagnose.nccl: {report.verdict.reason}", code=1)


@task(help={"hosts": HOSTS_HELP,
            "min_speed": "the link speed every fabric interface must report, Mb/s (default: 200000; 0: any)",
            "json": JSON_HELP})
@user_errors
def link(c: Context, hosts: str = "hosts.toml", min_speed: int = link_diag.SPARK_SPEED_MBPS,
         json: bool = False) -> None:
    """Check the fabric: link speed, MTU on both ends, a ping matrix, duplicate subnets, down links."""
    cluster = inventory.load(hosts)
    with console.err.status(f"reading the fabric of {len(cluster.nodes)} node(s)…", spinner="dots"):
        report = link_diag.run(cluster, min_speed or None)
    if json:
        console.print_json(report.as_json())
    else:
        names = list(report.nodes)
        rows = []
        for name, node in report.nodes.items():
            interfaces = "\n".join(
                f"{i} {(node.links.get(i) or {}).get('operstate', 'missing')} mtu "
                f"{(node.links.get(i) or {}).get('mtu', '–')} {node.ethtool.get(i, {}).get('speed') or '–'}"
                for i in node.fabric) or "none in hosts.toml"
            pings = [("–" if peer == name else
                      (f"{node.ping[peer]['rtt_ms']:.2f} ms" if node.ping.get(peer, {}).get("received")
                       else "no reply")) for peer in names]
            problems = report.problems.get(name, [])
            rows.append([name, report.addresses.get(name, "–"), interfaces, *pings,
                         console.status_cell("fail" if problems else "pass", "\n".join(problems) or "ok")])
        console.out.print(console.table("diagnose.link (rows ping columns)",
                                        ["node", "fabric address", "interfaces", *names, "checks"], rows))
        for line in report.across:
            console.out.print(console.status_cell("fail", line))
        for name, reason in report.unreachable.items():
            console.out.print(console.status_cell("fail", f"{name}: {reason}"))
    if not report.ok:
        raise Exit("diagnose.link: problems found (see above)", code=1)


@task(help={"hosts": HOSTS_HELP, "seconds": "how long to trace (default: 30)", "out": OUT_HELP,
            "program": "the command to profile, space-separated (default: the current deployment's"
                       " serving command in its head container)",
            "dry_run": "show the command and where the report would go; run nothing", "json": JSON_HELP})
@user_errors
def profile(c: Context, hosts: str = "hosts.toml", seconds: int = 30, out: str = "",
            program: str = "", dry_run: bool = False, json: bool = False) -> None:
    """Trace a short serving run on the head node with Nsight Systems and fetch the report."""
    from trtllm_deploy.measure.diagnose import profile as profile_diag

    if seconds <= 0:
        raise Exit("--seconds must be above 0", code=2)
    cluster = inventory.load(hosts)
    if dry_run:
        planned = profile_diag.plan(cluster, seconds, _out(out, "profile"), program=program.split() or None,
                                    in_container=not program)
        return show_plan(planned, json)
    report = profile_diag.run(cluster, seconds, _out(out, "profile"),
                              program=program.split() or None, in_container=not program)
    console.out.print(f"Nsight Systems report: {report} (open it with nsys-ui or `nsys stats`)")


@task(help={"hosts": HOSTS_HELP, "out": "the archive (default: diagnostics/bundle-<time>.tar.gz)",
            "nccl": "also measure NCCL bandwidth (slow)", "log_lines": "lines of each log (default: 200)"})
@user_errors
def bundle(c: Context, hosts: str = "hosts.toml", out: str = "", nccl: bool = False,
           log_lines: int = 200) -> None:
    """Write one archive for a bug report: nodes, versions, fabric, logs — secrets scrubbed."""
    import json as json_lib

    from trtllm_deploy.measure.diagnose import bundle as bundle_diag

    cluster = inventory.load(hosts)
    with console.err.status("collecting…", spinner="dots"):
        files = bundle_diag.collect(cluster, Path(hosts), log_lines)
        if nccl:
            files["nccl.json"] = json_lib.dumps(nccl_diag.run(cluster).as_json(), indent=1)
    path = bundle_diag.write(files, Path(out or f"{_out('', 'bundle')}.tar.gz"))
    console.out.print(f"bundle: {path} ({len(files)} files, secrets scrubbed)")


ns = Collection("diagnose", gpu, nccl, link, profile, bundle)
