"""``ssh.setup``: every node's own key trusted by every node, every node's host key pinned everywhere.

mpirun's rsh agent runs ``ssh <node> docker exec ...`` from the head, so the head must reach every
node, and each node reaches every other. Each node's key pair is made on that node and its private
half never leaves it; only public keys and host keys travel. Host keys are taken only when what
``ssh-keyscan`` gets from the node's address matches what the node itself reports over the
already-verified SSH connection; a key that differs from a pinned one is refused, never replaced.
Nothing in sshd's configuration is read or changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from trtllm_deploy.errors import CheckFailed, DeployError
from trtllm_deploy.hosts import knownhosts, scripts
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.knownhosts import PublicKey, find_key, host_name, keys_in
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.targets import Target

KEY = "~/.ssh/id_ed25519"  # the node user's key; containers.DEFAULT_KEY is the head's one of these

# What is read on each node, in one round trip: its key, the two files we may add to, their
# modes, and the host keys the node itself holds (the sshd we reached must present these).
LOOK = Script("read the node's SSH keys", """
k="$HOME/.ssh/id_ed25519"
mark modes; stat -c '%n %a' "$HOME/.ssh" "$HOME/.ssh/authorized_keys" 2>/dev/null
mark key
if [ -f "$k" ]; then
  if [ -f "$k.pub" ]; then cat "$k.pub"
  else ssh-keygen -y -P '' -f "$k" 2>/dev/null || echo '!unreadable'; fi
fi
mark authorized_keys; cat "$HOME/.ssh/authorized_keys" 2>/dev/null
mark known_hosts; cat "$HOME/.ssh/known_hosts" 2>/dev/null
mark host_keys; cat /etc/ssh/ssh_host_*_key.pub 2>/dev/null
exit 0
""")

# Makes the node's key pair on the node if it has none (comment: $1); prints created/kept and
# the public half.
MAKE_KEY = Script("make the node's SSH key", """set -e
umask 077
mkdir -p "$HOME/.ssh" && chmod 700 "$HOME/.ssh"
k="$HOME/.ssh/id_ed25519"
if [ -e "$k" ]; then echo kept
else ssh-keygen -q -t ed25519 -N '' -C "$1" -f "$k" </dev/null; echo created; fi
if [ -f "$k.pub" ]; then cat "$k.pub"; else ssh-keygen -y -P '' -f "$k"; fi
""")

# Appends lines to a file under ~/.ssh that are not in it yet (exact line), on a line of their
# own; then sets the file's mode ("keep": as it is, 0600 if new). Arguments: FILE MODE LINE...
_APPEND = """set -e
umask 077
mkdir -p "$HOME/.ssh" && chmod 700 "$HOME/.ssh"
f="$HOME/.ssh/$1"; mode=$2; shift 2
if [ -s "$f" ] && [ -n "$(tail -c 1 "$f")" ]; then echo >> "$f"; fi
for line do grep -qxF -- "$line" "$f" 2>/dev/null || printf '%s\\n' "$line" >> "$f"; done
touch "$f"
if [ "$mode" != keep ]; then chmod "$mode" "$f"; fi
"""
AUTHORIZE = Script("add keys to authorized_keys", _APPEND)
PIN = Script("pin host keys in known_hosts", _APPEND)


# --- facts ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeFacts:
    """What one node showed: its key, its ~/.ssh files, its host keys and what the network showed."""

    node: Node
    key: PublicKey | None             # ~/.ssh/id_ed25519's public half; None: no key yet
    authorized_keys: str
    known_hosts: str
    modes: dict[str, str]             # "ssh_dir"/"authorized_keys" -> octal mode as stat prints it
    reported: tuple[PublicKey, ...]   # /etc/ssh/ssh_host_*_key.pub, read over the verified connection
    scanned: tuple[PublicKey, ...]    # ssh-keyscan from this machine to the node's address and port


def parse_gathered(node: Node, parts: dict[str, str], scanned: str) -> NodeFacts:
    """A node's facts from the sections of :data:`LOOK`'s output and the scan."""
    key_text = parts.get("key", "").strip()
    if key_text == "!unreadable":
        raise CheckFailed(f"{node.name}: {KEY} exists but its public half cannot be read (is it"
                          " protected by a passphrase?); mpirun needs a key it can use unattended:"
                          f" write its public key to {KEY}.pub, or move the key aside")
    modes = {}
    for line in parts.get("modes", "").splitlines():
        path, _, mode = line.rpartition(" ")
        modes["authorized_keys" if path.endswith("/authorized_keys") else "ssh_dir"] = mode
    return NodeFacts(node=node, key=find_key(key_text) if key_text else None,
                     authorized_keys=parts.get("authorized_keys", ""),
                     known_hosts=parts.get("known_hosts", ""), modes=modes,
                     reported=tuple(keys_in(parts.get("host_keys", ""))),
                     scanned=tuple(keys_in(scanned)))


def _reach_address(node: Node) -> str | None:
    """The address other nodes' ssh uses for ``node`` (mpi.ssh_config's HostName), or None."""
    if node.connection == "local" and not node.address:
        return None
    return node.address or node.name


def keyscan(node: Node) -> str:
    """``ssh-keyscan`` of the node's address and port, from this machine (every key type)."""
    address = _reach_address(node)
    if address is None:
        return ""
    done = Local("ssh-keyscan").run(
        ["ssh-keyscan", "-p", node.port, "-T", max(1, int(node.connect_timeout)), address],
        timeout=node.connect_timeout + 15, check=False)
    if done.exit_code == 127:
        raise DeployError("ssh-keyscan is not installed on this machine (apt-get install openssh-client)")
    return done.stdout


