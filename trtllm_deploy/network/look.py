"""Looking at every node's fabric at once: its ports, their carrier, speed and RDMA device, what
the node's other interfaces and routes already use, and — without being told — the MAC at the
other end of each cabled port.

Which interfaces are fabric ports:

1. those backed by an RDMA device (a ConnectX), read from ``/sys/class/infiniband/*/device/net/*``
   and, where that is absent (a container has none), from ``ibdev2netdev``;
2. on a node with no RDMA device at all: every Ethernet interface that is not the loopback, not
   the management interface (the one the SSH connection came in on, else the default route's),
   not wireless and not virtual (``docker*``, ``veth*``, ``br-*``, bridges, tunnels, ...).

The management interface is never a fabric port, even behind an RDMA device.

Who is at the other end: each fabric port pings the all-nodes link-local multicast address
(``ff02::1%PORT``), pings each address that answered once more directly (so its MAC is in the
neighbour table whoever spoke first), then reads ``ip -j -6 neigh show dev PORT``: the MACs of the
addresses that answered this time (an entry left from earlier, of a node since unplugged, is not).
IPv6 link-local needs no address from anyone, so this works before ``fabric.setup`` has given the
ports theirs.

Two commands per node over one connection: the facts, then discovery on the ports they showed.
Every reader below is pure and tested against output recorded on testbed nodes
(``tests/data/fabric/``).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping

from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.facts import Fact, Output, gather
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.targets import Target, TargetError
from trtllm_deploy.network.model import NodeLook, Port

# --- what is asked of each node -------------------------------------------------------------------

_SPEEDS = Script("read the interfaces' speeds", """
for dev in /sys/class/net/*; do
    printf '%s %s\\n' "${dev##*/}" "$(cat "$dev/speed" 2>/dev/null)"
done
""")
_RDMA = Script("read the RDMA devices' interfaces", """
for net in /sys/class/infiniband/*/device/net/*; do
    [ -e "$net" ] || continue
    device=${net%/device/net/*}
    printf '%s %s\\n' "${device##*/}" "${net##*/}"
done
""")
_SESSION = Script("read the SSH connection", 'printf "%s\\n" "${SSH_CONNECTION:-}"')
_WIRELESS = Script("find wireless interfaces", """
for dev in /sys/class/net/*; do [ -d "$dev/wireless" ] && printf '%s\\n' "${dev##*/}"; done; true
""")
# A login's PATH over SSH may lack the sbin folders that ip, ibdev2netdev and netplan live in.
_SBIN = 'PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"\n'
_NETPLAN = Script("look for netplan", _SBIN + "command -v netplan && [ -d /etc/netplan ]")
_PROGRAM = Script("run a network tool", _SBIN + 'exec "$@"')


def _tool(name: str, *argv: str) -> Fact:
    return Fact.of(name, _PROGRAM, *argv)


FACTS = (
    _tool("link", "ip", "-j", "-d", "link", "show"),
    _tool("addr", "ip", "-j", "addr", "show"),
    _tool("route", "ip", "-j", "route", "show"),
    Fact.of("speed", _SPEEDS),
    Fact.of("rdma_sysfs", _RDMA),
    _tool("ibdev2netdev", "ibdev2netdev"),
    Fact.of("session", _SESSION),
    Fact.of("wireless", _WIRELESS),
    Fact.of("netplan", _NETPLAN),
)

# The ports arrive as "$@". A link-local address still in duplicate address detection
# ("tentative", just after the port came up) cannot send: wait for it, at most 3 s.
DISCOVER = Script("find who is at the other end of each fabric port", _SBIN + """
d=$(mktemp -d) || exit 97
trap 'rm -rf "$d"' EXIT
for port in "$@"; do
    n=0
    while [ $n -lt 30 ] && ip -6 addr show dev "$port" tentative 2>/dev/null | grep -q inet6; do
        sleep 0.1; n=$((n + 1))
    done
done
for port in "$@"; do ping -6 -n -w 2 "ff02::1%$port" >"$d/$port" 2>&1 & done
wait
for port in "$@"; do
    sed -n 's/^[0-9]* bytes from \\([0-9a-fA-F:]*\\)%.*/\\1/p' "$d/$port" | sort -u >"$d/$port.answered"
    while read -r peer; do ping -6 -n -c 1 -w 1 "$peer%$port" >/dev/null 2>&1 & done <"$d/$port.answered"
