"""From what every node's fabric ports heard to a plan: which port is cabled to which, the topology
(two nodes back to back, three in a ring, several through a switch), the subnet, each port's address
and MTU, and what NCCL/UCX/Gloo/OpenMPI use on each node. Pure: the nodes were looked at before.

Addresses follow NVIDIA's Spark playbooks (docs/SOURCES.md): every cable (pair, ring) is a subnet
of its own with one address at each end; through a switch every node has one address in a shared
subnet (one per switch port index when nodes have two ports on the switch). In a ring each node's
fabric.address sits on its first link, and the peer on its other link reaches it by a host route.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping

from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.network.model import End, Link, NodeLook, NodePlan, Plan, Port, PortPlan, Route

TOPOLOGIES = ("auto", "pair", "ring", "switch")
DEFAULT_MTU = 9000
# Tried in order when --subnet is not given: the first that collides with nothing any node uses.
# The first is the playbooks' range (192.168.100.0/24 and on for two Sparks).
DEFAULT_SUBNETS = ("192.168.100.0/22", "10.200.0.0/22", "172.30.100.0/22")
# The smallest subnet one link gets: room for its two ends, a network and a broadcast address.
_SMALLEST_LINK_PREFIX = 30


class CablingError(CheckFailed):
    """The ports' neighbours form no topology fabric.setup knows; the message draws what was seen."""


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """``--subnet`` as a private IPv4 network (exit 2 on anything else)."""
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise InputError(f"--subnet {text!r}: {exc}; expected a private IPv4 network such as"
                         f" {DEFAULT_SUBNETS[0]} (host bits zero); nothing was changed") from None
    if not net.is_private or net.is_loopback or net.is_link_local or net.prefixlen > 29:
        raise InputError(f"--subnet {text}: expected a private IPv4 network of at least 8 addresses"
                         f" (10/8, 172.16/12 or 192.168/16; e.g. {DEFAULT_SUBNETS[0]}); nothing was changed")
    return net


def check_mtu(mtu: int) -> int:
    if not 1280 <= mtu <= 9216:
        raise InputError(f"--mtu {mtu}: expected 1280 to 9216 (9000 is jumbo frames, what a Spark's"
                         " ConnectX-7 links run); nothing was changed")
    return mtu


# --- who is cabled to whom -------------------------------------------------------------------------

def _owners(looks: Mapping[str, NodeLook]) -> dict[str, End]:
    return {port.mac.lower(): End(name, port.name) for name, look in looks.items() for port in look.ports}


def _port(looks: Mapping[str, NodeLook], end: End) -> Port:
    return next(port for port in looks[end.node].ports if port.name == end.port)


def heard(looks: Mapping[str, NodeLook]) -> dict[End, tuple[set[End], set[str]]]:
    """Per port: the other nodes' ports whose MACs it heard, and MACs no node owns."""
    owners = _owners(looks)
    found = {}
    for name, look in looks.items():
        for port in look.ports:
            ends, strangers = set(), set()
            for mac in port.neighbours:
                owner = owners.get(mac.lower())
                if owner is None:
                    strangers.add(mac.lower())
                elif owner.node != name:
                    ends.add(owner)
            found[End(name, port.name)] = (ends, strangers)
    return found


def _match(mine: list[End], theirs: list[End], seen: dict) -> list[Link]:
    """Cables between two nodes: each port to the one it heard, the same name first (the playbooks
    cable the same port on both ends), else in order (a port's twin on the far side is heard too)."""
    links, left = [], list(theirs)
    for end in mine:
        candidates = [other for other in left if other in seen[end][0]]
        same = [other for other in candidates if other.port == end.port]
        chosen = (same or candidates or [None])[0]
        if chosen is not None:
            left.remove(chosen)
            links.append(Link(end, chosen))
    return links


def draw(looks: Mapping[str, NodeLook], seen: dict | None = None) -> str:
    """What each port heard, one line per port, for a refusal."""
    seen = seen if seen is not None else heard(looks)
    lines = []
    for name, look in looks.items():
        for port in look.ports:
            ends, strangers = seen[End(name, port.name)]
            if not port.admin_up or not port.carrier:
                state = ("down (set down)" if not port.admin_up else
                         "no carrier (not cabled, or the cable is bad)")
                far = f"── {state}"
            elif not ends and not strangers:
                far = "── nothing heard"
            else:
                far = "── " + ", ".join([f"{e.node} {e.port}" for e in sorted(ends, key=_key)]
                                       + [f"{mac} (no node's port)" for mac in sorted(strangers)])
            lines.append(f"  {name} {port.name} {far}")
    return "\n".join(lines)


def _key(end: End) -> tuple[str, str]:
    return (end.node, end.port)