def gather(node: Node, target: Target) -> NodeFacts:
    # The node's own report comes through `target`, whose host key was checked against the pinned
    # one; the scan is what anyone on the network gets from that address.
    return parse_gathered(node, scripts.run(target, LOOK).sections, keyscan(node))


# --- the plan -------------------------------------------------------------------------------------

@dataclass
class NodePlan:
    """What changes on one node; ``authorize`` names whose keys its authorized_keys lacks."""

    node: Node
    key: PublicKey | None
    create_key: bool
    authorize: list[str] = field(default_factory=list)          # node names
    known_hosts: list[str] = field(default_factory=list)        # lines for ~/.ssh/known_hosts
    fix_modes: bool = False

    @property
    def up_to_date(self) -> bool:
        return not (self.create_key or self.authorize or self.known_hosts or self.fix_modes)


@dataclass(frozen=True)
class HostKeyRow:
    node: str
    name: str          # as this machine's known_hosts names it
    key: PublicKey
    local_file: str
    pinned_here: bool  # already in this machine's known_hosts


@dataclass
class Plan:
    nodes: list[NodePlan]
    host_keys: list[HostKeyRow]
    local: dict[str, list[str]]        # this machine's known_hosts file -> lines to add
    local_by_node: dict[str, int]      # node -> how many of those lines are its keys
    notes: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return not self.local and all(step.up_to_date for step in self.nodes)

    def as_json(self) -> dict:
        return {
            "up_to_date": self.up_to_date,
            "refused": self.refusals,
            "notes": self.notes,
            "host_keys": [{"node": row.node, "name": row.name, "type": row.key.type,
                           "fingerprint": row.key.fingerprint, "known_hosts": row.local_file,
                           "pinned_here": row.pinned_here} for row in self.host_keys],
            "this_machine": {path: lines for path, lines in self.local.items()},
            "nodes": [{"node": step.node.name, "create_key": step.create_key,
                       "key": step.key.fingerprint if step.key else None,
                       "authorize": step.authorize, "known_hosts": step.known_hosts,
                       "fix_modes": step.fix_modes} for step in self.nodes],
        }


