"""Fan-out: one artifact from the head to 1, 3 and 5 workers — a star, a chain, and rsync.

For each worker count, in one run, the same checkpoint (4 GiB in 20 files) from the head:

- ``star``: ``push --route star``: the head sends every worker its own copy at once (fabric
  transport: plain TCP, checked against the manifest), so the head's one link carries N copies;
- ``chain``: ``push --route chain``: the head sends one copy to the first worker, which passes each
  record on to the next while it writes its own, and so on (fabric hops);
- ``rsync``: ``rsync -a`` from the head to every worker at once over SSH (what people do by hand).

Target (issue 14): the chain to 5 workers takes at most 1.3x its time to 1 worker (a star needs
about 5x where the head's link is the limit).

``--nodes testbed`` (the default): 6 Docker testbed nodes, spark-1 the head holding the artifact in
its store, each node's link limited to ``--link-mbit`` in each direction's egress with ``tc``
(token bucket), so the links are the limit, as between Sparks, not this machine's 2 cores that
every node shares. ``--nodes sshd``: the head is this machine and the workers real sshd servers on
loopback addresses (benchmarks/push.py's mode), no link limit: for a machine with cores to spare,
where every worker's receiver, hashing and fsync get cores of their own
(benchmarks/carry_ssh_tools.sh brings sshd and rsync to a machine that lacks them).

Run it with ``nox -s bench -- fanout``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from push import SshdNodes, make_checkpoint, rsync_parallel, sha256_rate, step  # noqa: E402

from trtllm_deploy import push as pushing  # noqa: E402
from trtllm_deploy.artifact import manifest  # noqa: E402
from trtllm_deploy.hosts import hop, shell, sshsetup  # noqa: E402
from trtllm_deploy.hosts.ssh import SSH  # noqa: E402

MiB = 1 << 20
NAME = "bench-ckpt"


def with_fabric(nodes):
    """Each node's own address as its fabric address: chain hops and the star's fabric transport
    then use plain TCP there, as between Sparks on their ConnectX-7 link."""
    return [node.model_copy(update={"fabric": node.fabric.model_copy(update={"address": node.host})})
            for node in nodes]


def timed_push(workers, src, route: str, streams: int) -> tuple[float, dict]:
    started = time.perf_counter()
    result = pushing.push(workers, src, transport="fabric", streams=streams, route=route)
    seconds = time.perf_counter() - started
    result.raise_for_failures()
    came = {}
    for outcome in result:
        sent = outcome.value.artifact
        assert sent is not None and sent.action != "up to date", outcome.node.name
        came[outcome.node.name] = outcome.value.received_from
    return seconds, came


class Testbed:
    """Six testbed nodes with rate-limited links; spark-1 holds the artifact in its store."""

    def __init__(self, scratch: Path, args):
        from trtllm_deploy.hosts.dockercli import require_engine
        from trtllm_deploy.testbed import cluster, images

        require_engine()
        layout = cluster.Layout(name="benchfanout", nodes=1 + args.max_workers, subnet=args.subnet,
                                state_dir=scratch / "bed")
        self.bed = cluster.Testbed(layout, base=images.resolve_base(args.base))
        self.bed.up(runtime=False)
        inventory = self.bed.inventory()
        sshsetup.apply(sshsetup.look(inventory))  # rsync and SSH hops go node to node
        self.head, *rest = with_fabric(inventory.nodes)
        self.workers = rest
        store = scratch / "engines"
        checkpoint = make_checkpoint(store / NAME, int(args.gib * (1 << 30)), args.files)
        self.size = sum(e["size"] for e in manifest.load(checkpoint)["files"].values())
        pushing.push([self.head], pushing.source(store, NAME), transport="fabric").raise_for_failures()
        shutil.rmtree(checkpoint)
        self.src = pushing.source_on(self.head, NAME)
        self.label = f"testbed nodes, every link limited to {args.link_mbit} Mbit/s"
        for index in layout.indexes:  # before anything is measured: every node's egress
            self._docker_exec(index, ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate",
                                      f"{args.link_mbit}mbit", "burst", "4mb", "latency", "200ms"])

    def _docker_exec(self, index: int, argv: list[str]) -> None:
        import subprocess

        subprocess.run(["docker", "exec", self.bed.layout.container(index), *argv], check=True,
                       capture_output=True, timeout=120)

    def clean(self) -> None:
        for index in range(2, 2 + len(self.workers)):
            self._docker_exec(index, ["sh", "-c", "rm -rf /home/spark/trtllm-deploy/engines "
                                                  "/home/spark/bench-rsync"])

    def rsync(self, workers) -> float:
        """rsync from the head's store to every worker at once, started on the head."""
        store = f"trtllm-deploy/engines/{NAME}/"
        jobs = " ".join(shell.join(["rsync", "-a", "-e", shell.join(hop.ssh_argv(w, fabric=False)[:-1]),
                                    store, f"{hop.address(w, fabric=False)}:bench-rsync/"]) + " &"
                        for w in workers)
        head = SSH(self.head)
        try:
            started = time.perf_counter()
            head.run(["sh", "-c", f"cd ~ && {jobs} wait"], timeout=3600)
            return time.perf_counter() - started
        finally:
            head.close()

    def stop(self) -> None:
        self.bed.down(purge=True)