def _refuse(looks, seen, why: str, fix: str) -> CablingError:
    down = [f"{name}'s {port.name}" for name, look in looks.items() for port in look.ports
            if not port.admin_up]
    hint = f"\nset down: {', '.join(down)} (bring it up: sudo ip link set IFACE up)" if down else ""
    return CablingError(f"fabric.setup: {why}; nothing was changed on any node.\nwhat each fabric port"
                        f" heard:\n{draw(looks, seen)}{hint}\n{fix}")


def classify(looks: Mapping[str, NodeLook]) -> tuple[str, tuple[Link, ...]]:
    """The topology the ports' neighbours form and its links (raises :class:`CablingError`)."""
    seen = heard(looks)
    names = list(looks)
    strangers = [end for end, (_, macs) in seen.items() if macs]
    switched = [end for end, (ends, _) in seen.items() if len({e.node for e in ends}) > 1]
    if len(names) < 2:
        raise _refuse(looks, seen, "a fabric needs at least two nodes in hosts.toml",
                      "list every cabled node in hosts.toml")
    if switched or (strangers and len(names) > 3):
        cabled = [end for end, (ends, macs) in seen.items() if ends or macs]
        lonely = [name for name in names if not any(end.node == name for end in cabled)]
        if lonely or any(len({e.node for e in seen[end][0]}) != len(names) - 1 for end in cabled):
            raise _refuse(looks, seen, "the ports share a switch, but not every node hears every other"
                          + (f" ({', '.join(lonely)} heard nothing)" if lonely else ""),
                          "cable every node to the switch (and keep all its ports in one network)")
        return "switch", tuple(Link(end, None) for end in sorted(cabled, key=_key))
    if strangers:
        raise _refuse(looks, seen, "some ports hear machines that are not in hosts.toml",
                      "add those machines to hosts.toml, or unplug their cables")
    links: list[Link] = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            mine = sorted((e for e, (ends, _) in seen.items()
                           if e.node == a and {x.node for x in ends} == {b}), key=_key)
            theirs = sorted((e for e, (ends, _) in seen.items()
                             if e.node == b and {x.node for x in ends} == {a}), key=_key)
            links += _match(mine, theirs, seen)
    peers = {name: {end.node for link in links for end in (link.a, link.b) if end.node != name
                    and name in (link.a.node, link.b.node)} for name in names}
    if len(names) == 2 and links:
        return "pair", tuple(links)
    if len(names) == 3 and all(len(peers[name]) == 2 for name in names):
        return "ring", tuple(links)
    lonely = [name for name in names if not peers[name]]
    why = (f"{', '.join(lonely)} {'is' if len(lonely) == 1 else 'are'} cabled to no other node" if lonely
           else f"{len(names)} nodes cabled point to point in a way that is not a pair or a ring of three")
    raise _refuse(looks, seen, why, "cable two nodes back to back, three in a ring (each to both others),"
                  " or four and more through a switch; then run fabric.setup again")


def _never_management(looks: Mapping[str, NodeLook]) -> None:
    """The interface SSH and the default route use is never planned, whatever was looked at."""
    for name, look in looks.items():
        if look.management and any(port.name == look.management for port in look.ports):
            raise CheckFailed(f"fabric.setup: {name}'s {look.management} carries its default route (the"
                              " management network) but was seen as a fabric port; nothing was changed."
                              " fabric.setup never readdresses it: cable the fabric on the ConnectX-7 ports")


# --- the subnet and the addresses ------------------------------------------------------------------

def _collisions(net: ipaddress.IPv4Network, looks: Mapping[str, NodeLook]) -> list[str]:
    found = []
    for name, look in looks.items():
        for cidr in look.in_use:
            try:
                used = ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                continue
            if used.version == 4 and used.prefixlen > 0 and net.overlaps(used):
                found.append(f"{name} uses {cidr}")
    return found


def choose_subnet(looks: Mapping[str, NodeLook], subnet: str | None) -> ipaddress.IPv4Network:
    if subnet:
        net = parse_subnet(subnet)
        clash = _collisions(net, looks)
        if clash:
            raise InputError(f"--subnet {subnet} collides with what the nodes already use"
                             f" ({'; '.join(clash)}):"
                             " the fabric would take traffic meant for that network; nothing was changed."
                             f" Pick a range no node uses (e.g. {DEFAULT_SUBNETS[0]}) or leave --subnet out")
        return net
    for candidate in DEFAULT_SUBNETS:
        net = ipaddress.IPv4Network(candidate)
        if not _collisions(net, looks):
            return net
    raise CheckFailed("fabric.setup: every default fabric range is in use on some node ("
                      + ", ".join(DEFAULT_SUBNETS) + "); nothing was changed. Give one with --subnet CIDR")


