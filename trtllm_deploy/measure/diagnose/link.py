"""``diagnose.link``: the fabric between the nodes — link speed (``ethtool``), MTU on both ends of
every link, a ping matrix over the fabric addresses, duplicate subnets, interfaces that are down.

Facts first (one SSH command per node: ``ip -j link``, ``ip -j addr``, ``ethtool`` per fabric
interface), then the ping matrix (each node pings every other node's fabric address), then the
checks as pure functions of what was read.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field

from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.scripts import Script

SPARK_SPEED_MBPS = 200_000


def parse_ethtool(text: str) -> dict:
    """``ethtool IFACE`` → speed in Mb/s (None for ``Unknown!`` or absent), duplex, link detected."""
    speed = re.search(r"^\s*Speed:\s*(\S+)", text, re.M)
    duplex = re.search(r"^\s*Duplex:\s*(\S+)", text, re.M)
    link = re.search(r"^\s*Link detected:\s*(\w+)", text, re.M)
    mbps = re.fullmatch(r"(\d+)Mb/s", speed.group(1)) if speed else None
    return {"speed_mbps": int(mbps.group(1)) if mbps else None,
            "speed": speed.group(1) if speed else None,
            "duplex": duplex.group(1).rstrip("!") if duplex else None,
            "link": (link.group(1) == "yes") if link else None}


def parse_ip_link(text: str) -> dict[str, dict]:
    """``ip -j link`` → {ifname: {mtu, operstate, up}} (``up``: the UP flag and a carrier)."""
    found = {}
    for entry in json.loads(text or "[]"):
        flags = entry.get("flags", [])
        found[entry["ifname"]] = {"mtu": entry.get("mtu"), "operstate": entry.get("operstate"),
                                  "up": "UP" in flags and "NO-CARRIER" not in flags}
    return found


def parse_ip_addr(text: str) -> dict[str, list[str]]:
    """``ip -j addr`` → {ifname: ["10.0.0.1/24", ...]} (IPv4 and IPv6, link-local IPv6 left out)."""
    found = {}
    for entry in json.loads(text or "[]"):
        found[entry["ifname"]] = [f"{info['local']}/{info['prefixlen']}"
                                  for info in entry.get("addr_info", [])
                                  if info.get("scope") != "link" or info.get("family") == "inet"]
    return found


def parse_ping(text: str) -> dict:
    """``ping -c N -q`` summary → transmitted, received, loss %, average RTT in ms (None if lost)."""
    counts = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received.*?([\d.]+)% packet loss",
                       text)
    rtt = re.search(r"= [\d.]+/([\d.]+)/[\d.]+", text)
    if not counts:
        return {"transmitted": 0, "received": 0, "loss_pct": 100.0, "rtt_ms": None,
                "error": text.strip().splitlines()[-1] if text.strip() else "no output"}
    return {"transmitted": int(counts.group(1)), "received": int(counts.group(2)),
            "loss_pct": float(counts.group(3)), "rtt_ms": float(rtt.group(1)) if rtt else None}


def duplicate_subnets(addresses: dict[str, list[str]]) -> list[str]:
    """Subnets that more than one interface of the node sits in (the kernel routes through one)."""
    owners: dict[str, list[str]] = {}
    for ifname, cidrs in addresses.items():
        if ifname == "lo":
            continue
        for cidr in cidrs:
            net = str(ipaddress.ip_interface(cidr).network)
            if ifname not in owners.setdefault(net, []):
                owners[net].append(ifname)
    return [f"{net} on {', '.join(names)}" for net, names in owners.items() if len(names) > 1]


@dataclass
class NodeLinks:
    """One node's fabric as read: interfaces, addresses, ethtool per fabric interface."""

    name: str
    fabric: list[str]
    links: dict[str, dict]
    addresses: dict[str, list[str]]
    ethtool: dict[str, dict]
    ping: dict[str, dict] = field(default_factory=dict)  # peer node → parse_ping

    def fabric_address(self, configured: str | None = None) -> str | None:
        if configured:
            return configured
        for ifname in self.fabric:
            for cidr in self.addresses.get(ifname, []):
                if ipaddress.ip_interface(cidr).version == 4:
                    return str(ipaddress.ip_interface(cidr).ip)
        return None

    def interface_of(self, address: str) -> str | None:
        for ifname, cidrs in self.addresses.items():
            if any(str(ipaddress.ip_interface(cidr).ip) == address for cidr in cidrs):
                return ifname
        return None

    def route_to(self, address: str) -> str | None:
        """The interface whose subnet holds ``address`` (a fabric one first)."""
        try:
            target = ipaddress.ip_address(address)
        except ValueError:
            return None
        names = [*self.fabric, *(i for i in self.addresses if i not in self.fabric and i != "lo")]
        for ifname in names:
            for cidr in self.addresses.get(ifname, []):
                if target in ipaddress.ip_interface(cidr).network and ifname in self.links:
                    return ifname
        return None

    def as_json(self) -> dict:
        return {"fabric": self.fabric, "links": {i: self.links.get(i) for i in self.fabric},
                "addresses": {i: self.addresses.get(i, []) for i in self.fabric},
                "ethtool": self.ethtool, "ping": self.ping}


