"""``invoke source.*`` and ``invoke image.*``: phase 2, the pinned TensorRT-LLM and its image."""

from __future__ import annotations

from pathlib import Path

from invoke import Collection, Context, task
from invoke.exceptions import Exit
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from trtllm_deploy import console
from trtllm_deploy.source import pin as phase
from trtllm_deploy.cli import DRY_RUN_HELP, HOSTS_HELP, JSON_HELP, NODES_HELP, show_plan, user_errors
from trtllm_deploy.cli.pinned_interface import ProjectInterface
from trtllm_deploy.hosts import inventory
from trtllm_deploy.runtimes import runtime as runtimes
from trtllm_deploy.source import advise as advisor
from trtllm_deploy.source import image as images
from trtllm_deploy.source import lock as locks

LOCK_HELP = f"the TensorRT-LLM lock file (default: {locks.DEFAULT_PATH})"
ROLLBACK = runtimes.rollback()   # the choice when no TensorRT-LLM option is usable


@task(help={"ref": "branch, tag or SHA to pin (default: the lock's ref, else main)",
            "repository": "git URL of TensorRT-LLM (default: the lock's, else NVIDIA/TensorRT-LLM)",
            "base_image": "base image for the build (default: the lock's, else what the tree names)",
            "hosts": HOSTS_HELP, "lock": LOCK_HELP, "dry_run": "show the new lock, do not write it",
            "accept_interface_changes": "pin a commit whose trtllm-serve flags or LLM-API keys lack "
                                        "some the project uses (listed; refused without this)",
            "json": JSON_HELP})
@user_errors
def update(c: Context, ref: str = "", repository: str = "", base_image: str = "",
           hosts: str = "hosts.toml", lock: str = str(locks.DEFAULT_PATH), dry_run: bool = False,
           accept_interface_changes: bool = False, json: bool = False) -> None:
    """Pin TensorRT-LLM: resolve a ref to a commit, record its submodules, check fixes and interface."""
    cluster = inventory.load(hosts)
    with console.err.status(f"resolving {ref or 'the locked ref'} on {cluster.build_node.name}…"):
        report = phase.update(cluster, Path(lock), ref or None, repository or None, base_image or None,
                              dry_run, ProjectInterface(), accept_interface_changes)
    for gap in report.interface_gaps:
        console.err.print(f"warning: accepted interface change: {gap}", soft_wrap=True, markup=False)
    for warning in report.warnings:  # before the output, where a script's reader sees it too
        console.err.print(f"warning: {warning}", soft_wrap=True, markup=False)
    if json:
        console.print_json(report.as_json() | {"dry_run": dry_run})
        return
    after = report.after.source
    before = (report.before.source.commit or "nothing pinned") if report.before else "no lock"
    console.out.print(console.table(f"{lock}" + (" (dry run)" if dry_run else ""), ["", "value"], [
        ["ref", after.ref], ["commit", f"{after.commit} (was {before})"],
        ["version", after.version or "?"], ["date", after.date or "?"],
        ["trtllm-build in the tree", "yes" if after.trtllm_build else "no (PyTorch backend only)"],
        ["submodules", str(len(after.submodules))], ["base image", report.after.build.base_image],
        ["required fixes", _fixes_row(report.after.fixes)],
        ["lock hash", (report.after.lock_hash or "")[:16]]]))
    console.out.print("up to date: the lock already says this" if not report.changed else
                      ("dry run: the lock was not written" if dry_run else f"wrote {lock}"))
    if report.interface_data:
        console.out.print(f"recorded the pinned interface in {report.interface_data}")


def _fixes_row(fixes: list[locks.Fix]) -> str:
    missing = [fix for fix in fixes if fix.missing]
    present = f"{len(fixes) - len(missing)} verified in the pinned history"
    return present + (f"; {len(missing)} missing (serves on one node only)" if missing else "")


@task(default=True, help={"hosts": HOSTS_HELP, "lock": LOCK_HELP, "dry_run": DRY_RUN_HELP, "json": JSON_HELP})
@user_errors
def fetch(c: Context, hosts: str = "hosts.toml", lock: str = str(locks.DEFAULT_PATH), dry_run: bool = False,
          json: bool = False) -> None:
    """Fetch exactly the locked commit on the build node: submodules, LFS objects, fixes checked."""
    cluster = inventory.load(hosts)
    lockfile = locks.load(lock)
    if dry_run:
        with console.err.status(f"looking at the tree on {cluster.build_node.name}…"):
            return show_plan(phase.fetch_plan(cluster, lockfile), json)
    with console.err.status(f"checking the tree on {cluster.build_node.name}…"):
        report = phase.fetch(cluster, lockfile)
    for warning in report.warnings:
        console.err.print(f"warning: {warning}", soft_wrap=True, markup=False)
    if json:
        console.print_json(report.as_json())
        return
    console.out.print(f"{report.node}:{report.directory} at {report.commit[:12]} "
                      f"(TensorRT-LLM {report.version or '?'}): {report.action}"
                      + (f" — was: {'; '.join(report.reasons)}" if report.reasons else ""),
                      soft_wrap=True)
    console.out.print("trtllm-build: " + ("present (the TensorRT-engine backend can be built)"
                                          if report.trtllm_build else
                                          "absent (this pin serves checkpoints with the PyTorch backend)"))


