"""Applying a fabric plan on each node, the node's own way, with a way back.

Per node: the netplan file the plan gives it (``/etc/netplan/40-cx7.yaml``, the playbooks' name;
the one it replaces is kept as ``40-cx7.yaml.previous``) touching only the fabric ports; what is
there now, and so what would change (nothing: "up to date", nothing touched); then the change,
made by network/onnode.py as root: ``netplan apply`` where netplan and systemd run, else live with
``ip``. Before changing anything the node starts a watchdog that puts everything back after
``confirm_s`` seconds; a NEW SSH connection to the node then confirms the change. Where that
connection fails the watchdog reverts, and fabric.setup reconnects, checks the revert and fails
saying what happened.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts.fanout import GroupResult, fan_out
from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.hosts.scripts import Script, StepFailed, run
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.hosts.targets import Target, TargetError
from trtllm_deploy.network.model import NodePlan, Plan

NETPLAN_FILE = "/etc/netplan/40-cx7.yaml"
RUNS = "/run/trtllm-deploy/fabric"
CONFIRM_S = 30          # how long the change waits for a new SSH connection to confirm it
APPLY_TIMEOUT_S = 20    # a change that cut this connection answers no more: the new one decides
NO_ROOT = 77

_ONNODE = (Path(__file__).parent / "onnode.py").read_text()

# $1: root | user; the rest: onnode.py's arguments; standard input: onnode.py itself.
PROGRAM = Script("run fabric.setup's program on the node", """
as=$1; shift
prog=$(mktemp "${TMPDIR:-/tmp}/trtllm-fabric-XXXXXX") || exit 1
cat > "$prog"
if [ "$as" = user ] || [ "$(id -u)" -eq 0 ]; then python3 "$prog" "$@"; rc=$?
elif sudo -n true 2>/dev/null; then sudo -n python3 "$prog" "$@"; rc=$?
else
  echo "fabric.setup needs root here (it reads the netplan files, mode 600, and sets addresses):" \
       "$(id -un) may not use sudo without a password (sudo -n true failed); allow it (a line in" \
       "/etc/sudoers.d) or log in as root" >&2
  rc=77
fi
rm -f "$prog"; exit $rc
""")


def netplan_file(node: NodePlan, plan: Plan) -> str:
    """The netplan YAML for the node's fabric ports only: addresses, MTU, no DHCP, its routes."""
    lines = [f"# Written by trtllm-deploy's fabric.setup: the {plan.topology} fabric in {plan.subnet},"
             " its ports only.",
             f"# The file this replaced is kept as {Path(NETPLAN_FILE).name}.previous.",
             "network:", "  version: 2", "  ethernets:"]
    for port in node.ports:
        lines += [f"    {port.port}:", "      dhcp4: false", "      dhcp6: false", f"      mtu: {port.mtu}",
                  "      addresses:", f"        - {port.address}"]
        routes = [route for route in node.routes if route.port == port.port]
        if routes:
            lines.append("      routes:")
            for route in routes:
                lines += [f"        - to: {route.to}", f"          via: {route.via}"]
    return "\n".join(lines) + "\n"


def _want(node: NodePlan, plan: Plan) -> dict:
    return {"file": NETPLAN_FILE, "text": netplan_file(node, plan),
            "ports": {port.port: {"addresses": [port.address], "mtu": port.mtu} for port in node.ports},
            "routes": [{"to": r.to, "via": r.via, "dev": r.port} for r in node.routes]}


def _run(target: Target, as_: str, *args: str, timeout: float = 60) -> dict:
    ran = run(target, PROGRAM, as_, *args, stdin=_ONNODE, timeout=timeout)
    return json.loads(ran.stdout.strip().splitlines()[-1])


def read_state(target: Target, node: NodePlan, plan: Plan) -> dict:
    return _run(target, "root", "state", json.dumps(_want(node, plan)))


def changes(node: NodePlan, plan: Plan, state: dict) -> list[str]:
    """What applying ``node`` would change, in words; empty: up to date."""
    want = _want(node, plan)
    found = []
    if state.get("file") != want["text"]:
        kept = " (the one there kept as .previous)" if state.get("file") else ""
        found.append(f"write {NETPLAN_FILE}{kept}")
    for name, port in want["ports"].items():
        have = state["ports"].get(name)
        if have is None:
            raise CheckFailed(f"{node.node}: {name} does not exist (it did moments ago); nothing was changed")
        if sorted(have["addresses"]) != sorted(port["addresses"]):
            now = ", ".join(have["addresses"]) or "none"
            found.append(f"{name}: {', '.join(port['addresses'])} (now {now})")
        if have["mtu"] != port["mtu"]:
            found.append(f"{name}: mtu {port['mtu']} (now {have['mtu']})")
        if not have["up"]:
            found.append(f"{name}: set up")
    have_routes = {(r["to"], r["via"], r["dev"]) for r in state.get("routes", [])}
    want_routes = {(r["to"], r["via"], r["dev"]) for r in want["routes"]}
    found += [f"route {to} via {via} dev {dev}" for to, via, dev in sorted(want_routes - have_routes)]
    found += [f"remove route {to} dev {dev}" for to, via, dev in sorted(have_routes - want_routes)]
    return found


