"""Testbed bring-up time: 3 nodes with the images already built (cached), in one run.

Target (testbed issue): `invoke testbed.up --nodes 3` with the image cached takes under 60 s on
the CI machine (2 cores). Beside it, in the same run:

- the floor: plain `docker run -d` of the same three node containers, with nothing waited for
  (no sshd answer, no inner Docker engine, no keys, no hosts.toml);
- the nodes alone (`--no-runtime`): network, containers, and each node answering over SSH with
  its host key checked and its own Docker engine up;
- the whole `up`: the same plus the stand-in runtime image delivered into every node's engine;
- `up` again on the running testbed (nothing to do).

Run it with `nox -s bench -- testbed` (or `python benchmarks/testbed_up.py`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trtllm_deploy.hosts.dockercli import require_engine  # noqa: E402
from trtllm_deploy.testbed import cluster, images  # noqa: E402

TARGET_S = 60.0


def floor(tag: str, name: str, subnet: str, nodes: int) -> float:
    """Three bare `docker run -d` on a fresh network: what Docker alone costs."""
    network = f"trtllm-{name}-floor"
    started = time.perf_counter()
    subprocess.run(["docker", "network", "create", "--subnet", subnet, network], check=True,
                   capture_output=True)
    names = []
    for index in range(1, nodes + 1):
        names.append(f"trtllm-{name}-floor{index}")
        subprocess.run(["docker", "run", "-d", "--name", names[-1], "--network", network,
                        *cluster.NESTED_DOCKER, "--entrypoint", "sleep", tag, "infinity"],
                       check=True, capture_output=True)
    seconds = time.perf_counter() - started
    subprocess.run(["docker", "rm", "-f", *names], capture_output=True)
    subprocess.run(["docker", "network", "rm", network], capture_output=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--subnet", default="10.213.240.0/24")
    parser.add_argument("--base", default="auto")
    args, _ = parser.parse_known_args()

    require_engine()
    base = images.resolve_base(args.base)
    with tempfile.TemporaryDirectory(prefix="trtllm-bench-testbed-") as scratch:
        layout = cluster.Layout(name="bench", nodes=args.nodes, subnet=args.subnet,
                                state_dir=Path(scratch))
        bed = cluster.Testbed(layout, base=base)
        # Warm-up, not measured: builds the images if this machine has never built them.
        node_image = images.ensure(images.NODE, base, layout.log_dir)
        images.ensure(images.STANDIN, base, layout.log_dir)
        bed.down()
        rows = {"floor: docker run x3, no waiting": [], "nodes ready (--no-runtime)": [],
                "testbed.up (nodes + stand-in loaded)": [], "testbed.up again (running)": []}
        delivered = []
        try:
            for _ in range(args.repeats):
                rows["floor: docker run x3, no waiting"].append(
                    floor(node_image.tag, "bench", args.subnet, args.nodes))
                report = bed.up(runtime=False)
                rows["nodes ready (--no-runtime)"].append(report.seconds)
                bed.down()
                report = bed.up(runtime=True)
                rows["testbed.up (nodes + stand-in loaded)"].append(report.seconds)
                delivered += [n.runtime_seconds for n in report.nodes]
                again = bed.up(runtime=True)
                assert not again.changed, again.as_json()
                rows["testbed.up again (running)"].append(again.seconds)
                bed.down()
        finally:
            bed.down(purge=False)
    size = int(subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}",
                               report.runtime.tag], capture_output=True, text=True).stdout or 0)
    print(f"\ntestbed bring-up, {args.nodes} nodes, images cached, {args.repeats} runs each "
          f"(base {base})")
    print(f"{'what':40} {'median s':>9} {'min s':>7} {'max s':>7}  target")
    for what, times in rows.items():
        mark = ""
        if what.startswith("testbed.up ("):
            mark = f"< {TARGET_S:.0f} s: {'met' if statistics.median(times) < TARGET_S else 'MISSED'}"
        print(f"{what:40} {statistics.median(times):9.2f} {min(times):7.2f} {max(times):7.2f}  {mark}")
    print(f"stand-in image {size / 1e6:.0f} MB; per-node delivery median "
          f"{statistics.median(delivered):.1f} s (all nodes at once)")


if __name__ == "__main__":
    main()
