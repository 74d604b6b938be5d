"""``invoke ssh.setup``: phase 5's trust between nodes, as mpirun needs it (hosts/sshsetup.py)."""

from __future__ import annotations

from invoke import Collection, Context, task
from invoke.exceptions import Exit

from trtllm_deploy import console
from trtllm_deploy.cli import DRY_RUN_HELP, HOSTS_HELP, JSON_HELP, user_errors
from trtllm_deploy.hosts import inventory, sshsetup


def _host_key_table(plan: sshsetup.Plan):
    rows = [[row.node, row.name, row.key.type, row.key.fingerprint,
             console.status_cell("skip", "pinned") if row.pinned_here
             else console.status_cell("warn", f"to pin in {row.local_file}")]
            for row in plan.host_keys]
    return console.table("ssh.setup: host keys (the address's key = the node's own /etc/ssh key)",
                         ["node", "as", "type", "fingerprint", "this machine"], rows)


def _plan_table(plan: sshsetup.Plan, dry_run: bool):
    rows = []
    for step in plan.nodes:
        if step.up_to_date:
            rows.append([step.node.name, console.status_cell("skip", "up to date"), "", ""])
            continue
        key = (console.status_cell("warn", f"create {sshsetup.KEY} on the node") if step.create_key
               else f"keep {step.key.fingerprint}")
        modes = ["\nset ~/.ssh 0700, authorized_keys 0600"] if step.fix_modes else []
        rows.append([step.node.name, key,
                     "\n".join(f"+ key of {name}" for name in step.authorize) + "".join(modes),
                     "\n".join(f"+ {line.split()[0]} {line.split()[1]}" for line in step.known_hosts)])
    title = "ssh.setup: plan" + (" (dry run: nothing will change)" if dry_run else "")
    return console.table(title, ["node", "key pair", "authorized_keys", "known_hosts"], rows)


def _results_table(results: list[sshsetup.NodeResult]):
    rows = [[r.node, console.status_cell("warn" if r.key == "created" else "skip", r.key),
             r.fingerprint, f"+{r.authorized_added}", f"+{r.known_hosts_added}",
             f"+{r.this_machine_added}",
             console.status_cell("pass", "changed") if r.changed
             else console.status_cell("skip", "up to date")]
            for r in results]
    return console.table("ssh.setup: done", ["node", "key", "fingerprint", "authorized_keys",
                                             "known_hosts", "this machine", ""], rows)


@task(help={"hosts": HOSTS_HELP, "dry_run": DRY_RUN_HELP, "json": JSON_HELP})
@user_errors
def setup(c: Context, hosts: str = "hosts.toml", dry_run: bool = False, json: bool = False) -> None:
    """Let every node reach every node over SSH (for mpirun): own keys, host keys pinned, sshd untouched.

    Each node's ed25519 key is made on that node if it has none (its private half never leaves
    it) and its public key is added to every node's authorized_keys. Each node's host keys, as
    ssh-keyscan gets them and as the node itself holds them, are shown and then pinned in every
    node's ~/.ssh/known_hosts and in this machine's known_hosts file that hosts.toml names. A key
    that differs from a pinned one is refused, never replaced. This machine must already reach
    every node with its own key (hosts.toml identity_file or the agent).
    """
    cluster = inventory.load(hosts)
    if not json:
        with console.err.status(f"reading {len(cluster.nodes)} node(s)…", spinner="dots"):
            plan = sshsetup.look(cluster)
        console.out.print(_host_key_table(plan))
        for note in plan.notes:
            console.out.print(console.status_cell("warn", note), soft_wrap=True)
    else:
        plan = sshsetup.look(cluster)
    if plan.refusals:
        if json:
            console.print_json({"dry_run": dry_run, **plan.as_json(), "nodes_done": []})
        raise Exit("ssh.setup refused, nothing was written:\n  " + "\n  ".join(plan.refusals), code=1)
    if not json:
        console.out.print(_plan_table(plan, dry_run))
    if dry_run or plan.up_to_date:
        if json:
            console.print_json({"dry_run": dry_run, **plan.as_json(), "nodes_done": []})
        else:
            console.out.print("up to date" if plan.up_to_date else "dry run: nothing changed")
        return
    results = sshsetup.apply(plan)
    if json:
        console.print_json({"dry_run": False, **plan.as_json(),
                            "nodes_done": [r.as_json() for r in results]})
    else:
        console.out.print(_results_table(results))


ns = Collection("ssh", setup)
