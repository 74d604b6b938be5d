"""Images the lock names by digest are what every node runs: the judgement table-driven, then the
real thing on the testbed: a Distribution registry on spark-1's loopback, a tag pushed twice (it
moved), nodes that pulled it before and after, and a node that got it by ``docker load``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import tomlkit

from conftest import docker_unusable
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts import hop, scripts, sshsetup
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.dockercli import LocalImage, parse_image
from trtllm_deploy.push import registry
from trtllm_deploy.serving import clustercheck, containers, launch, state
from trtllm_deploy.source import digest
from trtllm_deploy.source import image as images
from trtllm_deploy.source import lock as locks

ROOT = Path(__file__).resolve().parents[1]
A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
NAME = "127.0.0.1:5000/drift/x"
PIN = digest.Pin("[vllm] image", f"{NAME}:v1@{A}")


@pytest.mark.parametrize("reference, expected", [
    ("x", ("x", None, None)),
    ("x:1", ("x", "1", None)),
    (f"127.0.0.1:5000/drift/x:v1@{A}", ("127.0.0.1:5000/drift/x", "v1", A)),
    (f"127.0.0.1:5000/drift/x@{A}", ("127.0.0.1:5000/drift/x", None, A)),
    ("localhost:5000/x", ("localhost:5000/x", None, None)),   # a port is not a tag
], ids=["bare", "tag", "registry-tag-digest", "registry-digest", "registry-port"])
def test_a_reference_splits_into_name_tag_and_digest(reference, expected):
    assert digest.split(reference) == expected


def _lock(tmp_path: Path, extra: str = "") -> locks.LockFile:
    path = tmp_path / "lock.toml"
    path.write_text('[source]\nrepository = "https://github.com/NVIDIA/TensorRT-LLM.git"\n'
                    '[build]\nkind = "source"\n' + extra)
    return locks.load(path)


@pytest.mark.parametrize("image, expected", [
    (f"{NAME}:v1", f"{NAME}:v1@{A}"),                 # the lock pins this tag: its digest runs
    (f"{NAME}:v2", f"{NAME}:v2"),                     # another tag: as given
    (f"{NAME}:v1@{B}", f"{NAME}:v1@{B}"),             # a digest given wins
    ("docker.io/library/ubuntu:24.04", f"ubuntu:24.04@{B}"),   # Docker Hub's long name is the short one
], ids=["pinned-tag", "other-tag", "digest-given", "hub-names"])
def test_launch_runs_the_locks_digest_for_a_tag_it_pins(tmp_path, image, expected):
    lockfile = _lock(tmp_path, f'[vllm]\nimage = "{NAME}:v1@{A}"\n[other]\nimage = "ubuntu:24.04@{B}"\n')
    assert digest.pinned_reference(lockfile, image) == expected
    assert [pin.what for pin in digest.pins(lockfile)] == ["[vllm] image", "[other] image"]


def test_a_digest_that_is_not_sha256_hex_is_refused_by_name():
    with pytest.raises(CheckFailed, match=r"\[vllm\] image x@sha256:zz: the digest after @"):
        digest.pin_of("x@sha256:zz", "[vllm] image")


def _image(image_id: str, *digests: str) -> LocalImage:
    return LocalImage("r", image_id, {}, (), tuple(digests))


I1, I2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64

# (what each node answers: tagged, pinned) → each node's state, and words its detail must have.
CASES = {
    "pulled-by-the-pinned-tag": (
        {"n1": digest.Seen(_image(I1, f"{NAME}@{A}"), _image(I1, f"{NAME}@{A}"))},
        {"n1": (digest.PINNED, ["has sha256:aaaa"])}),
    "tag-moved": (
        {"n1": digest.Seen(_image(I1, f"{NAME}@{A}"), _image(I1, f"{NAME}@{A}")),
         "n2": digest.Seen(_image(I2, f"{NAME}@{B}"), None)},
        {"n1": (digest.PINNED, []),
         "n2": (digest.DRIFT, [f"tag {NAME}:v1 on node n2 is {B}", f"the lock pins {A}", "the tag moved",
                               f"docker pull {NAME}@{A}", "invoke source.update"])}),
    "side-loaded-same-id": (
        {"n1": digest.Seen(_image(I1, f"{NAME}@{A}"), _image(I1, f"{NAME}@{A}")),
         "n2": digest.Seen(_image(I1), None)},
        {"n2": (digest.SAME_ID, ["no registry digest: loaded with docker load", "same image ID as n1"])}),
    "side-loaded-other-id": (
        {"n1": digest.Seen(_image(I1, f"{NAME}@{A}"), _image(I1, f"{NAME}@{A}")),
         "n2": digest.Seen(_image(I2), None)},
        {"n2": (digest.DRIFT, ["is image 222222222222", "loaded with docker load", "not the pinned"])}),
    "digest-kept-tag-moved": (
        {"n1": digest.Seen(_image(I2, f"{NAME}@{B}"), _image(I1, f"{NAME}@{A}"))},
        {"n1": (digest.PINNED, ["it moved upstream, launch runs the pinned digest"])}),
    "missing": (
        {"n1": digest.Seen(None, None)},
        {"n1": (digest.MISSING, [f"has neither {NAME}:v1 nor {NAME}@{A}"])}),
    "nobody-has-the-digest": (
        {"n1": digest.Seen(_image(I1), None)},
        {"n1": (digest.UNVERIFIED, ["no node has", f"docker pull {NAME}@{A}"])}),
    "same-digest-other-ids": (
        {"n1": digest.Seen(None, _image(I1, f"{NAME}@{A}")),
         "n2": digest.Seen(None, _image(I2, f"{NAME}@{A}"))},
        {"n1": (digest.PINNED, ["another platform"]), "n2": (digest.PINNED, ["n1 111111111111"])}),
}


@pytest.mark.parametrize("seen, expected", CASES.values(), ids=CASES.keys())
def test_each_node_is_judged_against_the_pin_and_the_nodes_that_have_it(seen, expected):
    verdicts = {v.node: v for v in digest.judge(PIN, seen)}
    assert set(verdicts) == set(seen)
    for node, (state_, words) in expected.items():
        assert verdicts[node].state == state_, verdicts[node]
        assert verdicts[node].ok == (state_ in digest.GOOD)
        for word in words:
            assert word in verdicts[node].detail, verdicts[node].detail


def test_the_image_a_node_runs_is_the_pinned_id_there():
    seen = {"n1": digest.Seen(_image(I2, f"{NAME}@{B}"), _image(I1, f"{NAME}@{A}")),
            "n2": digest.Seen(_image(I1), None)}
    assert {v.node: v.image_id for v in digest.judge(PIN, seen)} == {"n1": I1, "n2": I1}


def test_docker_inspect_keeps_tags_and_registry_digests():
    inspected = json.dumps({"Id": I1, "RepoTags": [f"{NAME}:v1"], "RepoDigests": [f"{NAME}@{A}"],
                            "Config": {"Labels": None}, "RootFS": {"Layers": ["sha256:l"]}})
    image = parse_image(f"{NAME}:v1", inspected)
    assert image.tags == (f"{NAME}:v1",) and image.digests == (f"{NAME}@{A}",)


# --- the fixes a job across nodes needs ----------------------------------------------------------

SEVERAL = ('[[fixes]]\npr = 12902\ntitle = "multi-node NCCL on GB10"\nneeded_for = "several"\n'
           'missing = "not in the pinned history"\n')


def test_a_pin_without_a_multi_node_fix_refuses_nodes_and_warns_on_one(tmp_path):
    lockfile = _lock(tmp_path, SEVERAL)
    with pytest.raises(CheckFailed) as refused:
        launch.unfixed(lockfile, "trtllm", 2)
    message = str(refused.value)
    assert "(#12902) multi-node NCCL on GB10: not in the pinned history" in message
    assert "span 2 nodes" in message and "invoke source.update --ref <tag>" in message
    assert "nothing was started" in message and refused.value.exit_code == 1
    [warning] = launch.unfixed(lockfile, "trtllm", 1)
    assert "(#12902)" in warning and "one-node deployment goes ahead" in warning
    # TensorRT-LLM's fixes do not bind the rollback runtime's own image; no lock, nothing to judge.
    assert launch.unfixed(lockfile, "vllm", 3) == [] and launch.unfixed(None, "trtllm", 3) == []


def test_a_pin_with_every_fix_is_unchanged(tmp_path):
    lockfile = _lock(tmp_path, '[[fixes]]\npr = 7937\n[[fixes]]\npr = 12902\nneeded_for = "several"\n')
    assert launch.unfixed(lockfile, "trtllm", 3) == [] and launch.unfixed(lockfile, "trtllm", 1) == []


def test_deploy_dry_run_across_nodes_is_refused_before_any_node_is_asked(tmp_path):
    """The nodes are a closed port on loopback: a node asked anything would fail preflight instead."""
    hosts = tmp_path / "hosts.toml"
    hosts.write_text("".join(f'[[nodes]]\nname = "s{i}"\naddress = "127.0.0.{i}"\nport = 1\n'
                             + ('role = "head"\n' if i == 1 else "") for i in (1, 2)))
    lock = tmp_path / "lock.toml"
    lock.write_text(_lock(tmp_path, SEVERAL).path.read_text())
    folder = tmp_path / "tiny"
    from trtllm_deploy.testbed import artifact as tiny
    tiny.make(folder)
    done = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "deploy", "--dry-run",
                           "--artifact-dir", str(folder), "--tp", "2", "--image", "x:1",
                           "--hosts", str(hosts), "--lock", str(lock)], capture_output=True, text=True,
                          timeout=120,
                          env={**os.environ, "DOCKER_HOST": "unix:///nonexistent", "COLUMNS": "200"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "refused" in done.stderr and "(#12902)" in done.stderr and "Traceback" not in done.stderr
    assert "preflight" not in done.stderr


# --- on the testbed: a registry, a tag that moves, nodes that pulled it before and after ---------

needs_docker = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


def _sh(cluster, name: str, script: str, *args: str, timeout: float = 300) -> str:
    target = connect(cluster.node(name))
    try:
        return target.run(["sh", "-c", script, "sh", *args], timeout=timeout).stdout
    finally:
        target.close()


# $1 the name to pull, $2 the local port, then the tunnel's ssh command; the tunnel ends with it.
PULL_THROUGH = """
name=$1 port=$2; shift 2
"$@" </dev/null 2>/dev/null & tunnel=$!
trap 'kill $tunnel 2>/dev/null; wait $tunnel 2>/dev/null' EXIT
until python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "http://127.0.0.1:$port/v2/" 2>/dev/null; do
  kill -0 $tunnel 2>/dev/null || { echo "the tunnel ended" >&2; exit 1; }
