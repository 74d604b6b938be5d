"""The artifact manifest: what create records, what verify catches, and what its cache may skip."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import past_the_clock_tick
from trtllm_deploy.artifact import manifest

PROVENANCE = {"model": "meta-llama/Llama-3.1-8B-Instruct", "revision": "0e9e39f", "precision": "bf16",
              "tp": 1, "backend": "pytorch", "trtllm_commit": "a" * 40, "cuda_archs": "121-real"}


def tree(root: Path) -> Path:
    (root / "tokenizer").mkdir(parents=True)
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    (root / "tokenizer" / "tokenizer.json").write_text('{"model": {}}\n')
    (root / "llm-api.yaml").write_text("kv_cache_config:\n  free_gpu_memory_fraction: 0.8\n")
    (root / "model-00001-of-00002.safetensors").write_bytes(os.urandom(manifest.CHUNK_BYTES + 4097))
    (root / "model-00002-of-00002.safetensors").write_bytes(os.urandom(70_000))
    return root


@pytest.fixture
def artifact(tmp_path) -> Path:
    root = tree(tmp_path / "artifact")
    manifest.write(root, manifest.create(root, PROVENANCE))
    past_the_clock_tick(root)  # files older than the check are cacheable
    return root


def kinds(problems) -> list[tuple[str, str]]:
    return [(p["kind"], p["path"]) for p in problems]


def test_the_manifest_lists_every_file_with_size_and_hash_and_is_deterministic(artifact):
    written = (artifact / manifest.MANIFEST).read_text()
    data = json.loads(written)
    assert data["algorithm"] == "sha256-chunked" and data["provenance"] == PROVENANCE
    assert sorted(data["files"]) == ["config.json", "llm-api.yaml", "model-00001-of-00002.safetensors",
                                     "model-00002-of-00002.safetensors", "tokenizer/tokenizer.json"]
    config = (artifact / "config.json").read_bytes()
    assert data["files"]["config.json"] == {
        "size": len(config),
        "hash": hashlib.sha256(hashlib.sha256(config).digest()).hexdigest()}
    big = (artifact / "model-00001-of-00002.safetensors").read_bytes()
    chunks = [big[i:i + manifest.CHUNK_BYTES] for i in range(0, len(big), manifest.CHUNK_BYTES)]
    assert len(chunks) == 2
    assert data["files"]["model-00001-of-00002.safetensors"]["hash"] == hashlib.sha256(
        b"".join(hashlib.sha256(c).digest() for c in chunks)).hexdigest()
    assert data["total_bytes"] == sum(f["size"] for f in data["files"].values())
    assert manifest.dumps(manifest.create(artifact, dict(reversed(PROVENANCE.items())))) == written
    assert manifest.verify(artifact) == []


def _missing(root: Path) -> None:
    (root / "tokenizer" / "tokenizer.json").unlink()


def _extra(root: Path) -> None:
    (root / "notes.txt").write_text("left behind\n")


def _grown(root: Path) -> None:
    with open(root / "config.json", "a") as handle:
        handle.write(" ")


def _same_size_same_mtime(root: Path) -> None:
    shard = root / "model-00002-of-00002.safetensors"
    before = shard.stat()
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert shard.stat().st_size == before.st_size and shard.stat().st_mtime_ns == before.st_mtime_ns


def _replaced_by_escaping_symlink(root: Path) -> None:
    (root / "config.json").unlink()
    (root / "config.json").symlink_to("/etc/passwd")


def _second_chunk_changed(root: Path) -> None:
    shard = root / "model-00001-of-00002.safetensors"
    with open(shard, "r+b") as handle:
        handle.seek(manifest.CHUNK_BYTES + 10)
        byte = handle.read(1)
        handle.seek(manifest.CHUNK_BYTES + 10)
        handle.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = [
    pytest.param(_missing, [("missing", "tokenizer/tokenizer.json")], id="missing-file"),
    pytest.param(_extra, [("extra", "notes.txt")], id="extra-file"),
    pytest.param(_grown, [("size", "config.json")], id="size-changed"),
    pytest.param(_same_size_same_mtime, [("hash", "model-00002-of-00002.safetensors")],
                 id="content-changed-size-and-mtime-restored"),
    pytest.param(_second_chunk_changed, [("hash", "model-00001-of-00002.safetensors")],
                 id="content-changed-in-a-later-chunk"),
    pytest.param(_replaced_by_escaping_symlink, [("symlink", "config.json")], id="symlink-escapes"),
]


@pytest.mark.parametrize("cached", [False, True], ids=["cold", "cache-warm"])
@pytest.mark.parametrize("damage, expected", DAMAGE)
def test_verify_names_each_problem(artifact, damage, expected, cached):
    if cached:
        assert manifest.verify(artifact) == []  # fills the cache with the good state
    damage(artifact)
    assert kinds(manifest.verify(artifact)) == expected
    assert kinds(manifest.verify(artifact)) == expected  # and again, from whatever is cached


@pytest.mark.parametrize("content, reason", [
    (None, "is missing"),
    ("{not json", "not readable JSON"),
    ('{"format": 1, "algorithm": "md5", "files": {}}', "not a format-1"),
    ('{"format": 1, "algorithm": "sha256-chunked", "chunk_bytes": 67108864, "files": {"a": 3}}',
     "not a format-1"),
], ids=["missing", "not-json", "other-algorithm", "bad-entry"])
def test_a_missing_or_corrupt_manifest_is_one_named_problem(artifact, content, reason):
    path = artifact / manifest.MANIFEST
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    problems = manifest.verify(artifact)
    assert kinds(problems) == [("manifest", manifest.MANIFEST)]
    assert reason in problems[0]["detail"]


def test_a_second_verification_reads_nothing_and_a_touched_file_is_read_again(artifact):
    first = manifest.check(artifact)
    assert first.ok and first.hashed == 5 and first.cached == 0
    second = manifest.check(artifact)
    assert second.ok and second.hashed == 0 and second.cached == 5
    os.utime(artifact / "config.json")  # mtime only: the content is the same, it is still re-read
    third = manifest.check(artifact)
    assert third.ok and third.hashed == 1 and third.cached == 4


def test_a_file_changed_in_the_same_clock_tick_as_the_check_is_not_cached(artifact, monkeypatch):
    """A later write in that tick would leave its ctime unchanged, so such an entry is not kept."""
    config = artifact / "config.json"
    config.write_bytes(config.read_bytes())
    monkeypatch.setattr(manifest, "_clock_now", lambda root: config.stat().st_ctime_ns)
    assert manifest.check(artifact).hashed == 5
    monkeypatch.undo()
    again = manifest.check(artifact)
    assert again.ok and again.hashed == 1 and again.cached == 4


def test_a_damaged_cache_only_costs_a_full_read(artifact):
    manifest.check(artifact)
    (artifact / manifest.CACHE).write_text("garbage")
    report = manifest.check(artifact)
    assert report.ok and report.hashed == 5


def _hashed_without_write_permission(artifact: Path) -> int:
    """How many files a check of the read-only ``artifact`` hashed. Root writes to read-only
    directories (CI runs as root): there the check runs as root without the capabilities that
    override file permissions (util-linux's setpriv), as a user other than the owner would."""
    if os.geteuid() != 0:
        return manifest.check(artifact).hashed
    done = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--",
                           sys.executable, "-S", manifest.__file__, "verify", str(artifact)],
                          capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, cwd="/")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["hashed"]


def test_a_read_only_artifact_is_verified_in_full_every_time(artifact):
    artifact.chmod(0o555)
    try:
        assert _hashed_without_write_permission(artifact) == 5
        assert _hashed_without_write_permission(artifact) == 5
    finally:
        artifact.chmod(0o755)
    assert manifest.check(artifact).hashed == 5 and manifest.check(artifact).hashed == 0  # writable


def test_the_command_line_prints_json_and_exits_0_or_1(artifact):
    script = manifest.__file__  # run as a plain script, as a node does: no trtllm_deploy on its path
    env = {"PATH": os.environ["PATH"]}
    done = subprocess.run([sys.executable, "-S", script, "verify", str(artifact)],
                          capture_output=True, text=True, env=env, cwd="/")
    assert done.returncode == 0 and json.loads(done.stdout)["ok"], done.stderr
    _extra(artifact)
    done = subprocess.run([sys.executable, "-S", script, "verify", str(artifact)],
                          capture_output=True, text=True, env=env, cwd="/")
    assert done.returncode == 1 and kinds(json.loads(done.stdout)["problems"]) == [("extra", "notes.txt")]
    assert subprocess.run([sys.executable, "-S", script, "frobnicate"], capture_output=True).returncode == 2
