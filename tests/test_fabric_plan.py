"""fabric.setup's planner, table-driven: what the ports heard → topology, addresses, routes, env;
and what applying a node's plan would change."""

from __future__ import annotations

import ipaddress

import pytest

from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.network import apply
from trtllm_deploy.network import plan as planner
from trtllm_deploy.network.model import NodeLook, Port

P0, P1 = "enp1s0f0np0", "enp1s0f1np1"


def mac(node: int, port: int) -> str:
    return f"02:00:00:00:{node:02x}:{port:02x}"


def port(node: int, index: int, hears=(), up=True, carrier=True, rdma=True) -> Port:
    return Port([P0, P1][index], mac(node, index), up, carrier and up, 200000, 1500,
                rdma=f"rocep1s0f{index}" if rdma else None, neighbours=tuple(hears))


def look(node: int, *ports: Port, in_use=("10.213.7.0/24",)) -> NodeLook:
    return NodeLook(f"spark-{node}", tuple(ports), in_use=tuple(in_use), management="eth0")


def looks(*items: NodeLook) -> dict[str, NodeLook]:
    return {item.node: item for item in items}


def pair(**kw):
    return looks(look(1, port(1, 0, [mac(2, 0)]), port(1, 1, up=False), **kw),
                 look(2, port(2, 0, [mac(1, 0)]), port(2, 1, carrier=False), **kw))


def ring():
    # The playbook's cabling: each node's port 0 to the next node's port 1.
    return looks(look(1, port(1, 0, [mac(2, 1)]), port(1, 1, [mac(3, 0)])),
                 look(2, port(2, 0, [mac(3, 1)]), port(2, 1, [mac(1, 0)])),
                 look(3, port(3, 0, [mac(1, 1)]), port(3, 1, [mac(2, 0)])))


def switch(n=4, unplugged=()):
    everyone = [mac(i, 0) for i in range(1, n + 1)]
    return looks(*(look(i, port(i, 0, [] if i in unplugged else
                                [m for m in everyone if m != mac(i, 0)
                                 and int(m.split(":")[4], 16) not in unplugged],
                                carrier=i not in unplugged))
                   for i in range(1, n + 1)))


def by_node(result):
    return {node.node: node for node in result.nodes}


def test_pair_gets_one_subnet_per_cable_with_an_address_at_each_end():
    result = planner.plan(pair())
    assert result.topology == "pair" and result.subnet == "192.168.100.0/22" and result.mtu == 9000
    nodes = by_node(result)
    ends = {name: [(p.port, p.address, p.peer) for p in node.ports] for name, node in nodes.items()}
    assert ends == {"spark-1": [(P0, "192.168.100.1/24", "spark-2")],
                    "spark-2": [(P0, "192.168.100.2/24", "spark-1")]}
    assert nodes["spark-1"].address == "192.168.100.1" and nodes["spark-2"].address == "192.168.100.2"
    assert nodes["spark-1"].interfaces == (P0,) and nodes["spark-1"].rdma_devices == ("rocep1s0f0",)
    assert not nodes["spark-1"].routes


def test_ring_gives_each_node_both_interfaces_and_a_route_to_the_peer_whose_address_is_elsewhere():
    result = planner.plan(ring())
    assert result.topology == "ring" and len(result.links) == 3
    nodes = by_node(result)
    for name, node in nodes.items():
        assert node.interfaces == (P0, P1), name
        assert node.rdma_devices == ("rocep1s0f0", "rocep1s0f1"), name
        assert len({p.peer for p in node.ports}) == 2
    segments = {str(ipaddress.ip_interface(p.address).network) for n in nodes.values() for p in n.ports}
    assert len(segments) == 3  # one subnet per cable
    # Every node reaches every other node's fabric.address: on a shared link, or by its route.
    for name, node in nodes.items():
        mine = {str(ipaddress.ip_interface(p.address).network): p.port for p in node.ports}
        for peer, other in nodes.items():
            if peer == name:
                continue
            target = ipaddress.ip_address(other.address)
            direct = [net for net in mine if target in ipaddress.ip_network(net)]
            routed = [r for r in node.routes if r.to == f"{other.address}/32"]
            assert direct or routed, (name, peer)
            for route in routed:
                via = ipaddress.ip_address(route.via)
                assert any(via in ipaddress.ip_network(net) and mine[net] == route.port for net in mine)


