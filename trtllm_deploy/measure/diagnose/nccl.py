"""``diagnose.nccl``: all-gather / all-reduce bus bandwidth across the nodes, gated, and the transport
NCCL chose (RDMA through NET/IB, or sockets), read from its ``NCCL_DEBUG=INFO`` log.

Inside the runtime containers (``mpirun`` from the head's, as cluster.check does) it runs nccl-tests'
``all_gather_perf``/``all_reduce_perf`` where the image has them, else the project's own
``nccl_bench.py`` (same bus-bandwidth formula). On a plain multi-GPU host without containers:
``python3 -m trtllm_deploy.measure.diagnose.nccl --np 2 --op all_reduce --size 1G``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    from trtllm_deploy.measure.diagnose import nccl_bench
except ImportError:  # run as a plain script beside nccl_bench.py
    import nccl_bench  # type: ignore[no-redef]

BENCH = Path(nccl_bench.__file__).resolve()
GATE_GBPS = 21.875      # NVIDIA's line for a 200 Gb/s Spark link (docs/SOURCES.md#the-fabric): 175 Gb/s
DEFAULT_SIZE = "16G"
NCCL_TESTS = {"all_gather": "all_gather_perf", "all_reduce": "all_reduce_perf"}
# The step that looks for the NCCL tests' program ($1) in the head's container, as (step, text): its
# Script is made where it runs, since this module also runs on a plain host without the project.
HAS_TESTS = ("look for the NCCL tests", 'command -v "$1"')
DEBUG_ENV = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET,GRAPH"}
_TAG = re.compile(r"^\[\d+,\d+\]<std(?:out|err)>:")  # mpirun --tag-output


@dataclass(frozen=True)
class Measurement:
    op: str
    size: int
    ranks: int | None
    time_us: float
    algbw: float       # GB/s
    busbw: float       # GB/s
    correct: bool
    tool: str          # "nccl-tests" or "nccl_bench"

    def as_json(self) -> dict:
        return asdict(self)


def _untagged(text: str) -> list[str]:
    return [_TAG.sub("", line) for line in text.splitlines()]


def parse_bench(text: str) -> list[Measurement]:
    """Rank 0's ``nccl_bench: op=... size=... busbw=...`` lines (mpirun's tags allowed)."""
    found = []
    for line in _untagged(text):
        if not line.startswith(nccl_bench.PREFIX) or " op=" not in line:
            continue
        fields = dict(word.split("=", 1) for word in line.split()[1:] if "=" in word)
        try:
            found.append(Measurement(fields["op"], int(fields["size"]), int(fields["ranks"]),
                                     float(fields["time_us"]), float(fields["algbw"]),
                                     float(fields["busbw"]), fields.get("correct") == "yes", "nccl_bench"))
        except (KeyError, ValueError):
            continue
    return found


_NCCL_TESTS_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\w+)\s+(\w+)\s+(-?\d+)\s+([\d.]+)\s+([\d.]+)\s+"
                             r"([\d.]+)\s+(\S+)")


def parse_nccl_tests(text: str) -> list[Measurement]:
    """nccl-tests' table (out-of-place columns): size, time, algbw, busbw, #wrong (``N/A`` when not
    checked, -c 0). The op comes from its ``Collective test starting:`` line, the rank count from
    its ``Rank N`` lines."""
    op, ranks, found = None, 0, []
    for line in _untagged(text):
        if "Collective test starting:" in line:
            name = line.split(":", 1)[1].strip()
            op = next((key for key, binary in NCCL_TESTS.items() if name.startswith(binary)), name)
            ranks = 0  # each test lists its own ranks
            continue
        if re.match(r"^#\s+Rank\s+\d+", line):
            ranks += 1
            continue
        match = _NCCL_TESTS_ROW.match(line)
        if match and op:
            size, _count, _type, _redop, _root, time_us, algbw, busbw, wrong = match.groups()
            found.append(Measurement(op, int(size), ranks or None, float(time_us), float(algbw),
                                     float(busbw), wrong in ("0", "N/A"), "nccl-tests"))
    return found


@dataclass(frozen=True)
class Transport:
    """What NCCL's INFO log says about the network: the plugin it used and the channel paths."""

    network: str | None            # "IB" (RDMA: InfiniBand or RoCE) or "Socket"; None: not in the log
    devices: tuple[str, ...]       # NET/IB : Using [0]mlx5_0:1/RoCE ... → ("mlx5_0:1/RoCE",)
    paths: dict[str, int]          # "via NET/IB/0" → {"NET/IB": n}; "via P2P/CUMEM" → {"P2P/CUMEM": n}
    nodes: int | None
    ib_problem: str | None         # why IB was not used ("NET/IB : No device found.")

    @property
    def rdma(self) -> bool:
        return self.network == "IB"

    def describe(self) -> str:
        if self.network is None:
            return "unknown (no NCCL INFO lines; was NCCL_DEBUG=INFO passed to every rank?)"
        if self.network == "IB":
            return f"RDMA (NET/IB: {', '.join(self.devices) or 'devices not named'})"
        why = f"; {self.ib_problem}" if self.ib_problem else ""
        one_node = (" — all ranks on one node, so the network carried no data"
                    if self.nodes == 1 else "")
        return f"sockets (NET/Socket){why}{one_node}"

    def as_json(self) -> dict:
        return {"network": self.network, "rdma": self.rdma, "devices": list(self.devices),
                "paths": self.paths, "nodes": self.nodes, "ib_problem": self.ib_problem,
                "summary": self.describe()}


