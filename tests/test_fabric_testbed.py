"""The testbed's fabric: `testbed.up --fabric pair|ring|switch` cables the nodes with Docker
networks that join only the nodes a cable would join, with Spark-named ports and no addresses.

One testbed per topology (module-scoped), no stand-in runtime: these tests look at interfaces.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import tomlkit

from conftest import docker_unusable, start_testbed
from trtllm_deploy.errors import InputError
from trtllm_deploy.hosts import inventory
from trtllm_deploy.network import look
from trtllm_deploy.testbed import fabric
from trtllm_deploy.testbed import layout as layouts
from waiting import until

needs_docker = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))
TOPOLOGIES = {"pair": 2, "ring": 3, "switch": 4}


# --- the layout, without Docker ---------------------------------------------------------------

@pytest.mark.parametrize("topology, nodes, flag", [
    ("pair", 3, "--fabric pair --nodes 3: a pair needs 2 nodes"),
    ("ring", 4, "--fabric ring --nodes 4: a ring needs 3 nodes"),
    ("switch", 1, "--fabric switch --nodes 1: a switch needs at least 2 nodes"),
    ("mesh", 3, "--fabric mesh: expected pair, ring or switch"),
])
def test_a_fabric_the_nodes_cannot_make_is_refused_with_the_flags_to_fix(topology, nodes, flag):
    with pytest.raises(InputError) as caught:
        layouts.Layout(nodes=nodes, fabric=topology)
    assert flag in str(caught.value)


def test_the_ring_gives_each_node_port_0_and_port_1_to_its_two_neighbours():
    layout = layouts.Layout(name="r", nodes=3, subnet="10.213.150.0/24", fabric="ring")
    ends = {(end.node, end.interface): tuple(other.node for other in cable.ends if other is not end)
            for cable in fabric.cables(layout) for end in cable.ends}
    assert ends == {(1, "enp1s0f0np0"): (2,), (2, "enp1s0f0np0"): (1,),
                    (2, "enp1s0f1np1"): (3,), (3, "enp1s0f0np0"): (2,),
                    (3, "enp1s0f1np1"): (1,), (1, "enp1s0f1np1"): (3,)}
    subnets = [cable.subnet for cable in fabric.cables(layout)]
    assert subnets == ["10.214.150.0/27", "10.214.150.32/27", "10.214.150.64/27"]


def test_a_cabled_testbeds_hosts_file_leaves_the_fabric_to_fabric_setup(tmp_path):
    layout = layouts.Layout(name="f", nodes=2, subnet="10.213.151.0/24", fabric="pair",
                            state_dir=tmp_path)
    written = tomlkit.parse(layouts.hosts_toml(layout))
    assert "fabric" not in written["defaults"]
    assert all("fabric" not in node for node in written["nodes"])
    plain = tomlkit.parse(layouts.hosts_toml(layouts.Layout(name="f", nodes=2, state_dir=tmp_path)))
    assert plain["defaults"]["fabric"]["interfaces"] == ["eth0"]  # no --fabric: as before
    # What fabric.setup wrote survives a rewrite while the nodes stayed up.
    written["nodes"][1]["fabric"] = {"interfaces": ["enp1s0f0np0"], "address": "192.168.100.2"}
    again = tomlkit.parse(layouts.hosts_toml(layout, earlier=written.as_string()))
    assert again["nodes"][1]["fabric"]["interfaces"] == ["enp1s0f0np0"]
    assert "fabric" not in again["nodes"][0]


# --- the cabled testbed -----------------------------------------------------------------------

def inside(bed, index: int, *argv: str) -> str:
    """Run a command as root in a node container (what the node's own root sees)."""
    done = subprocess.run(["docker", "exec", "--user", "root", bed.layout.container(index), *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def links(bed, index: int) -> dict[str, dict]:
    """The node's interfaces with their addresses (``ip -j addr``), by name."""
    return {link["ifname"]: link for link in json.loads(inside(bed, index, "ip", "-j", "addr"))}


def endpoints(network: str) -> dict[str, str]:
    """Who Docker has on a network: container name → its MAC there."""
    done = subprocess.run(["docker", "network", "inspect", "--format", "{{json .Containers}}", network],
                          capture_output=True, text=True, timeout=60, check=True)
    return {info["Name"]: info["MacAddress"] for info in json.loads(done.stdout).values()}


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def cabled(request, base_image, tmp_path_factory):
    topology = request.param
    bed, report = start_testbed(tmp_path_factory.mktemp(topology), TOPOLOGIES[topology],
                                f"pyfab-{topology}-{os.getpid()}", runtime=False, base=base_image,
                                fabric=topology)
    try:
        yield bed, report
    finally:
        bed.down(purge=True)


@needs_docker
def test_each_cable_joins_only_its_nodes_on_spark_named_ports_without_addresses(cabled):
    bed, report = cabled
    layout = bed.layout
    cables = fabric.cables(layout)
    assert len(cables) == {"pair": 1, "ring": 3, "switch": 1}[layout.fabric]
    for cable in cables:
        joined = endpoints(cable.network)
        assert sorted(joined) == sorted(layout.container(end.node) for end in cable.ends)
        for end in cable.ends:
            port = links(bed, end.node)[end.interface]
            # The interface with this name is the one on this cable: Docker's MAC for the node there.
            assert port["address"] == joined[layout.container(end.node)]
            assert port["operstate"] == "UP" and "LOWER_UP" in port["flags"]
            assert port["mtu"] == 1500
            assert [(a["family"], a["scope"]) for a in port["addr_info"]] == [("inet6", "link")]
    for index in layout.indexes:
        found = links(bed, index)
        expected = {end.interface for _, end in fabric.node_ends(layout, index)}
        assert set(found) - {"lo", "eth0", "docker0"} == expected   # nothing left named ethN
        management = [(a["family"], a["local"]) for a in found["eth0"]["addr_info"]
                      if a["family"] == "inet"]
        assert management == [("inet", layout.address(index))]    # the management network stays
        rdma = inside(bed, index, "ibdev2netdev").splitlines()
        assert rdma == [f"rocep1s0f{p} port 1 ==> enp1s0f{p}np{p} (Up)" for p in range(len(expected))]
    assert [c["network"] for c in report.as_json()["cables"]] == [c.network for c in cables]


@needs_docker
def test_the_cabled_testbeds_inventory_has_no_fabric_until_fabric_setup(cabled):
    bed, _ = cabled
    cluster = bed.inventory()
    assert all(node.fabric.interfaces == [] and node.fabric.address is None for node in cluster.nodes)
    assert "fabric" not in tomlkit.parse(bed.layout.hosts_file.read_text())["defaults"]
    assert inventory.load(bed.layout.hosts_file).head.name == "spark-1"


@needs_docker
def test_look_finds_each_nodes_ports_and_the_port_at_the_other_end_of_each_cable(cabled):
    bed, _ = cabled
    layout = bed.layout
    seen = look.look(bed.inventory())
    assert sorted(seen) == [layout.node_name(i) for i in layout.indexes]
    for cable in fabric.cables(layout):
        macs = endpoints(cable.network)   # what Docker gave each node on this cable
        for end in cable.ends:
            node = seen[layout.node_name(end.node)]
            assert node.management == "eth0" and node.netplan
            assert layout.subnet in node.in_use
            port = next(p for p in node.ports if p.name == end.interface)
            assert (port.mac, port.rdma, port.carrier, port.admin_up, port.addresses) == (
                macs[layout.container(end.node)], end.rdma, True, True, ())
            others = {macs[layout.container(other.node)] for other in cable.ends if other is not end}
            assert set(port.neighbours) == others   # the other end(s) of this cable, nothing else
    for index in layout.indexes:
        names = [p.name for p in seen[layout.node_name(index)].ports]
        assert names == sorted(end.interface for _, end in fabric.node_ends(layout, index))


@needs_docker
def test_a_port_taken_down_shows_down_until_brought_up(cabled):
    bed, _ = cabled
    before = look.look(bed.inventory())   # spark-2 is in spark-1's neighbour table from here on
    gone = next(p for p in before["spark-2"].ports if p.name == "enp1s0f0np0").mac
    assert gone in {mac for port in before["spark-1"].ports for mac in port.neighbours}
    bed.cable(2, 0, up=False)
    try:
        assert "rocep1s0f0 port 1 ==> enp1s0f0np0 (Down)" in inside(bed, 2, "ibdev2netdev")
        assert links(bed, 2)["enp1s0f0np0"]["operstate"] == "DOWN"
        seen = look.look(bed.inventory())
        down = next(p for p in seen["spark-2"].ports if p.name == "enp1s0f0np0")
        assert (down.carrier, down.admin_up, down.neighbours) == (False, False, ())
        heard = {mac for port in seen["spark-1"].ports for mac in port.neighbours}
        assert down.mac == gone and gone not in heard   # its lingering entry is not a neighbour
    finally:
        bed.cable(2, 0, up=True)
    until(lambda: links(bed, 2)["enp1s0f0np0"]["operstate"], 10, "the port to come back up",
          done=lambda state: state == "UP")
    with pytest.raises(InputError, match="no fabric port 5"):
        bed.cable(2, 5, up=False)


# --- its life: up again, a reboot, recabling, down --------------------------------------------

@needs_docker
def test_up_twice_reboot_recable_and_down(base_image, tmp_path):
    name = f"pyfab-life-{os.getpid()}"
    bed, first = start_testbed(tmp_path / "state", 2, name, runtime=False, base=base_image,
                               fabric="pair")
    try:
        layout = bed.layout
        # Up again: nothing changes, and what fabric.setup wrote into hosts.toml stays.
        written = tomlkit.parse(layout.hosts_file.read_text())
        written["nodes"][0]["fabric"] = {"interfaces": ["enp1s0f0np0"]}
        layout.hosts_file.write_text(written.as_string())
        again = bed.up(runtime=False)
        assert [n.action for n in again.nodes] == ["already running"] * 2 and not again.changed
        assert bed.inventory().nodes[0].fabric.interfaces == ["enp1s0f0np0"]

        # A reboot: Docker makes the interfaces anew (eth1, with an address); the node renames
        # and flushes them again as it starts.
        subprocess.run(["docker", "restart", layout.container(2)], check=True, capture_output=True)
        until(lambda: links(bed, 2), 30, "node 2 to name its fabric port after its restart",
              done=lambda found: "enp1s0f0np0" in found and "eth1" not in found)
        assert [a["scope"] for a in links(bed, 2)["enp1s0f0np0"]["addr_info"]] == ["link"]

        # Recabled as a ring of three: the two nodes cabled otherwise are made anew.
        ring = layouts.Layout(name=name, nodes=3, subnet=layout.subnet, state_dir=layout.state_dir,
                              fabric="ring")
        bed.layout = ring
        recabled = bed.up(runtime=False)
        assert [n.action for n in recabled.nodes] == ["recreated: cabled otherwise"] * 2 + ["created"]
        networks = sorted(c.network for c in fabric.cables(ring))
        assert sorted(bed.networks()) == sorted([ring.network, *networks])
        assert "fabric" not in tomlkit.parse(ring.hosts_file.read_text())["nodes"][0]  # stale now

        bed.down()
        listed = subprocess.run(["docker", "network", "ls", "--format", "{{.Name}}"],
                                capture_output=True, text=True, check=True).stdout.split()
        assert not [n for n in listed if n.startswith(f"trtllm-{name}")]
        assert bed.leftovers() == {"containers": [], "networks": [], "volumes": []}
    finally:
        bed.down(purge=True)
