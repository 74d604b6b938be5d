"""Preflight wall time across 1, 2, 4 and 8 real SSH nodes (sshd on loopback), in one run.

Target (foundation issue): 8 nodes take at most 1.5x the time of 1 node. The baseline beside
it is the same preflight with the nodes visited one after another.

Every "node" here shares this machine's cores, so what each node runs (sshd, `docker info`,
...) competes for them in a way it never would on real nodes. The benchmark therefore runs
twice: with the real tools, and with nvidia-smi, docker, mpirun and git answered by stand-ins
that print recorded outputs (tests/data), which leaves the tool's own fan-out, SSH and the
shell - the part whose scaling the target is about.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sshd import start_sshd, write_hosts  # noqa: E402

from trtllm_deploy import inventory, preflight  # noqa: E402


def node_cpu(servers) -> float:
    """CPU seconds the sshd listeners' finished children (sessions, commands) have used."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for server in servers:
        fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[13]) + int(fields[14])  # cutime + cstime
    return total / ticks


def measure(cluster: inventory.Cluster, workers: int | None, repeats: int,
            servers=(), cpu: list | None = None) -> list[float]:
    times = []
    for _ in range(repeats):
        node_before, client_before = node_cpu(servers), time.process_time()
        started = time.perf_counter()
        observations = preflight.run(cluster, cluster.nodes, workers=workers)
        times.append(time.perf_counter() - started)
        if cpu is not None:
            time.sleep(0.2)  # let sshd reap its session children before reading their CPU time
            cpu.append((time.process_time() - client_before, node_cpu(servers) - node_before))
        unreached = [seen.node.name for seen in observations if seen.error]
        if unreached:
            raise SystemExit(f"nodes not reached: {unreached}: {observations[0].error}")
    return times


DATA = ROOT / "tests" / "data"
STAND_INS = {
    "nvidia-smi": 'case "$*" in *--query-gpu*) echo "0, NVIDIA GB10, 12.1, 580.95.05, [N/A]";;'
                  ' *) cat "%s";; esac' % (DATA / "nvidia-smi/gb10-580.95.05.txt"),
    "docker": 'cat "%s"' % (DATA / "docker/nvidia-runtime-registered.json"),
    "mpirun": "echo 'mpirun (Open MPI) 4.1.6'",
    "git": 'case "$1" in lfs) echo "git-lfs/3.4.1 (GitHub; linux arm64; go 1.22.2)";;'
           ' *) echo "git version 2.43.0";; esac',
}


def stand_in_bin(root: Path) -> Path:
    directory = root / "stand-in-bin"
    directory.mkdir()
    for name, body in STAND_INS.items():
        (directory / name).write_text(f"#!/bin/sh\n# recorded output, benchmark only\n{body}\n")
        (directory / name).chmod(0o755)
    return directory


def run_sizes(root: Path, label: str, sizes: list[int], repeats: int, **sshd_options) -> list:
    servers = [start_sshd(root / f"{label}-node{i}", **sshd_options) for i in range(max(sizes))]
    try:
        rows = []
        for size in sizes:
            cluster = inventory.load(write_hosts(root / f"{label}-hosts-{size}.toml", servers[:size]))
            measure(cluster, None, 1)  # warm-up: first connections, page cache
            cpu: list = []
            parallel = statistics.median(measure(cluster, None, repeats, servers[:size], cpu))
            serial = statistics.median(measure(cluster, 1, repeats))
            client = statistics.median(c for c, _ in cpu)
            nodes = statistics.median(n for _, n in cpu)
            rows.append((size, parallel, serial, client, nodes))
        return rows
    finally:
        for server in servers:
            server.stop()


def report(title: str, rows: list, repeats: int) -> bool:
    one, largest = rows[0][1], max(row[0] for row in rows)
    cores = os.cpu_count() or 1
    print(f"\n{title} (median of {repeats} runs, real sshd on 127.0.0.1, {cores} cores)")
    print(f"{'nodes':>5}  {'parallel s':>10}  {'x 1 node':>8}  {'one by one s':>12}  {'speed-up':>8}"
          f"  {'client CPU s':>12}  {'node CPU s':>10}  {'CPU floor s':>11}  target")
    for size, parallel, serial, client, nodes in rows:
        ratio = parallel / one
        target = f"<= 1.5x: {'met' if ratio <= 1.5 else 'MISSED'}" if size == largest else ""
        # With every node on this machine, the run cannot beat all CPU spent divided by the cores.
        floor = (client + nodes) / cores
        print(f"{size:>5}  {parallel:>10.3f}  {ratio:>8.2f}  {serial:>12.3f}  {serial / parallel:>8.2f}"
              f"  {client:>12.3f}  {nodes:>10.3f}  {floor:>11.3f}  {target}")
    return rows[-1][1] / one <= 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", default="1,2,4,8")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        real = run_sizes(root, "real", sizes, args.repeats)
        bin_dir, home = stand_in_bin(root), root / "home"
        home.mkdir()
        system_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        stand_in = run_sizes(root, "stand-in", sizes, args.repeats, home=False,
                             extra_config=f"SetEnv HOME={home} PATH={bin_dir}:{system_path}\n")
    report("preflight, real tools on every node (nodes share this machine's cores)", real, args.repeats)
    met = report("preflight, node tools answered from recordings (the tool's own scaling)",
                 stand_in, args.repeats)
    if not met:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
