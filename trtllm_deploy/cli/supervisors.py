"""The CLI's side of the head's supervisor (serving/install.py): ``supervise --install`` and
``--uninstall``, what ``status`` and ``logs`` show of it, and refusing a second supervisor in a terminal."""

from __future__ import annotations

from pathlib import Path

from invoke.exceptions import Exit

from trtllm_deploy import console
from trtllm_deploy.cli import show_plan
from trtllm_deploy.errors import DeployError
from trtllm_deploy.serving import install, plans, servicefiles
from trtllm_deploy.serving.state import Deployment, current
from trtllm_deploy.source import lock as locks


def refuse_second(cluster) -> None:
    """A supervisor in this terminal beside the head's would both act on one failure: refused."""
    if install.look(cluster, lines=0).installed:
        raise Exit(f"supervise: a supervisor is installed on {cluster.head.name} already and watches the "
                   "deployment; two would both act on a failure. See it with `invoke status` and "
                   "`invoke logs --supervisor`, or remove it first (`invoke supervise --uninstall`)", code=1)


def install_or_remove(cluster, remove: bool, dry_run: bool, json: bool, build: str, base: str, lock: str,
             options: servicefiles.Options) -> None:
    """``supervise --install`` / ``--uninstall``: the plan first, then the act, then what runs."""
    if remove:
        if dry_run:
            found = install.look(cluster)
            plan = plans.Plan("supervise --uninstall")
            plan.add(cluster.head.name, f"remove the {found.record.get('mode')} supervisor, its folder, and "
                     "copy the head's record of the deployments back here" if found.installed else
                     "nothing: no supervisor is installed")
            return show_plan(plan, json)
        removed = install.uninstall(cluster, report=console.err.print)
        if json:
            console.print_json({"removed": removed, "left": []})
        else:
            console.out.print(f"removed: {', '.join(removed)}; nothing of it is left" if removed
                              else "nothing to remove: no supervisor is installed on the head")
        return
    path = Path(lock) if lock else (locks.DEFAULT_PATH if locks.DEFAULT_PATH.exists() else None)
    intent = install.intend(cluster, options, build=build, base=base, lock=path)
    if dry_run:
        return show_plan(intent.plan, json)
    if not json:
        show_plan_lines(intent.plan)
    with console.err.status("installing the supervisor on the head…") as spinner:
        found = install.install(cluster, intent, build=build, base=base, report=spinner.update)
    if json:
        console.print_json({"up_to_date": intent.up_to_date, "mode": intent.head.mode, **found.as_json()})
        return
    console.out.print("up to date" if intent.up_to_date else
                      f"installed: the supervisor runs on {cluster.head.name} as a {intent.head.mode} "
                      f"service ({found.running.get(intent.head.mode)}); `invoke status` shows it")


def show_plan_lines(plan) -> None:
    console.out.print(console.table(plan.task, ["node", "will"], [[n, what] for n, what in plan.steps]))
    for note in plan.notes:
        console.out.print(note, highlight=False, markup=False, soft_wrap=True)




def owned(cluster) -> tuple[Deployment | None, dict | None]:
    """The current deployment and the head's supervisor: where one is installed it owns the record,
    so the head's copy is the one shown (this machine's may be stale)."""
    try:
        found = install.look(cluster, lines=8)
    except DeployError as exc:
        return current(cluster), {"installed": None, "error": str(exc)}
    if not found.installed:
        return current(cluster), found.as_json()
    mine = found.deployments.get("current")
    return (Deployment.from_json(mine) if mine else None), found.as_json()




def show(supervisor: dict | None) -> None:
    if not supervisor or supervisor.get("installed") is False:
        console.out.print("supervisor: none installed on the head (invoke supervise --install)")
        return
    if supervisor.get("installed") is None:
        console.out.print(f"supervisor: could not look at the head ({supervisor['error']})")
        return
    runs = "running" if supervisor["running"] else f"NOT running ({supervisor['state'] or 'gone'})"
    console.out.print(f"supervisor: installed on the head as a {supervisor['mode']} service, {runs}"
                      f", --on-failure {supervisor['options']['on_failure']}; it owns the record of "
                      "the deployments (shown above as the head sees it)", highlight=False, markup=False)
    for event in supervisor["history"]:
        console.out.print(f"  {event_line(event)}", highlight=False, markup=False)


def event_line(event: dict) -> str:
    detail = event.get("text") or event.get("what") or event.get("why") or ""
    return f"{event.get('at', '?')} {event.get('event', '?')}: {detail}".rstrip(": ")