def node_problems(node: NodeLinks, min_speed_mbps: int | None) -> list[str]:
    problems = []
    for ifname in node.fabric:
        link = node.links.get(ifname)
        if link is None:
            problems.append(f"{ifname} does not exist")
            continue
        if not link["up"] or link["operstate"] not in ("UP", "UNKNOWN"):
            problems.append(f"{ifname} is down ({link['operstate']})")
        speed = node.ethtool.get(ifname, {}).get("speed_mbps")
        if min_speed_mbps and speed is not None and speed < min_speed_mbps:
            problems.append(f"{ifname} runs at {speed} Mb/s, below {min_speed_mbps} Mb/s")
    problems += [f"duplicate subnet: {dup}" for dup in duplicate_subnets(node.addresses)]
    return problems


def link_problems(nodes: dict[str, NodeLinks], addresses: dict[str, str]) -> list[str]:
    """Across nodes: an unanswered or lossy ping, and a link whose two ends differ in MTU."""
    problems = []
    for name, node in nodes.items():
        for peer, result in node.ping.items():
            address = addresses.get(peer, "")
            if result["received"] == 0:
                problems.append(f"{name} → {peer} ({address}): no reply")
            elif result["loss_pct"] > 0:
                problems.append(f"{name} → {peer}: {result['loss_pct']:g}% loss")
            other = nodes.get(peer)
            far_if = other.interface_of(address) if other else None
            near_if = node.route_to(address)
            if far_if and near_if:
                near, far = node.links[near_if]["mtu"], other.links[far_if]["mtu"]
                if near != far:
                    problems.append(f"MTU differs on {name}'s {near_if} ↔ {peer}'s {far_if}: "
                                    f"{near} against {far}")
    return sorted(set(problems))


# --- the commands on each node ------------------------------------------------------------------

# $@ the fabric interfaces. Each fact in its own section.
LOOK = Script("look at the node's links", """
mark link; ip -j link show
mark addr; ip -j addr show
for iface in "$@"; do
  mark "ethtool $iface"
  if command -v ethtool >/dev/null 2>&1; then ethtool "$iface" 2>&1; \
  elif [ -x /sbin/ethtool ]; then /sbin/ethtool "$iface" 2>&1; \
  else echo "ethtool is not installed"; fi
done
""")

# $@ the peers' addresses. ping where the node has it; else three TCP connects to the peer's
# sshd, summarised the same way (a node image without iputils still gets a reachability matrix,
# and says which it used).
PING = Script("ping the other nodes", """
for addr in "$@"; do
  mark "ping $addr"
  if command -v ping >/dev/null 2>&1; then ping -c 3 -q -W 2 "$addr" 2>&1; \
  else echo "(ping is not installed: TCP to port 22 instead)"; python3 - "$addr" <<'EOF'
import socket, sys, time
rtts = []
for _ in range(3):
    start = time.monotonic()
    try:
        socket.create_connection((sys.argv[1], 22), timeout=2).close()
        rtts.append((time.monotonic() - start) * 1000)
    except OSError:
        pass
loss = 100 * (3 - len(rtts)) / 3
print(f"3 packets transmitted, {len(rtts)} received, {loss:g}% packet loss")
if rtts:
    print(f"rtt min/avg/max/mdev = {min(rtts):.3f}/{sum(rtts)/len(rtts):.3f}/{max(rtts):.3f}/0.000 ms")
EOF
  fi
done
""")


def read_node(name: str, fabric: list[str], sections: dict[str, str]) -> NodeLinks:
    return NodeLinks(name, fabric, parse_ip_link(sections.get("link", "[]")),
                     parse_ip_addr(sections.get("addr", "[]")),
                     {ifname: parse_ethtool(sections.get(f"ethtool {ifname}", ""))
                      for ifname in fabric})


@dataclass
class LinkReport:
    nodes: dict[str, NodeLinks]
    addresses: dict[str, str]
    problems: dict[str, list[str]]
    across: list[str]
    unreachable: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.across and not self.unreachable and not any(self.problems.values())

    def as_json(self) -> dict:
        return {"ok": self.ok, "addresses": self.addresses, "across": self.across,
                "problems": self.problems, "unreachable": self.unreachable,
                "nodes": {name: node.as_json() for name, node in self.nodes.items()}}


def run(cluster, min_speed_mbps: int | None = SPARK_SPEED_MBPS) -> LinkReport:
    from trtllm_deploy.hosts.fanout import fan_out

    def facts(node, target) -> NodeLinks:
        fabric = list(node.fabric.interfaces)
        return read_node(node.name, fabric, scripts.run(target, LOOK, *fabric).sections)

    seen = fan_out(cluster.nodes, facts)
    nodes = {o.node.name: o.value for o in seen if o.ok}
    unreachable = {o.node.name: o.reason for o in seen.failed}
    addresses = {}
    for node in cluster.nodes:
        if node.name in nodes:
            address = nodes[node.name].fabric_address(node.fabric.address) or node.address
            if address:
                addresses[node.name] = str(address)

    def pings(node, target) -> dict[str, dict]:
        peers = {peer: addr for peer, addr in addresses.items() if peer != node.name}
        sections = scripts.run(target, PING, *peers.values(), check=False).sections
        return {peer: parse_ping(sections.get(f"ping {addr}", "")) for peer, addr in peers.items()}

    for outcome in fan_out([n for n in cluster.nodes if n.name in nodes], pings):
        if outcome.ok:
            nodes[outcome.node.name].ping = outcome.value
        else:
            unreachable[outcome.node.name] = outcome.reason
    problems = {name: node_problems(node, min_speed_mbps) for name, node in nodes.items()}
    return LinkReport(nodes, addresses, problems, link_problems(nodes, addresses), unreachable)