@task(help={"hosts": HOSTS_HELP, "lock": LOCK_HELP, "json": JSON_HELP})
@user_errors
def advise(c: Context, hosts: str = "hosts.toml", lock: str = str(locks.DEFAULT_PATH),
           json: bool = False) -> None:
    cluster = inventory.load(hosts)
    lockfile = locks.load(lock)
    with console.err.status("looking at the cluster and the lock…"):
        advice = advisor.advise(cluster, lockfile, fallback=ROLLBACK.name, product=ROLLBACK.product)
    if json:
        console.print_json(advice.as_json())
        return
    rows = [[option.kind + (" ◀" if option.kind == advice.choice else ""),
             console.status_cell("pass" if option.usable else "fail", "usable" if option.usable
                                 else "not now"),
             option.fixes, option.disk, option.time, "; ".join(option.reasons)]
            for option in advice.options]
    console.out.print(console.table("source.advise", ["source", "", "required fixes", "disk", "time",
                                                      "why"], rows))
    kind = lockfile.lock.build.kind
    if advice.choice == ROLLBACK.name:
        console.out.print(f"use: {ROLLBACK.name} — no TensorRT-LLM option passes every check yet (see why)")
    elif advice.choice == kind:
        console.out.print(f"use: {advice.choice} (what the lock already says)")
    else:
        console.out.print(f"use: {advice.choice} — the lock says {kind!r}: set [build] kind = "
                          f"\"{advice.choice}\" in {lockfile.path} and run invoke source.update")


# The task's first line for `invoke --list`, naming the rollback runtime from its record.
advise.__doc__ = (f"Which source to use (build, release image, wheel, or stay with {ROLLBACK.product}), "
                  "from the facts.")


@task(default=True, help={"cuda_archs": "override CUDA_ARCHS (default: the lock's)",
                          "jobs": "parallel compile jobs (default: sized from the build node's memory)",
                          "hosts": HOSTS_HELP, "lock": LOCK_HELP, "dry_run": DRY_RUN_HELP,
                          "json": JSON_HELP})
@user_errors
def build(c: Context, cuda_archs: str = "", jobs: int = 0, hosts: str = "hosts.toml",
          lock: str = str(locks.DEFAULT_PATH), dry_run: bool = False, json: bool = False) -> None:
    """Build the TensorRT-LLM image at the locked commit on the build node, labelled with the lock."""
    cluster = inventory.load(hosts)
    lockfile = locks.load(lock)
    if lockfile.lock.build.kind == "source":
        report = phase.fetch(cluster, lockfile)
        plan = images.plan(cluster, lockfile, report.directory, cuda_archs or None, jobs or None,
                           report.ccache)
    else:
        plan = images.plan(cluster, lockfile)
    if json and (dry_run or plan.up_to_date):
        console.print_json(plan.as_json() | {"dry_run": dry_run})
        return
    if not json:
        console.out.print(console.table(f"image: plan on {plan.node}", ["", "value"], [
            ["image", plan.image], ["lock hash", plan.lock_hash[:16]],
            ["CUDA_ARCHS", plan.cuda_archs], ["compile jobs", plan.jobs_why],
            *[["note", note] for note in plan.notes],
            *[["step", " ".join(argv[:4]) + " …"] for argv in plan.commands]]))
    if plan.up_to_date:
        console.out.print(f"up to date: {plan.image} on {plan.node} carries this lock's hash")
        return
    if dry_run:
        console.out.print("dry run: nothing was built")
        return
    log_dir = f"{cluster.build_node.paths.state}/logs"
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                  TimeElapsedColumn(), console=console.err, transient=True) as bar:
        task_id = bar.add_task("building: starting", total=None, count="")

        def follow(step) -> None:
            count = f"{step.done}/{step.total}" if step.total else ""
            bar.update(task_id, description=f"building: {step.stage} ({step.index + 1}/{step.stages})",
                       total=step.total or None, completed=step.done or 0, count=count)

        result = images.build(cluster, plan, log_dir, follow)
    if json:
        console.print_json(plan.as_json() | {"image_id": result.image_id, "seconds": result.seconds,
                                             "log": result.log})
        return
    console.out.print(f"built {result.image} ({result.image_id[:19]}) on {plan.node} in "
                      f"{result.seconds:.0f} s; log: {result.log}", soft_wrap=True)


@task(help={"hosts": HOSTS_HELP, "nodes": NODES_HELP, "lock": LOCK_HELP, "json": JSON_HELP})
@user_errors
def verify(c: Context, hosts: str = "hosts.toml", nodes: str = "",
           lock: str = str(locks.DEFAULT_PATH), json: bool = False) -> None:
    """Check the images on every node against the lock: same lock hash and commit; pinned digests."""
    cluster = inventory.load(hosts)
    lockfile = locks.load(lock)
    verdicts = images.verify(cluster, lockfile, cluster.select(nodes))
    if json:
        console.print_json([vars(v) for v in verdicts])
    else:
        console.out.print(console.table(f"image.verify: {images.image_ref(lockfile)}",
                                        ["node", "image", "verdict"], [
            [v.node, v.image, console.status_cell("pass" if v.ok else "fail", v.detail)]
            for v in verdicts]))
    bad = sorted({v.node for v in verdicts if not v.ok})
    if bad:
        raise Exit(f"image.verify: {len(bad)} node(s) differ from the lock: {', '.join(bad)}", code=1)


source_ns = Collection("source", fetch, update, advise)
image_ns = Collection("image", build, verify)
