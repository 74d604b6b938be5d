"""`invoke push` against the usual ways of copying a checkpoint and an image, in one run.

A 3-node testbed (node 1 is the head; this machine drives, as the head does in the field) and a
checkpoint of 20 files, 4 GiB in all, sent to the 2 workers:

- cold: sequential `scp -r` (the plan's way), parallel `rsync -a` (what other tools do), a raw TCP
  stream of the same bytes to both workers at once (no encryption: the link's limit here), and
  `push` over SSH and over the fabric transport (plain TCP, checked against the manifest);
- `push` again with nothing changed (target < 1 s);
- one file replaced by a new 200 MiB one (target: under 1.1x its size sent);
- an image rebuilt with only its top layer changed: bytes `push` sends against that layer (target
  at most 1.2x), beside a full `docker save | ssh docker load`.

Every side writes to the workers' disks and nothing is fsynced except by `push` (which syncs each
file before it makes the version current). Run it with `nox -s bench -- push`.

`--nodes sshd` runs the artifact part without Docker: the 2 workers are real OpenSSH sshd servers
(tests/sshd.py) on this machine, on 127.0.0.2 and 127.0.0.3 (127.0.0.1 with other ports where
those cannot be bound), each with its own home directory and so its own artifact store. It is for
machines with more cores than the testbed's 2, where sender, sshd and receivers do not queue for
the same CPU. The image part needs Docker and is skipped. Where sshd is not installed, point
TRTLLM_DEPLOY_TEST_SSHD at one (and put ssh-keygen on PATH), as for the preflight benchmark;
benchmarks/carry_ssh_tools.sh carries sshd, ssh, scp and rsync to a machine that lacks them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trtllm_deploy import push as pushing  # noqa: E402
from trtllm_deploy.artifact import manifest  # noqa: E402
from trtllm_deploy.hosts import inventory, shell  # noqa: E402
from trtllm_deploy.hosts.ssh import SSH  # noqa: E402
from trtllm_deploy.push import layers  # noqa: E402

MiB = 1 << 20
# Every node straight from this machine, as these rows have always measured (the chain that push
# takes by default for several nodes is measured by benchmarks/fanout.py).
STAR = "star"
RAW_PORT = 18555
# argv: port, file, address to listen on, and "sync" (fsync the file at the end) or "hash" (also
# SHA-256 every block in the receiving thread, as push's receiver does) for the reference rows.
RECEIVER = """
import hashlib, os, socket, sys
mode = sys.argv[4] if len(sys.argv) > 4 else ""
hasher = hashlib.sha256() if mode == "hash" else None
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[3], int(sys.argv[1])))
server.listen(1)
print("ready", flush=True)
conn, _ = server.accept()
buffer = memoryview(bytearray(4 << 20))
total = 0
with open(sys.argv[2], "wb") as out:
    while True:
        got = conn.recv_into(buffer)
        if not got:
            break
        out.write(buffer[:got])
        if hasher:
            hasher.update(buffer[:got])
        total += got
    if mode:
        out.flush()
        os.fsync(out.fileno())
print(total, flush=True)
"""


def ssh_options(node) -> list[str]:
    """The node's ssh options (pinned known_hosts, its key, batch mode) without the host."""
    return SSH(node).openssh_argv()[1:-1]


