"""A deployment's job seen from its nodes: each rank alive or dead, mpirun's exit, the logs' tails,
and what went wrong explained from them (a known failure of its runtime, with its remedy).

The logs stay after the containers are gone: they live in each node's state folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from trtllm_deploy import secrets
from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.runtimes import failures
from trtllm_deploy.serving import containers
from trtllm_deploy.serving.state import Deployment

# One look at a node's job, inside its container: each rank's pid alive or not and its log's size;
# on the head, mpirun's exit status once it has one.
LOOK = Script("look at the job's ranks", """
cd "$TRTLLM_DEPLOY_LOG_DIR" 2>/dev/null || exit 0
for pid in rank-*.pid; do
  test -f "$pid" || continue
  rank=${pid%.pid}
  if kill -0 "$(cat "$pid")" 2>/dev/null; then state=alive; else state=dead; fi
  echo "$rank $state $(stat -c %s "$rank.log" 2>/dev/null || echo 0)"
done
test -f mpirun.exit && echo "mpirun exited $(cat mpirun.exit)"
exit 0
""", timeout=30)
# The last "$2" lines of the logs "$3".. in the job's log folder "$1", each after a mark.
TAILS = Script("read the job's logs", """
cd "$1" 2>/dev/null || exit 0
lines=$2; shift 2
for pattern in "$@"; do
  for f in $pattern; do
    test -f "$f" && { mark "$f"; tail -n "$lines" "$f"; }
  done
done
exit 0
""")


@dataclass(frozen=True)
class Look:
    """What one node's job looks like now."""

    node: str
    ranks: dict[str, tuple[bool, int]]  # rank-N -> (alive, log bytes)
    mpirun_exit: int | None
    container: bool


def look(cluster: Cluster, deployment: Deployment) -> dict[str, Look]:
    name = containers.container_name(cluster, deployment.job)

    def one(node: Node, target) -> Look:
        seen = scripts.run(target, LOOK, check=False, prefix=("docker", "exec", name))
        if not seen.ok:
            return Look(node.name, {}, None, False)
        ranks, code = {}, None
        for line in seen.lines():
            words = line.split()
            if words[:2] == ["mpirun", "exited"]:
                code = int(words[2]) if words[2:] and words[2].lstrip("-").isdigit() else -1
            elif len(words) == 3:
                ranks[words[0]] = (words[1] == "alive", int(words[2]) if words[2].isdigit() else 0)
        return Look(node.name, ranks, code, True)

    seen = fan_out(cluster.nodes, one)
    return {o.node.name: o.value if o.ok else Look(o.node.name, {}, None, False) for o in seen}


def trouble(looks: dict[str, Look], deployment: Deployment, head: str) -> str | None:
    """What is wrong with the job, in a sentence, or None when every part of it runs."""
    for name, seen in looks.items():
        if not seen.container:
            return f"the job's container on {name} is gone (or the node cannot be reached)"
        dead = [rank for rank, (alive, _) in seen.ranks.items() if not alive]
        if dead:
            return f"{', '.join(sorted(dead))} on {name} died"
    if looks[head].mpirun_exit is not None:
        return f"mpirun exited with status {looks[head].mpirun_exit}"
    return None


def tails(cluster: Cluster, job: str, lines: int = 30, rank: int | None = None) -> dict[str, str]:
    """The last lines of every rank's log (and mpirun's, on the head), read on each node; kept after
    the containers are gone (they live in the node's state folder)."""
    patterns = ("rank-*.log", "mpirun.log") if rank is None else (f"rank-{rank}.log",)

    def one(node: Node, target) -> dict[str, str]:
        folder = f"{containers.job_dir(node, target.home(), job)}/logs"
        ran = scripts.run(target, TAILS, folder, lines, *patterns, check=False)
        return {name: text + "\n" if text else "" for name, text in ran.sections.items() if name}

    seen = fan_out(cluster.nodes, one)
    return {f"{o.node.name}/{name}": text for o in seen if o.ok for name, text in o.value.items()}


def explain(cluster: Cluster, deployment: Deployment, what: str) -> str:
    """``what``, the known failure the ranks' logs show (with its remedy), and where each log ends."""
    logs = tails(cluster, deployment.job)
    everything = "\n".join(logs.values())
    known = failures.match(everything, deployment.runtime)
    lines = [what if known is None else f"{what}: {known.name}"]
    for name, text in sorted(logs.items()):
        last = [line for line in text.splitlines() if line.strip()][-3:]
        if last:
            lines.append(f"  {name}:")
            lines += [f"    {line}" for line in last]
    if known is not None:
        lines.append(f"  what to do: {known.remedy}")
    return secrets.redact("\n".join(lines))
