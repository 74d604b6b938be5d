"""Images node to node through a registry on the node that holds them (push/registry.py), on the
testbed: real engines on every node, the Distribution registry on spark-1's loopback, SSH tunnels
between the nodes with the keys ``ssh.setup`` gave them. After every round, success or failure,
no registry, tunnel or registry name is left on any node.

Traffic goes only to loopback and to the testbed's own addresses (TESTING.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import docker_unusable
from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.hosts import sshsetup
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.dockercli import LocalImage
from trtllm_deploy.push import registry
from waiting import until

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
needs_docker = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


# --- without Docker ---------------------------------------------------------------------------

@pytest.mark.parametrize("reference, expected", [
    ("trtllm-deploy/standin:abc", ("trtllm-deploy/trtllm-deploy/standin", "abc")),
    ("nvcr.io/nvidia/tensorrt-llm/release:1.0.0", ("trtllm-deploy/nvidia/tensorrt-llm/release", "1.0.0")),
    ("localhost:5000/x", ("trtllm-deploy/x", "latest")),
    ("Busybox", ("trtllm-deploy/busybox", "latest")),
    ("repo@sha256:" + "ab" * 32, ("trtllm-deploy/repo", "ab" * 16)),
], ids=["ours", "ngc-host-dropped", "registry-with-port", "lowercased", "pinned-by-digest"])
def test_where_an_image_goes_in_the_registry(reference, expected):
    assert registry.repository_and_tag(reference) == expected


@pytest.mark.parametrize("reference", ["sha256:" + "ab" * 32, "no spaces:1", "UPPER/../x"])
def test_an_image_named_by_id_or_badly_is_refused_before_anything_runs(reference):
    with pytest.raises(InputError, match="REPO:TAG"):
        registry.repository_and_tag(reference)


IMAGE = LocalImage("x:1", "sha256:" + "1" * 64, {}, ("sha256:" + "a" * 64, "sha256:" + "b" * 64))


def test_the_manifest_gives_each_layers_compressed_size_in_layer_order():
    manifest = {"layers": [{"digest": "sha256:" + "c" * 64, "size": 10},
                           {"digest": "sha256:" + "d" * 64, "size": 20}]}
    text = "sha256:" + "e" * 64 + "\n" + json.dumps(manifest)
    assert registry.parse_manifest(text, IMAGE) == ("sha256:" + "e" * 64, ("sha256:" + "c" * 64,
                                                    "sha256:" + "d" * 64), (10, 20))
    with pytest.raises(CheckFailed, match="lists 1 layers, the image has 2"):
        registry.parse_manifest(text.replace(', {"digest": "sha256:' + "d" * 64 + '", "size": 20}', ""),
                                IMAGE)


def test_the_pull_output_says_which_layers_came_over_the_tunnel():
    served = registry.Served(None, IMAGE, 1, "trtllm-deploy/x", "sha256:" + "e" * 64,
                             ("sha256:" + "c" * 64, "sha256:" + "d" * 64), (10, 20))
    output = f"{'c' * 12}: Already exists\n{'d' * 12}: Pulling fs layer\n{'d' * 12}: Pull complete\n"
    assert registry._pulled(output, served) == {1}
    assert registry._pulled(f"{'c' * 12}: Already exists\n", served) is None  # then the plan stands


# --- on the testbed ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bed(testbed):
    testbed_, report = testbed
    cluster = testbed_.inventory()
    sshsetup.apply(sshsetup.look(cluster))  # every node trusts every node: the tunnels need it
    return testbed_, cluster, report.runtime.tag


def node_sh(testbed_, name: str, script: str, user: str = "spark", check: bool = True) -> str:
    index = int(name.rsplit("-", 1)[1])
    done = subprocess.run(["docker", "exec", "-u", user, testbed_.layout.container(index), "sh", "-c",
                           script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 or not check, done.stderr
    return done.stdout


def build_on(testbed_, node: str, tag: str, base: str, size: int = MiB) -> None:
    """An image only ``node`` has: the stand-in plus one layer of random bytes and a label."""
    node_sh(testbed_, node, f"""set -e; d=$(mktemp -d); head -c {size} /dev/urandom > "$d/new.bin"