@dataclass
class Applied:
    """What happened on one node."""

    node: str
    changes: list[str]
    status: str = "up to date"          # up to date | applied
    mode: str = ""                       # netplan apply | ip
    validated: str = ""
    details: dict = field(default_factory=dict)


def fresh_target(node: Node) -> Target:
    """A connection of its own, never a shared one: it proves that a new login still works."""
    if node.connection == "local":
        return Local(node.name, default_timeout=node.command_timeout)
    return SSH(node)


def _ask(node: Node, fresh: Callable[[Node], Target], *args: str, timeout: float = 20) -> dict:
    target = fresh(node)
    try:
        return _run(target, "root", *args, timeout=timeout)
    finally:
        target.close()


def apply_node(node: Node, target: Target, node_plan: NodePlan, plan: Plan, *, confirm_s: float = CONFIRM_S,
               fresh: Callable[[Node], Target] = fresh_target) -> Applied:
    """Apply ``node_plan`` on ``node`` (see the module's docstring); raises CheckFailed with what
    happened when the change had to be reverted."""
    state = read_state(target, node_plan, plan)
    todo = changes(node_plan, plan, state)
    if not todo:
        return Applied(node.name, [])
    mode = "netplan apply" if state["netplan"] and state["systemd"] else "ip"
    folder = f"{RUNS}/{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    want = dict(_want(node_plan, plan), mode=mode, seconds=confirm_s, dir=folder)
    lost: TargetError | None = None
    started = time.monotonic()
    try:
        done = _run(target, "root", "apply", json.dumps(want), timeout=APPLY_TIMEOUT_S)
    except StepFailed as error:
        if error.result is not None:   # refused before the watchdog, or failed after it
            if _started(node, fresh, folder) is None:
                raise CheckFailed(f"{node.name}: {error}; nothing was changed") from None
            raise _reverted(node, fresh, folder, confirm_s, f"the change failed ({error})", state,
                            node_plan, plan) from None
        lost, done = error, {}
    except TargetError as error:
        lost, done = error, {}
    try:
        answer = _ask(node, fresh, "confirm", folder)
    except TargetError as error:
        why = f"after the change a new SSH connection failed ({error})"
        if lost is not None:
            why = f"the connection that made the change stopped answering ({lost}), and {why}"
        raise _reverted(node, fresh, folder, confirm_s, why, state, node_plan, plan) from None
    if not answer.get("confirmed"):
        took = time.monotonic() - started
        why = (f"the change cut the node off: the connection that made it answered only after {took:.0f} s,"
               " when the watchdog had put the previous network back" if took >= confirm_s else
               f"the change was not confirmed within {confirm_s:g} s")
        raise _reverted(node, fresh, folder, confirm_s, why, state, node_plan, plan)
    return Applied(node.name, todo, "applied", mode, done.get("validated", ""), {"dir": folder})


def _started(node: Node, fresh, folder: str) -> dict | None:
    try:
        found = _ask(node, fresh, "outcome", folder)
    except TargetError:
        return None
    return found if found.get("exists") else None


def _reverted(node: Node, fresh, folder: str, confirm_s: float, why: str, before: dict,
              node_plan: NodePlan, plan: Plan) -> CheckFailed:
    """Wait for the watchdog's revert, check it: the error that tells the story."""
    deadline = time.monotonic() + confirm_s + 60
    seen: object = "nothing yet"
    pause = 1.0
    while time.monotonic() < deadline:
        try:
            seen = _ask(node, fresh, "outcome", folder, timeout=15)
        except TargetError as error:
            seen = str(error)
        else:
            if seen.get("reverted"):
                break
        time.sleep(pause)
        pause = min(pause * 1.5, 5)
    else:
        return CheckFailed(f"{node.name}: {why}; the watchdog should have put the previous network back"
                           f" after {confirm_s:g} s, but no revert was seen within {confirm_s + 60:g} s"
                           f" (last: {seen}). Reach the node another way (its console) and check"
                           f" {NETPLAN_FILE} and `ip addr`; what was saved is in {folder} on the node")
    report = seen["reverted"]  # type: ignore[index]
    target = fresh(node)
    try:
        now = read_state(target, node_plan, plan)
    finally:
        target.close()
    same = all(sorted((now["ports"].get(name) or {}).get("addresses", []))
               == sorted((port or {}).get("addresses", [])) for name, port in before["ports"].items())
    if same and report.get("ok"):
        verdict = ("the addresses are as before: nothing of this plan stays on the node. See why the"
                   " change cut it off (a port of the management network?) before trying again")
    else:
        verdict = (f"but the node is not as before ({report.get('error') or now['ports']}): check"
                   f" {NETPLAN_FILE} and `ip addr` there; what was saved is in {folder}")
    return CheckFailed(f"{node.name}: {why}; the watchdog restored the previous network after"
                       f" {report.get('reverted_after_s', confirm_s):g} s and {verdict}")


def apply_all(nodes: tuple[Node, ...], plan: Plan, *, confirm_s: float = CONFIRM_S,
              fresh: Callable[[Node], Target] = fresh_target) -> GroupResult[Applied]:
    """Every node of the plan at once; each node's outcome kept (one failing hides no other)."""
    by_name = {node_plan.node: node_plan for node_plan in plan.nodes}
    return fan_out([node for node in nodes if node.name in by_name],
                   lambda node, target: apply_node(node, target, by_name[node.name], plan,
                                                   confirm_s=confirm_s, fresh=fresh))