def _verified_host_keys(facts: NodeFacts, refusals: list[str]) -> list[PublicKey]:
    """The scanned keys, each of which the node itself holds; anything else is a refusal."""
    node = facts.node
    where = host_name(_reach_address(node) or node.host, node.port)
    if not facts.scanned:
        refusals.append(f"{node.name}: ssh-keyscan got no host key from {where}; is sshd listening"
                        " there for the other nodes too?")
        return []
    if not facts.reported:
        refusals.append(f"{node.name}: the node reports no host key in /etc/ssh/ssh_host_*_key.pub,"
                        f" so the key {where} presents ({facts.scanned[0].shown}) cannot be checked"
                        " against the node's own; nothing was pinned")
        return []
    strangers = [key for key in facts.scanned if key not in facts.reported]
    if strangers:
        own = ", ".join(key.shown for key in facts.reported)
        # Its own words (NOT THE NODE'S KEY), not a known_hosts mismatch's: a scanned key can be
        # a stranger where nothing is pinned yet, and only this check sees that.
        refusals.append(
            f"{node.name}: NOT THE NODE'S KEY: {where} presents {', '.join(k.shown for k in strangers)},"
            f" which the node itself does not hold (its /etc/ssh has {own}). Something between this"
            " machine and the node answers in its name. Nothing was written; find out why before"
            " trusting it.")
        return []
    return list(facts.scanned)


def _missing(text: str, name: str, keys: list[PublicKey], file: str, owner: str,
             refusals: list[str]) -> list[PublicKey]:
    """Which ``keys`` a known_hosts text lacks for ``name``; a different key of a type it pins
    for that name, or a revoked one, is a refusal."""
    found = knownhosts.pins(text, name)
    wanted = []
    for key in keys:
        verdict = knownhosts.judge(found, key)
        if verdict == knownhosts.REVOKED:
            refusals.append(f"{owner}: {file} marks {key.shown} of {name} @revoked; nothing was written")
        elif rivals := knownhosts.rivals(found, key):
            # Also when the right key is pinned beside it: a second key of the same type for the
            # same host is what a planted man-in-the-middle entry looks like.
            refusals.append(f"{owner}: " + knownhosts.changed_key_message(
                name, file, rivals[0].shown, key.shown, refused="Nothing was written anywhere"))
        elif verdict == knownhosts.UNKNOWN:
            wanted.append(key)
    return wanted


def make_plan(cluster: Cluster, facts: list[NodeFacts]) -> Plan:
    """From every node's facts, what to add where. Pure: nothing here touches a host."""
    refusals: list[str] = []
    notes: list[str] = []
    host_keys: dict[str, list[PublicKey]] = {}
    rows: list[HostKeyRow] = []
    local: dict[str, list[str]] = {}
    local_by_node: dict[str, int] = {}
    local_texts: dict[str, str] = {}

    for seen in facts:
        node = seen.node
        if _reach_address(node) is None:
            notes.append(f"{node.name}: no address in hosts.toml, so other nodes cannot reach it and"
                         " its host key is not pinned on them")
            continue
        keys = _verified_host_keys(seen, refusals)
        host_keys[node.name] = keys
        if node.connection == "local":
            continue  # this machine does not ssh to itself; the nodes' known_hosts get its keys
        path = str(Path(node.known_hosts).expanduser())
        if path not in local_texts:
            local_texts[path] = knownhosts.read(path)
        name = host_name(node.host, node.port)
        text = local_texts[path] + "".join(line + "\n" for line in local.get(path, []))
        add = _missing(text, name, keys, path, "this machine", refusals)
        lines = [f"{name} {key.line}" for key in add]
        if lines:
            local.setdefault(path, []).extend(lines)
            local_by_node[node.name] = len(lines)
        rows += [HostKeyRow(node.name, name, key, path, key not in add) for key in keys]

    steps: list[NodePlan] = []
    for seen in facts:
        node = seen.node
        authorized = {find_key(line) for line in seen.authorized_keys.splitlines()}
        # Every node's key, its own too: mpirun may reach its own node by name over ssh.
        authorize = [other.node.name for other in facts
                     if other.key is None or other.key not in authorized]
        lines = []
        for other in facts:
            keys = host_keys.get(other.node.name)
            if not keys:
                continue
            address = _reach_address(other.node)
            names = list(dict.fromkeys([host_name(address, other.node.port),
                                        host_name(other.node.name, other.node.port)]))
            for key in keys:
                lacking = [name for name in names
                           if _missing(seen.known_hosts, name, [key], f"{node.name}:~/.ssh/known_hosts",
                                       node.name, refusals)]
                if lacking:
                    lines.append(f"{','.join(lacking)} {key.line}")
        fix_modes = (seen.modes.get("ssh_dir", "700") != "700"
                     or seen.modes.get("authorized_keys", "600") != "600")
        steps.append(NodePlan(node, seen.key, seen.key is None, authorize, lines, fix_modes))
    return Plan(steps, rows, local, local_by_node, notes, list(dict.fromkeys(refusals)))


