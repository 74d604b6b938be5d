"""The fabric look's readers, on outputs recorded on testbed nodes (tests/data/fabric/SOURCES.md):
which interfaces are fabric ports, their state, and the MACs at the other end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trtllm_deploy.hosts.facts import Output
from trtllm_deploy.network import look

DATA = Path(__file__).parent / "data" / "fabric"


def recorded(case: str) -> tuple[dict[str, Output], dict[str, tuple[str, str]], dict[str, str]]:
    """(fact outputs, by port (neighbour table, addresses that answered), every node's port MACs
    as 'node port' → MAC)."""
    folder = DATA / case
    codes = dict(line.split() for line in (folder / "exit-codes.txt").read_text().splitlines())
    outputs = {name: Output(int(code), (folder / f"{name}.txt").read_text().removesuffix("\n"), "")
               for name, code in codes.items()}
    neighbours = {path.stem.removeprefix("neigh-"): (
        path.read_text().removesuffix("\n"),
        (folder / f"answered-{path.stem.removeprefix('neigh-')}.txt").read_text().removesuffix("\n"))
        for path in folder.glob("neigh-*.json")}
    macs = {" ".join(line.split()[:2]): line.split()[2]
            for line in (folder / "macs.txt").read_text().splitlines()}
    return outputs, neighbours, macs


def test_every_fact_was_recorded():
    for case in ("ring-spark-1", "switch-spark-1", "pair-spark-2-port-down", "pair-spark-1-peer-down"):
        outputs, _, _ = recorded(case)
        assert set(outputs) == {fact.name for fact in look.FACTS}


def test_a_ring_node_has_two_ports_each_hearing_its_own_neighbour():
    outputs, neighbours, macs = recorded("ring-spark-1")
    seen = look.read("spark-1", outputs, neighbours)
    assert [(p.name, p.rdma) for p in seen.ports] == [("enp1s0f0np0", "rocep1s0f0"),
                                                      ("enp1s0f1np1", "rocep1s0f1")]
    first, second = seen.ports
    assert first.mac == macs["spark-1 enp1s0f0np0"] and second.mac == macs["spark-1 enp1s0f1np1"]
    assert first.neighbours == (macs["spark-2 enp1s0f0np0"],)   # cable 1: spark-1 port 0 ↔ spark-2
    assert second.neighbours == (macs["spark-3 enp1s0f1np1"],)  # cable 3: spark-3 ↔ spark-1 port 1
    for port in seen.ports:
        assert (port.admin_up, port.carrier, port.speed_mbps, port.mtu, port.addresses) == (
            True, True, 10000, 1500, ())
    assert seen.management == "eth0"
    assert "10.213.241.0/24" in seen.in_use and "172.17.0.0/16" in seen.in_use  # eth0, docker0
    assert seen.netplan is True


def test_a_switch_port_hears_every_other_node_and_not_itself():
    outputs, neighbours, macs = recorded("switch-spark-1")
    seen = look.read("spark-1", outputs, neighbours)
    assert [p.name for p in seen.ports] == ["enp1s0f0np0"]
    others = {mac for where, mac in macs.items() if not where.startswith("spark-1 ")}
    assert len(others) == 3 and set(seen.ports[0].neighbours) == others


def test_a_port_taken_down_has_no_carrier_speed_or_neighbours():
    outputs, neighbours, _ = recorded("pair-spark-2-port-down")
    port, = look.read("spark-2", outputs, neighbours).ports
    assert (port.name, port.admin_up, port.carrier, port.speed_mbps, port.neighbours) == (
        "enp1s0f0np0", False, False, None, ())
    assert look.parse_rdma("", outputs["ibdev2netdev"].stdout) == {"enp1s0f0np0": "rocep1s0f0"}


def test_a_peer_that_no_longer_answers_is_not_a_neighbour_though_its_entry_lingers():
    outputs, neighbours, macs = recorded("pair-spark-1-peer-down")
    table, answered = neighbours["enp1s0f0np0"]
    assert macs["spark-2 enp1s0f0np0"] in table            # still in spark-1's neighbour table...
    port, = look.read("spark-1", outputs, neighbours).ports
    assert port.carrier and port.neighbours == ()          # ...but it did not answer this time


def test_without_rdma_devices_the_non_management_ethernet_interfaces_are_the_ports():
    outputs, _, _ = recorded("ring-spark-1")
    outputs["ibdev2netdev"] = Output(127, "", "sh: 1: ibdev2netdev: not found")
    seen = look.read("spark-1", outputs)
    # lo, eth0 (SSH came in on it) and docker0 (virtual) are not fabric ports.
    assert [(p.name, p.rdma) for p in seen.ports] == [("enp1s0f0np0", None), ("enp1s0f1np1", None)]
    # Without the SSH session's address, the default route names the management interface.
    outputs["session"] = Output(0, "", "")
    assert look.read("spark-1", outputs).management == "eth0"
    links = json.loads(outputs["link"].stdout)
    assert look.fabric_port_names(links, {}, "enp1s0f0np0") == ["enp1s0f1np1", "eth0"]
    assert look.fabric_port_names(links, {}, "eth0", wireless=["enp1s0f1np1"]) == ["enp1s0f0np0"]


def test_sysfs_rdma_wins_over_ibdev2netdev_and_the_management_interface_is_never_a_port():
    outputs, _, _ = recorded("ring-spark-1")
    outputs["rdma_sysfs"] = Output(0, "mlx5_0 enp1s0f1np1\nmlx5_1 eth0", "")
    seen = look.read("spark-1", outputs)
    assert [(p.name, p.rdma) for p in seen.ports] == [("enp1s0f1np1", "mlx5_0")]


def test_the_playbooks_ibdev2netdev_lines_are_read():
    # The four lines NVIDIA's playbook nvidia/connect-two-sparks/README.md shows for one Spark.
    shown = ("roceP2p1s0f0 port 1 ==> enP2p1s0f0np0 (Down)\nroceP2p1s0f1 port 1 ==> enP2p1s0f1np1 (Up)\n"
             "rocep1s0f0 port 1 ==> enp1s0f0np0 (Down)\nrocep1s0f1 port 1 ==> enp1s0f1np1 (Up)\n")
    assert look.parse_rdma("", shown) == {"enP2p1s0f0np0": "roceP2p1s0f0", "enP2p1s0f1np1": "roceP2p1s0f1",
                                          "enp1s0f0np0": "rocep1s0f0", "enp1s0f1np1": "rocep1s0f1"}


def test_neighbours_leave_out_failed_entries_and_the_nodes_own_macs():
    table = json.dumps([{"dst": "fe80::1", "lladdr": "02:42:0A:00:00:01", "state": ["STALE"]},
                        {"dst": "fe80::2", "lladdr": "02:42:0a:00:00:02", "state": ["REACHABLE"]},
                        {"dst": "fe80::3", "state": ["FAILED"]},
                        {"dst": "fe80::4", "lladdr": "02:42:0a:00:00:04", "state": ["FAILED"]}])
    answered = "fe80::1\nfe80::2\nfe80::3\nfe80::4\n"
    assert look.parse_neighbours(table, answered, own=["02:42:0a:00:00:02"]) == ("02:42:0a:00:00:01",)
    assert look.parse_neighbours(table, "fe80::2\n") == ("02:42:0a:00:00:02",)  # only who answered


def test_speeds_the_driver_does_not_give_are_none():
    assert look.parse_speeds("enp1s0f0np0 200000\ndocker0 -1\nlo \n") == {
        "enp1s0f0np0": 200000, "docker0": None, "lo": None}


def test_output_that_is_not_ip_json_is_refused_naming_the_command():
    outputs, _, _ = recorded("ring-spark-1")
    outputs["addr"] = Output(0, "1: lo: <LOOPBACK,UP>", "")
    with pytest.raises(ValueError, match="ip -j addr: not the JSON"):
        look.read("spark-1", outputs)
    outputs["addr"] = Output(255, "", 'Option "-j" is unknown')
    with pytest.raises(ValueError, match='`ip addr` failed: Option "-j" is unknown'):
        look.read("spark-1", outputs)


def test_the_management_interface_is_the_one_ssh_came_in_on_before_the_default_route():
    outputs, _, _ = recorded("ring-spark-1")
    addrs, routes = json.loads(outputs["addr"].stdout), json.loads(outputs["route"].stdout)
    assert look.management_interface(addrs, routes, "10.213.241.1 40000 172.17.0.1 22") == "docker0"
    assert look.management_interface(addrs, routes, "") == "eth0"            # the default route's
    assert look.management_interface(addrs, [], "") is None


def test_in_use_has_the_other_interfaces_networks_and_the_routes_not_the_ports():
    addrs = [{"ifname": "eth0", "addr_info": [
                 {"family": "inet", "local": "10.0.5.7", "prefixlen": 24, "scope": "global"},
                 {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"}]},
             {"ifname": "enp1s0f0np0", "addr_info": [
                 {"family": "inet", "local": "192.168.100.1", "prefixlen": 30, "scope": "global"}]},
             {"ifname": "lo", "addr_info": [
                 {"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"}]}]
    routes = [{"dst": "default", "gateway": "10.0.5.1", "dev": "eth0"},
              {"dst": "10.8.0.0/16", "gateway": "10.0.5.1", "dev": "eth0"},
              {"dst": "192.168.100.0/30", "dev": "enp1s0f0np0"}]
    assert look.in_use(addrs, routes, ["enp1s0f0np0"]) == ("10.0.5.0/24", "10.8.0.0/16")
