"""``invoke push`` for real: testbed nodes (sshd and their own Docker engine) receiving artifacts and
images, with bytes counted, interrupted transfers, a full disk, corruption and layer-wise images.

Traffic goes only to loopback and to the testbed's own addresses (TESTING.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import docker_unusable
from trtllm_deploy import push as pushing
from trtllm_deploy.artifact import manifest, verify
from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.hosts import inventory
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.push import agent, channel, files, layers, reports

ROOT = Path(__file__).resolve().parents[1]
# The task as a command line, through invoke's own parser (tasks.py adds the same task).
PROGRAM = ("import sys; from invoke import Collection, Program; from trtllm_deploy.cli.push import push;"
           " Program(namespace=Collection(push)).run(['invoke', *sys.argv[1:]])")
MiB = 1 << 20

needs_docker = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


def run_push(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", PROGRAM, "push", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def make_artifact(store: Path, name: str, sizes: dict[str, int], seed: int = 0) -> Path:
    root = store / name
    for path, size in sizes.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(os.urandom(size))
    manifest.write(root, manifest.create(root, {"model": name, "seed": seed}))
    return root


def rewrite(root: Path, path: str, size: int) -> None:
    (root / path).write_bytes(os.urandom(size))
    manifest.write(root, manifest.create(root, {"model": root.name}))


# --- planning and parsing, pure ---------------------------------------------------------------

WANTED = {"files": {"a": {"size": 100, "hash": "x"}, "b": {"size": 50, "hash": "y"},
                    "c/d": {"size": 10, "hash": "z"}}}


@pytest.mark.parametrize("seen, actions, to_send", [
    ({}, {"a": "send", "b": "send", "c/d": "send"}, 160),
    ({"a": {"current": True}, "b": {"current": True}, "c/d": {"current": True}},
     {"a": "link", "b": "link", "c/d": "link"}, 0),
    ({"a": {"partial": 40}, "b": {"current": True}}, {"a": "resume", "b": "link", "c/d": "send"}, 70),
    ({"a": {"staged": True, "current": True}, "b": {"partial": 50}},
     {"a": "staged", "b": "send", "c/d": "send"}, 60),
    ({"a": {"partial": 0}}, {"a": "send", "b": "send", "c/d": "send"}, 160),
], ids=["cold", "all-in-current", "resume-a-partial-file", "staged-wins-full-size-partial-resent",
        "empty-partial"])
def test_a_survey_becomes_a_plan(seen, actions, to_send):
    planned = files.plan("n", "art", WANTED, {"files": seen, "free": 1 << 20, "exists": True})
    assert {step.path: step.action for step in planned.steps} == actions
    assert planned.send_bytes == to_send and planned.total_bytes == 160
    assert planned.fits


def test_a_plan_that_does_not_fit_says_so():
    planned = files.plan("n", "art", WANTED, {"files": {}, "free": 100})
    assert not planned.fits and planned.needed >= 160
    assert "100 B free" in str(files.no_room(inventory.Node(name="n"), planned))


FULL = {"ok": False, "kind": "full", "error": "b: No space left on device"}
CUT = {"ok": False, "kind": "truncated", "error": "the stream ended inside a"}


@pytest.mark.parametrize("parts", [
    pytest.param([{"ok": True}, CUT, FULL], id="a-part-filled-the-disk-another-was-cut"),
    pytest.param([FULL, CUT, CUT], id="the-receive-filled-the-disk"),
    pytest.param([CUT, FULL], id="cut-first-full-after"),
])
def test_the_reason_a_push_failed_is_the_stream_that_failed_not_the_ones_it_cut(parts):
    """Whichever stream hits a full disk first, the others are ended mid-stream: the node's report
    names the full disk (which push turns into "filled up"), not a cut stream."""
    assert agent._commit(None, "/nonexistent", "x", {}, parts) == FULL


def test_the_sender_takes_a_parts_reason_when_the_receive_could_not_hear_it():
    """The receive's own report is cut or missing (it never got the end record with the parts'
    reports): a part's own reason, as its channel brought it back, is the push's reason."""
    assert reports.reason_in([{"ok": True}, CUT, FULL]) == FULL
    assert reports.reason_in([CUT, {"ok": True}]) is None and reports.reason_in(None) is None
    assert reports.report_in('{"ready": true}\n' + json.dumps(FULL) + "\n") == FULL
    assert reports.report_in("ssh: connect to host x: Connection reset\n") is None


@pytest.mark.parametrize("first", [False, True], ids=["over-the-current-version", "the-first-version"])
def test_staging_becomes_current_by_an_exchange_synced_on_both_sides(tmp_path, monkeypatch, first):
    """The node's own commit, run here: the name never goes missing (no remove or rename of the
    current version, only the exchange), the new version's directories are synced before the swap
    and the folder holding the name after it, and the report says the swap was atomic."""
    artifacts = tmp_path / "engines"
    new = make_artifact(tmp_path / "new", "art", {"w": 3000, "sub/t.json": 100}, seed=2)
    if not first:
        make_artifact(artifacts, "art", {"w": 1000, "old-only": 10}, seed=1)
    artifacts.mkdir(exist_ok=True)
    current, staging = artifacts / "art", Path(agent.staging_of(str(artifacts), "art"))
    wanted = manifest.load(new)
    os.rename(new, staging)
    staged = os.stat(staging).st_ino
    gone, synced = [], []

    def watched(name, real):
        def call(*args, **kwargs):
            done = real(*args, **kwargs)
            if not first and not os.path.lexists(current):
                gone.append((name, args))
            return done
        return call

    for name in ("rename", "replace", "rmdir", "unlink", "removedirs"):
        monkeypatch.setattr(os, name, watched(name, getattr(os, name)))
    real_fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
        swapped = os.path.exists(current) and os.stat(current).st_ino == staged
        synced.append((path, swapped))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)

    parts = [{"ok": True, "hashed": {}, "received": 0, "written": []}]
    report = agent._commit(manifest, str(artifacts), "art", wanted, parts)
    assert report["ok"] and report["atomic"] is True, report
    assert gone == [], f"the current version's name went missing during the swap: {gone}"
    assert os.stat(current).st_ino == staged and not staging.exists()
    assert manifest.check(current, wanted).ok and not (current / "old-only").exists()
    assert (str(artifacts.resolve()), True) in synced, f"{artifacts} was not synced after the swap: {synced}"
    for folder in (staging, staging / "sub"):
        assert (str(folder.resolve()), False) in synced, f"{folder} was not synced before the swap: {synced}"


def test_layer_chains_and_node_facts():
    chains = layers.chain_ids(["sha256:a", "sha256:b"])
    assert chains[0] == "sha256:a" and chains[1].startswith("sha256:") and len(chains[1]) == 71
    got, labels, held = layers.parse_facts('sha256:1 {"x":"1"}', '["sha256:a"]\n["sha256:a","sha256:b"]\n')
    assert (got, labels) == ("sha256:1", {"x": "1"}) and held == set(chains)
    assert layers.parse_facts("", "") == (None, {}, set())


# --- bad input: exit 2, nothing run anywhere --------------------------------------------------

def test_bad_input_exits_2(tmp_path):
    store = tmp_path / "engines"
    make_artifact(store, "good", {"w": 10})
    (store / "no-manifest").mkdir()
    damaged = make_artifact(store, "damaged", {"w": 10})
    (damaged / "w").write_bytes(b"short")
    hosts = tmp_path / "missing-hosts.toml"
    for args, words in [((), "nothing to push"), (("--name", "../etc"), "not valid"),
                        (("--name", "absent"), "no artifact absent"),
                        (("--name", "no-manifest"), "no manifest"),
                        (("--name", "damaged"), "does not match its manifest"),
                        (("--image", "sha256:" + "0" * 64), "not an image name"),
                        (("--image", "Bad Name:0"), "not an image name"),
                        (("--name", "damaged", "--streams", "0"), "--streams 0")]:
        done = run_push("--store", str(store), "--hosts", str(hosts), *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert words in done.stderr and "Traceback" not in done.stderr


# --- on the testbed ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bed(testbed):
    testbed_, _ = testbed
    return testbed_


def node_sh(bed, index: int, script: str, user: str = "spark") -> str:
    done = subprocess.run(["docker", "exec", "-u", user, bed.layout.container(index), "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def verified(bed, name: str, nodes: tuple) -> dict:
    cluster = bed.inventory()
    result = verify.verify(cluster, tuple(cluster.node(n) for n in nodes), name)
    return {o.node.name: o.value for o in result}


@needs_docker
def test_cold_then_unchanged_then_one_changed_file(bed, tmp_path):
    store = tmp_path / "engines"
    root = make_artifact(store, "push-basic", {"config.json": 300, "model-1.safetensors": 3 * MiB,
                                               "model-2.safetensors": 2 * MiB,
                                               "tokenizer/tokenizer.json": 4000})
    total = sum(e["size"] for e in manifest.load(root)["files"].values())
    hosts = str(bed.layout.hosts_file)
    args = ("--store", str(store), "--name", "push-basic", "--hosts", hosts, "--nodes", "spark-2,spark-3")

    done = run_push(*args, "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)["nodes"]
    assert plan["spark-2"]["artifact"]["send_bytes"] == total
    assert node_sh(bed, 2, "ls ~/trtllm-deploy/engines 2>/dev/null || true").strip() == ""

    done = run_push(*args, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    for node in ("spark-2", "spark-3"):
        assert report["nodes"][node]["artifact"]["action"] == "sent"
        # The stream's framing (a JSON line per file) is all that is sent beyond the files.
        assert total <= report["nodes"][node]["bytes_sent"] < total + 8192
        assert report["nodes"][node]["artifact"]["streams"] == 1  # 5 MiB: one connection is enough
    assert all(v.ok for v in verified(bed, "push-basic", ("spark-2", "spark-3")).values())
    inode = node_sh(bed, 2, "stat -c %i ~/trtllm-deploy/engines/push-basic/model-1.safetensors")

    done = run_push(*args, "--json")
    report = json.loads(done.stdout)
    for node in ("spark-2", "spark-3"):
        assert report["nodes"][node]["artifact"]["action"] == "up to date"
        assert report["nodes"][node]["bytes_sent"] == 0

    rewrite(root, "model-2.safetensors", 2 * MiB)
    done = run_push(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "spark-2" in done.stdout and "updated" in done.stdout
    done = run_push(*args, "--json")  # and now it is up to date again
    assert json.loads(done.stdout)["nodes"]["spark-3"]["bytes_sent"] == 0
    # The unchanged shard was kept (the same inode), not sent again.
    assert node_sh(bed, 2, "stat -c %i ~/trtllm-deploy/engines/push-basic/model-1.safetensors") == inode
    assert node_sh(bed, 2, "ls -a ~/trtllm-deploy/engines").split() == [
        ".", "..", ".push-basic.push.lock", "push-basic"]


@needs_docker
def test_one_changed_file_is_sent_alone_and_a_corrupted_one_is_resent(bed, tmp_path):
    store = tmp_path / "engines"
    root = make_artifact(store, "push-delta", {f"shard-{i}": MiB for i in range(4)})
    cluster = bed.inventory()
    node = cluster.node("spark-2")
    src = pushing.source(store, "push-delta")
    assert not pushing.push([node], src).failed

    rewrite(root, "shard-1", MiB)
    src = pushing.source(store, "push-delta")
    counted = pushing.Counter()
    result = pushing.push([node], src, progress=counted)["spark-2"].value
    assert result.artifact.files_sent == 1
    assert MiB <= counted.sent["spark-2"] == result.bytes_sent < 1.01 * MiB

    # A byte flipped on the node, size and mtime kept: found by its hash and sent again, alone.
    node_sh(bed, 2, "f=~/trtllm-deploy/engines/push-delta/shard-3; t=$(stat -c %y $f);"
                    " printf Z | dd of=$f bs=1 seek=1000 conv=notrunc 2>/dev/null; touch -d \"$t\" $f")
    assert not verified(bed, "push-delta", ("spark-2",))["spark-2"].ok
    result = pushing.push([node], src)["spark-2"].value
    assert result.artifact.files_sent == 1 and MiB <= result.bytes_sent < 1.01 * MiB
    assert verified(bed, "push-delta", ("spark-2",))["spark-2"].ok


FRAMING = 64 << 10  # at most, of a push's header records and manifest beside the file bytes


def resumed(bed, index: int, root: Path, src, below: int, **options) -> files.ArtifactSent:
    """Push again to node ``index`` after an interruption: it continues (sending fewer than ``below``
    bytes) and the node ends up with exactly the artifact under ``root``."""
    node = bed.inventory().node(f"spark-{index}")
    counted = pushing.Counter()
    result = pushing.push([node], src, progress=counted, **options)[node.name].value.artifact
    assert result.action == "resumed"
    assert counted.sent[node.name] < below, counted.sent
    assert verified(bed, root.name, (node.name,))[node.name].ok
    on_node = node_sh(bed, index, f"cat ~/trtllm-deploy/engines/{root.name}/{manifest.MANIFEST}")
    assert json.loads(on_node)["files"] == manifest.load(root)["files"]
    return result


def _staged(bed, index: int, name: str, file: str) -> int:
    """Bytes of ``file`` in the node's staging of artifact ``name`` (0: none yet)."""
    size = node_sh(bed, index, f"stat -c '%s' ~/trtllm-deploy/engines/.{name}.push/{file} 2>/dev/null "
                               "|| true")
    return int(size.strip() or 0)