done
wait
for port in "$@"; do
    mark "answered $port"; cat "$d/$port.answered"
    mark "neigh $port"; ip -j -6 neigh show dev "$port"
done
""", timeout=30)

_VIRTUAL_NAMES = re.compile(r"^(lo|docker\d*|veth|br-|virbr|lxc|cni|flannel|cali|vxlan|tailscale|wg|"
                            r"tun|tap|zt|podman|nerdctl|kube)")
_VIRTUAL_KINDS = {"bridge", "dummy", "vxlan", "tun", "tap", "wireguard", "macvlan", "ipvlan",
                  "bond", "vlan", "geneve", "gre", "ipip", "sit", "ip6tnl", "vrf", "team"}
_IBDEV2NETDEV = re.compile(r"^(\S+)\s+port\s+\d+\s+==>\s+(\S+)\s+\((\w+)\)\s*$")


# --- pure readers -------------------------------------------------------------------------------

def parse_json(text: str, what: str) -> list[dict]:
    try:
        value = json.loads(text or "[]")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: not the JSON `ip -j` prints ({exc})") from None
    if not isinstance(value, list):
        raise ValueError(f"{what}: expected a JSON list, got {type(value).__name__}")
    return [item for item in value if isinstance(item, dict)]


def parse_speeds(text: str) -> dict[str, int | None]:
    """``NAME SPEED`` lines (sysfs: -1 or nothing where the driver does not say) → Mb/s or None."""
    speeds: dict[str, int | None] = {}
    for line in text.splitlines():
        name, _, value = line.strip().partition(" ")
        if name:
            value = value.strip()
            speeds[name] = int(value) if value.isdigit() and int(value) > 0 else None
    return speeds


def parse_rdma(sysfs: str, ibdev2netdev: str) -> dict[str, str]:
    """Interface → RDMA device: sysfs (``DEVICE INTERFACE`` lines) where it has any, else
    ``ibdev2netdev``'s ``DEVICE port N ==> INTERFACE (State)`` lines."""
    found = {}
    for line in sysfs.splitlines():
        parts = line.split()
        if len(parts) == 2:
            found[parts[1]] = parts[0]
    if found:
        return found
    for line in ibdev2netdev.splitlines():
        match = _IBDEV2NETDEV.match(line)
        if match:
            found[match.group(2)] = match.group(1)
    return found


def management_interface(addrs: list[dict], routes: list[dict], session: str) -> str | None:
    """The interface the SSH connection came in on (``SSH_CONNECTION``'s server address), else
    the default route's."""
    words = session.split()
    if len(words) == 4:
        server = words[2].split("%")[0]
        for link in addrs:
            if any(info.get("local") == server for info in link.get("addr_info", [])):
                return link.get("ifname")
    for route in routes:
        if route.get("dst") == "default" and route.get("dev"):
            return route["dev"]
    return None


def is_virtual(link: Mapping) -> bool:
    kind = (link.get("linkinfo") or {}).get("info_kind")
    return bool(_VIRTUAL_NAMES.match(link.get("ifname", ""))) or kind in _VIRTUAL_KINDS


def fabric_port_names(links: list[dict], rdma: Mapping[str, str], management: str | None,
                      wireless: Iterable[str] = ()) -> list[str]:
    """The fabric ports, by name (see the module's docstring for the rule)."""
    names = [link.get("ifname", "") for link in links]
    if rdma:
        return sorted(name for name in names if name in rdma and name != management)
    skip = set(wireless) | {management, "lo"}
    return sorted(link["ifname"] for link in links
                  if link.get("link_type") == "ether" and link.get("ifname") not in skip
                  and not is_virtual(link))


def _cidrs(link: Mapping) -> list[str]:
    """The link's addresses as CIDRs, link-local and host-scope ones left out."""
    found = []
    for info in link.get("addr_info", []):
        if info.get("scope") in ("link", "host") or "local" not in info:
            continue
        found.append(f"{info['local']}/{info.get('prefixlen', 128 if ':' in info['local'] else 32)}")
    return found


def in_use(addrs: list[dict], routes: list[dict], ports: Iterable[str]) -> tuple[str, ...]:
    """The networks the node's other interfaces and its routes use, for the plan to avoid."""
    ports = set(ports)
    seen: list[str] = []
    for link in addrs:
        if link.get("ifname") not in ports:
            seen += [str(ipaddress.ip_interface(cidr).network) for cidr in _cidrs(link)]
    for route in routes:
        dst = route.get("dst", "default")
        if dst != "default" and route.get("dev") not in ports:
            try:
                seen.append(str(ipaddress.ip_network(dst, strict=False)))
            except ValueError:
                continue
    return tuple(dict.fromkeys(net for net in seen if not ipaddress.ip_network(net).is_loopback))


