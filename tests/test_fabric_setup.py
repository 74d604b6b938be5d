"""fabric.setup on the testbed: the apply layer on real nodes over real SSH (netplan file, the real
`netplan generate`, addresses live with `ip`, the watchdog that reverts a change that cuts SSH), and
the whole task on testbeds cabled as a pair, a ring and a switch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomlkit

from conftest import docker_unusable, start_testbed
from test_containers import authorize_head_key
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts import inventory
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.measure.diagnose import link as link_diag
from trtllm_deploy.network import apply
from trtllm_deploy.network.model import NodePlan, Plan, PortPlan, Route
from trtllm_deploy.serving import containers
from waiting import until

pytestmark = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


def sh(container: str, script: str, check: bool = True) -> str:
    done = subprocess.run(["docker", "exec", container, "sh", "-c", script], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{script}: {done.stderr}")
    return done.stdout


def addresses(container: str, port: str) -> list[str]:
    found = json.loads(sh(container, f"ip -j addr show dev {port}"))[0]
    return sorted(f"{a['local']}/{a['prefixlen']}" for a in found["addr_info"] if a.get("scope") != "link")


@pytest.fixture(scope="module")
def bed(base_image, tmp_path_factory):
    """Two plain nodes (no fabric cables): the apply layer is tried on a port made inside node 1."""
    bed, _ = start_testbed(tmp_path_factory.mktemp("fabric-apply"), 2, "fabric-setup-apply", runtime=False,
                           base=base_image)
    try:
        yield bed
    finally:
        bed.down(purge=True)


@pytest.fixture
def port(bed):
    """A fresh veth port ``fabx`` in node 1, no address, MTU 1500; removed afterwards with the file."""
    container = bed.layout.container(1)
    sh(container, "ip link add fabx type veth peer name fabxp && ip link set fabxp up")
    yield container
    sh(container, f"ip link del fabx; rm -f {apply.NETPLAN_FILE} {apply.NETPLAN_FILE}.previous", check=False)


def one_port_plan(port: str, address: str, routes=(), mtu: int = 9000) -> tuple[NodePlan, Plan]:
    node = NodePlan("spark-1", (PortPlan(port, address, mtu, "spark-2"),), address.split("/")[0], (port,), (),
                    tuple(routes))
    return node, Plan("pair", "192.168.100.0/22", mtu, (), (node,))


def test_apply_sets_the_port_writes_the_file_is_confirmed_and_a_rerun_is_up_to_date(bed, port):
    cluster = bed.inventory()
    node = cluster.node("spark-1")
    route = Route("192.168.103.7/32", "192.168.100.2", "fabx")
    plan_node, plan = one_port_plan("fabx", "192.168.100.1/24", [route])
    target = SSH(node)
    try:
        done = apply.apply_node(node, target, plan_node, plan, confirm_s=20)
        assert done.status == "applied" and done.mode == "ip"
        assert done.validated == "netplan generate --root-dir accepted it"
        assert {"fabx: 192.168.100.1/24 (now none)", "fabx: mtu 9000 (now 1500)"} <= set(done.changes)
        assert addresses(port, "fabx") == ["192.168.100.1/24"]
        assert json.loads(sh(port, "ip -j link show dev fabx"))[0]["mtu"] == 9000
        assert "192.168.103.7 via 192.168.100.2 dev fabx" in sh(port, "ip route")
        assert sh(port, f"cat {apply.NETPLAN_FILE}") == apply.netplan_file(plan_node, plan)
        assert sh(port, f"stat -c %a {apply.NETPLAN_FILE}").strip() == "600"
        folder = done.details["dir"]
        assert sh(port, f"cat {folder}/decided") == "confirmed"
        watchdog = sh(port, f"cat {folder}/watchdog.pid").strip()
        alive = f"kill -0 {watchdog} 2>/dev/null && echo alive || echo gone"
        until(lambda: sh(port, alive).strip() == "gone", 10, "the confirmed change's watchdog to stop")
        stamp = sh(port, f"stat -c %Y.%i {apply.NETPLAN_FILE}")

        again = apply.apply_node(node, target, plan_node, plan, confirm_s=20)
        assert again.status == "up to date" and again.changes == []
        assert sh(port, f"stat -c %Y.%i {apply.NETPLAN_FILE}") == stamp
    finally:
        target.close()


def test_a_file_netplan_refuses_changes_nothing(bed, port):
    cluster = bed.inventory()
    node = cluster.node("spark-1")
    bad = Route("192.168.103.0/24", "not-an-address", "fabx")
    plan_node, plan = one_port_plan("fabx", "192.168.100.1/24", [bad])
    target = SSH(node)
    try:
        with pytest.raises(CheckFailed, match="netplan generate refused the file") as error:
            apply.apply_node(node, target, plan_node, plan, confirm_s=20)
    finally:
        target.close()
    assert "nothing was changed" in str(error.value)
    assert addresses(port, "fabx") == []
    assert sh(port, f"test -e {apply.NETPLAN_FILE} && echo there || echo absent").strip() == "absent"


def test_a_user_without_sudo_is_told_what_root_is_needed_for_and_nothing_changes(bed):
    cluster = bed.inventory()
    node = cluster.node("spark-2")
    container = bed.layout.container(2)
    sh(container, "ip link add fabx type veth peer name fabxp && mv /etc/sudoers.d/spark /root/sudoers-spark")
    plan_node, plan = one_port_plan("fabx", "192.168.100.2/24")
    target = SSH(node)
    try:
        with pytest.raises(CheckFailed, match="fabric.setup needs root here") as error:
            apply.apply_node(node, target, plan_node, plan, confirm_s=20)
        assert "spark may not use sudo without a password" in str(error.value)
        assert addresses(container, "fabx") == []
    finally:
        target.close()
        sh(container, "mv /root/sudoers-spark /etc/sudoers.d/spark; ip link del fabx", check=False)


def test_a_change_that_cuts_ssh_is_reverted_by_the_node_and_reported(bed):
    """The crafted plan moves the management interface (eth0) to another subnet: SSH to the node's
    address dies with it. The node's watchdog puts eth0, its default route and the file back."""
    cluster = bed.inventory()
    node = cluster.node("spark-1")
    container = bed.layout.container(1)
    before = addresses(container, "eth0")
    routes_before = sh(container, "ip route")
    plan_node, plan = one_port_plan("eth0", "10.99.0.1/24", mtu=1500)
    target = SSH(node)
    try:
        with pytest.raises(CheckFailed) as error:
            apply.apply_node(node, target, plan_node, plan, confirm_s=8)
    finally:
        target.close()
    text = str(error.value)
    assert "spark-1: " in text and "the watchdog restored the previous network after 8 s" in text
    assert "the addresses are as before" in text
    assert addresses(container, "eth0") == before
    assert sh(container, "ip route") == routes_before
    assert sh(container, f"test -e {apply.NETPLAN_FILE} && echo there || echo absent").strip() == "absent"
    fresh = SSH(node)
    try:
        assert fresh.run(["true"]).ok
    finally:
        fresh.close()