def make_checkpoint(root: Path, total: int, count: int) -> Path:
    root.mkdir(parents=True)
    each = total // count
    for index in range(count):
        with open(root / f"model-{index + 1:05d}-of-{count:05d}.safetensors", "wb") as out:
            for _ in range(each // (16 * MiB)):
                out.write(os.urandom(16 * MiB))
            out.write(os.urandom(each % (16 * MiB)))
    manifest.write(root, manifest.create(root, {"model": "bench"}))
    return root


BENCH_DIRS = ("bench-scp", "bench-rsync", "bench-raw", "trtllm-deploy/engines")


class TestbedNodes:
    """Workers 2 and 3 of a 3-node Docker testbed (the default)."""

    label = "testbed workers"

    def __init__(self, bed):
        self.bed = bed
        self.workers = bed.inventory().nodes[1:3]
        self.indexes = (2, 3)

    def clean(self) -> None:
        for index in self.indexes:
            subprocess.run(["docker", "exec", "-u", "spark", self.bed.layout.container(index), "sh", "-c",
                            "rm -rf " + " ".join(f"~/{name}" for name in BENCH_DIRS)],
                           check=True, capture_output=True, timeout=600)

    def path(self, index: int, name: str) -> str:
        """Where a baseline writes ``name`` on worker ``index``: its home (the session's cwd)."""
        return name

    def raw_listen(self, index: int) -> tuple[str, int]:
        return "0.0.0.0", RAW_PORT


class SshdNodes:
    """Workers that are sshd servers on this machine, on distinct loopback addresses.

    sshd starts every session in the account's own home directory, which both servers share, so
    every path here is absolute, inside the server's own ``home`` (its ``$HOME``, which push uses).
    """

    def __init__(self, root: Path, count: int = 2):
        sys.path.insert(0, str(ROOT / "tests"))
        from sshd import start_sshd, write_hosts

        addresses = [f"127.0.0.{2 + index}" for index in range(count)]
        if not all(bindable(address) for address in addresses):
            addresses = ["127.0.0.1"] * count
        self.servers = []
        try:
            for index, address in enumerate(addresses):
                self.servers.append(start_sshd(root / f"worker{index + 1}", address=address))
            hosts = write_hosts(root / "hosts.toml", self.servers)
        except BaseException:
            self.stop()
            raise
        self.workers = inventory.load(hosts).nodes
        self.label = f"sshd workers on {', '.join(addresses)}"

    def clean(self) -> None:
        for server in self.servers:
            for name in BENCH_DIRS:
                target = server.home / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)

    def path(self, index: int, name: str) -> str:
        return str(self.servers[index].home / name)

    def raw_listen(self, index: int) -> tuple[str, int]:
        return self.servers[index].address, RAW_PORT + index

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def bindable(address: str) -> bool:
    import socket
    try:
        with socket.socket() as sock:
            sock.bind((address, 0))
        return True
    except OSError:
        return False


def parallel(jobs) -> float:
    """Run the jobs at once; the wall time, or the first job's failure."""
    failures = []

    def guarded(job):
        try:
            job()
        except BaseException as exc:  # noqa: B036 - handed to the main thread
            failures.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=guarded, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return time.perf_counter() - started


def scp_sequential(nodes, source: Path) -> float:
    started = time.perf_counter()
    for index, node in enumerate(nodes.workers):
        opts = [o.replace("-p", "-P") if o == "-p" else o for o in ssh_options(node)]
        opts = [o for o in opts if o != "-T"]
        user = opts.index("-l")
        login = opts[user + 1]
        del opts[user:user + 2]
        subprocess.run(["scp", "-q", "-r", *opts, str(source),
                        f"{login}@{node.host}:{nodes.path(index, 'bench-scp')}"],
                       check=True, timeout=3600)
    return time.perf_counter() - started


def rsync_parallel(nodes, source: Path) -> float:
    def one(index, node):
        return lambda: subprocess.run(
            ["rsync", "-a", "-e", shell.join(["ssh", *ssh_options(node)]), f"{source}/",
             f"{node.host}:{nodes.path(index, 'bench-rsync')}/"], check=True, timeout=3600)
    return parallel([one(index, node) for index, node in enumerate(nodes.workers)])


