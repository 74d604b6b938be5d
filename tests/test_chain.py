"""An artifact from the head's store to four workers node to node, on a testbed of five nodes of its
own (sshd, every node trusting every node as ``ssh.setup`` makes them): along SSH tunnels and over
fabric TCP, only what each node lacks written, a worker in the middle stopped mid-push routed
around, nothing partial ever current.

Traffic goes only to loopback and to the testbed's own addresses (TESTING.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import docker_unusable, start_testbed
from trtllm_deploy import push as pushing
from trtllm_deploy.artifact import manifest, verify
from trtllm_deploy.errors import InputError
from trtllm_deploy.hosts import inventory, sshsetup
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import TargetError
from trtllm_deploy.push import chain, channel, files
from waiting import until

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ("import sys; from invoke import Collection, Program; from trtllm_deploy.cli.push import push;"
           " Program(namespace=Collection(push)).run(['invoke', *sys.argv[1:]])")
MiB = 1 << 20
WORKERS = ("spark-2", "spark-3", "spark-4", "spark-5")
EVERY = ("spark-1", *WORKERS)
STORE = "/home/spark/trtllm-deploy/engines"  # the testbed user's paths.artifacts

needs_docker = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


# --- the route, as data ---------------------------------------------------------------------

def _plan(node: str, steps: list[tuple[str, int, str, int]]) -> files.ArtifactPlan:
    return files.ArtifactPlan(node, "art", False, True, 1 << 30,
                              tuple(files.FileStep(p, size, action, offset)
                                    for p, size, action, offset in steps))


@pytest.mark.parametrize("plans, expected", [
    ([[("a", 100, "send", 0), ("b", 50, "send", 0)]],
     [{"path": "a", "offset": 0, "length": 100}, {"path": "b", "offset": 0, "length": 50}]),
    ([[("a", 100, "resume", 40), ("b", 50, "link", 0)], [("a", 100, "resume", 70), ("b", 50, "staged", 0)]],
     [{"path": "a", "offset": 40, "length": 60}]),
    ([[("a", 100, "link", 0), ("b", 50, "resume", 10)], [("a", 100, "send", 0), ("b", 50, "link", 0)]],
     [{"path": "a", "offset": 0, "length": 100}, {"path": "b", "offset": 10, "length": 40}]),
    ([[("a", 100, "link", 0)], [("a", 100, "staged", 0)]], []),
], ids=["cold", "smallest-resume-offset-wins-and-nobody-needs-b", "each-file-from-whoever-lacks-most",
        "nothing-needed-nothing-sent"])
def test_a_chain_carries_what_any_of_its_nodes_lacks(plans, expected):
    made = [_plan(f"n{i}", steps) for i, steps in enumerate(plans)]
    assert chain.records(made) == expected
    assert chain.needs(made[0]) == {s.path: s.offset for s in made[0].steps if s.bytes_to_send}


def test_the_route_in_words():
    assert chain.describe("spark-1", ["spark-2", "spark-3"], "chain") == "spark-1 → spark-2 → spark-3"
    assert chain.describe("this machine", ["spark-2", "spark-3"], "star") == \
        "this machine → spark-2, spark-3"
    assert chain.describe("spark-1", [], "chain") == "nothing to send"
    assert chain.groups(["a", "b"], "chain") == [["a", "b"]]
    assert chain.groups(["a", "b"], "star") == [["a"], ["b"]]


def test_a_hop_goes_over_the_fabric_where_the_next_node_has_an_address():
    plain = inventory.Node(name="spark-2", address="10.0.0.2")
    fabric = inventory.Node(name="spark-3", address="10.0.0.3", fabric={"address": "192.168.100.3"})
    up = inventory.Node(name="spark-1", address="10.0.0.1")

    def member(node):
        return chain.Member(node, None, None, None, port=4242)  # type: ignore[arg-type]

    assert chain._way(up, False, member(fabric), False) == "fabric"
    assert chain._to("fabric", up, member(fabric)) == {"address": "192.168.100.3", "port": 4242}
    assert chain._way(up, False, member(plain), False) == "tunnel"
    tunnel = chain._to("tunnel", up, member(plain))["tunnel"]
    assert tunnel[-1] == "10.0.0.2" and "127.0.0.1:0:127.0.0.1:4242" in tunnel
    assert "StrictHostKeyChecking=yes" in tunnel
    # From this machine (which may not be on the fabric) a node is reached over SSH unless asked.
    assert chain._way(None, True, member(fabric), False) == "tunnel"
    assert chain._way(None, True, member(plain), True) == "fabric"


def test_a_bad_route_is_bad_input():
    with pytest.raises(InputError, match="--route 'ring'"):
        pushing.check_route("ring")


def test_bad_from_and_route_exit_2_before_any_node_is_touched(tmp_path):
    hosts = tmp_path / "hosts.toml"  # addresses no test reaches: nothing may be contacted
    hosts.write_text('[[nodes]]\nname = "spark-1"\naddress = "192.0.2.1"\nrole = "head"\n'
                     '[[nodes]]\nname = "spark-2"\naddress = "192.0.2.2"\n')
    for args, words in [(("--from", "spark-9", "--name", "x"), "no node named 'spark-9'"),
                        (("--from", "head"), "--from NODE: give --name"),
                        (("--from", "head", "--name", "../x"), "not valid"),
                        (("--name", "x", "--route", "ring"), "--route 'ring'")]:
        done = run_push("--hosts", str(hosts), *args, timeout=60)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert words in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)


# --- on a testbed of five nodes -----------------------------------------------------------------

@pytest.fixture(scope="module")
def bed(base_image, tmp_path_factory):
    bed_, _ = start_testbed(tmp_path_factory.mktemp("chain"), 5, f"chain{os.getpid()}",
                            runtime=False, base=base_image)
    try:
        sshsetup.apply(sshsetup.look(bed_.inventory()))  # every node trusts every node
        yield bed_
    finally:
        bed_.down(purge=True)


def node_sh(bed, index: int, script: str, user: str = "spark", check: bool = True) -> str:
    done = subprocess.run(["docker", "exec", "-u", user, bed.layout.container(index), "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 or not check, done.stderr
    return done.stdout


def in_head_store(bed, tmp_path: Path, name: str, sizes: dict[str, int]) -> Path:
    """The artifact written into spark-1's store with its manifest (as engine.build leaves it)."""
    root = tmp_path / name
    for path, size in sizes.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(os.urandom(size))
    manifest.write(root, manifest.create(root, {"model": name}))
    return copied_to_head(bed, root)