# --- the whole task on cabled testbeds ------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = {"pair": 2, "ring": 3, "switch": 4}
PORTS = ("enp1s0f0np0", "enp1s0f1np1")


def fabric_setup(hosts: Path, *flags: str) -> subprocess.CompletedProcess:
    # --min-speed 0: a testbed cable is a veth, whose speed is no Spark's
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "fabric.setup",
                           "--hosts", str(hosts), "--min-speed", "0", "--confirm", "20", *flags],
                          capture_output=True, text=True, timeout=600)


def fabric_state(bed) -> dict:
    """Every node's fabric ports' addresses and MTU, and the netplan file, read in the containers."""
    found = {}
    for index in bed.layout.indexes:
        container = bed.layout.container(index)
        ports = [p for p in PORTS if sh(container, f"test -e /sys/class/net/{p} && echo y", check=False)]
        mtu = {p: json.loads(sh(container, f"ip -j link show {p}"))[0]["mtu"] for p in ports}
        found[index] = ({p: (addresses(container, p), mtu[p]) for p in ports},
                        sh(container, f"cat {apply.NETPLAN_FILE} 2>/dev/null || true"))
    return found


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def cabled(request, base_image, standin_image, tmp_path_factory):
    """A testbed cabled as a pair, a ring of three or four on a switch; the ring's nodes carry the
    stand-in runtime (a deploy after fabric.setup is tried there)."""
    topology = request.param
    bed, _ = start_testbed(tmp_path_factory.mktemp(f"fabric-{topology}"), TOPOLOGIES[topology],
                           f"fabric-setup-{topology}", runtime=topology == "ring", base=base_image,
                           fabric=topology)
    try:
        yield topology, bed
    finally:
        bed.down(purge=True)