def test_switch_gives_every_node_one_address_in_one_subnet():
    result = planner.plan(switch(4))
    assert result.topology == "switch"
    nodes = by_node(result)
    assert [nodes[f"spark-{i}"].address for i in range(1, 5)] == [f"192.168.100.{i}" for i in range(1, 5)]
    assert {p.peer for n in nodes.values() for p in n.ports} == {None}
    assert all(p.address.endswith("/24") for n in nodes.values() for p in n.ports)


def test_a_pair_of_nodes_on_a_switch_is_planned_as_a_switch_when_told():
    assert planner.plan(pair(), topology="switch").topology == "switch"


@pytest.mark.parametrize("given, found", [("ring", "pair"), ("pair", "ring"), ("switch", "ring")])
def test_a_topology_that_the_cables_contradict_is_refused_as_input(given, found):
    seen = pair() if found == "pair" else ring()
    with pytest.raises(InputError, match=f"--topology {given}: the cables say {found}"):
        planner.plan(seen, topology=given)


def test_a_node_cabled_to_nothing_is_refused_with_a_drawing_and_the_port_set_down():
    seen = looks(look(1, port(1, 0, [])), look(2, port(2, 0, up=False)))
    with pytest.raises(planner.CablingError) as error:
        planner.plan(seen)
    text = str(error.value)
    assert "cabled to no other node" in text and "nothing was changed" in text
    assert "spark-2 enp1s0f0np0 ── down (set down)" in text
    assert "set down: spark-2's enp1s0f0np0" in text
    assert error.value.exit_code == 1


def test_a_ring_with_one_cable_missing_is_a_chain_and_is_refused():
    seen = ring()
    seen["spark-1"] = look(1, port(1, 0, [mac(2, 1)]), port(1, 1, carrier=False))
    seen["spark-3"] = look(3, port(3, 0, carrier=False), port(3, 1, [mac(2, 0)]))
    with pytest.raises(planner.CablingError, match="not a pair or a ring of three"):
        planner.plan(seen)


def test_four_nodes_point_to_point_are_refused():
    seen = looks(look(1, port(1, 0, [mac(2, 0)])), look(2, port(2, 0, [mac(1, 0)])),
                 look(3, port(3, 0, [mac(4, 0)])), look(4, port(4, 0, [mac(3, 0)])))
    with pytest.raises(planner.CablingError, match="not a pair or a ring"):
        planner.plan(seen)


def test_a_switch_where_one_node_is_unplugged_is_refused():
    with pytest.raises(planner.CablingError, match="spark-3 heard nothing"):
        planner.plan(switch(4, unplugged=(3,)))


def test_a_port_hearing_a_machine_not_in_hosts_toml_is_refused():
    seen = pair()
    seen["spark-1"] = look(1, port(1, 0, [mac(2, 0), "02:aa:bb:cc:dd:ee"]))
    with pytest.raises(planner.CablingError, match="not in hosts.toml") as error:
        planner.plan(seen)
    assert "02:aa:bb:cc:dd:ee (no node's port)" in str(error.value)


def test_the_default_subnet_moves_past_a_range_a_node_uses():
    result = planner.plan(pair(in_use=("10.213.7.0/24", "192.168.101.0/24")))
    assert result.subnet == "10.200.0.0/22"


def test_a_given_subnet_that_collides_with_the_management_network_is_refused():
    with pytest.raises(InputError, match=r"collides with what the nodes already use \(spark-1 uses 10.213.7"):
        planner.plan(pair(), subnet="10.213.0.0/16")


def test_every_default_range_in_use_is_a_found_fault():
    with pytest.raises(CheckFailed, match="every default fabric range is in use"):
        planner.plan(pair(in_use=("192.168.0.0/16", "10.0.0.0/8", "172.16.0.0/12")))


