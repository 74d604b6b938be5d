"""``invoke cluster.check``: the probe's parsing and the drift judgement as pure functions, then the
check for real across the testbed's three nodes: uniform passes, a node whose image or artifact
manifest differs is refused and named."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from invoke import Context
from invoke.exceptions import Exit
from rich.console import Console
from test_containers import authorize_head_key

from conftest import docker_unusable
from trtllm_deploy.artifact.manifest import MANIFEST
from trtllm_deploy.cli import cluster as cluster_cli
from trtllm_deploy.hosts import inventory
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.serving import clustercheck, probe
from trtllm_deploy.source import lock as locks

ROOT = Path(__file__).resolve().parents[1]
needs_docker = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))

# Recorded by this project on its device machine (2 × H200, driver 580.159.04, 2026-11-27) with
# the exact query probe.py sends.
H200X2_QUERY = ("0, NVIDIA H200, GPU-9acc68ef-6272-b60f-5dc3-eaa84f34dd80, 9.0, 580.159.04\n"
                "1, NVIDIA H200, GPU-f333da29-95e2-06f4-76d7-0bf1910d4604, 9.0, 580.159.04\n")


# --- the probe, without a cluster ---------------------------------------------------------------

def test_nvidia_smi_rows_are_read_as_recorded():
    rows = probe.parse_nvidia_smi(H200X2_QUERY)
    assert [(r["index"], r["name"], r["compute_capability"], r["driver"]) for r in rows] == [
        (0, "NVIDIA H200", "9.0", "580.159.04"), (1, "NVIDIA H200", "9.0", "580.159.04")]


@pytest.mark.parametrize("env, expected", [
    ({"NCCL_SOCKET_IFNAME": "enp1s0f1np1,enP2p1s0f1np1", "UCX_NET_DEVICES": "rocep1s0f1:1",
      "OMPI_MCA_btl_tcp_if_include": "enp1s0f1np1"}, ["enp1s0f1np1", "enP2p1s0f1np1"]),
    ({"NCCL_SOCKET_IFNAME": "^docker0,lo", "OMPI_MCA_btl_tcp_if_include": "10.0.0.0/24"}, []),
    ({"GLOO_SOCKET_IFNAME": "eth0", "UCX_NET_DEVICES": "eth0"}, ["eth0"]),
    ({}, []),
], ids=["spark", "exclusions-and-subnets", "tcp", "none"])
def test_the_interfaces_the_variables_name(env, expected):
    assert probe.configured_interfaces(env) == expected


def test_the_probe_runs_on_a_plain_host_and_hashes_the_manifest(tmp_path):
    """One rank without mpirun (this machine has no GPU: it says so, truthfully)."""
    manifest = tmp_path / MANIFEST
    manifest.write_text('{"files": []}')
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, str(ROOT / "trtllm_deploy" / "serving" / "probe.py"), "--manifest",
                           str(manifest), "--out", str(out)], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "NCCL_SOCKET_IFNAME": "lo"})
    assert done.returncode == 0, done.stderr
    gathered = probe.parse_output("[1,0]<stdout>:" + done.stdout)
    assert gathered == json.loads(out.read_text())
    rank = gathered["ranks"][0]
    assert rank["manifest"]["sha256"] == "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert rank["env"] == {"NCCL_SOCKET_IFNAME": "lo"}
    assert rank["interfaces"][0]["name"] == "lo" and "127.0.0.1" in rank["interfaces"][0]["ipv4"][0]


# --- the judgement ------------------------------------------------------------------------------

@pytest.mark.parametrize("values, expected", [
    ({"image": {"a": "x", "b": "x", "c": "x"}}, []),
    ({"image": {"a": "x", "b": "y", "c": "x"}}, [("image", "x", ["a", "c"], {"b": "y"})]),
    ({"driver": {"a": "1", "b": "2"}}, [("driver", None, [], {"a": "1", "b": "2"})]),
    ({"commit": {"a": None, "b": "c0ffee", "c": None}}, [("commit", None, ["a", "c"], {"b": "c0ffee"})]),
], ids=["uniform", "one-odd-of-three", "no-majority", "missing-counts-as-a-value"])
def test_drift_against_the_majority(values, expected):
    got = [(d.field, d.majority, d.majority_nodes, d.odd) for d in clustercheck.compare(values)]
    assert got == expected


def _rank(rank: int, node: str, image: str = "sha256:aa", iface: dict | None = None,
          env: dict | None = None) -> dict:
    return {"rank": rank, "node": node, "host": node, "driver": "580.95.05",
            "gpu": {"count": 1, "names": ["NVIDIA GB10"], "compute_capability": ["12.1"]},
            "runtime": {"version": "1.2.1", "commit": "abc"}, "image": {"id": image},
            "manifest": {"sha256": "sha256:m"}, "env": env if env is not None else {
                "NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0", "UCX_NET_DEVICES": "eth0",
                "OMPI_MCA_btl_tcp_if_include": "eth0", "OMPI_MCA_oob_tcp_if_include": "eth0",
                "TP_SOCKET_IFNAME": "eth0"},
            "interfaces": [iface or {"name": "eth0", "exists": True, "operstate": "up", "mtu": 9000,
                                     "speed_mbps": 200000, "ipv4": ["10.0.0.1/24"]}]}


@pytest.fixture
def three(tmp_path) -> inventory.Cluster:
    path = tmp_path / "hosts.toml"
    path.write_text("[defaults]\nfabric = { interfaces = [\"eth0\"] }\n" + "".join(
        f'[[nodes]]\nname = "s{i}"\naddress = "192.0.2.{i}"\n' + ('role = "head"\n' if i == 1 else "")
        for i in (1, 2, 3)))
    return inventory.load(path)


def test_the_odd_image_is_named_in_the_drift_table(three):
    report = clustercheck.evaluate(three, {"ranks": [
        _rank(0, "s1"), _rank(1, "s2", image="sha256:bb"), _rank(2, "s3")]})
    assert not report.ok
    assert [(d.field, d.majority, d.odd) for d in report.drifts] == [
        ("image", "sha256:aa", {"s2": "sha256:bb"})]
    console = Console(record=True, width=120)
    console.print(cluster_cli.drift_table(report.drifts))
    text = console.export_text()
    assert "image" in text and "sha256:aa (s1, s3)" in text and "s2: sha256:bb" in text


def test_each_nodes_own_checks(three):
    report = clustercheck.evaluate(three, {"ranks": [
        _rank(0, "s1"),
        _rank(1, "s2", env={"NCCL_SOCKET_IFNAME": "enp1s0f1np1"}),  # the head's, not its own
        _rank(2, "s3", iface={"name": "eth0", "exists": True, "operstate": "down", "mtu": 1500,
                              "speed_mbps": None, "ipv4": []})]})
    assert report.drifts == []
    assert report.problems["s1"] == []
    assert "NCCL_SOCKET_IFNAME='enp1s0f1np1', hosts.toml says 'eth0'" in report.problems["s2"]
    assert report.problems["s3"] == ["interface eth0 is down"]
    missing = clustercheck.evaluate(three, {"ranks": [_rank(0, "s1"), _rank(1, "s2")]})
    assert missing.problems["s3"] == ["no rank reported from this node"]


# The probe's nvidia-smi, held to the query it sends: it answers that query with the recording
# (H200X2_QUERY, or the recording with one field of one node changed) and refuses any other.
NVIDIA_SMI = """#!/bin/sh
[ "$*" = "--query-gpu=index,name,uuid,compute_cap,driver_version --format=csv,noheader" ] || {
    echo "nvidia-smi stand-in: only the probe's recorded query is answered, not: $*" >&2; exit 2; }
