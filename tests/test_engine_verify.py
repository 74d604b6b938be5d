"""``invoke engine.verify`` against real sshd nodes, each verifying its own copy of an artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import past_the_clock_tick
from trtllm_deploy.artifact import manifest, verify

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = "tiny-llama-bf16-tp1"


def make_artifact(home: Path) -> Path:
    root = home / "trtllm-deploy" / "engines" / ARTIFACT
    (root / "tokenizer").mkdir(parents=True)
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    (root / "tokenizer" / "tokenizer.json").write_text('{"model": {}}\n')
    (root / "model-00001-of-00002.safetensors").write_bytes(os.urandom(3 << 20))
    (root / "model-00002-of-00002.safetensors").write_bytes(os.urandom(1 << 20))
    manifest.write(root, manifest.create(root, {"model": "tiny-llama", "tp": 1}))
    return root


def run_verify(hosts: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "engine.verify",
                           "--hosts", str(hosts), *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)


@pytest.fixture
def two_nodes(sshd_factory, hosts_file):
    servers = [sshd_factory(), sshd_factory()]
    roots = [make_artifact(server.home) for server in servers]
    past_the_clock_tick(*roots)  # so that the first verification may be cached
    return hosts_file(servers), roots, servers


def test_both_nodes_good_then_one_corrupted(two_nodes):
    hosts, roots, servers = two_nodes
    done = run_verify(hosts, "--name", ARTIFACT, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and set(report["nodes"]) == {"node-0", "node-1"}
    for node in report["nodes"].values():
        assert node["ok"] and node["files"] == 4 and node["hashed"] == 4

    shard = roots[1] / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[12345] ^= 0xFF
    stat = shard.stat()
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: still caught

    done = run_verify(hosts, "--name", ARTIFACT)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "node-1" in done.stderr and "node-0" not in done.stderr
    assert "model-00002-of-00002.safetensors: hash" in done.stdout

    done = run_verify(hosts, "--name", ARTIFACT, "--json")
    nodes = json.loads(done.stdout)["nodes"]
    assert nodes["node-0"]["ok"] and nodes["node-0"]["cached"] == 4 and nodes["node-0"]["hashed"] == 0
    assert [p["path"] for p in nodes["node-1"]["problems"]] == ["model-00002-of-00002.safetensors"]
    # The cache records what a file holds, not that it passed: the mismatch is still reported.
    assert nodes["node-1"]["hashed"] == 0 and not nodes["node-1"]["ok"]


def test_the_script_is_sent_once_and_again_only_when_it_changes(two_nodes):
    hosts, _, servers = two_nodes
    assert run_verify(hosts, "--name", ARTIFACT).returncode == 0
    _, filename = verify._script()
    staged = servers[0].home / ".cache" / "trtllm-deploy" / filename
    assert staged.exists() and oct(staged.parent.stat().st_mode & 0o777) == "0o700"
    sent = staged.stat().st_mtime_ns
    assert run_verify(hosts, "--name", ARTIFACT).returncode == 0
    assert staged.stat().st_mtime_ns == sent


def test_a_missing_artifact_fails_and_bad_names_are_refused(two_nodes):
    hosts, roots, _ = two_nodes
    done = run_verify(hosts, "--name", "no-such-artifact", "--nodes", "node-0")
    assert done.returncode == 1 and "no such artifact directory" in done.stdout
    for bad in ("../etc", "a/b", "", ".."):
        done = run_verify(hosts, "--name", bad)
        assert done.returncode == 2, (bad, done.stdout, done.stderr)
        assert "not valid" in done.stderr and "Traceback" not in done.stderr