done
docker pull -q "$name" >/dev/null
"""


@pytest.fixture(scope="module")
def moved(testbed, tmp_path_factory):
    """Tag v1 pushed as image A (spark-2 pulls it), then as image B (spark-3 pulls that): spark-1,
    the registry's node, keeps both. The lock pins v1 at A's digest."""
    bed, report = testbed
    cluster = bed.inventory()
    sshsetup.apply(sshsetup.look(cluster))   # the tunnels from the nodes to spark-1 need it
    holder = cluster.node("spark-1")
    target = connect(holder)
    run = f"/tmp/drift-registry-{os.getpid()}"
    started = scripts.run(target, registry.START, run, f"{run}-storage", 3600, registry.CONFIG)
    port = int(started.sections["port"].strip())
    name = f"127.0.0.1:{port}/drift/x"
    tag = f"{name}:v1"
    pushed = {}
    try:
        for label, puller in (("a", "spark-2"), ("b", "spark-3")):
            _sh(cluster, "spark-1", 'printf "FROM %s\\nLABEL io.trtllm-deploy.test=drift-%s\\n" "$1" "$2" | '
                'docker build -q -t "$3" - >/dev/null && docker push -q "$3" >/dev/null', report.runtime.tag,
                label, tag)
            pushed[label] = _sh(cluster, "spark-1", "docker image inspect --format "
                                "'{{index .RepoDigests 0}}' \"$1\"", tag).strip().split("@")[1]
            tunnel = hop.tunnel_argv(holder, port, port)
            _sh(cluster, puller, PULL_THROUGH, tag, str(port), *tunnel)
        lock = tmp_path_factory.mktemp("lock") / "lock.toml"
        shipped = tomlkit.parse(Path(ROOT / "requirements/tensorrt-llm.lock.toml").read_text())
        shipped.setdefault("vllm", tomlkit.table())["image"] = f"{tag}@{pushed['a']}"
        lock.write_text(tomlkit.dumps(shipped))
        yield cluster, bed, tag, pushed, locks.load(lock)
    finally:
        scripts.run(target, registry.STOP, run, "-")
        target.run(["rm", "-rf", f"{run}-storage"], check=False, timeout=60)
        target.close()
        for node in cluster.nodes:
            _sh(cluster, node.name, 'docker images -q "$1" | sort -u | xargs -r docker rmi -f >/dev/null',
                name)


@needs_docker
def test_verify_names_the_node_whose_tag_moved_with_both_digests(moved):
    cluster, _, tag, pushed, lockfile = moved
    verdicts = [v for v in images.verify(cluster, lockfile) if v.image != images.image_ref(lockfile)]
    by_node = {v.node: v for v in verdicts}
    assert set(by_node) == {"spark-1", "spark-2", "spark-3"}
    assert by_node["spark-2"].ok and "pinned: has " + pushed["a"][:19] in by_node["spark-2"].detail
    # spark-1 pushed both: it keeps the pinned digest, its tag is the new image.
    assert by_node["spark-1"].ok and "it moved upstream" in by_node["spark-1"].detail
    drift = by_node["spark-3"]
    assert not drift.ok and "drift" in drift.detail
    assert f"tag {tag} on node spark-3 is {pushed['b']}" in drift.detail
    assert f"the lock pins {pushed['a']}" in drift.detail and "the tag moved" in drift.detail


@needs_docker
def test_a_node_that_got_the_pinned_image_by_docker_load_is_judged_by_its_id(moved):
    cluster, _, tag, pushed, lockfile = moved
    name = tag.rsplit(":", 1)[0]
    # spark-3 drops what it pulled and loads spark-2's image (the pinned one): no registry digest.
    _sh(cluster, "spark-3", 'docker rmi -f "$1" >/dev/null', tag)
    saved = subprocess.run(["docker", "exec", cluster_container(moved, "spark-2"), "docker", "save", tag],
                           capture_output=True, timeout=300, check=True).stdout
    subprocess.run(["docker", "exec", "-i", cluster_container(moved, "spark-3"), "docker", "load", "-q"],
                   input=saved, capture_output=True, timeout=300, check=True)
    try:
        pin = digest.Pin("[vllm] image", f"{tag}@{pushed['a']}")
        by_node = {v.node: v for v in digest.look(list(cluster.nodes), pin)}
        assert by_node["spark-3"].state == digest.SAME_ID, by_node["spark-3"]
        assert "loaded with docker load" in by_node["spark-3"].detail
        assert by_node["spark-3"].image_id == by_node["spark-2"].image_id
    finally:  # spark-3 as the module left it: the moved tag, pulled again
        _sh(cluster, "spark-3", 'docker rmi -f "$1" >/dev/null', tag)
        with_tunnel(moved, "spark-3", name)


def cluster_container(moved, node: str) -> str:
    _, bed, _, _, _ = moved
    return bed.layout.container(int(node.rsplit("-", 1)[1]))


def with_tunnel(moved, node: str, name: str) -> None:
    cluster, _, tag, _, _ = moved
    port = int(tag.split("/")[0].split(":")[1])
    _sh(cluster, node, PULL_THROUGH, tag, str(port), *hop.tunnel_argv(cluster.node("spark-1"), port, port))


@needs_docker
def test_cluster_check_reports_the_drift_before_starting_anything(moved, tmp_path):
    cluster, bed, tag, pushed, lockfile = moved
    (tmp_path / "tasks.py").write_text("from invoke import Collection\n"
                                       "from trtllm_deploy.cli import cluster\n"
                                       "ns = Collection()\nns.add_collection(cluster.ns)\n")
    done = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(tmp_path), "cluster.check",
                           "--hosts", str(bed.layout.hosts_file), "--image", tag,
                           "--lock", str(lockfile.path), "--json"], capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    states = {v["node"]: v["state"] for v in report["digests"]}
    assert states == {"spark-1": "pinned", "spark-2": "pinned", "spark-3": "drift"}
    [odd] = [v for v in report["digests"] if not v["ok"]]
    assert pushed["a"] in odd["detail"] and pushed["b"] in odd["detail"]
    assert report["ranks"] == [] and "image digest differ or failed on spark-3" in done.stderr
    for outcome in containers.status(cluster, clustercheck.JOB):
        assert outcome.value == []   # nothing was started


@needs_docker
def test_the_pinned_image_runs_where_the_tag_moved_and_a_drifted_node_refuses_the_job(moved, tmp_path,
                                                                                      monkeypatch):
    """spark-3 has only the moved tag: a job on it is refused, nothing started. Then it loads the
    pinned image (docker load: no registry digest), and a job on spark-1 (whose tag moved, but which
    keeps the pinned digest) and spark-3 runs the pinned image on both, as the probe inside says."""
    cluster, _, tag, pushed, lockfile = moved
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    reference = f"{tag}@{pushed['a']}"
    pinned_id = _sh(cluster, "spark-2", "docker image inspect --format '{{.Id}}' \"$1\"", reference).strip()
    assert _sh(cluster, "spark-1", "docker image inspect --format '{{.Id}}' \"$1\"", tag).strip() != pinned_id
    wanted = state.Deployment(job="tbdigest", runtime="trtllm", image=reference, artifact="none", tp=3,
                              port=8368)
    with pytest.raises(CheckFailed, match="is not the pinned image on spark-3; nothing was started"):
        launch.launch(cluster, wanted, tmp_path / "tmp")
    for outcome in containers.status(cluster, "tbdigest"):
        assert outcome.value == []
    _sh(cluster, "spark-3", 'docker rmi -f "$1" >/dev/null', tag)
    saved = subprocess.run(["docker", "exec", cluster_container(moved, "spark-2"), "docker", "save", tag],
                           capture_output=True, timeout=300, check=True).stdout
    subprocess.run(["docker", "exec", "-i", cluster_container(moved, "spark-3"), "docker", "load", "-q"],
                   input=saved, capture_output=True, timeout=300, check=True)
    pair = replace(cluster, nodes=(cluster.node("spark-1"), cluster.node("spark-3")))
    checked = clustercheck.run(pair, image=tag, lockfile=lockfile)   # the tag: the lock's digest runs
    assert checked.ok, checked.as_json()
    assert {v.node: v.state for v in checked.digests} == {"spark-1": digest.PINNED, "spark-3": digest.SAME_ID}
    assert [rank["image"]["id"] for rank in checked.ranks] == [pinned_id, pinned_id]