def _segments(net: ipaddress.IPv4Network, count: int) -> list[ipaddress.IPv4Network]:
    """``count`` equal subnets of ``net``, each a /24 where ``net`` has room (as the playbooks)."""
    prefix = net.prefixlen + max(0, math.ceil(math.log2(count)))
    prefix = max(prefix, min(24, _SMALLEST_LINK_PREFIX))
    if prefix > _SMALLEST_LINK_PREFIX:
        raise InputError(f"--subnet {net}: too small for {count} link(s); give a larger network,"
                         f" e.g. {DEFAULT_SUBNETS[0]}")
    return list(net.subnets(new_prefix=prefix))[:count]


def _address(segment: ipaddress.IPv4Network, host: int) -> str:
    if host >= segment.num_addresses - 1:
        raise InputError(f"the fabric subnet's segment {segment} has no room for host {host};"
                         " give a larger --subnet")
    return f"{segment.network_address + host}/{segment.prefixlen}"


def plan(looks: Mapping[str, NodeLook], topology: str = "auto", subnet: str | None = None,
         mtu: int = DEFAULT_MTU) -> Plan:
    """The plan for the nodes ``looks`` describes (in hosts.toml order)."""
    if topology not in TOPOLOGIES:
        raise InputError(f"--topology {topology!r}: expected one of {', '.join(TOPOLOGIES)}")
    check_mtu(mtu)
    if subnet:
        parse_subnet(subnet)
    _never_management(looks)
    found, links = classify(looks)
    if topology not in ("auto", found) and not (topology == "switch" and found == "pair"):
        seen = heard(looks)
        raise InputError(f"--topology {topology}: the cables say {found}; nothing was changed.\n"
                         f"what each fabric port heard:\n{draw(looks, seen)}\n"
                         "run with --topology auto (the default), or recable")
    if topology == "switch" and found == "pair":  # two nodes on a switch look like a cable
        found, links = "switch", tuple(Link(end, None) for link in links for end in (link.a, link.b))
    net = choose_subnet(looks, subnet)
    ports: dict[str, list[PortPlan]] = {name: [] for name in looks}
    if found == "switch":
        index_of = {}
        for link in links:  # the node's first port on the switch is index 0, its second index 1
            index_of[link.a] = sum(1 for other in index_of if other.node == link.a.node)
        segments = _segments(net, max(index_of.values()) + 1)
        order = list(looks)
        for end, index in index_of.items():
            ports[end.node].append(PortPlan(end.port, _address(segments[index], order.index(end.node) + 1),
                                            mtu, None))
    else:
        for link, segment in zip(links, _segments(net, len(links)), strict=True):
            ports[link.a.node].append(PortPlan(link.a.port, _address(segment, 1), mtu, link.b.node))
            ports[link.b.node].append(PortPlan(link.b.port, _address(segment, 2), mtu, link.a.node))
    nodes = _node_plans(looks, ports, found)
    return Plan(found, str(net), mtu, links, nodes)  # type: ignore[arg-type]


def _ip(cidr: str) -> str:
    return str(ipaddress.ip_interface(cidr).ip)


def _node_plans(looks: Mapping[str, NodeLook], ports: dict[str, list[PortPlan]],
                topology: str) -> tuple[NodePlan, ...]:
    def port_order(name: str) -> list[PortPlan]:
        # by name: port 0 before port 1 whatever order the kernel lists them in (fabric.address
        # is the first one's), so a re-run plans the same
        return sorted(ports[name], key=lambda p: (p.port.lower(), p.port))

    address = {name: _ip(port_order(name)[0].address) for name in looks}
    plans = []
    for name, look in looks.items():
        mine = port_order(name)
        routes = []
        if topology == "ring":
            for peer in (other for other in looks if other != name):
                on_shared = [p for p in mine if p.peer == peer]
                theirs = [p for p in ports[peer] if p.peer == name]
                if on_shared and theirs and _ip(theirs[0].address) != address[peer]:
                    routes.append(Route(f"{address[peer]}/32", _ip(theirs[0].address), on_shared[0].port))
        rdma = tuple(port.rdma for plan_port in mine for port in look.ports
                     if port.name == plan_port.port and port.rdma)
        plans.append(NodePlan(name, tuple(mine), address[name], tuple(p.port for p in mine), rdma,
                              tuple(routes)))
    return tuple(plans)


def describe(plan_: Plan) -> list[list[str]]:
    """Rows for the per-node plan table: node, port, address, MTU, peer, routes, env interfaces."""
    rows = []
    for node in plan_.nodes:
        for index, port in enumerate(node.ports):
            first = index == 0
            rows.append([node.node if first else "", port.port, port.address, str(port.mtu),
                         port.peer or "(switch)",
                         "\n".join(f"{r.to} via {r.via}" for r in node.routes if r.port == port.port) or "–",
                         (",".join(node.interfaces) + (f"\nrdma {','.join(node.rdma_devices)}"
                                                       if node.rdma_devices else "")) if first else ""])
    return rows