def parse_transport(log: str) -> Transport:
    network, devices, nodes, ib_problem = None, [], None, None
    paths: Counter = Counter()
    for line in _untagged(log):
        if "NCCL INFO" not in line:
            continue
        body = line.split("NCCL INFO", 1)[1].strip()
        match = re.match(r"Using network (\w+)", body)
        if match:
            network = match.group(1)
        match = re.match(r"NET/IB\s*:\s*Using\s+(.*?)(?:;|$)", body)
        if match:
            for device in re.findall(r"\[\d+\](\S+)", match.group(1)):
                if device not in devices and device != "[RO]":
                    devices.append(device)
        if re.match(r"NET/IB\s*:\s*No device found", body) and not ib_problem:
            ib_problem = "NET/IB : No device found."
        match = re.search(r" via ((?:NET/\w+)|(?:[A-Z0-9]+/[A-Z0-9]+)|(?:[A-Z0-9]+))", body)
        if match and body.startswith("Channel"):
            path = match.group(1)
            paths["/".join(path.split("/")[:2]) if path.startswith("NET/") else path] += 1
        match = re.search(r"nNodes (\d+)", body)
        if match:
            nodes = int(match.group(1))
    if network is None and paths:
        network = "IB" if "NET/IB" in paths else "Socket" if "NET/Socket" in paths else None
    return Transport(network, tuple(devices), dict(paths), nodes, ib_problem)


@dataclass(frozen=True)
class Verdict:
    op: str
    size: int
    busbw: float | None
    gate_gbps: float
    passed: bool
    reason: str

    def as_json(self) -> dict:
        return asdict(self)


def judge(measurements: list[Measurement], op: str, size: int, gate_gbps: float) -> Verdict:
    """The gate: the bus bandwidth of ``op`` at ``size`` (else its largest size) against the line."""
    mine = [m for m in measurements if m.op == op]
    if not mine:
        return Verdict(op, size, None, gate_gbps, False, f"no {op} result in the output")
    chosen = next((m for m in mine if m.size == size), max(mine, key=lambda m: m.size))
    if not chosen.correct:
        return Verdict(op, chosen.size, chosen.busbw, gate_gbps, False, "wrong results (#wrong > 0)")
    passed = chosen.busbw >= gate_gbps
    return Verdict(op, chosen.size, chosen.busbw, gate_gbps, passed,
                   f"{chosen.busbw:.2f} GB/s {'≥' if passed else '<'} {gate_gbps:g} GB/s")


def nccl_tests_argv(op: str, size: str) -> list[str]:
    """nccl-tests for one size on one GPU per rank (as NVIDIA's Spark check runs it)."""
    return [NCCL_TESTS[op], "-b", size, "-e", size, "-g", "1"]


def bench_argv(python: list[str], bench: str, op: str, size: str) -> list[str]:
    return [*python, bench, "--op", op, "--sizes", size]


@dataclass
class Report:
    tool: str
    measurements: list[Measurement]
    transport: Transport
    verdict: Verdict
    exit_code: int
    tail: str

    def as_json(self) -> dict:
        return {"tool": self.tool, "passed": self.verdict.passed, "verdict": self.verdict.as_json(),
                "transport": self.transport.as_json(), "exit_code": self.exit_code,
                "measurements": [m.as_json() for m in self.measurements]}