def parse_neighbours(text: str, answered: str, own: Iterable[str] = ()) -> tuple[str, ...]:
    """The MACs at the other end: of the entries ``ip -j -6 neigh show dev PORT`` printed whose
    address is one of those that ``answered`` the pings (one per line), failed entries and the
    node's own MACs left out; lower case, in order."""
    own = {mac.lower() for mac in own}
    heard = {ipaddress.ip_address(line.strip()) for line in answered.splitlines() if line.strip()}
    macs = []
    for entry in parse_json(text, "ip -j -6 neigh"):
        mac = str(entry.get("lladdr", "")).lower()
        try:
            address = ipaddress.ip_address(str(entry.get("dst", "")).split("%")[0])
        except ValueError:
            continue
        if mac and mac not in own and address in heard and "FAILED" not in entry.get("state", []):
            macs.append(mac)
    return tuple(dict.fromkeys(macs))


def read(node: str, outputs: Mapping[str, Output],
         discovered: Mapping[str, tuple[str, str]] | None = None) -> NodeLook:
    """One node's look from its facts' outputs and, by port, what discovery printed: (the
    neighbour table, the addresses that answered)."""
    for name in ("link", "addr", "route"):
        if not outputs[name].ok:
            raise ValueError(f"`ip {name}` failed: {outputs[name].stderr or 'no output'} (the fabric "
                             "look needs iproute2 with JSON output, `ip -j`)")
    links = parse_json(outputs["link"].stdout, "ip -j -d link")
    addrs = {link.get("ifname"): link for link in parse_json(outputs["addr"].stdout, "ip -j addr")}
    routes = parse_json(outputs["route"].stdout, "ip -j route")
    speeds = parse_speeds(outputs["speed"].stdout if outputs["speed"].ok else "")
    rdma = parse_rdma(outputs["rdma_sysfs"].stdout if outputs["rdma_sysfs"].ok else "",
                      outputs["ibdev2netdev"].stdout if outputs["ibdev2netdev"].ok else "")
    management = management_interface(list(addrs.values()), routes, outputs["session"].stdout)
    wireless = outputs["wireless"].stdout.split() if outputs["wireless"].ok else []
    names = fabric_port_names(links, rdma, management, wireless)
    by_name = {link.get("ifname"): link for link in links}
    own = [str(link.get("address", "")) for link in links]
    ports = []
    for name in names:
        link, flags = by_name[name], by_name[name].get("flags", [])
        ports.append(Port(
            name=name, mac=str(link.get("address", "")).lower(), admin_up="UP" in flags,
            carrier="LOWER_UP" in flags and "NO-CARRIER" not in flags,
            speed_mbps=speeds.get(name), mtu=int(link.get("mtu", 0)), rdma=rdma.get(name),
            addresses=tuple(_cidrs(addrs.get(name, {}))),
            neighbours=parse_neighbours(*(discovered or {}).get(name, ("", "")), own=own)))
    return NodeLook(node=node, ports=tuple(ports), in_use=in_use(list(addrs.values()), routes, names),
                    management=management, netplan=outputs["netplan"].ok)


# --- on the nodes -------------------------------------------------------------------------------

def look_at(node: Node, target: Target) -> NodeLook:
    """Look at one node: its facts, then discovery on the fabric ports they show."""
    outputs = gather(target, FACTS, "look at the node's network")
    try:
        first = read(node.name, outputs)
    except ValueError as exc:
        raise TargetError(target.name, str(exc)) from None
    names = [port.name for port in first.ports]
    if not names:
        return first
    ran = scripts.run(target, DISCOVER, *names)
    return read(node.name, outputs, {name: (ran.sections.get(f"neigh {name}", ""),
                                            ran.sections.get(f"answered {name}", ""))
                                     for name in names})


def look(cluster: Cluster, reach: Callable[[Node], Target] = connect) -> dict[str, NodeLook]:
    """Every node's fabric, all nodes at once; any node that cannot be looked at stops it here,
    named with why."""
    seen = fan_out(cluster.nodes, look_at, reach=reach)
    seen.raise_for_failures()
    return {outcome.node.name: outcome.value for outcome in seen}