def look(cluster: Cluster) -> Plan:
    """Gather every node's facts in parallel and plan; an unreachable node or a host key that
    does not match the pinned one stops here, before anything is written."""
    gathered = fan_out(cluster.nodes, gather)
    gathered.raise_for_failures()
    return make_plan(cluster, [outcome.value for outcome in gathered])


# --- acting ---------------------------------------------------------------------------------------

@dataclass
class NodeResult:
    node: str
    key: str                 # "created" or "kept"
    fingerprint: str
    authorized_added: int
    known_hosts_added: int
    this_machine_added: int

    @property
    def changed(self) -> bool:
        return (self.key == "created" or self.authorized_added or self.known_hosts_added
                or self.this_machine_added)

    def as_json(self) -> dict:
        return {"node": self.node, "key": self.key, "fingerprint": self.fingerprint,
                "authorized_keys_added": self.authorized_added,
                "known_hosts_added": self.known_hosts_added,
                "this_machine_known_hosts_added": self.this_machine_added}


def _append_here(path: str, lines: list[str]) -> None:
    """Append lines to this machine's known_hosts, made 0600 (its folder 0700) if new."""
    file = Path(path)
    if not file.parent.exists():
        file.parent.mkdir(mode=0o700, parents=True)
    fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as out:
        if file.stat().st_size and not file.read_bytes().endswith(b"\n"):
            out.write("\n")
        out.writelines(line + "\n" for line in lines)


def apply(plan: Plan) -> list[NodeResult]:
    """Make missing keys (on their nodes), then add the lines; refuses if the plan has refusals."""
    if plan.refusals:
        raise CheckFailed("ssh.setup refused, nothing was written:\n  " + "\n  ".join(plan.refusals))
    by_name = {step.node.name: step for step in plan.nodes}
    nodes = [step.node for step in plan.nodes]

    def make_key(node: Node, target: Target) -> tuple[str, PublicKey]:
        step = by_name[node.name]
        if not step.create_key:
            return "kept", step.key
        done = scripts.run(target, MAKE_KEY, f"{node.user or 'node'}@{node.name} trtllm-deploy").lines()
        key = find_key("\n".join(done[1:]))
        if key is None:
            raise CheckFailed(f"{node.name}: ssh-keygen made no readable {KEY}.pub")
        return done[0].strip(), key

    made = fan_out(nodes, make_key)
    made.raise_for_failures()
    keys = {outcome.node.name: outcome.value for outcome in made}

    def add_lines(node: Node, target: Target) -> tuple[int, int]:
        step = by_name[node.name]
        authorized = [f"{keys[name][1].line} trtllm-deploy:{name}" for name in step.authorize]
        if authorized or step.fix_modes:
            scripts.run(target, AUTHORIZE, "authorized_keys", "600", *authorized)
        if step.known_hosts:
            scripts.run(target, PIN, "known_hosts", "keep", *step.known_hosts)
        return len(authorized), len(step.known_hosts)

    added = fan_out(nodes, add_lines)
    added.raise_for_failures()
    for path, lines in plan.local.items():
        _append_here(path, lines)
    return [NodeResult(node.name, keys[node.name][0], keys[node.name][1].fingerprint,
                       *added[node.name].value, plan.local_by_node.get(node.name, 0))
            for node in nodes]
