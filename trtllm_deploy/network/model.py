"""What ``fabric.setup`` works with: what each node's fabric ports are (looked at on the node), and
the plan for them. Looking (network/look.py) fills the first; planning (network/plan.py) turns it
into the second; applying and writing hosts.toml take the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Topology = Literal["pair", "ring", "switch"]


@dataclass(frozen=True)
class Port:
    """One fabric network interface on a node, as the node reports it."""

    name: str                        # the kernel's name, e.g. enp1s0f0np0
    mac: str                         # lower-case, colon separated
    admin_up: bool                   # IFF_UP
    carrier: bool                    # a live link (operstate UP / LOWER_UP)
    speed_mbps: int | None           # ethtool's / sysfs's speed; None when the driver does not say
    mtu: int
    rdma: str | None = None          # the RDMA device behind it (ibdev2netdev), e.g. rocep1s0f0
    addresses: tuple[str, ...] = ()  # CIDRs on it now, link-local left out
    neighbours: tuple[str, ...] = () # MACs heard at the other end (IPv6 link-local discovery)


@dataclass(frozen=True)
class NodeLook:
    """One node's fabric ports and what its other interfaces already use."""

    node: str                                   # the hosts.toml name
    ports: tuple[Port, ...]
    in_use: tuple[str, ...] = ()                # CIDRs on its other interfaces and its routes
    management: str | None = None               # the interface its default route / SSH uses
    netplan: bool = False                       # /etc/netplan and the netplan program are there


@dataclass(frozen=True)
class End:
    node: str
    port: str


@dataclass(frozen=True)
class Link:
    """One cable (pair, ring) or one node's cable to the switch (switch: ``b`` is None)."""

    a: End
    b: End | None


@dataclass(frozen=True)
class PortPlan:
    """What one port gets."""

    port: str
    address: str                     # CIDR, e.g. 192.168.100.1/30
    mtu: int
    peer: str | None                 # the node at the other end (None: a switch)


@dataclass(frozen=True)
class Route:
    """A host route over a fabric port: in a ring each node's fabric.address sits on one of its two
    links, so the peer cabled to its other link reaches it through the address at that link's end."""

    to: str                          # CIDR, e.g. 192.168.100.1/32
    via: str                         # the peer's address on the shared link
    port: str                        # the port it leaves by


@dataclass(frozen=True)
class NodePlan:
    node: str
    ports: tuple[PortPlan, ...]
    address: str                     # hosts.toml fabric.address: how the other nodes reach it
    interfaces: tuple[str, ...]      # hosts.toml fabric.interfaces (NCCL/UCX/Gloo/OpenMPI)
    rdma_devices: tuple[str, ...]    # hosts.toml fabric.rdma_devices
    routes: tuple[Route, ...] = ()   # added by fabric.setup's planner (ring)


@dataclass(frozen=True)
class Plan:
    topology: Topology
    subnet: str
    mtu: int
    links: tuple[Link, ...]
    nodes: tuple[NodePlan, ...] = field(default_factory=tuple)