def test_bad_input_is_refused_before_anything_changes(cabled):
    topology, bed = cabled
    hosts = bed.layout.hosts_file
    text, before = hosts.read_text(), fabric_state(bed)
    other = "ring" if topology != "ring" else "pair"
    cases = [(["--topology", other], f"--topology {other}: the cables say {topology}"),
             (["--subnet", "10.213.0.0/16"], "collides with what the nodes already use"),
             (["--subnet", "10.1.2.3/8"], "host bits set"),
             (["--mtu", "100"], "--mtu 100")]
    for flags, says in cases:
        done = fabric_setup(hosts, *flags)
        assert done.returncode == 2, (flags, done.stdout, done.stderr)
        assert says in done.stderr and "Traceback" not in done.stderr, (flags, done.stderr)
    assert hosts.read_text() == text and fabric_state(bed) == before


def test_a_port_down_is_refused_with_what_was_heard_and_nothing_changes(cabled):
    topology, bed = cabled
    hosts = bed.layout.hosts_file
    text, before = hosts.read_text(), fabric_state(bed)
    bed.cable(2, 0, up=False)
    try:
        done = fabric_setup(hosts)
    finally:
        bed.cable(2, 0, up=True)
        # the next look needs the port's link-local address again (IPv6 duplicate detection first)
        container = bed.layout.container(2)
        until(lambda: "fe80" in (shown := sh(container, f"ip -6 addr show dev {PORTS[0]}"))
              and "tentative" not in shown, 30, "spark-2's port 0 to have its link-local address again")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "spark-2 enp1s0f0np0 ── down (set down)" in done.stderr and "nothing was changed" in done.stderr
    assert hosts.read_text() == text and fabric_state(bed) == before


