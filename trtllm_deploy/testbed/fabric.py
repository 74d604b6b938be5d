"""The testbed's fabric cables: extra Docker networks that join only the nodes a cable would join.

``--fabric pair`` is one cable between two nodes, ``ring`` three cables between three nodes (each
node on two of them), ``switch`` one network holding every node (a switch). Inside a node each
cable's interface is renamed the way a DGX Spark names its ConnectX-7 ports: a node's first cable
is port 0 (``enp1s0f0np0``, RDMA device ``rocep1s0f0``), its second port 1 (``enp1s0f1np1``).

The interfaces carry no IPv4 and no global IPv6 address (``fabric.setup`` gives them theirs), only
their IPv6 link-local address, which neighbour discovery needs. Docker's bridge driver cannot make
a network without an IPv4 pool, so each cable has a small subnet in 10.214.0.0/16 (its third
octet is the management subnet's, so two testbeds on different management subnets do not
collide), a fixed address per node end, and the node's start script (docker/testbed-node/
entrypoint.sh) finds each interface by that address, renames it and flushes the address, on every
start (a restart of the node is its reboot). The mapping it reads, ``/etc/trtllm-testbed/fabric``,
also feeds the stand-in ``ibdev2netdev`` in the node image: a container has no
/sys/class/infiniband.

What a Docker network is not: a cable. The host's end of each network (its bridge) has an IPv6
link-local address of its own where the host has IPv6 and would answer neighbour discovery; the
start script drops what the bridge sends in on the port (ip6tables, by its MAC), and says so where
it cannot. Taking one node's port down leaves the other end's carrier up (that end is cabled to
the bridge, not to the node).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from trtllm_deploy.errors import DeployError, InputError
from trtllm_deploy.hosts.dockercli import docker, text
from trtllm_deploy.testbed.layout import LABEL, Layout

TOPOLOGIES = ("pair", "ring", "switch")
LABEL_FABRIC = "io.trtllm-deploy.testbed.fabric"   # a fabric network: its topology; a node: its cables
POOL = ipaddress.IPv4Network("10.214.0.0/16")
CABLE_PREFIX = 27                                   # a switch of 16 nodes, its bridge and room to spare
MAPPING = "/etc/trtllm-testbed/fabric"   # in the node: "ADDRESS NAME RDMA BRIDGE" per port


def port_name(port: int) -> str:
    """A Spark's name for ConnectX-7 port ``port`` (FACTS: enp1s0f0np0, enp1s0f1np1)."""
    return f"enp1s0f{port}np{port}"


def rdma_name(port: int) -> str:
    return f"rocep1s0f{port}"


@dataclass(frozen=True)
class End:
    node: int       # the node's index (1 is the head)
    port: int       # 0: the node's first cable, 1: its second
    address: str    # what Docker gives this end before the node flushes it

    @property
    def interface(self) -> str:
        return port_name(self.port)

    @property
    def rdma(self) -> str:
        return rdma_name(self.port)


@dataclass(frozen=True)
class Cable:
    """One Docker network standing for a cable (pair, ring) or for the switch."""

    network: str
    subnet: str
    ends: tuple[End, ...]

    @property
    def bridge(self) -> str:
        """The host's address on it (Docker gives a bridge network's gateway the first one)."""
        return str(ipaddress.IPv4Network(self.subnet).network_address + 1)

    def end(self, node: int) -> End | None:
        return next((end for end in self.ends if end.node == node), None)


def _groups(layout: Layout) -> list[tuple[str, tuple[int, ...]]]:
    nodes = tuple(layout.indexes)
    if layout.fabric == "pair":
        return [("cable1", nodes)]
    if layout.fabric == "ring":
        return [(f"cable{k + 1}", (nodes[k], nodes[(k + 1) % 3])) for k in range(3)]
    if layout.fabric == "switch":
        return [("switch", nodes)]
    return []