@pytest.mark.parametrize("subnet, says", [
    ("192.168.100.1/24", "host bits set"), ("8.8.8.0/24", "private"),
    ("nonsense", "expected a private IPv4 network"), ("10.0.0.0/30", "at least 8")])
def test_a_bad_subnet_is_input(subnet, says):
    with pytest.raises(InputError, match=says):
        planner.plan(pair(), subnet=subnet)


def test_a_small_subnet_is_split_between_the_ring_s_cables():
    result = planner.plan(ring(), subnet="10.9.0.0/24")
    nets = sorted({str(ipaddress.ip_interface(p.address).network) for n in result.nodes for p in n.ports})
    assert nets == ["10.9.0.0/26", "10.9.0.128/26", "10.9.0.64/26"]


def test_mtu_is_checked_and_applied_to_every_port():
    assert {p.mtu for n in planner.plan(ring(), mtu=1500).nodes for p in n.ports} == {1500}
    with pytest.raises(InputError, match="--mtu 99999"):
        planner.plan(ring(), mtu=99999)


def test_twin_interfaces_of_one_cable_pair_by_name():
    # A Spark shows each physical port as two interfaces; each twin hears both twins at the far end.
    twins = ("enp1s0f1np1", "enP2p1s0f1np1")

    def node(i):
        other = 3 - i
        heard = [mac(other, 0), mac(other, 1)]
        return look(i, *(Port(name, mac(i, k), True, True, 200000, 1500, neighbours=tuple(heard))
                         for k, name in enumerate(twins)))

    result = planner.plan(looks(node(1), node(2)))
    assert result.topology == "pair"
    assert sorted((link.a.port, link.b.port) for link in result.links) == [(t, t) for t in sorted(twins)]
    nodes = by_node(result)
    assert nodes["spark-1"].interfaces == twins


def test_the_management_interface_is_never_planned():
    seen = pair()
    seen["spark-1"] = NodeLook("spark-1", seen["spark-1"].ports, ("10.213.7.0/24",), management=P0)
    with pytest.raises(CheckFailed, match="spark-1's enp1s0f0np0 carries its default route"):
        planner.plan(seen)


# --- what applying a node's plan would change (network/apply.py's pure part) ----------------------

def ring_node(name="spark-3"):
    result = planner.plan(ring())
    return by_node(result)[name], result


def as_found(node, plan_, **override):
    state = {"file": apply.netplan_file(node, plan_),
             "ports": {p.port: {"addresses": [p.address], "mtu": p.mtu, "up": True} for p in node.ports},
             "routes": [{"to": r.to, "via": r.via, "dev": r.port} for r in node.routes]}
    state.update(override)
    return state


def test_a_node_as_planned_has_nothing_to_change_and_each_difference_is_named():
    node, plan_ = ring_node()
    assert node.routes, "spark-3 reaches one peer's fabric.address by a route"
    assert apply.changes(node, plan_, as_found(node, plan_)) == []
    port = node.ports[0]
    foreign = {"to": "10.9.9.9/32", "via": "10.0.0.1", "dev": port.port}
    stale = as_found(node, plan_, file="old", routes=[foreign])
    stale["ports"][port.port] = {"addresses": ["192.168.0.1/24"], "mtu": 1500, "up": False}
    assert apply.changes(node, plan_, stale) == [
        "write /etc/netplan/40-cx7.yaml (the one there kept as .previous)",
        f"{port.port}: {port.address} (now 192.168.0.1/24)", f"{port.port}: mtu 9000 (now 1500)",
        f"{port.port}: set up",
        *(f"route {r.to} via {r.via} dev {r.port}" for r in node.routes),
        f"remove route 10.9.9.9/32 dev {port.port}"]


def test_the_netplan_file_names_only_the_planned_ports_with_address_mtu_and_routes():
    node, plan_ = ring_node()
    text = apply.netplan_file(node, plan_)
    assert [line.strip()[:-1] for line in text.splitlines() if line.startswith("    ") and
            not line.startswith("     ")] == list(node.interfaces)
    assert text.count("mtu: 9000") == 2 and text.count("dhcp4: false") == 2
    for route in node.routes:
        assert f"- to: {route.to}\n          via: {route.via}" in text
    assert "eth0" not in text