def test_dry_run_shows_the_plan_and_files_and_changes_nothing(cabled):
    topology, bed = cabled
    hosts = bed.layout.hosts_file
    text, before = hosts.read_text(), fabric_state(bed)
    done = fabric_setup(hosts, "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["dry_run"] and report["topology"] == topology
    assert set(report["changes"]) == {f"spark-{i}" for i in bed.layout.indexes}
    assert all(any(line.startswith("write /etc/netplan/40-cx7.yaml") for line in lines)
               for lines in report["changes"].values())
    assert all("network:\n  version: 2" in node["netplan"] for node in report["nodes"].values())
    assert hosts.read_text() == text and fabric_state(bed) == before


def test_setup_applies_checks_writes_hosts_toml_and_a_rerun_is_up_to_date(cabled, tmp_path):
    topology, bed = cabled
    hosts = bed.layout.hosts_file
    done = fabric_setup(hosts, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["topology"] == topology and report["hosts_written"] is True
    assert report["link_check"]["ok"], report["link_check"]
    assert {name: node["status"] for name, node in report["applied"].items()} == {
        f"spark-{i}": "applied" for i in bed.layout.indexes}
    cluster = inventory.load(hosts)
    wanted = 2 if topology == "ring" else 1
    for node in cluster.nodes:
        planned = report["nodes"][node.name]
        assert len(node.fabric.interfaces) == wanted
        assert node.fabric.interfaces == planned["interfaces"]
        assert node.fabric.address == planned["address"]
        assert node.fabric.rdma_devices == [f"rocep1s0f{p[-1]}" for p in node.fabric.interfaces]
    # diagnose.link, as a user runs it afterwards, passes on what hosts.toml now says
    checked = link_diag.run(cluster, None)
    assert checked.ok, checked.as_json()
    assert all(result["received"] for node in checked.nodes.values() for result in node.ping.values())

    # Testbed nodes have no GPU: NCCL is not measured, and the report says why instead of passing.
    assert report["nccl"]["run"] is False
    assert all(f"spark-{i}: no GPU" in report["nccl"]["why"] for i in bed.layout.indexes)
    if topology == "ring":  # the ring's nodes carry the stand-in runtime
        ranks_get_both_ports(cluster, report, tmp_path)

    text, state = hosts.read_text(), fabric_state(bed)
    again = fabric_setup(hosts)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "up to date: nothing changed" in again.stdout
    assert "diagnose.nccl: not run: spark-1: no GPU" in again.stdout
    assert hosts.read_text() == text and fabric_state(bed) == state


GPU_LIST = '#!/bin/sh\ncase "$1" in -L) echo "GPU 0: NVIDIA GB10 (UUID: GPU-test)" ;; *) exit 9 ;; esac\n'


@pytest.mark.parametrize("cabled", ["ring"], indirect=True)   # the ring's nodes carry a runtime image
def test_where_nodes_have_gpus_nccl_is_measured_and_a_failure_keeps_hosts_toml(cabled, tmp_path):
    """Nodes that list a GPU (nvidia-smi -L answered by a stand-in put in each node) and hold their
    runtime image: fabric.setup runs diagnose.nccl over the new fabric. The stand-in runtime has no
    NCCL, so the measurement fails: exit 1, said, hosts.toml not written, no job container left."""
    _, bed = cabled
    doc = tomlkit.parse(bed.layout.hosts_file.read_text())
    for node in doc["nodes"]:
        node.pop("fabric", None)
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(tomlkit.dumps(doc))
    text = hosts.read_text()
    for index in bed.layout.indexes:
        subprocess.run(["docker", "exec", "-i", bed.layout.container(index), "sh", "-c",
                        "cat > /usr/local/bin/nvidia-smi && chmod 755 /usr/local/bin/nvidia-smi"],
                       input=GPU_LIST, text=True, check=True, timeout=60)
    try:
        done = fabric_setup(hosts, "--json")
    finally:
        for index in bed.layout.indexes:
            sh(bed.layout.container(index), "rm -f /usr/local/bin/nvidia-smi")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["link_check"]["ok"] and report["nccl"]["run"] is True and report["nccl"]["passed"] is False
    assert report["nccl"]["report"]["tool"] == "nccl_bench"
    assert "diagnose.nccl does not" in done.stderr and "hosts.toml was not changed" in done.stderr
    assert hosts.read_text() == text
    cluster = inventory.load(hosts)
    left = SSH(cluster.head).run(["docker", "ps", "-aq", "--filter", "label=io.trtllm-deploy.job=nccl"])
    assert left.stdout.strip() == ""


SHOW_ENV = ('echo "node=$TRTLLM_DEPLOY_NODE nccl=$NCCL_SOCKET_IFNAME btl=$OMPI_MCA_btl_tcp_if_include '
            'gloo=$GLOO_SOCKET_IFNAME hca=$NCCL_IB_HCA"')


def ranks_get_both_ports(cluster: inventory.Cluster, report: dict, tmp_path: Path) -> None:
    """After fabric.setup, the job's containers (what launch starts) give every rank its own node's
    fabric: in a ring both ports; mpirun's own traffic goes over them (OpenMPI's tcp includes)."""
    authorize_head_key(cluster)
    try:
        started = containers.up(cluster, containers.Job("fabricenv"), tmp_path)
        assert not started.failed, started.summary()
        inside = containers.enter(cluster, "fabricenv")
        try:
            argv = containers.mpirun_argv(cluster, ["sh", "-c", SHOW_ENV])
            done = inside.run(argv, timeout=180, check=False)
        finally:
            inside.close()
        assert done.ok, done.stdout + done.stderr
        lines = sorted(line.split(":", 1)[1] for line in done.stdout.splitlines() if "node=" in line)
        both, hcas = ",".join(PORTS), "rocep1s0f0,rocep1s0f1"
        assert lines == [f"node={name} nccl={both} btl={both} gloo={both} hca={hcas}"
                         for name in sorted(report["nodes"])]
    finally:
        containers.down(cluster, "fabricenv")