def raw_tcp(nodes, source: Path, mode: str = "") -> float:
    files = sorted(p for p in source.iterdir() if p.is_file())
    receivers = []
    for index, node in enumerate(nodes.workers):
        address, port = nodes.raw_listen(index)
        proc = subprocess.Popen([*SSH(node).openssh_argv(), "--", shell.join(
            ["python3", "-c", RECEIVER, str(port), nodes.path(index, "bench-raw"), address, mode])],
            stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        receivers.append(proc)

    def one(index, node):
        def send():
            import socket
            with socket.create_connection((node.host, nodes.raw_listen(index)[1])) as conn:
                for path in files:
                    with open(path, "rb") as handle:
                        conn.sendfile(handle)
        return send

    started = time.perf_counter()
    parallel([one(index, node) for index, node in enumerate(nodes.workers)])
    for proc in receivers:  # done when every byte is in the node's file, as for the others
        proc.wait(timeout=600)
    return time.perf_counter() - started


def build_image(tag: str, context: Path, base: str, lower_mib: int, top_mib: int) -> None:
    context.mkdir(parents=True, exist_ok=True)
    (context / "lower.bin").write_bytes(b"L" * (lower_mib * MiB))
    (context / "top.bin").write_bytes(os.urandom(top_mib * MiB))
    (context / "Dockerfile").write_text(f"FROM {base}\nCOPY lower.bin /lower.bin\n"
                                        "COPY top.bin /top.bin\nLABEL io.trtllm-deploy.bench=push\n")
    subprocess.run(["docker", "build", "-q", "-t", tag, str(context)], check=True,
                   capture_output=True, timeout=600)


def full_load(nodes, tag: str, folder: Path) -> tuple[float, int]:
    archive = folder / "full.tar"
    started = time.perf_counter()
    subprocess.run(["docker", "save", "-o", str(archive), tag], check=True)

    def one(node):
        def load():
            with open(archive, "rb") as handle:
                subprocess.run([*SSH(node).openssh_argv(), "--", "docker load -q"], stdin=handle,
                               check=True, capture_output=True, timeout=1800)
        return load

    parallel([one(node) for node in nodes])
    return time.perf_counter() - started, archive.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--changed-mib", type=int, default=200)
    parser.add_argument("--streams", type=int, default=pushing.files.STREAMS,
                        help="push's connections per node (the default is push's own)")
    parser.add_argument("--nodes", choices=("testbed", "sshd"), default="testbed",
                        help="the workers: a Docker testbed (default; image part included) or sshd "
                        "servers on loopback addresses of this machine (artifact part only)")
    parser.add_argument("--subnet", default="10.213.241.0/24")
    parser.add_argument("--base", default="auto")
    parser.add_argument("--scratch", default=None, help="where the checkpoint is made (default: tmp)")
    args, _ = parser.parse_known_args()

    testbed = args.nodes == "testbed"
    if testbed:
        from trtllm_deploy.hosts.dockercli import require_engine
        from trtllm_deploy.testbed import cluster, images

        require_engine()
        base = images.resolve_base(args.base)
    with tempfile.TemporaryDirectory(prefix="trtllm-bench-push-", dir=args.scratch) as scratch:
        scratch = Path(scratch)
        bed = nodes = None
        if testbed:
            layout = cluster.Layout(name="benchpush", nodes=3, subnet=args.subnet, state_dir=scratch / "bed")
            bed = cluster.Testbed(layout, base=base)
        rows = []
        try:
            if testbed:
                bed.up(runtime=True)  # the stand-in (built on the base image) is on every node
                nodes = TestbedNodes(bed)
            else:
                nodes = SshdNodes(scratch / "nodes")
            workers = nodes.workers
            total = int(args.gib * (1 << 30))
            store = scratch / "engines"
            checkpoint = make_checkpoint(store / "bench-ckpt", total, args.files)
            size = sum(e["size"] for e in manifest.load(checkpoint)["files"].values())

            nodes.clean()
            t_scp = step("sequential scp -r", scp_sequential(nodes, checkpoint))
            nodes.clean()
            t_rsync = None
            if shutil.which("rsync"):
                t_rsync = step("parallel rsync -a", rsync_parallel(nodes, checkpoint))
                nodes.clean()
            t_raw = step("raw TCP", raw_tcp(nodes, checkpoint))
            nodes.clean()
            # References, not targets: what a receiver that also does push's work costs on this rig.
            t_raw_sync = step("raw TCP + fsync", raw_tcp(nodes, checkpoint, "sync"))
            nodes.clean()
            t_raw_hash = step("raw TCP + SHA-256 + fsync", raw_tcp(nodes, checkpoint, "hash"))
            nodes.clean()

            src = pushing.source(store, "bench-ckpt")
            started = time.perf_counter()
            result = pushing.push(workers, src, streams=1, route=STAR)
            t_one = step("push (SSH), one stream per node", time.perf_counter() - started)
            result.raise_for_failures()
            nodes.clean()

            counted = pushing.Counter()
            started = time.perf_counter()
            result = pushing.push(workers, src, progress=counted, streams=args.streams, route=STAR)
            t_push = step(f"push (SSH), {args.streams} streams per node", time.perf_counter() - started)
            result.raise_for_failures()
            sent = statistics_per_node(counted)
            node_times(result)

            nodes.clean()
            fabric_counted = pushing.Counter()
            started = time.perf_counter()
            result = pushing.push(workers, src, progress=fabric_counted, transport="fabric", route=STAR,
                                  streams=args.streams)
            t_fabric = step("push --transport fabric", time.perf_counter() - started)
            result.raise_for_failures()
            node_times(result)
            fabric_sent = statistics_per_node(fabric_counted)

            started = time.perf_counter()
            again = pushing.push(workers, src, route=STAR)
            t_again = step("push, unchanged", time.perf_counter() - started)
            again.raise_for_failures()
            assert all(o.value.bytes_sent == 0 for o in again)

            changed = checkpoint / "model-00007-of-00020.safetensors"
            if not changed.exists():
                changed = sorted(checkpoint.glob("*.safetensors"))[0]
            with open(changed, "wb") as out:
                for start in range(0, args.changed_mib, 16):
                    out.write(os.urandom(min(16, args.changed_mib - start) * MiB))
            manifest.write(checkpoint, manifest.create(checkpoint, {"model": "bench", "changed": 1}))
            src = pushing.source(store, "bench-ckpt")
            delta = pushing.Counter()
            started = time.perf_counter()
            pushing.push(workers, src, progress=delta, route=STAR).raise_for_failures()
            t_delta = step("push, one file changed", time.perf_counter() - started)
            changed_sent = statistics_per_node(delta)

            mb = size / 1e6
            rows = [
                ("cold: sequential scp -r", t_scp, size, mb * 2 / t_scp,
                 f"push {t_scp / t_push:.2f}x faster"),
                ("cold: parallel rsync -a", t_rsync, size, mb * 2 / t_rsync,
                 f"push {t_rsync / t_push:.2f}x faster") if t_rsync else
                ("cold: parallel rsync -a", None, 0, 0.0, "not run: rsync is not installed here"),
                ("cold: raw TCP, both at once", t_raw, size, mb * 2 / t_raw,
                 f"push {t_push / t_raw:.2f}x raw time (SSH transport)"),
                ("  reference: raw TCP + fsync", t_raw_sync, size, mb * 2 / t_raw_sync,
                 f"fabric push {t_fabric / t_raw_sync:.2f}x this"),
                ("  reference: raw TCP + SHA-256 + fsync", t_raw_hash, size, mb * 2 / t_raw_hash,
                 f"fabric push {t_fabric / t_raw_hash:.2f}x this (one thread per node reads, "
                 "writes, hashes)"),
                ("  push (SSH), one stream per node", t_one, size, mb * 2 / t_one,
                 f"{t_scp / t_one:.2f}x faster than scp (before streams: for comparison)"),
                (f"cold: invoke push (SSH, {args.streams} streams)", t_push, sent, mb * 2 / t_push,
                 f">= 2x scp: {'met' if t_scp / t_push >= 2 else 'MISSED'}"),
                (f"cold: invoke push --transport fabric ({args.streams})", t_fabric, fabric_sent,
                 mb * 2 / t_fabric,
                 f"{t_scp / t_fabric:.2f}x faster than scp, {t_fabric / t_raw:.2f}x raw TCP; "
                 f"within 1.3x raw: {'met' if t_fabric <= 1.3 * t_raw else 'MISSED'}"),
                ("unchanged: invoke push", t_again, 0, 0.0, f"< 1 s: {'met' if t_again < 1 else 'MISSED'}"),
                (f"one new {args.changed_mib} MiB file: push", t_delta, changed_sent, 0.0,
                 f"{changed_sent / (args.changed_mib * MiB):.3f}x the file; < 1.1x: "
                 f"{'met' if changed_sent < 1.1 * args.changed_mib * MiB else 'MISSED'}"),
            ]
            if testbed:
                rows += push_image(workers, base, scratch)
        finally:
            if bed is not None:
                bed.down(purge=True)
            elif nodes is not None:
                nodes.stop()
            shutil.rmtree(scratch / "engines", ignore_errors=True)
    where = ("nodes, client and sshd share them" if testbed
             else "client, both sshd and both receivers share them")
    print(f"\npush to 2 {nodes.label}: {args.files} files, {size / (1 << 30):.2f} GiB "
          f"({os.cpu_count()} cores; {where}; load average at the end {os.getloadavg()[0]:.1f}; "
          f"one core hashes SHA-256 at {sha256_rate():.0f} MB/s)")
    print(f"{'what':40} {'wall s':>8} {'MiB/node':>10} {'MB/s total':>11}  note / target")
    for what, seconds, per_node, rate, note in rows:
        wall = f"{seconds:8.2f}" if seconds is not None else f"{'-':>8}"
        print(f"{what:40} {wall} {per_node / MiB:10.1f} {rate:11.0f}  {note}")
    if not testbed:
        print("image rows: not run (--nodes sshd; the image part needs Docker on the nodes)")


def push_image(workers, base: str, scratch: Path) -> list[tuple]:
    """An image rebuilt with only its top layer changed: what push sends, beside a full load."""
    tag = "trtllm-deploy-bench/push:1"
    build_image(tag, scratch / "v1", base, 256, 64)
    pushing.push(workers, pushing.source(image=tag)).raise_for_failures()
    build_image(tag, scratch / "v2", base, 256, 64)  # same lower layer, new top layer
    local = layers.inspect_local(tag)
    saved = layers.SavedImage(local, scratch).ready()
    top = next(end - start for name, start, end in saved.members if name == saved.layer_names[-1])
    image_counted = pushing.Counter()
    started = time.perf_counter()
    pushing.push(workers, pushing.source(image=tag), progress=image_counted).raise_for_failures()
    t_image = time.perf_counter() - started
    image_sent = statistics_per_node(image_counted)
    t_full, full_bytes = full_load(workers, tag, scratch)
    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
    return [
        ("image, top layer changed: push", t_image, image_sent, 0.0,
         f"{image_sent / top:.3f}x the layer ({top / MiB:.1f} MiB); <= 1.2x: "
         f"{'met' if image_sent <= 1.2 * top else 'MISSED'}"),
        ("image: docker save | ssh docker load", t_full, full_bytes, 0.0,
         f"push sends {image_sent / full_bytes:.3f}x of it"),
    ]


def node_times(result) -> None:
    """Each node's own time and the part its check of staging took (stderr, beside the steps)."""
    for outcome in result:
        if outcome.ok and outcome.value.artifact:
            sent = outcome.value.artifact
            print(f"    {outcome.node.name}: {sent.seconds:.2f} s, verify {sent.verify_seconds:.2f} s",
                  file=sys.stderr, flush=True)


def sha256_rate() -> float:
    """MB/s of hashlib's SHA-256 on one core over 256 MiB in memory: a push receiver's ceiling."""
    import hashlib
    data = os.urandom(256 * MiB)
    started = time.perf_counter()
    hashlib.sha256(data).digest()
    return len(data) / 1e6 / (time.perf_counter() - started)


def step(what: str, seconds: float) -> float:
    """Say a measurement as soon as it is made (a run cut short still leaves its rows)."""
    print(f"  {what}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return seconds


def statistics_per_node(counter: pushing.Counter) -> int:
    """Bytes sent to one node (the largest, where they differ)."""
    return max(counter.sent.values(), default=0)


if __name__ == "__main__":
    main()