def copied_to_head(bed, root: Path) -> Path:
    node_sh(bed, 1, f"rm -rf {STORE}/{root.name} && mkdir -p {STORE}/{root.name}")
    subprocess.run(["docker", "cp", f"{root}/.", f"{bed.layout.container(1)}:{STORE}/{root.name}"],
                   check=True, timeout=120)
    node_sh(bed, 1, f"chown -R spark {STORE}/{root.name}", user="root")
    return root


def run_push(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", PROGRAM, "push", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def verified(cluster, name: str, nodes: tuple) -> dict:
    result = verify.verify(cluster, tuple(cluster.node(n) for n in nodes), name)
    return {o.node.name: o.value.ok if o.ok else o.reason for o in result}


def with_fabric(bed, path: Path) -> Path:
    """The testbed's inventory with every node's fabric address set (its testbed address)."""
    text = bed.layout.hosts_file.read_text()
    for index in range(1, 6):
        address = bed.layout.address(index)
        text = text.replace(f'address = "{address}"\n',
                            f'address = "{address}"\nfabric = {{ address = "{address}" }}\n')
    path.write_text(text)
    assert all(node.fabric.address for node in inventory.load(path).nodes)
    return path


@needs_docker
def test_from_the_head_along_a_chain_of_ssh_tunnels_then_nothing(bed, tmp_path):
    name = "chain-basic"
    root = in_head_store(bed, tmp_path, name, {"config.json": 300, "rank0.engine": 20 * MiB,
                                               "rank1.engine": 18 * MiB, "tok/tokenizer.json": 5000})
    total = sum(e["size"] for e in manifest.load(root)["files"].values())
    args = ("--from", "head", "--name", name, "--hosts", str(bed.layout.hosts_file))

    done = run_push(*args, "--dry-run", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    plan = json.loads(done.stdout)
    assert plan["route"] == "spark-1 → spark-2 → spark-3 → spark-4 → spark-5" and plan["from"] == "spark-1"
    assert plan["nodes"]["spark-1"]["up_to_date"]  # the source itself
    assert all(plan["nodes"][w]["artifact"]["send_bytes"] == total for w in WORKERS)
    assert name not in node_sh(bed, 3, f"ls {STORE} 2>/dev/null || true")

    done = run_push(*args, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["route"] == plan["route"]
    upstream = dict(zip(WORKERS, EVERY, strict=False))  # spark-2 from spark-1, spark-3 from spark-2…
    for worker in WORKERS:
        got = report["nodes"][worker]
        assert got["received_from"] == upstream[worker], got
        assert got["artifact"]["action"] == "sent" and got["bytes_sent"] == total
        assert got["artifact"]["streams"] == 2  # a stream per 16 MiB, each hop alike
    assert report["nodes"]["spark-1"]["artifact"]["action"] == "up to date"
    cluster = bed.inventory()
    assert verified(cluster, name, EVERY) == {n: True for n in EVERY}

    done = run_push(*args, "--json")
    again = json.loads(done.stdout)
    assert again["route"] == "nothing to send"
    assert all(again["nodes"][n]["bytes_sent"] == 0 and again["nodes"][n]["artifact"]["action"]
               == "up to date" for n in EVERY)
    done = run_push(*args)  # the table says where from
    assert done.returncode == 0 and "from" in done.stdout and "nothing to send" in done.stdout


@needs_docker
def test_from_this_machine_along_a_chain_and_from_the_head_as_a_star(bed, tmp_path):
    """The two baselines the fan-out benchmark compares: a folder here sent along the chain (this
    machine's link carries it once), and the head's store sent to each worker straight."""
    cluster = bed.inventory()
    local = tmp_path / "here"
    root = local / "chain-here"
    root.mkdir(parents=True)
    (root / "w.engine").write_bytes(os.urandom(3 * MiB))
    manifest.write(root, manifest.create(root, {"model": "chain-here"}))
    result = pushing.push(cluster.nodes, pushing.source(local, "chain-here"), route="chain")
    assert not result.failed, result.summary()
    assert [result[n].value.received_from for n in EVERY] == ["this machine", *EVERY[:-1]]
    assert verified(cluster, "chain-here", EVERY) == {n: True for n in EVERY}

    in_head_store(bed, tmp_path, "chain-star", {"w.engine": 3 * MiB})
    args = ("--from", "head", "--name", "chain-star", "--hosts", str(bed.layout.hosts_file),
            "--route", "star")
    plan = json.loads(run_push(*args, "--dry-run", "--json").stdout)
    assert plan["route"] == "spark-1 → spark-2, spark-3, spark-4, spark-5"
    done = run_push(*args, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert all(report["nodes"][w]["received_from"] == "spark-1" for w in WORKERS)
    assert verified(cluster, "chain-star", EVERY) == {n: True for n in EVERY}


@needs_docker
def test_over_fabric_hops_each_node_writes_only_what_it_lacks(bed, tmp_path):
    """Fabric addresses set: every hop is plain TCP, so the nodes need no SSH to each other (their
    keys are moved away to prove it). spark-4 has the previous version: it passes on every byte
    but writes the one changed file only."""
    name = "chain-fabric"
    sizes = {f"shard-{i}": 17 * MiB for i in range(3)}
    root = in_head_store(bed, tmp_path, name, sizes)
    hosts = with_fabric(bed, tmp_path / "hosts.toml")
    cluster = inventory.load(hosts)
    src = pushing.source_on(cluster.head, name)
    assert not pushing.push([cluster.node("spark-4")], src).failed
    inode = node_sh(bed, 4, f"stat -c %i {STORE}/{name}/shard-0")

    (root / "shard-2").write_bytes(os.urandom(17 * MiB))  # a new version: one file changed
    manifest.write(root, manifest.create(root, {"model": name}))
    copied_to_head(bed, root)
    src = pushing.source_on(cluster.head, name)
    # spark-5 was cut off earlier 5 MiB into shard-0: it skips those bytes of the stream the others
    # need from the start, and writes on from there.
    prefix = tmp_path / "prefix"
    prefix.write_bytes((root / "shard-0").read_bytes()[:5 * MiB])
    node_sh(bed, 5, f"mkdir -p {STORE}/.{name}.push")
    subprocess.run(["docker", "cp", str(prefix), f"{bed.layout.container(5)}:{STORE}/.{name}.push/shard-0"],
                   check=True, timeout=60)
    node_sh(bed, 5, f"chown -R spark {STORE}/.{name}.push", user="root")

    for index in range(1, 6):
        node_sh(bed, index, "mv ~/.ssh/id_ed25519 ~/.ssh/id_ed25519.aside")
    try:
        counted = pushing.Counter()
        result = pushing.push(cluster.nodes, src, progress=counted)
    finally:
        for index in range(1, 6):
            node_sh(bed, index, "mv ~/.ssh/id_ed25519.aside ~/.ssh/id_ed25519")
    assert not result.failed, result.summary()
    total = sum(sizes.values())
    for worker in WORKERS:
        pushed = result[worker].value
        assert pushed.bytes_sent == counted.sent[worker] == total  # the union goes down the chain
    assert result["spark-4"].value.artifact.files_sent == 1  # the one it lacked
    assert result["spark-4"].value.artifact.bytes_skipped == 2 * 17 * MiB
    assert result["spark-3"].value.artifact.files_sent == 3
    assert result["spark-5"].value.artifact.action == "resumed"
    assert result["spark-5"].value.artifact.bytes_skipped == 5 * MiB
    assert node_sh(bed, 4, f"stat -c %i {STORE}/{name}/shard-0") == inode  # kept, not rewritten
    assert verified(cluster, name, EVERY) == {n: True for n in EVERY}


@needs_docker
def test_a_node_that_cannot_reach_the_next_hands_the_rest_to_the_source(bed, tmp_path):
    """spark-3 has lost its key (ssh.setup not run there): it takes its own copy, spark-4 is told at
    once that nothing will come, and spark-4 and spark-5 get the artifact straight from the head
    in a second round, well before any 30 s wait for a connection."""
    name = "chain-cut"
    in_head_store(bed, tmp_path, name, {"a.engine": 3 * MiB, "b.json": 100})
    cluster = bed.inventory()
    src = pushing.source_on(cluster.head, name)
    node_sh(bed, 3, "mv ~/.ssh/id_ed25519 ~/.ssh/id_ed25519.aside")
    try:
        started = time.monotonic()
        result = pushing.push(cluster.nodes, src)
        took = time.monotonic() - started
    finally:
        node_sh(bed, 3, "mv ~/.ssh/id_ed25519.aside ~/.ssh/id_ed25519")
    assert not result.failed, result.summary()
    assert {n: result[n].value.received_from for n in WORKERS} == {
        "spark-2": "spark-1", "spark-3": "spark-2", "spark-4": "spark-1", "spark-5": "spark-1"}
    assert result["spark-4"].value.artifact.attempts == 2
    assert took < 25, took
    assert verified(cluster, name, EVERY) == {n: True for n in EVERY}


@needs_docker
def test_a_node_that_cannot_start_receiving_is_left_out_of_the_chain(bed, tmp_path):
    """spark-3's store is where it may not write: its receive refuses at once, and spark-2 passes
    the artifact straight on to spark-4 in the same chain."""
    name = "chain-skip"
    in_head_store(bed, tmp_path, name, {"w.engine": 2 * MiB})
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(bed.layout.hosts_file.read_text().replace(
        'name = "spark-3"', 'name = "spark-3"\npaths = { artifacts = "/etc/trtllm-nope/engines" }'))
    cluster = inventory.load(hosts)
    result = pushing.push(cluster.nodes, pushing.source_on(cluster.head, name))
    assert [o.node.name for o in result.failed] == ["spark-3"], result.summary()
    assert "Permission denied" in result["spark-3"].reason
    assert {n: result[n].value.received_from for n in ("spark-2", "spark-4", "spark-5")} == {
        "spark-2": "spark-1", "spark-4": "spark-2", "spark-5": "spark-4"}
    assert all(result[n].value.artifact.attempts == 1 for n in ("spark-2", "spark-4", "spark-5"))
    assert verified(cluster, name, ("spark-2", "spark-4", "spark-5")) == {
        n: True for n in ("spark-2", "spark-4", "spark-5")}


def _host_pid(bed, index: int, name: str) -> int:
    """This machine's id of the receiving agent on node ``index`` (its container's process)."""
    top = subprocess.run(["docker", "top", bed.layout.container(index), "-eo", "pid,args"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    found = [int(line.split()[0]) for line in top.splitlines()[1:]
             if "push-agent" in line and " receive " in line and f" {name} " in f"{line} "]
    assert len(found) == 1, top
    return found[0]


def _wait_ssh(node, timeout: float = 90) -> None:
    def answers() -> bool:
        target = connect(node)
        try:
            return target.run(["true"], timeout=10, check=False).ok
        finally:
            target.close()

    until(answers, timeout, f"{node.name}'s sshd to answer again", retry_on=(TargetError,))


@needs_docker
def test_a_worker_stopped_mid_chain_is_routed_around_and_completed_after_restart(bed, tmp_path):
    """spark-3 is frozen (SIGSTOP) once it has 24 MiB of 160, then killed with its container. Past
    it, TCP and SSH buffers hold far less than the 136 MiB still to come, so spark-4 and spark-5
    are cut mid-artifact: a second chain spark-1 → spark-4 → spark-5 finishes them from what they
    kept, spark-2 finishes on its own, spark-3 fails with nothing partial current."""
    name = "chain-broken"
    sizes = {f"shard-{i}": 16 * MiB for i in range(10)}
    in_head_store(bed, tmp_path, name, sizes)
    total = sum(sizes.values())
    cluster = bed.inventory()
    src = pushing.source_on(cluster.head, name)
    seen = {"got": 0, "pid": 0, "killed": False}
    counted = pushing.Counter()

    def progress(node: str, count: int) -> None:
        counted(node, count)
        if node != "spark-3" or seen["killed"]:
            return
        seen["pid"] = seen["pid"] or _host_pid(bed, 3, name)
        seen["got"] += count
        if seen["got"] >= 24 * MiB:
            os.kill(seen["pid"], signal.SIGSTOP)
            subprocess.run(["docker", "kill", bed.layout.container(3)], check=True, timeout=60,
                           capture_output=True)
            seen["killed"] = True

    result = pushing.push(cluster.nodes, src, progress=progress)
    assert seen["killed"]
    assert [o.node.name for o in result.failed] == ["spark-3"], result.summary()
    assert "spark-3" in result.summary()
    assert verified(cluster, name, ("spark-1", "spark-2", "spark-4", "spark-5")) == {
        n: True for n in ("spark-1", "spark-2", "spark-4", "spark-5")}
    two, four, five = (result[n].value for n in ("spark-2", "spark-4", "spark-5"))
    assert two.received_from == "spark-1" and two.artifact.attempts == 1
    # Routed around spark-3; spark-4 and spark-5 continued what they had kept, not resent it.
    assert (four.received_from, five.received_from) == ("spark-1", "spark-4")
    assert four.artifact.attempts == five.artifact.attempts == 2
    assert four.artifact.action == five.artifact.action == "resumed"
    for late in (four, five):
        kept = late.artifact.bytes_skipped  # what it had when asked again
        assert 0 < kept < total - 64 * MiB, kept
        # What it received in the first chain it kept; the second carried less than the whole
        # artifact: only what spark-4 or spark-5 still lacked.
        assert total - MiB <= late.bytes_sent <= kept + total - MiB, (late.bytes_sent, kept)

    subprocess.run(["docker", "start", bed.layout.container(3)], check=True, timeout=60,
                   capture_output=True)
    _wait_ssh(cluster.node("spark-3"))
    # The node's entrypoint puts back the testbed's authorized_keys: trust it again, as a node
    # brought back in the field gets `invoke ssh.setup`.
    sshsetup.apply(sshsetup.look(cluster))
    listing = node_sh(bed, 3, f"ls -A {STORE}")
    assert name not in listing.split() and f".{name}.push" in listing.split()  # staging only
    done = run_push("--from", "head", "--name", name, "--hosts", str(bed.layout.hosts_file), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["route"] == "spark-1 → spark-3"
    assert report["nodes"]["spark-3"]["artifact"]["action"] == "resumed"
    assert report["nodes"]["spark-3"]["bytes_sent"] < total - 4 * MiB
    assert verified(cluster, name, EVERY) == {n: True for n in EVERY}


@needs_docker
def test_ctrl_c_stops_every_agent_of_the_chain_and_nothing_becomes_current(bed, tmp_path):
    name = "chain-ctrl-c"
    in_head_store(bed, tmp_path, name, {f"shard-{i}": 16 * MiB for i in range(6)})
    cluster = bed.inventory()
    src = pushing.source_on(cluster.head, name)
    seen = {"got": 0, "pids": set()}

    def interrupt(node: str, count: int) -> None:
        seen["got"] += count
        with channel._lock:
            seen["pids"] |= {proc.pid for proc in channel._open}
        if seen["got"] >= 16 * MiB and not seen.get("signalled"):
            seen["signalled"] = True
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in a terminal does

    with pytest.raises(KeyboardInterrupt):
        pushing.push(cluster.nodes, src, progress=interrupt)
    assert len(seen["pids"]) >= 5 and not channel._open  # four receivers and the sender
    for index in range(2, 6):
        assert name not in node_sh(bed, index, f"ls {STORE}").split()
    # The agents end on the nodes too (their streams end with the killed ones), within a deadline.
    def agents() -> list[int]:
        return [i for i in range(1, 6) if "push-agent" in node_sh(
            bed, i, "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '", check=False)]

    until(agents, 60, "the push agents on the nodes to end", done=lambda nodes: nodes == [])
