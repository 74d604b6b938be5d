"""`invoke deploy` with nothing to do, on testbeds of 2, 4 and 6 nodes, in one run.

Target (phase-5 issue): a re-run of deploy that finds everything done takes under 3 s, and on 6
nodes at most 1.3x what it takes on 2. For each size the run brings a testbed up (images cached),
lets the nodes trust each other (ssh.setup), deploys a tiny artifact once (every phase does its
work), then times `invoke deploy` again several times as a user runs it (a new process: Python
start-up and imports included), and the pipeline alone in this process. Beside them, the floor:
one `ssh node true` to every node at once, what asking every node anything costs; and the CPU the
no-op took on the head (this process) and in each node's container (its cgroup), which tells the
head's cost per node from the simulated nodes' own work, which here shares the head's cores.

Run it with `nox -s bench -- deploy` (or `python benchmarks/deploy_noop.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trtllm_deploy.artifact import models  # noqa: E402
from trtllm_deploy.hosts import sshsetup  # noqa: E402
from trtllm_deploy.serving import deploy  # noqa: E402
from trtllm_deploy.source import lock as locks  # noqa: E402
from trtllm_deploy.testbed import artifact as tiny  # noqa: E402
from trtllm_deploy.testbed import cluster as testbeds  # noqa: E402

TARGET_S = 3.0
TARGET_RATIO = 1.3


def ssh_floor(cluster) -> float:
    """One `ssh node true` to every node at once (the OpenSSH client, host keys checked)."""
    def one(node) -> None:
        subprocess.run(["ssh", "-i", node.identity_file, "-o", f"UserKnownHostsFile={node.known_hosts}",
                        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(node.port),
                        f"{node.user}@{node.address}", "true"], check=True, capture_output=True)

    started = time.perf_counter()
    with ThreadPoolExecutor(len(cluster.nodes)) as pool:
        list(pool.map(one, cluster.nodes))
    return time.perf_counter() - started


def container_cpu(ids: list[str]) -> float | None:
    """CPU seconds the containers have used (cgroup v1 cpuacct or v2 cpu.stat), None if unreadable."""
    total = 0.0
    for cid in ids:
        for path, scale, key in ((f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage", 1e9, None),
                                 (f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat", 1e6,
                                  "usage_usec")):
            try:
                text = Path(path).read_text()
            except OSError:
                continue
            value = (int(text) if key is None else
                     int(next(line.split()[1] for line in text.splitlines() if line.startswith(key))))
            total += value / scale
            break
        else:
            return None
    return total


def head_cpu() -> float:
    """CPU seconds of this process and the children it has waited for (ssh clients, if any)."""
    import resource
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(nodes: int, repeats: int, work: Path, base: str) -> dict:
    layout = testbeds.Layout(name=f"benchdeploy{nodes}", nodes=nodes, subnet=f"10.213.{230 + nodes}.0/24",
                             state_dir=work / f"testbed{nodes}")
    bed = testbeds.Testbed(layout, base=base)
    try:
        bed.up(runtime=True)
        cluster = bed.inventory()
        sshsetup.apply(sshsetup.look(cluster))
        folder = tiny.make(work / "engines" / f"tiny-bf16-tp{nodes}-bench")
        request = deploy.Request(artifact_dir=folder, tp=nodes, job="bench",
                                 env=(("STANDIN_LOAD_SECONDS", "1"),))
        lockfile, catalog = locks.load(ROOT / "requirements" / "tensorrt-llm.lock.toml"), models.load(None)
        started = time.perf_counter()
        deploy.run(cluster, lockfile, catalog, request)
        first = time.perf_counter() - started
        cli, inprocess, head, per_node = [], [], [], []
        ids = [subprocess.run(["docker", "inspect", "-f", "{{.Id}}", layout.container(index)],
                              capture_output=True, text=True).stdout.strip() for index in range(1, nodes + 1)]
        env = dict(os.environ)
        argv = [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "deploy", "--artifact-dir",
                str(folder), "--tp", str(nodes), "--job", "bench", "--env", "STANDIN_LOAD_SECONDS=1",
                "--hosts", str(layout.hosts_file), "--json"]
        for _ in range(repeats):
            started = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, env=env)
            cli.append(time.perf_counter() - started)
            actions = {p["phase"]: p["action"] for p in json.loads(done.stdout)["phases"]}
            assert actions["launch"] == "up to date", done.stderr
            node_before, head_before = container_cpu(ids), head_cpu()
            started = time.perf_counter()
            report = deploy.run(cluster, lockfile, catalog, request)
            inprocess.append(time.perf_counter() - started)
            head.append(head_cpu() - head_before)
            node_after = container_cpu(ids)
            if node_before is not None and node_after is not None:
                per_node.append((node_after - node_before) / nodes)
            assert report.phases[-2].action == "up to date"
        floor = statistics.median(ssh_floor(cluster) for _ in range(repeats))
        from trtllm_deploy.serving import launch

        launch.stop(cluster, "bench")
        return {"nodes": nodes, "first": first, "cli": statistics.median(cli),
                "inprocess": statistics.median(inprocess), "floor": floor,
                "head_cpu": statistics.median(head),
                "node_cpu": statistics.median(per_node) if per_node else None,
                "phases": {p.name: round(p.seconds, 3) for p in report.phases}}
    finally:
        bed.down(purge=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,4,6")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base", default="auto")
    args, _ = parser.parse_known_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        rows = [measure(size, args.repeats, Path(tmp), args.base) for size in sizes]
    base = rows[0]["cli"]
    print(f"\ndeploy with nothing to do ({os.cpu_count()} cores; median of {args.repeats}; target "
          f"< {TARGET_S:g} s, and {sizes[-1]} nodes <= {TARGET_RATIO}x {sizes[0]} nodes)")
    print(f"{'nodes':>5} | {'first deploy':>12} | {'no-op (CLI)':>11} | {'x ' + str(sizes[0]) + ' nodes':>10}"
          f" | {'no-op (in process)':>18} | {'ssh floor':>9} | {'head CPU':>8} | {'CPU per node':>12}")
    print("-" * 111)
    for row in rows:
        node_cpu = f"{row['node_cpu']:>10.2f} s" if row["node_cpu"] is not None else f"{'-':>12}"
        print(f"{row['nodes']:>5} | {row['first']:>10.2f} s | {row['cli']:>9.2f} s | "
              f"{row['cli'] / base:>10.2f} | {row['inprocess']:>16.2f} s | {row['floor']:>7.2f} s | "
              f"{row['head_cpu']:>6.2f} s | {node_cpu}")
    print(f"(head CPU: this process during the in-process no-op; CPU per node: each node's container "
          f"during it, all of which share this machine's {os.cpu_count()} cores with the head)")
    print("\nphases of the last in-process no-op run (s):")
    for row in rows:
        print(f"  {row['nodes']} nodes: {row['phases']}")
    worst = max(row["cli"] for row in rows)
    ratio = rows[-1]["cli"] / base
    print(f"\nunder {TARGET_S:g} s: {'met' if worst < TARGET_S else 'NOT met'} (worst {worst:.2f} s); "
          f"{sizes[-1]}/{sizes[0]} nodes: {ratio:.2f}x, {'met' if ratio <= TARGET_RATIO else 'NOT met'}")


if __name__ == "__main__":
    main()