printf 'FROM %s\\nCOPY new.bin /new.bin\\nLABEL io.trtllm-deploy.test=registry\\n' '{base}' > "$d/Dockerfile"
docker build -q -t '{tag}' "$d" > /dev/null; rm -rf "$d" """)


def leftovers(testbed_, cluster) -> dict[str, str]:
    """What a round may not leave on a node: a registry, a tunnel, an image named by a registry."""
    found = {}
    for node in cluster.nodes:
        seen = node_sh(testbed_, node.name, "pgrep -af '[d]ocker-registry serve|[s]sh .*-N .*-L 127'; "
                       "docker images --format '{{.Repository}}' | grep '^127\\.0\\.0\\.1:'", "root",
                       check=False).strip()
        if seen:
            found[node.name] = seen
    return found


def image_on(cluster, name: str, tag: str) -> LocalImage | None:
    target = connect(cluster.node(name))
    try:
        return registry.inspect(cluster.node(name), target, tag)
    except CheckFailed:
        return None
    finally:
        target.close()


def distribute(cluster, tag: str, receivers=("spark-2", "spark-3")):
    holder = cluster.node("spark-1")
    target = connect(holder)
    try:
        return registry.distribute(holder, target, tag, [cluster.node(n) for n in receivers])
    finally:
        target.close()


@needs_docker
def test_an_image_built_on_spark1_reaches_the_others_then_only_new_layers_travel(bed):
    testbed_, cluster, standin = bed
    tag = f"trtllm-deploy-test/registry:{os.getpid()}"
    build_on(testbed_, "spark-1", tag, standin)
    held = image_on(cluster, "spark-1", tag)
    assert image_on(cluster, "spark-2", tag) is None and image_on(cluster, "spark-3", tag) is None

    first = distribute(cluster, tag)
    assert not first.failed, first.summary()
    for name in ("spark-2", "spark-3"):
        sent = first[name].value
        got = image_on(cluster, name, tag)
        # The ID is the config's digest: it survives a push and a pull through a registry.
        assert (got.id, got.labels, got.diff_ids) == (held.id, held.labels, held.diff_ids)
        assert got.labels["io.trtllm-deploy.test"] == "registry"
        # The first pull through a registry takes the stand-in's layers too: the node got them by
        # `docker load`, and Docker 20.10 on Linux skips a layer only when it knows it by its
        # registry digest. Where an earlier test of this session already pulled an image on the
        # stand-in through spark-1's registry (same storage, same digests), the node knows them and
        # only the new layer travels. The count is docker pull's own, not the plan's: what
        # travelled, and the bytes are those layers' sizes.
        assert sent.action == "pulled", sent
        if sent.layers_sent == len(held.diff_ids):
            assert sent.bytes_skipped == 0 and sent.bytes_sent > 20 * MiB
        else:
            assert sent.layers_sent == 1 and MiB <= sent.bytes_sent < 1.2 * MiB, sent
        print(f"first pull to {name}: {sent.layers_sent} of {len(held.diff_ids)} layers, "
              f"{sent.bytes_sent} bytes sent, {sent.bytes_skipped} skipped, {sent.seconds:.2f} s")
    assert leftovers(testbed_, cluster) == {}
    assert image_on(cluster, "spark-1", tag).id == held.id  # the holder keeps its image

    build_on(testbed_, "spark-1", tag, standin)  # the same stand-in below, a new layer on top
    newer = image_on(cluster, "spark-1", tag)
    second = distribute(cluster, tag)
    assert not second.failed, second.summary()
    for name in ("spark-2", "spark-3"):
        sent = second[name].value
        # Only the new layer came (random bytes do not compress): the rest are known by digest now.
        assert (sent.action, sent.layers_sent) == ("pulled", 1)
        assert MiB <= sent.bytes_sent < 1.1 * MiB and sent.bytes_skipped > 20 * MiB
        assert image_on(cluster, name, tag).id == newer.id
        print(f"second pull to {name}: {sent.bytes_sent} bytes sent, {sent.seconds:.2f} s")
    assert leftovers(testbed_, cluster) == {}

    # A third round finds everything up to date and starts no registry: with docker-registry
    # gone from spark-1, it still succeeds (a round that needs one fails, as the next lines show).
    node_sh(testbed_, "spark-1", "mv /usr/bin/docker-registry /usr/bin/docker-registry.away", "root")
    try:
        third = distribute(cluster, tag)
        assert not third.failed, third.summary()
        assert {o.value.action for o in third} == {"up to date"}
        assert sum(o.value.bytes_sent for o in third) == 0

        build_on(testbed_, "spark-1", tag, standin)
        with pytest.raises(CheckFailed, match=r"spark-1 has no docker-registry .*apt install docker-regi"):
            distribute(cluster, tag)
    finally:
        node_sh(testbed_, "spark-1", "mv /usr/bin/docker-registry.away /usr/bin/docker-registry", "root")
    assert leftovers(testbed_, cluster) == {}


@needs_docker
def test_a_node_without_node_to_node_ssh_gets_a_clear_error_and_nothing_is_left_anywhere(bed):
    testbed_, cluster, standin = bed
    tag = f"trtllm-deploy-test/registry-nokey:{os.getpid()}"
    build_on(testbed_, "spark-1", tag, standin)
    node_sh(testbed_, "spark-3", "mv ~/.ssh/id_ed25519 ~/.ssh/id_ed25519.away")
    try:
        result = distribute(cluster, tag)
    finally:
        node_sh(testbed_, "spark-3", "mv ~/.ssh/id_ed25519.away ~/.ssh/id_ed25519")
    assert result["spark-2"].ok and result["spark-2"].value.action == "pulled"
    assert [o.node.name for o in result.failed] == ["spark-3"]
    reason = result["spark-3"].reason
    assert "cannot open an SSH tunnel to spark-1" in reason and "invoke ssh.setup" in reason, reason
    print(reason)
    assert image_on(cluster, "spark-3", tag) is None
    assert leftovers(testbed_, cluster) == {}


@needs_docker
def test_a_failure_while_served_stops_the_registry_and_its_storage_stays_for_next_time(bed):
    testbed_, cluster, standin = bed
    tag = f"trtllm-deploy-test/registry-fail:{os.getpid()}"
    build_on(testbed_, "spark-1", tag, standin)
    holder = cluster.node("spark-1")
    target = connect(holder)
    try:
        image = registry.inspect(holder, target, tag)
        with pytest.raises(KeyboardInterrupt):
            with registry.serve(holder, target, image) as served:
                assert leftovers(testbed_, cluster)["spark-1"]  # it is running, its name is there
                raise KeyboardInterrupt
        with pytest.raises(CheckFailed, match="is not on spark-1: build it there"):
            registry.inspect(holder, target, "trtllm-deploy-test/never:1")
    finally:
        target.close()
    assert leftovers(testbed_, cluster) == {}
    blob = served.layer_digests[-1].split(":")[1]
    stored = node_sh(testbed_, "spark-1", "find ~/.local/state/trtllm-deploy/registry/storage -path "
                     f"'*/blobs/sha256/*/{blob}/data'")
    assert stored.strip(), "the layer is not kept in the registry's storage"
    assert image_on(cluster, "spark-1", tag).id == image.id


# distribute() as `invoke push` would run it, in a process of its own to interrupt.
DISTRIBUTE = """
import sys
from trtllm_deploy.hosts import inventory
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.push import registry
cluster = inventory.load(sys.argv[1])
holder = cluster.node("spark-1")
target = connect(holder)
try:
    registry.distribute(holder, target, sys.argv[2], [cluster.node("spark-2"), cluster.node("spark-3")])
finally:
    target.close()
"""


@needs_docker
def test_ctrl_c_while_nodes_pull_leaves_no_registry_tunnel_or_half_image(bed):
    testbed_, cluster, standin = bed
    tag = f"trtllm-deploy-test/registry-interrupted:{os.getpid()}"
    build_on(testbed_, "spark-1", tag, standin, size=192 * MiB)  # a pull long enough to catch
    held = image_on(cluster, "spark-1", tag)
    run = subprocess.Popen([sys.executable, "-c", DISTRIBUTE, str(testbed_.layout.hosts_file), tag],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: leftovers(testbed_, cluster), 120, "a tunnel on spark-2",
              done=lambda found: "-N" in found.get("spark-2", ""))
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    # The nodes' scripts end by themselves once the registry is gone: give them a bounded while.
    until(lambda: leftovers(testbed_, cluster), 60, "nothing left on any node",
          done=lambda found: found == {})
    for name in ("spark-2", "spark-3"):
        got = image_on(cluster, name, tag)
        assert got is None or got.id == held.id  # all of it or none of it
    assert image_on(cluster, "spark-1", tag).id == held.id