def _once_landed(bed, index: int, name: str, file: str) -> None:
    """Wait until the node has written a whole block of ``file`` (it writes each agent.BLOCK once
    it is whole), so that an interruption now leaves something to continue from."""
    deadline = time.monotonic() + 60
    while _staged(bed, index, name, file) < agent.BLOCK:  # each look is a `docker exec`: no sleep
        assert time.monotonic() < deadline, f"no whole block of {file} ever landed on spark-{index}"


def _kill_channels_after(limit: int, landed=lambda: None):
    """A progress callback that kills the running ssh transfer (a process this test started)
    once ``limit`` bytes have gone into it and ``landed()`` has returned, as a dropped link or a
    killed node would."""
    seen = {"sent": 0, "killed": 0}

    def progress(node: str, count: int) -> None:
        seen["sent"] += count
        if seen["sent"] >= limit and not seen["killed"]:
            landed()
            with channel._lock:
                procs = list(channel._open)
            for proc in procs:
                os.killpg(proc.pid, signal.SIGKILL)
            seen["killed"] = len(procs)

    return progress, seen


@needs_docker
def test_an_interrupted_push_resumes_and_the_old_version_serves_meanwhile(bed, tmp_path):
    store = tmp_path / "engines"
    root = make_artifact(store, "push-resume", {"small": 1000, "big.safetensors": 12 * MiB})
    cluster = bed.inventory()
    node = cluster.node("spark-3")
    assert not pushing.push([node], pushing.source(store, "push-resume")).failed
    old = manifest.load(root)

    rewrite(root, "big.safetensors", 12 * MiB)
    src = pushing.source(store, "push-resume")
    progress, seen = _kill_channels_after(agent.BLOCK + MiB,
                                          lambda: _once_landed(bed, 3, "push-resume", "big.safetensors"))
    broken = pushing.push([node], src, progress=progress)
    assert seen["killed"] == 1
    assert "push again to send only the rest" in broken["spark-3"].reason
    kept = _staged(bed, 3, "push-resume", "big.safetensors")
    assert agent.BLOCK <= kept < 12 * MiB
    # The name still holds the whole previous version, which verifies.
    target = connect(node)
    try:
        home = target.home()
        on_node = json.loads(target.run(["cat", f"{home}/trtllm-deploy/engines/push-resume/"
                                                f"{manifest.MANIFEST}"]).stdout)
    finally:
        target.close()
    assert on_node["files"] == old["files"]
    assert verified(bed, "push-resume", ("spark-3",))["spark-3"].ok

    # Only the rest went: what the node kept is not resent (a resend from the start would be more).
    resumed(bed, 3, root, src, below=12 * MiB - kept + FRAMING)


