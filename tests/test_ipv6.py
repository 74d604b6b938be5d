"""IPv6 addresses where the project listens or names its own address: push's fabric receiver, the
NCCL benchmark's PyTorch rendezvous, the cluster probe's interface facts — on the IPv6 loopback
(``::1``) of the test machine, never another address."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from test_push import PROGRAM, make_artifact
from test_standin import Server, health, write_checkpoint
from trtllm_deploy.artifact import verify
from trtllm_deploy.hosts import inventory
from trtllm_deploy.measure.diagnose import nccl_bench
from trtllm_deploy.push import agent
from trtllm_deploy.serving import launch, probe
from trtllm_deploy.serving.state import Deployment

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def test_this_machine_has_ipv6_loopback():
    """What the other tests here stand on: a machine without ::1 fails here, by name, not below."""
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as server:
        with socket.create_connection(("::1", server.getsockname()[1]), timeout=5):
            pass


def reaches(server: socket.socket, host: str) -> bool:
    with socket.create_connection((host, server.getsockname()[1]), timeout=5) as client:
        accepted, _ = server.accept()
        client.sendall(b"x")
        with accepted:
            return accepted.recv(1) == b"x"


@pytest.mark.parametrize("address, family", [
    ("::1", socket.AF_INET6), ("127.0.0.1", socket.AF_INET), ("localhost", None)])
def test_the_push_receiver_listens_in_the_family_of_the_address_it_is_given(address, family):
    with agent.listener(address) as server:
        assert family is None or server.family == family
        assert reaches(server, address)


def test_the_push_receiver_on_the_wildcard_takes_both_families():
    with agent.listener("") as server:
        assert reaches(server, "::1") and reaches(server, "127.0.0.1")


def test_an_address_that_is_not_the_nodes_own_is_refused_by_name():
    # fd00:dead::7 is nobody's address here: binding it fails locally, no packet is sent.
    with pytest.raises(agent.Refused, match=r"cannot listen on fd00:dead::7: .*own fabric address"):
        agent.listener("fd00:dead::7")


def push_over_fabric(tmp_path, address: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``invoke push --transport fabric`` to this machine as a node whose fabric address is ``address``."""
    store, node_store = tmp_path / "engines", tmp_path / "node"
    make_artifact(store, "v6", {"a.safetensors": 3 * MiB, "config.json": 100})
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(f'[[nodes]]\nname = "here"\nconnection = "local"\n\n[nodes.paths]\n'
                     f'artifacts = "{node_store}"\n\n[nodes.fabric]\naddress = "{address}"\n')
    done = subprocess.run([sys.executable, "-c", PROGRAM, "push", "--store", str(store), "--name", "v6",
                           "--hosts", str(hosts), "--transport", "fabric", "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    return done, hosts


def test_the_fabric_transport_pushes_to_an_ipv6_fabric_address(tmp_path):
    """A whole push over the fast transport to a node whose fabric address is IPv6 (this machine,
    ``fabric.address = "::1"``): the receiver listens on it, the sender connects to it."""
    done, hosts = push_over_fabric(tmp_path, "::1")
    assert done.returncode == 0, done.stdout + done.stderr
    sent = json.loads(done.stdout)["nodes"]["here"]["artifact"]
    assert sent["action"] == "sent" and sent["bytes_sent"] >= 3 * MiB
    cluster = inventory.load(hosts)
    assert verify.verify(cluster, (cluster.node("here"),), "v6")["here"].value.ok


@pytest.mark.parametrize("host, family", [("::1", socket.AF_INET6), ("127.0.0.1", socket.AF_INET)])
def test_the_nccl_benchmarks_rendezvous_is_a_url_on_a_free_port_of_that_address(host, family):
    url = urllib.parse.urlsplit(nccl_bench.rendezvous(host))
    assert url.scheme == "tcp" and url.hostname == host
    # What PyTorch's TCPStore does with it: listen there (the port is free in that family).
    with socket.create_server((url.hostname, url.port), family=family) as server:
        assert reaches(server, host)


IF_INET6 = """\
fe800000000000009859ddfffe013d6c 2b7 40 20 c0 veth7058c22
00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000002 04 40 00 82     eth0
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
"""


def test_the_probe_reports_an_interfaces_ipv6_addresses(tmp_path):
    table = tmp_path / "if_inet6"
    table.write_text(IF_INET6)   # the kernel's table as recorded on a Debian 12 host
    assert probe._ipv6("eth0", str(table)) == ["fd00::2/64"]   # link-local fe80:: left out
    assert probe._ipv6("lo", str(table)) == ["::1/128"]
    assert probe._ipv6("ib0", str(table)) == []
    assert "::1/128" in probe.interface("lo")["ipv6"]   # this machine's own, as the probe reads it


def test_a_fabric_address_the_node_cannot_listen_on_reaches_the_user_by_name(tmp_path):
    done, _ = push_over_fabric(tmp_path, "fd00:dead::7")
    assert done.returncode == 1
    error = json.loads(done.stdout)["nodes"]["here"]["error"]
    assert "cannot listen on fd00:dead::7" in error and "own fabric address" in error, error


@pytest.mark.parametrize("address, listen", [
    ("fd00::1", "::"), ("fe80::1%enP7s7", "::"), ("spark-1.local", "0.0.0.0"), ("10.0.0.1", "0.0.0.0")])
@pytest.mark.parametrize("serves", ["trtllm", "vllm"])
def test_an_ipv6_head_serves_on_both_families(address, listen, serves):
    """The endpoint of a head reached by an IPv6 address listens on "::" (both families), the runtime
    told so on its command line; an IPv4 or named head keeps 0.0.0.0."""
    head = inventory.Node(name="spark-1", address=address, role="head")
    assert launch.listen_address(head) == listen
    argv = launch.program(Deployment(job="serve", runtime=serves, image="i", artifact="a", tp=1),
                          launch.listen_address(head))
    assert argv[argv.index("--host") + 1] == listen


def test_the_stand_in_told_to_listen_on_both_families_answers_on_both(tmp_path):
    """What the runtimes do with --host :: (uvicorn binds IPv6, dual-stack): the stand-in answers at
    [::1] and at 127.0.0.1."""
    server = Server(["trtllm-serve", str(write_checkpoint(tmp_path / "model"))], host="::")
    try:
        server.wait_ready()
        assert health(server.port, "::1") == 200
        assert health(server.port, "127.0.0.1") == 200
    finally:
        server.stop()
