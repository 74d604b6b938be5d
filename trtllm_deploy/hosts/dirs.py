"""The directories every node needs (model cache, artifact store, state, build), created once.

The state directory holds run records and logs that can name what was deployed, so it is
private to the node's user (mode 0700).
"""

from __future__ import annotations

from trtllm_deploy.hosts import scripts, shell
from trtllm_deploy.hosts.facts import Fact, gather
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.plan import Change, Plan, Step
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.targets import Target, TargetError, expand

PRIVATE = "700"

# For each path: "<path>\t<yes|no>\t<octal mode or ->\t<writable yes|no>", with ~ as the home.
SURVEY = Script("look at the node's folders", (
    'for p do ' + shell.EXPAND_P_TO_Q
    + 'if [ -d "$q" ]; then m=$(stat -c %a -- "$q"); e=yes; else m=-; e=no; fi; '
    'if [ -w "$q" ]; then w=yes; else w=no; fi; '
    'printf "%s\\t%s\\t%s\\t%s\\n" "$p" "$e" "$m" "$w"; done'
), timeout=30)


def parse_survey(text: str) -> dict[str, tuple[bool, str, bool]]:
    found = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            found[parts[0]] = (parts[1] == "yes", parts[2], parts[3] == "yes")
    return found


def steps_for(node: Node, cluster: Cluster, home: str, survey: dict) -> list[Step]:
    """The plan for one node from what its survey found (pure)."""
    steps = []
    for role, path in cluster.paths_for(node).items():
        absolute = expand(path, home)
        exists, mode, writable = survey.get(path, (False, "-", False))
        step = Step(node, f"dir:{role}", state=f"{absolute} ({mode})" if exists else absolute)
        if not exists:
            argv = ["mkdir", "-p", "--", absolute]
            if role == "state":
                argv = ["mkdir", "-p", "-m", PRIVATE, "--", absolute]
            step.changes.append(Change(f"create {absolute}", tuple(argv)))
        elif role == "state" and mode != PRIVATE:
            step.changes.append(Change(f"make {absolute} private (mode {mode} → {PRIVATE})",
                                       ("chmod", PRIVATE, "--", absolute)))
        elif not writable:
            step.state += "; not writable by this user: fix ownership by hand (sudo chown)"
        steps.append(step)
    return steps


def survey(node: Node, target: Target, cluster: Cluster) -> list[Step]:
    paths = list(cluster.paths_for(node).values())
    found = gather(target, [Fact.of("home", scripts.HOME), Fact.of("dirs", SURVEY, *paths)],
                   step=SURVEY.step)
    home = found["home"].stdout.strip()
    if not home.startswith("/"):
        raise TargetError(target.name, "cannot tell the node user's home directory (HOME is unset"
                          " and the user database has none); use absolute paths in hosts.toml")
    return steps_for(node, cluster, home, parse_survey(found["dirs"].stdout))


def make_plan(cluster: Cluster, nodes: tuple[Node, ...]) -> Plan:
    results = fan_out(nodes, lambda node, target: survey(node, target, cluster))
    results.raise_for_failures()
    return Plan([step for outcome in results for step in outcome.value])