def report_from(tool: str, stdout: str, stderr: str, exit_code: int, op: str, size: int,
                gate_gbps: float) -> Report:
    text = stdout + "\n" + stderr
    measurements = parse_nccl_tests(text) if tool == "nccl-tests" else parse_bench(text)
    verdict = judge(measurements, op, size, gate_gbps)
    if not measurements:
        problem = [line for line in _untagged(text) if "error" in line.lower() or "No module" in line]
        detail = (problem or [line for line in _untagged(text) if line.strip()] or ["no output"])[-1]
        verdict = Verdict(op, size, None, gate_gbps, False,
                          f"{tool} exited with {exit_code}: {detail.strip()}")
    lines = [line for line in _untagged(text) if line.strip() and "NCCL INFO" not in line]
    return Report(tool, measurements, parse_transport(text), verdict, exit_code, "\n".join(lines[-12:]))


# --- across the nodes, in their runtime containers ----------------------------------------------

JOB = "nccl"
BENCH_IN_CONTAINER = "/tmp/trtllm-deploy-nccl_bench.py"


def run(cluster, op: str = "all_gather", size: str = DEFAULT_SIZE, gate_gbps: float = GATE_GBPS,
        image: str | None = None, timeout: float = 600.0) -> Report:
    """The job's containers up on every node, the benchmark through mpirun from the head's, down."""
    import tempfile

    from trtllm_deploy.hosts import scripts
    from trtllm_deploy.hosts.fanout import fan_out
    from trtllm_deploy.serving import containers
    from trtllm_deploy.serving.clustercheck import FIND_PYTHON

    size_bytes = nccl_bench.parse_size(size)
    with tempfile.TemporaryDirectory(prefix="trtllm-deploy-nccl-") as tmp:
        try:
            containers.up(cluster, containers.Job(JOB, image=image), Path(tmp)).raise_for_failures()
            head = containers.enter(cluster, JOB)
            has_tests = scripts.run(head, scripts.Script(*HAS_TESTS), NCCL_TESTS[op], check=False).ok
            if has_tests:
                tool, program = "nccl-tests", nccl_tests_argv(op, size)
            else:
                fan_out(cluster.nodes, lambda node, _target: containers.enter(cluster, JOB, node).put(
                    BENCH, BENCH_IN_CONTAINER)).raise_for_failures()
                tool, program = "nccl_bench", bench_argv(FIND_PYTHON, BENCH_IN_CONTAINER, op, size)
            argv = containers.mpirun_argv(cluster, program, forward_env=tuple(DEBUG_ENV))
            done = head.run(argv, env=DEBUG_ENV, timeout=timeout, check=False)
        finally:
            containers.down(cluster, JOB)
    return report_from(tool, done.stdout, done.stderr, done.exit_code, op, size_bytes, gate_gbps)


# --- on a plain multi-GPU host ------------------------------------------------------------------

def local_argv(ranks: int, op: str, size: str, python: str = sys.executable) -> list[str]:
    """``mpirun -np N`` of the bench on this host, NCCL's INFO log passed to every rank."""
    root = ["--allow-run-as-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    env = [arg for name in (*DEBUG_ENV, "NCCL_NVLS_ENABLE") for arg in ("-x", name)]
    return ["mpirun", *root, "-np", str(ranks), *env, *bench_argv([python], str(BENCH), op, size)]


def run_local(ranks: int, op: str, size: str, gate_gbps: float, timeout: float = 600.0) -> Report:
    if shutil.which("mpirun") is None:
        raise SystemExit("mpirun is not installed: install Open MPI (apt install openmpi-bin)")
    env = {**os.environ, **DEBUG_ENV, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    done = subprocess.run(local_argv(ranks, op, size), capture_output=True, text=True, env=env,
                          timeout=timeout)
    return report_from("nccl_bench", done.stdout, done.stderr, done.returncode, op,
                       nccl_bench.parse_size(size), gate_gbps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="NCCL bus bandwidth on this host, gated.")
    parser.add_argument("--np", type=int, default=2, help="ranks, one GPU each")
    parser.add_argument("--op", choices=tuple(NCCL_TESTS), default="all_gather")
    parser.add_argument("--size", default="1G")
    parser.add_argument("--gate-gbps", type=float, default=GATE_GBPS)
    args = parser.parse_args(argv)
    report = run_local(args.np, args.op, args.size, args.gate_gbps)
    print(json.dumps(report.as_json(), indent=1))
    return 0 if report.verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