def cables(layout: Layout) -> tuple[Cable, ...]:
    """The cables of the layout's topology, in order; a node's ports are numbered in that order."""
    third = ipaddress.IPv4Network(layout.subnet).network_address.packed[2]
    block = ipaddress.IPv4Network((int(POOL.network_address) + (third << 8), 24))
    slots = list(block.subnets(new_prefix=CABLE_PREFIX))
    used: dict[int, int] = {}
    made = []
    for slot, (suffix, members) in enumerate(_groups(layout)):
        subnet = slots[slot]
        ends = []
        for node in members:
            port = used.get(node, 0)
            used[node] = port + 1
            ends.append(End(node, port, str(subnet.network_address + 1 + node)))
        made.append(Cable(f"{layout.network}-{suffix}", str(subnet), tuple(ends)))
    return tuple(made)


def node_ends(layout: Layout, node: int) -> list[tuple[Cable, End]]:
    """One node's cables, by port."""
    found = [(cable, end) for cable in cables(layout) if (end := cable.end(node)) is not None]
    return sorted(found, key=lambda pair: pair[1].port)


def wiring(layout: Layout, node: int) -> str:
    """What a node container is cabled to, as its label says: a change means a new container."""
    return ",".join(f"{cable.network}/{end.address}/{end.interface}"
                    for cable, end in node_ends(layout, node)) or "none"


def mapping(layout: Layout, node: int) -> str:
    """The node's /etc/trtllm-testbed/fabric: how its start script and ibdev2netdev know its ports."""
    return "".join(f"{end.address} {end.interface} {end.rdma} {cable.bridge}\n"
                   for cable, end in node_ends(layout, node))


# --- Docker ---------------------------------------------------------------------------------------

def existing(layout: Layout) -> dict[str, str]:
    """This testbed's fabric networks now: name → subnet."""
    names = text(docker("network", "ls", "--filter", f"label={LABEL}={layout.name}",
                        "--filter", f"label={LABEL_FABRIC}", "--format", "{{.Name}}")).split()
    found = {}
    for name in names:
        found[name] = text(docker("network", "inspect", "--format",
                                  "{{range .IPAM.Config}}{{.Subnet}}{{end}}", name))
    return found


def remove_stale(layout: Layout) -> list[str]:
    """Remove this testbed's fabric networks that its layout no longer has (or has on another
    subnet); the nodes cabled to them must be gone already (their wiring changed)."""
    wanted = {cable.network: cable.subnet for cable in cables(layout)}
    gone = [name for name, subnet in existing(layout).items() if wanted.get(name) != subnet]
    for name in gone:
        docker("network", "rm", name)
    return gone


def create_missing(layout: Layout) -> list[str]:
    """Create the layout's fabric networks that do not exist yet. Not ``--internal``: Docker then
    drops every IPv4 packet on the bridge outside the network's own subnet (bridged traffic goes
    through the host's iptables), and fabric.setup gives the ports addresses of its own. Nothing is
    masqueraded, and no node routes through the host: the host only bridges the nodes' ends."""
    have = existing(layout)
    made = []
    for cable in cables(layout):
        if cable.network in have:
            continue
        done = docker("network", "create", "--driver", "bridge",
                      "--opt", "com.docker.network.bridge.enable_ip_masquerade=false",
                      "--subnet", cable.subnet, "--label", f"{LABEL}={layout.name}",
                      "--label", f"{LABEL_FABRIC}={layout.fabric}", cable.network, check=False)
        if done.returncode != 0:
            error = done.stderr.decode(errors="replace").strip()
            if "overlap" in error:
                raise InputError(f"--fabric {layout.fabric}: its cable network {cable.subnet} (made from "
                                 f"--subnet {layout.subnet}) overlaps a network this machine already "
                                 f"has ({error}); pick another --subnet")
            raise DeployError(f"creating network {cable.network} failed: {error}")
        made.append(cable.network)
    return made


def connect(layout: Layout, node: int) -> None:
    """Cable a created (not yet started) node container to its fabric networks at fixed addresses."""
    for cable, end in node_ends(layout, node):
        docker("network", "connect", "--ip", end.address, cable.network, layout.container(node))


def set_port(layout: Layout, node: int, port: int, up: bool) -> None:
    """Take a node's fabric port down (as if its cable were pulled at this end) or bring it up."""
    if not any(end.port == port for _, end in node_ends(layout, node)):
        raise InputError(f"node {node} of testbed {layout.name!r} has no fabric port {port} "
                         f"(--fabric {layout.fabric or 'none'})")
    docker("exec", "--user", "root", layout.container(node), "ip", "link", "set", port_name(port),
           "up" if up else "down")
