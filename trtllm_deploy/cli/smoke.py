"""``invoke smoke``: phase 3, one node serves the small preset and answers."""

from __future__ import annotations

from pathlib import Path

from invoke import Context, task
from invoke.exceptions import Exit

from trtllm_deploy import console
from trtllm_deploy.artifact import build as artifact
from trtllm_deploy.artifact import models
from trtllm_deploy.cli import DRY_RUN_HELP, HOSTS_HELP, JSON_HELP, show_plan, user_errors
from trtllm_deploy.hosts import inventory
from trtllm_deploy.serving import smoke as smoking
from trtllm_deploy.source import lock as locks


@task(help={
    "artifact_dir": "an artifact folder made by engine.build (default: the --model one in --store)",
    "model": "the model whose artifact to serve (default: llama-8b, the small preset)",
    "precision": "its precision (default: the model's default)",
    "store": "a folder of artifacts on this machine (default: the head's paths.artifacts, where "
             "engine.build makes them, when the head is this machine)",
    "port": "the port to serve on (default: 8355)",
    "stall_s": "give up when the runtime's log has not moved for this long (default: 120)",
    "min_rate": "the least tokens/s the answer must come at (default: 1)",
    "models_file": "your models file, merged over the presets",
    "dry_run": DRY_RUN_HELP, "hosts": HOSTS_HELP, "lock": "the TensorRT-LLM lock", "json": JSON_HELP,
})
@user_errors
def smoke(c: Context, artifact_dir: str = "", model: str = "llama-8b", precision: str = "",
          store: str = "", port: int = 8355, stall_s: float = 120.0, min_rate: float = 1.0,
          models_file: str = "", dry_run: bool = False, hosts: str = "hosts.toml",
          lock: str = "requirements/tensorrt-llm.lock.toml", json: bool = False) -> None:
    """Serve the small preset on the head node, ask it one question, check the answer, stop."""
    cluster = inventory.load(hosts)
    lockfile = locks.load(lock)
    if artifact_dir:
        folder = Path(artifact_dir)
    else:
        request = artifact.Request(model, precision or None, 1)
        planned = artifact.plan(cluster, lockfile, models.load(models_file or None), request)
        if not store and cluster.head.connection != "local":
            raise Exit(f"engine.build made {planned.name} on {cluster.head.name}; smoke serves an "
                       "artifact from this machine: pass --artifact-dir (or run smoke on the head)", code=2)
        folder = Path(store or cluster.head.paths.artifacts).expanduser() / planned.name
    if not folder.is_dir():
        raise Exit(f"no artifact at {folder}: make it with `invoke engine.build --model {model}`", code=2)
    if dry_run:
        return show_plan(smoking.plan(cluster, lockfile, folder, port, min_rate), json)
    with console.err.status(f"smoke test on {cluster.head.name}…"):
        report = smoking.run(cluster, lockfile, folder, port, stall_s, min_rate)
    if json:
        console.print_json(report.as_json())
    else:
        if report.standin:
            console.out.print("STAND-IN RUN: the runtime is trtllm-deploy's test double (no GPU, no "
                              "inference); this checks the flow, not TensorRT-LLM.")
        rows = [[step.name, console.status_cell({True: "pass", False: "fail", None: "skip"}[step.ok],
                                                step.detail)] for step in report.steps]
        console.out.print(console.table(f"smoke on {report.node}: {report.image}", ["step", "result"],
                                        rows))
        console.out.print(f"{'passed' if report.ok else 'FAILED'} in {report.seconds:.1f} s")
    if not report.ok:
        raise Exit("smoke: failed", code=1)