@needs_docker
def test_several_streams_per_node_stop_together_and_resume_each_file(bed, tmp_path):
    store = tmp_path / "engines"
    sizes = {f"model-{i}.safetensors": 16 * MiB for i in range(4)} | {"config.json": 200}
    root = make_artifact(store, "push-streams", sizes)
    node = bed.inventory().node("spark-2")
    src = pushing.source(store, "push-streams")
    kill, seen = _kill_channels_after(0)
    by_thread: dict = {}
    lock = threading.Lock()
    all_four = threading.Barrier(4, timeout=60)

    # The node reads a stream in blocks of agent.BLOCK and writes each block once it is whole:
    # each stream stops past its first block, so that block's landing shows in the node's file.
    first = agent.BLOCK + MiB

    def landed() -> bool:
        """Every stream's file holds its first block in the node's staging."""
        sizes = node_sh(bed, 2, "cd ~/trtllm-deploy/engines/.push-streams.push 2>/dev/null && "
                                "stat -c '%s' model-* 2>/dev/null || true").split()
        return len(sizes) == 4 and all(int(size) >= agent.BLOCK for size in sizes)

    def progress(name: str, count: int) -> None:
        """Each stream waits past its first block until all four are; then the link drops."""
        mine = by_thread[threading.get_ident()] = by_thread.get(threading.get_ident(), 0) + count
        if mine - count >= first or mine < first:
            return  # only as this stream passes its first block
        all_four.wait()
        with lock:  # the others wait here while the first of them waits for the node, then kills
            if not seen["killed"]:
                deadline = time.monotonic() + 60
                while not landed():  # each look is a `docker exec`: no sleep between them
                    assert time.monotonic() < deadline, "the first block of each stream never landed"
                kill(name, count)

    broken = pushing.push([node], src, progress=progress, streams=4)
    # The receive and three more streams, each its own SSH connection: all four were sending.
    assert seen["killed"] == 4, seen
    assert "push again to send only the rest" in broken["spark-2"].reason
    assert "push-streams" not in node_sh(bed, 2, "ls ~/trtllm-deploy/engines")
    partial = node_sh(bed, 2, "cd ~/trtllm-deploy/engines/.push-streams.push && stat -c '%n %s' *")
    started = [line.split() for line in partial.splitlines() if line.startswith("model-")]
    assert len(started) == 4 and all(MiB <= int(size) < 16 * MiB for _, size in started), partial

    # Every stream continued its own file where it stopped: what the node lacked, and the records
    # that frame it (a file resent from its start would be at least MiB more).
    kept = sum(int(size) for _, size in started)
    again = resumed(bed, 2, root, src, below=sum(sizes.values()) - kept + FRAMING, streams=4)
    assert again.files_sent == 5 and again.streams == min(4, again.bytes_sent // (16 * MiB))


@needs_docker
def test_a_stream_without_a_receive_writes_nothing(bed, tmp_path):
    store = tmp_path / "engines"
    make_artifact(store, "push-orphan", {"w.safetensors": MiB})
    node = bed.inventory().node("spark-3")
    src = pushing.source(store, "push-orphan")
    # A lock file left by an earlier push, held by nobody: no receive owns staging now.
    node_sh(bed, 3, "mkdir -p ~/trtllm-deploy/engines && "
                    "touch ~/trtllm-deploy/engines/.push-orphan.push.lock")
    target = connect(node)
    try:
        scripts, _ = files.look(node, target, "push-orphan", src.wanted)
        ch = channel.Channel(target, scripts.command("part", node.paths.artifacts, "push-orphan"))
        ch.write(json.dumps({"manifest": src.wanted}).encode() + b"\n")
        ch.write(json.dumps({"path": "w.safetensors", "offset": 0, "length": MiB}).encode() + b"\n")
        try:
            ch.write(os.urandom(MiB) + b'{"end": true}\n')
        except BrokenPipeError:
            pass  # it refused before reading the bytes
        code, out, _ = ch.finish(timeout=60)
    finally:
        target.close()
    answer = json.loads(out.splitlines()[-1])
    assert code == 1 and answer["kind"] == "protocol" and "no push of push-orphan" in answer["error"]
    assert "w.safetensors" not in node_sh(bed, 3, "ls -R ~/trtllm-deploy/engines 2>/dev/null || true")


@needs_docker
def test_ctrl_c_stops_every_transfer_and_the_next_push_continues(bed, tmp_path):
    store = tmp_path / "engines"
    make_artifact(store, "push-ctrl-c", {"big.safetensors": 12 * MiB, "config.json": 100})
    node = bed.inventory().node("spark-2")
    src = pushing.source(store, "push-ctrl-c")
    seen = {"sent": 0, "pids": set()}

    def interrupt(name: str, count: int) -> None:
        seen["sent"] += count
        with channel._lock:
            seen["pids"] |= {proc.pid for proc in channel._open}
        if seen["sent"] >= agent.BLOCK + MiB and not seen.get("signalled"):
            _once_landed(bed, 2, "push-ctrl-c", "big.safetensors")
            seen["signalled"] = True
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in a terminal does

    with pytest.raises(KeyboardInterrupt):
        pushing.push([node], src, progress=interrupt)
    assert seen["pids"] and not channel._open
    for pid in seen["pids"]:  # nothing of the push is left running here
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert "push-ctrl-c" not in node_sh(bed, 2, "ls ~/trtllm-deploy/engines")  # never half there
    kept = _staged(bed, 2, "push-ctrl-c", "big.safetensors")
    assert agent.BLOCK <= kept < 12 * MiB

    resumed(bed, 2, store / "push-ctrl-c", src, below=12 * MiB + 100 - kept + FRAMING)


@needs_docker
def test_the_fabric_transport_sends_plain_tcp_checked_on_the_node(bed, tmp_path):
    store = tmp_path / "engines"
    root = make_artifact(store, "push-fabric", {"a.safetensors": 16 * MiB, "b.safetensors": 16 * MiB,
                                                "c.json": 500})
    hosts = str(bed.layout.hosts_file)
    args = ("--store", str(store), "--name", "push-fabric", "--hosts", hosts, "--nodes", "spark-3")
    done = run_push(*args, "--transport", "fabric", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    sent = json.loads(done.stdout)["nodes"]["spark-3"]
    # Two fabric connections (a stream per 16 MiB to send), every byte checked on the node.
    assert sent["artifact"]["action"] == "sent" and sent["artifact"]["streams"] == 2
    assert 32 * MiB < sent["bytes_sent"] < 32 * MiB + 4096
    assert verified(bed, "push-fabric", ("spark-3",))["spark-3"].ok

    # A connection without the token is never read: the node waits for the right one.
    node = bed.inventory().node("spark-3")
    target = connect(node)
    try:
        scripts = files.Scripts(target)
        rewrite(root, "a.safetensors", 3 * MiB)
        src = pushing.source(store, "push-fabric")
        planned = files.look(node, target, "push-fabric", src.wanted)[1]
        argv = scripts.command("receive", node.paths.artifacts, "push-fabric", node.host)
        ch = channel.Channel(target, argv, None)
        ch.write(b"a" * 64 + b"\n")
        ch.write(json.dumps({"manifest": src.wanted, "link": [], "streams": 1}).encode() + b"\n")
        port = ch.answer()["port"]
        import socket
        with socket.create_connection((node.host, port), timeout=10) as intruder:
            intruder.sendall(b"b" * 64 + b"\n" + b"{}\n")
        code, out, _ = ch.finish(timeout=60)
        assert code == 1 and "no connection with the token" in out
        assert not planned.up_to_date
    finally:
        target.close()
    assert run_push(*args, "--transport", "fabric").returncode == 0
    assert verified(bed, "push-fabric", ("spark-3",))["spark-3"].ok
    done = run_push(*args, "--transport", "carrier-pigeon")
    assert done.returncode == 2 and "--transport" in done.stderr


@needs_docker
def test_bytes_that_do_not_match_the_manifest_never_become_current(bed, tmp_path):
    store = tmp_path / "engines"
    root = make_artifact(store, "push-garbled", {"w.safetensors": MiB})
    node = bed.inventory().node("spark-1")
    assert not pushing.push([node], pushing.source(store, "push-garbled")).failed
    before = manifest.load(root)
    rewrite(root, "w.safetensors", MiB)
    wanted = manifest.load(root)
    target = connect(node)
    try:
        scripts = files.Scripts(target)
        ch = channel.Channel(target, scripts.command("receive", node.paths.artifacts, "push-garbled"),
                             None)
        ch.write(json.dumps({"manifest": wanted, "link": []}).encode() + b"\n")
        ch.write(json.dumps({"path": "w.safetensors", "offset": 0, "length": MiB}).encode() + b"\n")
        ch.write(os.urandom(MiB) + b'{"end": true}\n')  # the right size, the wrong bytes
        code, out, _ = ch.finish(timeout=60)
    finally:
        target.close()
    answer = json.loads(out.splitlines()[-1])
    assert code == 1 and answer["kind"] == "verify"
    assert [p["path"] for p in answer["verify"]["problems"]] == ["w.safetensors"]
    on_node = node_sh(bed, 1, f"cat ~/trtllm-deploy/engines/push-garbled/{manifest.MANIFEST}")
    assert json.loads(on_node)["files"] == before["files"]
    assert sorted(node_sh(bed, 1, "ls -A ~/trtllm-deploy/engines/.push-garbled.push").split()) == [
        manifest.CACHE, manifest.MANIFEST]  # the bad file is gone: the next push sends it whole
    result = pushing.push([node], pushing.source(store, "push-garbled"))["spark-1"].value
    assert result.artifact.action == "updated" and MiB <= result.bytes_sent < MiB + 4096
    assert verified(bed, "push-garbled", ("spark-1",))["spark-1"].ok


def _small_disk(bed, index: int, path: str, size: str) -> None:
    node_sh(bed, index, f"mkdir -p {path} && (umount {path} 2>/dev/null; true) && mount -t tmpfs"
                        f" -o size={size} tmpfs {path} && chown spark {path}", user="root")


@needs_docker
def test_a_full_disk_is_a_clear_error_before_and_during_sending(bed, tmp_path):
    store = tmp_path / "engines"
    make_artifact(store, "push-full", {"a": 24 * MiB, "b": 24 * MiB})
    _small_disk(bed, 2, "/srv/small", "40m")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(bed.layout.hosts_file.read_text().replace(
        'name = "spark-2"', 'name = "spark-2"\npaths = { artifacts = "/srv/small/engines" }'))
    try:
        done = run_push("--store", str(store), "--name", "push-full", "--hosts", str(hosts),
                        "--nodes", "spark-1,spark-2", timeout=60)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "spark-2: not enough free space" in done.stderr and "Traceback" not in done.stderr
        assert "paths.artifacts" in done.stderr
        # Nothing moved anywhere, not even to the node with room.
        assert "push-full" not in node_sh(bed, 1, "ls ~/trtllm-deploy/engines 2>/dev/null || true")

        # Room when asked, gone when sending: the node says so, the push does not hang.
        _small_disk(bed, 2, "/srv/small", "64m")
        cluster = inventory.load(hosts)
        src = pushing.source(store, "push-full")
        plans = pushing.look([cluster.node("spark-2")], src)
        pushing.require_room(plans)
        node_sh(bed, 2, "head -c 31457280 /dev/zero > /srv/small/filler")  # 30 MiB: both streams fill it
        finished = {}
        worker = threading.Thread(target=lambda: finished.update(r=pushing.send(plans, src)))
        worker.start()
        worker.join(60)
        assert "r" in finished, "the push hung on a full disk"
        reason = finished["r"]["spark-2"].reason
        assert "filled up" in reason and "No space left" in reason, reason
    finally:
        node_sh(bed, 2, "umount /srv/small", user="root")


@needs_docker
def test_a_full_disk_is_named_when_the_stream_that_hit_it_lost_its_report(bed, tmp_path):
    """The interleaving that lost the reason, forced: the receive has its whole file, a part
    fills the disk and its report never comes back (its channel torn down), so the end record
    says only that the part was cut. The node looks at its disk and says it filled up."""
    store = tmp_path / "engines"
    make_artifact(store, "push-lost", {"a": MiB, "b": 24 * MiB})
    _small_disk(bed, 3, "/srv/lost", "16m")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(bed.layout.hosts_file.read_text().replace(
        'name = "spark-3"', 'name = "spark-3"\npaths = { artifacts = "/srv/lost/engines" }'))
    node = inventory.load(hosts).node("spark-3")
    wanted = pushing.source(store, "push-lost").wanted
    target = connect(node)
    try:
        scripts, _ = files.look(node, target, "push-lost", wanted)
        receive = channel.Channel(target, scripts.command("receive", node.paths.artifacts, "push-lost"))
        receive.write(json.dumps({"manifest": wanted, "link": [], "streams": 2}).encode() + b"\n")
        assert receive.answer() == {"ready": True}
        receive.write(json.dumps({"path": "a", "offset": 0, "length": MiB}).encode() + b"\n")
        receive.send_file(store / "push-lost" / "a", 0, MiB)
        landed = "stat -c %s /srv/lost/engines/.push-lost.push/a 2>/dev/null || echo 0"
        deadline = time.monotonic() + 60
        while int(node_sh(bed, 3, landed)) < MiB:  # the receive holds all of its file first
            assert time.monotonic() < deadline, "the receive's file never landed"
        part = channel.Channel(target, scripts.command("part", node.paths.artifacts, "push-lost"))
        part.write(json.dumps({"manifest": wanted}).encode() + b"\n")
        part.write(json.dumps({"path": "b", "offset": 0, "length": 24 * MiB}).encode() + b"\n")
        try:
            part.send_file(store / "push-lost" / "b", 0, 24 * MiB)  # 16 MiB of disk: it stops
        except BrokenPipeError:
            pass
        part.kill()  # its report is lost: to the sender, the stream was only cut
        cut = {"ok": False, "kind": "truncated", "error": "a stream of the push stopped"}
        receive.write(json.dumps({"end": True, "parts": [cut]}).encode() + b"\n")
        code, out, _ = receive.finish(timeout=60)
    finally:
        target.close()
        node_sh(bed, 3, "umount /srv/lost", user="root")
    answer = json.loads(out.splitlines()[-1])
    assert code == 1 and answer["kind"] == "full", answer
    assert "No space left on device" in answer["error"], answer


@needs_docker
def test_not_enough_room_raises_from_the_api(bed, tmp_path):
    store = tmp_path / "engines"
    make_artifact(store, "push-room", {"a": 3 * MiB})
    _small_disk(bed, 3, "/srv/tiny", "1m")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(bed.layout.hosts_file.read_text().replace(
        'name = "spark-3"', 'name = "spark-3"\npaths = { artifacts = "/srv/tiny/e" }'))
    try:
        with pytest.raises(CheckFailed, match="not enough free space"):
            pushing.push([inventory.load(hosts).node("spark-3")], pushing.source(store, "push-room"))
    finally:
        node_sh(bed, 3, "umount /srv/tiny", user="root")


def _build(tag: str, context: Path, base: str, top: bytes) -> None:
    context.mkdir(parents=True, exist_ok=True)
    (context / "lower.bin").write_bytes(b"L" * (2 * MiB))
    (context / "top.bin").write_bytes(top)
    (context / "Dockerfile").write_text(f"FROM {base}\nCOPY lower.bin /lower.bin\nCOPY top.bin /top.bin\n"
                                        f"LABEL io.trtllm-deploy.test=push\n")
    subprocess.run(["docker", "build", "-q", "-t", tag, str(context)], check=True,
                   capture_output=True, timeout=300)


@needs_docker
def test_an_image_no_node_has_nor_this_machine_is_named_with_every_node_asked(bed):
    done = run_push("--image", "trtllm-deploy-test/never-built:0", "--hosts", str(bed.layout.hosts_file))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "no node has the image trtllm-deploy-test/never-built:0" in done.stderr
    assert "spark-1, spark-2, spark-3" in done.stderr and "invoke image" in done.stderr


def test_an_image_sends_only_the_layers_a_node_lacks(bed, base_image, tmp_path):
    tag = f"trtllm-deploy-test/push:{os.getpid()}"
    try:
        _build(tag, tmp_path / "v1", base_image, os.urandom(MiB))
        done = run_push("--image", tag, "--image-from", "here", "--hosts", str(bed.layout.hosts_file),
                        "--nodes", "spark-1,spark-2", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        first = json.loads(done.stdout)["nodes"]
        # The base layer is already on the nodes (the stand-in is built on it): two layers go.
        for node in ("spark-1", "spark-2"):
            assert first[node]["image"]["layers_sent"] == 2
            assert first[node]["image"]["action"] == "loaded"
            assert 3 * MiB < first[node]["bytes_sent"] < 4 * MiB

        _build(tag, tmp_path / "v2", base_image, os.urandom(MiB))  # only the top layer differs
        done = run_push("--image", tag, "--image-from", "here", "--hosts", str(bed.layout.hosts_file),
                        "--nodes", "spark-1,spark-2", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        second = json.loads(done.stdout)["nodes"]
        local = layers.inspect_local(tag)
        for node in ("spark-1", "spark-2"):
            assert second[node]["image"]["layers_sent"] == 1
            assert MiB < second[node]["bytes_sent"] < 1.2 * MiB
            assert second[node]["image"]["image_id"] == local.id
        cluster = bed.inventory()
        target = connect(cluster.node("spark-2"))
        try:
            plan = layers.look(cluster.node("spark-2"), target, local)
        finally:
            target.close()
        assert plan.up_to_date and local.labels["io.trtllm-deploy.test"] == "push"

        done = run_push("--image", tag, "--hosts", str(bed.layout.hosts_file), "--nodes", "spark-2",
                        "--json")
        assert json.loads(done.stdout)["nodes"]["spark-2"]["image"]["action"] == "up to date"
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


def test_source_refuses_without_anything(tmp_path):
    with pytest.raises(InputError):
        pushing.source(tmp_path, "", "")
