"""``invoke demo``: the whole deployment on a simulated cluster, on any machine with Docker.

A testbed of N nodes (sshd, their own Docker engines, the stand-in runtime), ``ssh.setup`` so the
nodes trust each other, a tiny artifact, then ``deploy`` (every phase), ``deploy`` again (nothing
to do), a short benchmark against the endpoint, and everything removed (unless ``keep``). The
stand-in computes nothing: this exercises the deployment, not inference.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from trtllm_deploy.artifact import models
from trtllm_deploy.hosts import sshsetup
from trtllm_deploy.serving import deploy, launch
from trtllm_deploy.source import lock as locks
from trtllm_deploy.testbed import artifact as tiny
from trtllm_deploy.testbed import cluster as testbeds
from trtllm_deploy.urls import http_url

NAME = "demo"
SUBNET = "10.213.8.0/24"
LOCK = Path(__file__).resolve().parents[2] / "requirements" / "tensorrt-llm.lock.toml"


@dataclass
class Result:
    first: deploy.Report
    again: deploy.Report
    bench: dict
    hosts: str
    seconds: float

    def as_json(self) -> dict:
        return {"standin": True, "first": self.first.as_json(), "again": self.again.as_json(),
                "bench": self.bench, "hosts": self.hosts, "seconds": round(self.seconds, 2)}


def bench(url: str, model: str, requests: int, concurrency: int, max_tokens: int = 32) -> dict:
    """``requests`` completions, ``concurrency`` at a time: latency and tokens per second."""
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    queue = list(range(requests))

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                queue.pop()
            body = json.dumps({"model": model, "prompt": "Tell me about DGX Spark",
                               "max_tokens": max_tokens, "temperature": 0}).encode()
            request = urllib.request.Request(f"{url}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            started = time.monotonic()
            try:
                with urllib.request.urlopen(request, timeout=120) as answer:
                    reply = json.load(answer)
                with lock:
                    latencies.append(time.monotonic() - started)
                    tokens.append((reply.get("usage") or {}).get("completion_tokens") or 0)
            except OSError as exc:
                with lock:
                    errors.append(type(exc).__name__)

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    return {"requests": f"{len(latencies)} of {requests} ({concurrency} at a time)",
            "errors": str(len(errors)),
            "latency p50": f"{statistics.median(latencies):.2f} s" if latencies else "-",
            "latency max": f"{max(latencies):.2f} s" if latencies else "-",
            "output tokens/s (all streams)": f"{sum(tokens) / wall:.1f}" if wall else "-"}


def run(workdir: Path, nodes: int = 3, keep: bool = False, requests: int = 16, concurrency: int = 4,
        report=lambda line: None) -> Result:
    started = time.monotonic()
    layout = testbeds.Layout(name=NAME, nodes=nodes, subnet=SUBNET)
    bed = testbeds.Testbed(layout, report=report)
    report(f"bringing up {nodes} simulated nodes")
    bed.up(runtime=True)
    cluster = bed.inventory()
    try:
        report("ssh.setup: every node trusts every node")
        sshsetup.apply(sshsetup.look(cluster))
        folder = tiny.make(workdir / "engines" / f"tiny-bf16-tp{nodes}-demo")
        request = deploy.Request(artifact_dir=folder, tp=nodes, job=NAME,
                                 env=(("STANDIN_LOAD_SECONDS", "1"),), store=workdir / "engines")
        lockfile, catalog = locks.load(LOCK), models.load(None)

        def say(phase: str, line: str) -> None:
            report(f"{phase}: {line}")

        first = deploy.run(cluster, lockfile, catalog, request, say)
        report("deploy again: nothing should be done")
        again = deploy.run(cluster, lockfile, catalog, request, say)
        report(f"benchmark: {requests} requests")
        url = http_url(cluster.head.host, request.port)
        measured = bench(url, f"/artifacts/{folder.name}", requests, concurrency)
    except BaseException:
        if not keep:
            _teardown(cluster, bed)
        raise
    if not keep:
        report("tearing down")
        _teardown(cluster, bed)
    return Result(first, again, measured, str(layout.hosts_file), time.monotonic() - started)


def _teardown(cluster, bed) -> None:
    try:
        launch.stop(cluster, NAME)
    finally:
        bed.down(purge=True)