cat "$(dirname "$0")/query.csv"
"""
# A DGX Spark's one GPU: its name and compute capability as recorded (tests/data/nvidia-smi), in
# the first H200 row's place.
GB10_NAME, GB10_CC = (ROOT / "tests" / "data" / "nvidia-smi" / "gb10-query-name-compute_cap.noheader.csv"
                      ).read_text().strip().split(", ")
GB10_QUERY = H200X2_QUERY.splitlines()[0].replace("NVIDIA H200", GB10_NAME).replace(
    " 9.0,", f" {GB10_CC},") + "\n"
COMMIT = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"

# (case, the odd node, its nvidia-smi answer, its image's words, the drift rows expected)
ODD_ONE_OUT = [
    ("driver", "s2", H200X2_QUERY.replace("580.159.04", "580.95.05"), {},
     [("driver", "580.159.04", {"s2": "580.95.05"})]),
    ("GPU model", "s3", H200X2_QUERY.replace("NVIDIA H200", "NVIDIA H100 80GB HBM3"), {},
     [("GPU model", "NVIDIA H200", {"s3": "NVIDIA H100 80GB HBM3"})]),
    ("compute capability", "s1", GB10_QUERY, {},
     [("compute capability", "9.0", {"s1": GB10_CC}), ("GPU model", "NVIDIA H200", {"s1": GB10_NAME})]),
    ("TensorRT-LLM version", "s2", H200X2_QUERY, {"TRT_LLM_VERSION": "1.1.0"},
     [("TensorRT-LLM version", "1.2.0rc2", {"s2": "1.1.0"})]),
    ("TensorRT-LLM commit", "s3", H200X2_QUERY, {"TRT_LLM_GIT_COMMIT": "0" * 40},
     [("TensorRT-LLM commit", COMMIT, {"s3": "0" * 40})]),
]


def _probe_on(tmp_path: Path, node: inventory.Node, query: str, image_env: dict) -> dict:
    """The real probe, one rank as on ``node``: its nvidia-smi answers ``query``, its image says
    ``image_env``, its fabric variables are its hosts.toml ones (so only the drift is wrong)."""
    bin_dir = tmp_path / node.name / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "query.csv").write_text(query)
    (bin_dir / "nvidia-smi").write_text(NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TRTLLM_DEPLOY_NODE": node.name,
           "TRTLLM_DEPLOY_IMAGE_ID": "sha256:" + "ab" * 32, "TRT_LLM_VERSION": "1.2.0rc2",
           "TRT_LLM_GIT_COMMIT": COMMIT,
           **clustercheck.fabric.fabric_env(node, clustercheck.runtime.default()), **image_env}
    done = subprocess.run([sys.executable, str(ROOT / "trtllm_deploy" / "serving" / "probe.py")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    (rank,) = probe.parse_output(done.stdout)["ranks"]
    assert rank["gpu"]["source"] == "nvidia-smi", rank["gpu"]
    return rank


@pytest.mark.parametrize("case, odd, query, image_env, expected", ODD_ONE_OUT,
                         ids=[case for case, *_ in ODD_ONE_OUT])
def test_the_odd_driver_gpu_or_tensorrt_llm_is_named_against_the_majority_and_exits_1(
        tmp_path, monkeypatch, case, odd, query, image_env, expected):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[defaults]\nfabric = { interfaces = ["lo"] }\n' + "".join(
        f'[[nodes]]\nname = "s{i}"\naddress = "192.0.2.{i}"\n' + ('role = "head"\n' if i == 1 else "")
        for i in (1, 2, 3)))
    cluster = inventory.load(hosts)
    ranks = []
    for index, node in enumerate(cluster.nodes):
        rank = _probe_on(tmp_path, node, query if node.name == odd else H200X2_QUERY,
                         image_env if node.name == odd else {})
        ranks.append({**rank, "rank": index, "size": 3})
    report = clustercheck.evaluate(cluster, {"size": 3, "ranks": ranks})
    assert report.problems == {"s1": [], "s2": [], "s3": []}
    majority = [name for name in ("s1", "s2", "s3") if name != odd]
    assert [(d.field, d.majority, d.majority_nodes, d.odd) for d in report.drifts] == [
        (field, value, majority, odd_value) for field, value, odd_value in expected]
    console = Console(record=True, width=160)
    console.print(cluster_cli.drift_table(report.drifts))
    text = console.export_text()
    for field, value, odd_value in expected:
        row = next(line for line in text.splitlines() if f"│ {field} " in line)
        shown, odd_shown = cluster_cli._short(value), cluster_cli._short(odd_value[odd])
        assert f"{shown} ({', '.join(majority)})" in row and f"{odd}: {odd_shown}" in row, text

    # Through the task: the gathered report is this one (mpirun's part is the testbed tests').
    monkeypatch.chdir(tmp_path)  # no lock file here: only the drift decides
    monkeypatch.setattr(clustercheck, "run", lambda *args, **kwargs: report)
    with pytest.raises(Exit) as caught:
        cluster_cli.check(Context(), hosts=str(hosts))
    assert caught.value.code == 1
    assert caught.value.message == (f"cluster.check: {', '.join(field for field, *_ in expected)}"
                                     f" differ or failed on {odd}")


UNFIXED = ('[source]\nrepository = "https://github.com/NVIDIA/TensorRT-LLM.git"\n[build]\nkind = "source"\n'
           '[[fixes]]\npr = 12902\nneeded_for = "several"\nmissing = "not in the pinned history"\n')


def test_a_pin_without_a_multi_node_fix_fails_the_check_across_nodes_and_warns_on_one(three, tmp_path):
    """Judged before any container starts (the nodes here, 192.0.2.x, are never reached)."""
    lock = tmp_path / "lock.toml"
    lock.write_text(UNFIXED)
    lockfile = locks.load(lock)
    across = clustercheck.lock_checks(three, "x:1", lockfile)
    assert not across.ok and "(#12902): not in the pinned history" in across.fixes
    assert across.digests == [] and across.as_json()["fixes"] == across.fixes
    one = clustercheck.lock_checks(replace(three, nodes=three.nodes[:1]), "x:1", lockfile)
    assert one.ok and one.fixes is None and "(#12902)" in one.warnings[0]
    lock.write_text(UNFIXED.replace('missing = "not in the pinned history"\n', ""))
    assert clustercheck.lock_checks(three, "x:1", locks.load(lock)).ok


# --- on the testbed, through the task ------------------------------------------------------------

def _check(hosts: Path, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    (tmp_path / "tasks.py").write_text("from invoke import Collection\n"
                                       "from trtllm_deploy.cli import cluster\n"
                                       "ns = Collection()\nns.add_collection(cluster.ns)\n")
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(tmp_path),
                           "cluster.check", "--hosts", str(hosts), *flags],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})


@pytest.fixture(scope="module")
def bed(testbed):
    bed, report = testbed
    cluster = bed.inventory()
    authorize_head_key(cluster)
    return bed, cluster, report.runtime.tag


def _on(node: inventory.Node, argv: list[str]) -> str:
    target = SSH(node)
    try:
        return target.run(argv, timeout=120).stdout
    finally:
        target.close()


@needs_docker
def test_a_uniform_cluster_passes(bed, tmp_path):
    testbed, cluster, image = bed
    done = _check(testbed.layout.hosts_file, tmp_path, "--json")
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(done.stdout)
    assert report["ok"] and report["drift"] == [] and report["nodes"] == ["spark-1", "spark-2", "spark-3"]
    ids = {rank["image"]["id"] for rank in report["ranks"]}
    assert len(ids) == 1 and ids.pop().startswith("sha256:")
    assert all(rank["runtime"]["standin"] for rank in report["ranks"])
    assert [rank["host"] for rank in report["ranks"]] == ["spark-1", "spark-2", "spark-3"]
    for outcome in clustercheck.containers.status(cluster, clustercheck.JOB):
        assert outcome.value == []  # the check's containers are gone afterwards


@needs_docker
def test_a_node_with_another_image_under_the_same_tag_is_the_odd_one_out(bed, tmp_path):
    testbed, cluster, image = bed
    odd = cluster.nodes[2]
    original = _on(odd, ["docker", "image", "inspect", "--format", "{{.Id}}", image]).strip()
    # The stand-in built again on the node under the same tag, saying it is another TensorRT-LLM
    # (the OCI labels the probe is told): a stale image, and its TensorRT-LLM drift rows.
    _on(odd, ["sh", "-c", 'printf "FROM %s\\nLABEL org.opencontainers.image.version=0.21.0'
              ' org.opencontainers.image.revision=0123abc\\n" "$1" | docker build -q -t "$1" -', "sh", image])
    try:
        done = _check(testbed.layout.hosts_file, tmp_path)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "drift: the nodes disagree" in done.stdout
        line = next(line for line in done.stdout.splitlines() if "│ image" in line)
        assert "(spark-1, spark-2)" in line and "spark-3: sha256:" in line
        rows = {field: [line for line in done.stdout.splitlines() if f"│ {field} " in line]
                for field in ("TensorRT-LLM version", "TensorRT-LLM commit")}
        assert all(rows.values()), f"a drift row is missing:\n{done.stdout}"
        assert "(spark-1, spark-2)" in rows["TensorRT-LLM version"][0]
        assert "spark-3: 0.21.0" in rows["TensorRT-LLM version"][0]
        assert "– (spark-1, spark-2)" in rows["TensorRT-LLM commit"][0]
        assert "spark-3: 0123abc" in rows["TensorRT-LLM commit"][0]
        assert ("cluster.check: image, TensorRT-LLM version, TensorRT-LLM commit differ or failed on"
                " spark-3") in done.stderr
    finally:
        _on(odd, ["sh", "-c", 'new=$(docker image inspect --format "{{.Id}}" "$2"); docker tag "$1" "$2"'
                  ' && docker rmi "$new" >/dev/null', "sh", original, image])


@needs_docker
def test_a_node_with_another_manifest_is_refused_by_name(bed, tmp_path):
    testbed, cluster, _ = bed
    name = "drift-check-artifact"
    for index, node in enumerate(cluster.nodes):
        body = '{"files": [], "note": "%s"}' % ("other" if index == 1 else "same")
        _on(node, ["sh", "-c", 'mkdir -p "$1" && printf %s "$2" > "$1/$3"', "sh",
                   f"trtllm-deploy/engines/{name}", body, MANIFEST])
    try:
        done = _check(testbed.layout.hosts_file, tmp_path, "--name", name, "--json")
        assert done.returncode == 1, done.stderr
        report = json.loads(done.stdout)
        assert [(d["field"], list(d["odd"]), d["majority_nodes"]) for d in report["drift"]] == [
            ("artifact manifest", ["spark-2"], ["spark-1", "spark-3"])]
        same = "sha256:" + hashlib.sha256(b'{"files": [], "note": "same"}').hexdigest()
        assert report["drift"][0]["majority"] == same
    finally:
        for node in cluster.nodes:
            _on(node, ["rm", "-rf", f"trtllm-deploy/engines/{name}"])


def test_bad_input_exits_2_before_touching_a_node(tmp_path):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[[nodes]]\nname = "a"\naddress = "192.0.2.1"\n')
    done = _check(hosts, tmp_path, "--name", "../etc")
    assert done.returncode == 2, done.stderr
    assert "artifact name '../etc' is not valid" in done.stderr and "Traceback" not in done.stderr


def test_a_long_report_survives_mpiruns_tags_inside_its_lines():
    """mpirun forwards a long line in pieces, tagging each; the probe prints short numbered lines."""
    report = {"size": 6, "ranks": [{"rank": i, "host": f"spark-{i}", "pad": "x" * 900} for i in range(6)]}
    text = json.dumps(report, sort_keys=True)
    pieces = [text[at:at + probe.CHUNK] for at in range(0, len(text), probe.CHUNK)]
    printed = "".join(f"[1,0]<stdout>:{probe.MARKER}{i}/{len(pieces)} {piece}\n"
                      for i, piece in enumerate(pieces))
    assert probe.parse_output("noise\n" + printed) == report
    with pytest.raises(ValueError):
        probe.parse_output(printed.split("\n", 1)[1])  # a piece missing: no half report
