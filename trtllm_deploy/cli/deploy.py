"""``invoke deploy`` (every phase, each skipped when done) and ``invoke demo`` (all of it on a testbed)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from invoke import Context, task
from invoke.exceptions import Exit

from trtllm_deploy import console
from trtllm_deploy.artifact import models
from trtllm_deploy.cli import (ENV_HELP, HOSTS_HELP, JSON_HELP, MIN_RATE_HELP, STALL_HELP, env_pairs,
                               user_errors)
from trtllm_deploy.hosts import inventory
from trtllm_deploy.serving import deploy as pipeline
from trtllm_deploy.source import lock as locks
from trtllm_deploy.testbed import demo as demos

ACTION_STYLE = {"done": "pass", "up to date": "pass", "skipped": "skip", "failed": "fail"}


def show(report: pipeline.Report, title: str, dry_run: bool) -> None:
    rows = []
    for phase in report.phases:
        status = ACTION_STYLE.get(phase.action, "warn")
        detail = phase.detail
        if phase.nodes and (dry_run or len(set(phase.nodes.values())) > 1 or phase.action == "done"):
            detail += "".join(f"\n  {node}: {words}" for node, words in phase.nodes.items())
        rows.append([phase.name, console.status_cell(status, phase.action), detail,
                     f"{phase.seconds:.2f} s"])
    console.out.print(console.table(title + (" (dry run: nothing changed)" if dry_run else ""),
                                    ["phase", "action", "what", "time"], rows))


@task(iterable=["env"], help={
    "model": "engine.build this model (e.g. llama-8b); or give --artifact-dir",
    "precision": "its precision (default: the model's default)", "tp": "tensor-parallel size",
    "artifact_dir": "deploy an artifact made already (a folder with trtllm-deploy-manifest.json)",
    "image": "the runtime image (default: hosts.toml container.image, else the one the lock builds)",
    "job": "the serving job's name (default: serve)", "port": "HTTP port on the head (default: 8355)",
    "env": ENV_HELP,
    "on_failure": "stop (default) or rollback: back to the last known good deployment",
    "transport": "push over ssh (default) or fabric (plain TCP on the fabric link, hash-checked)",
    "dry_run": "print the plan per phase and node; change nothing",
    "stall_s": STALL_HELP, "min_rate": MIN_RATE_HELP,
    "store": "where engine.build makes artifacts (default: engines/)",
    "models_file": "your models file", "lock": "the TensorRT-LLM lock", "hosts": HOSTS_HELP,
    "json": JSON_HELP})
@user_errors
def deploy(c: Context, model: str = "", precision: str = "", tp: int = 0, artifact_dir: str = "",
           image: str = "", job: str = "serve", port: int = 8355, env: list[str] | None = None,
           on_failure: str = "stop", transport: str = "ssh", dry_run: bool = False, stall_s: float = 120.0,
           min_rate: float = 1.0, store: str = "engines", models_file: str = "",
           lock: str = "requirements/tensorrt-llm.lock.toml", hosts: str = "hosts.toml",
           json: bool = False) -> None:
    """preflight → source → image → engine → push → check → launch → verify, each skipped when done."""
    pairs = env_pairs(env)  # a secret in --env is refused before anything is read or run
    cluster = inventory.load(hosts)
    lockfile = locks.load(lock)
    catalog = models.load(models_file or None)
    request = pipeline.Request(model or None, precision or None, Path(artifact_dir) if artifact_dir else None,
                               tp or None, image or None, job, port, pairs, Path(store),
                               on_failure, dry_run, stall_s, min_rate, transport)
    started = time.monotonic()
    report = None
    try:
        with console.err.status("deploy: preflight") as spinner:
            report = pipeline.run(cluster, lockfile, catalog, request,
                                  lambda phase, line: spinner.update(f"deploy: {phase}: {line}"))
    finally:
        if report is None:
            pass  # the error says which phase; nothing to tabulate
    if json:
        console.print_json(report.as_json() | {"seconds": round(time.monotonic() - started, 3),
                                               "dry_run": dry_run})
        return
    show(report, f"deploy on {len(cluster.nodes)} node(s)", dry_run)
    for line in report.warnings:
        console.err.print(line, style="yellow", highlight=False, markup=False)
    quiet = all(p.action in ("up to date", "skipped") for p in report.phases[1:-1])
    console.out.print(("up to date: nothing to do; " if quiet and not dry_run else "")
                      + f"{time.monotonic() - started:.1f} s")


@task(help={"nodes": "simulated nodes (default: 3)", "keep": "leave the testbed and the deployment running",
            "requests": "benchmark requests (default: 16)", "concurrency": "at once (default: 4)",
            "json": JSON_HELP})
@user_errors
def demo(c: Context, nodes: int = 3, keep: bool = False, requests: int = 16, concurrency: int = 4,
         json: bool = False) -> None:
    """A 3-node testbed, `deploy` on it with the stand-in runtime, a short benchmark, torn down.
    It exercises the deployment, not inference: the stand-in computes nothing."""
    if nodes < 1 or nodes > 8:
        raise Exit("--nodes: 1 to 8", code=2)
    with tempfile.TemporaryDirectory(prefix="trtllm-deploy-demo-") as tmp:
        with console.err.status("demo: starting") as spinner:
            result = demos.run(Path(tmp), nodes, keep, requests, concurrency,
                               report=lambda line: spinner.update(f"demo: {line}"))
    if json:
        console.print_json(result.as_json())
        return
    console.out.print("STAND-IN RUN: the runtime is trtllm-deploy's test double (no GPU, no inference). "
                      "This exercises the deployment, not TensorRT-LLM.")
    show(result.first, f"deploy on a {nodes}-node testbed", False)
    show(result.again, "deploy again (nothing to do)", False)
    console.out.print(console.table("a short benchmark against the endpoint", ["", "value"], [
        [key, value] for key, value in result.bench.items()]))
    kept = f"kept: invoke --hosts {result.hosts} status" if keep else "removed"
    console.out.print(f"testbed {kept}; {result.seconds:.0f} s in all")