class Loopback:
    """This machine as the head, sshd workers on loopback addresses, no link limit."""

    def __init__(self, scratch: Path, args):
        self.nodes = SshdNodes(scratch / "nodes", count=args.max_workers)
        self.workers = with_fabric(self.nodes.workers)
        store = scratch / "engines"
        checkpoint = make_checkpoint(store / NAME, int(args.gib * (1 << 30)), args.files)
        self.size = sum(e["size"] for e in manifest.load(checkpoint)["files"].values())
        self.checkpoint = checkpoint
        self.src = pushing.source(store, NAME)
        self.label = f"sshd workers on loopback ({os.cpu_count()} cores shared, no link limit)"

    def clean(self) -> None:
        self.nodes.clean()

    def rsync(self, workers) -> float | None:
        if not shutil.which("rsync"):
            return None
        subset = type("Subset", (), {"workers": self.nodes.workers[:len(workers)], "path": self.nodes.path})
        return rsync_parallel(subset, self.checkpoint)

    def stop(self) -> None:
        self.nodes.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--workers", default="1,3,5")
    parser.add_argument("--streams", type=int, default=pushing.files.STREAMS)
    parser.add_argument("--nodes", choices=("testbed", "sshd"), default="testbed")
    parser.add_argument("--link-mbit", type=int, default=800,
                        help="testbed: every node's egress limit (a scaled-down fabric link)")
    parser.add_argument("--subnet", default="10.213.242.0/24")
    parser.add_argument("--base", default="auto")
    parser.add_argument("--scratch", default=None, help="where the checkpoint and stores go (default: tmp)")
    args, _ = parser.parse_known_args()
    counts = [int(n) for n in args.workers.split(",")]
    args.max_workers = max(counts)

    rows = []
    with tempfile.TemporaryDirectory(prefix="trtllm-bench-fanout-", dir=args.scratch) as scratch:
        rig = (Testbed if args.nodes == "testbed" else Loopback)(Path(scratch), args)
        try:
            for count in counts:
                workers = rig.workers[:count]
                rig.clean()
                star, _ = timed_push(workers, rig.src, "star", args.streams)
                step(f"star to {count}", star)
                rig.clean()
                chain, came = timed_push(workers, rig.src, "chain", args.streams)
                step(f"chain to {count} ({', '.join(f'{n} from {f}' for n, f in came.items())})", chain)
                rig.clean()
                rsync = rig.rsync(workers)
                if rsync is not None:
                    step(f"rsync to {count}", rsync)
                rig.clean()
                rows.append((count, star, chain, rsync))
        finally:
            rig.stop()
    one = next(((star, chain) for count, star, chain, _ in rows if count == 1), None)
    print(f"\nfan-out of {args.files} files, {rig.size / (1 << 30):.2f} GiB, from the head to {rig.label} "
          f"({os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.1f}; one core hashes "
          f"SHA-256 at {sha256_rate():.0f} MB/s)")
    print(f"{'workers':>7} {'star s':>8} {'chain s':>8} {'rsync s':>8}  {'star/1':>7} {'chain/1':>8}  target")
    for count, star, chain, rsync in rows:
        star_ratio = f"{star / one[0]:7.2f}" if one else f"{'-':>7}"
        chain_ratio = f"{chain / one[1]:8.2f}" if one else f"{'-':>8}"
        verdict = ""
        if one and count == max(counts) and count > 1:
            verdict = f"chain <= 1.3x its 1-worker time: {'met' if chain <= 1.3 * one[1] else 'MISSED'}"
        shown = f"{rsync:8.2f}" if rsync is not None else f"{'-':>8}"
        print(f"{count:7d} {star:8.2f} {chain:8.2f} {shown}  {star_ratio} {chain_ratio}  {verdict}")


if __name__ == "__main__":
    main()
