"""`invoke deploy` end to end on the testbed (3 nodes, real sshd, Docker engines and mpirun, the
stand-in runtime), then the fault matrix: an unreachable worker, a corrupted file, a node with
another image, a gate that fails (rolled back), Ctrl-C in the middle; after each, nothing of a failed
job is left on any node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import docker_unusable
from trtllm_deploy.hosts import sshsetup, targets
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.testbed import artifact as tiny
from waiting import until

ROOT = Path(__file__).resolve().parents[1]
PORT = 8371

pytestmark = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


@pytest.fixture(scope="module")
def bed(testbed, tmp_path_factory):
    testbed_, _ = testbed
    cluster = testbed_.inventory()
    sshsetup.apply(sshsetup.look(cluster))  # every node trusts every node, as mpirun needs
    work = tmp_path_factory.mktemp("deploy")
    folder = tiny.make(work / "engines" / "tiny-bf16-tp3-deploy")
    hosts = work / "hosts.toml"
    hosts.write_text(Path(cluster.source).read_text())
    yield cluster, folder, hosts, work
    for node in cluster.nodes:
        target = SSH(node)
        store = targets.expand(node.paths.artifacts, target.home())
        # The artifact and what push keeps beside it (its lock): the session's stores as found.
        target.run(["sh", "-c", 'rm -rf "$1/$2" "$1/.$2".*', "sh", store, folder.name])
        target.close()


def deploy(bed, *args: str, job: str = "tbd", timeout: float = 300) -> subprocess.CompletedProcess:
    cluster, folder, hosts, work = bed
    return subprocess.run(invoke_argv(bed, *args, job=job), capture_output=True, text=True,
                          timeout=timeout, env=environment(work))


def invoke_argv(bed, *args: str, job: str = "tbd") -> list[str]:
    cluster, folder, hosts, work = bed
    return [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "deploy", "--artifact-dir",
            str(folder), "--tp", "3", "--job", job, "--port", str(PORT), "--env", "STANDIN_LOAD_SECONDS=1",
            "--hosts", str(hosts), *args]


def environment(work: Path) -> dict:
    return {**os.environ, "HOME": str(work / "home")}  # the deployments recorded by these tests


def phases(done: subprocess.CompletedProcess) -> dict[str, str]:
    assert done.returncode == 0, done.stderr
    return {phase["phase"]: phase["action"] for phase in json.loads(done.stdout)["phases"]}


def job_containers(cluster, job: str | None = None) -> list[str]:
    label = f"io.trtllm-deploy.job={job}" if job else "io.trtllm-deploy.job"
    found = []
    for node in cluster.nodes:
        target = SSH(node)
        found += [f"{node.name}:{name}" for name in target.run(
            ["docker", "ps", "--all", "--format", "{{.Names}}", "--filter", f"label={label}"]).stdout.split()]
        target.close()
    return found


def answers(cluster) -> str:
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 4, "temperature": 0}).encode()
    request = urllib.request.Request(f"http://{cluster.head.address}:{PORT}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)["choices"][0]["text"]


def stop(bed, job: str) -> None:
    cluster, _, hosts, work = bed
    subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "stop", "--job", job,
                    "--hosts", str(hosts)], capture_output=True, text=True, timeout=300,
                   env=environment(work))


def test_deploy_end_to_end_then_up_to_date_and_a_dry_run_that_changes_nothing(bed):
    cluster, folder, hosts, work = bed
    try:
        first = phases(deploy(bed, "--json"))
        assert first == {"preflight": "done", "source": "skipped", "image": "skipped", "engine": "skipped",
                         "push": "done", "check": "done", "launch": "done", "verify": "done"}
        assert answers(cluster)
        again = phases(deploy(bed, "--json"))
        assert again["push"] == again["check"] == again["launch"] == "up to date"
        human = deploy(bed)
        assert human.returncode == 0 and "up to date: nothing to do" in human.stdout
        # A corrupted file on a worker: found by the push phase and sent again, alone.
        worker = SSH(cluster.node("spark-2"))
        store = targets.expand(cluster.node("spark-2").paths.artifacts, worker.home())
        worker.run(["sh", "-c", f'printf X | dd of="{store}/{folder.name}/model.safetensors" bs=1 seek=100 '
                                'conv=notrunc status=none'])
        worker.close()
        planned = deploy(bed, "--dry-run", "--json")
        dry = json.loads(planned.stdout)
        push = next(p for p in dry["phases"] if p["phase"] == "push")
        assert push["action"] == "would send" and push["nodes"]["spark-2"] != "up to date"
        assert push["nodes"]["spark-1"] == push["nodes"]["spark-3"] == "up to date"
        repaired = phases(deploy(bed, "--json"))
        assert repaired["push"] == "done"
    finally:
        stop(bed, "tbd")
    assert job_containers(cluster, "tbd") == []


def test_an_unreachable_worker_stops_deploy_at_preflight_with_nothing_changed(bed, testbed):
    cluster, *_ = bed
    testbed_, _ = testbed
    worker = testbed_.layout.container(3)
    subprocess.run(["docker", "pause", worker], check=True, capture_output=True)
    try:
        done = deploy(bed, job="tbu", timeout=200)
    finally:
        subprocess.run(["docker", "unpause", worker], check=True, capture_output=True)
    assert done.returncode == 1 and "deploy stopped at preflight" in done.stderr, done.stderr
    assert "spark-3" in done.stderr and "nothing was changed on any node" in done.stderr
    assert "Traceback" not in done.stderr
    assert job_containers(cluster) == []


def supervised_until_good(bed, job: str) -> None:
    """``invoke supervise`` (a real one) watches until it records ``job`` as good, then Ctrl-C."""
    cluster, _, hosts, work = bed
    recorded = work / "home/.local/state/trtllm-deploy/clusters" / cluster.name / "deployments.json"
    process = subprocess.Popen([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "supervise",
                                "--good-after-s", "3", "--hosts", str(hosts)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environment(work))
    try:
        def good() -> list[str]:
            assert process.poll() is None, process.communicate()
            return [d["job"] for d in json.loads(recorded.read_text()).get("good", [])]

        until(good, 120, f"supervise to record {job} as good", done=lambda jobs: job in jobs)
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)


def test_a_gate_that_fails_rolls_back_to_the_last_known_good(bed):
    cluster, *_ = bed
    try:
        assert phases(deploy(bed, "--json", job="tbgood"))["launch"] == "done"
        # Passing its gate does not make it good; serving well under supervision for a while does.
        supervised_until_good(bed, "tbgood")
        bad = deploy(bed, "--on-failure", "rollback", "--env", "STANDIN_FAULT=oom@1", "--stall-s", "30",
                     job="tbbad")
        assert bad.returncode == 1, bad.stdout
        assert "deploy stopped at launch" in bad.stderr and "CUDA out of memory" in bad.stderr
        assert "rolled back: tbgood" in bad.stderr
        assert job_containers(cluster, "tbbad") == []
        assert answers(cluster)  # the last known good serves again
    finally:
        stop(bed, "tbgood")
        stop(bed, "tbbad")
    assert job_containers(cluster) == []


def test_ctrl_c_during_deploy_leaves_nothing_half_done_and_a_rerun_continues(bed):
    cluster, folder, hosts, work = bed
    process = subprocess.Popen(invoke_argv(bed, "--stall-s", "60", job="tbc"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**environment(work), "PYTHONUNBUFFERED": "1"})
    try:
        def started() -> list[str]:
            assert process.poll() is None, process.communicate()
            return job_containers(cluster, "tbc")

        until(started, 120, "deploy to reach launch (the job's containers)")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 130, stderr
        assert job_containers(cluster, "tbc") == []  # the half-started job is gone from every node
        again = phases(deploy(bed, "--json", job="tbc"))
        assert again["launch"] == "done" and answers(cluster)
    finally:
        if process.poll() is None:
            process.kill()
        stop(bed, "tbc")
    assert job_containers(cluster) == []


def test_a_pin_without_a_multi_node_fix_refuses_tp_across_nodes_and_plans_one_node_with_a_warning(bed):
    cluster, folder, hosts, work = bed
    lock = work / "unfixed.lock.toml"
    lock.write_text('[source]\nrepository = "https://github.com/NVIDIA/TensorRT-LLM.git"\n[build]\n'
                    'kind = "source"\n[[fixes]]\npr = 12902\ntitle = "multi-node NCCL on GB10"\n'
                    'needed_for = "several"\nmissing = "not in the pinned history"\n')
    argv = [arg if arg != "3" else "2" for arg in invoke_argv(bed, "--lock", str(lock), job="tbfix")]
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=environment(work))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "ranks span 2 nodes" in refused.stderr and "(#12902) multi-node NCCL on GB10" in refused.stderr
    assert "preflight" not in refused.stderr and "Traceback" not in refused.stderr
    assert job_containers(cluster) == []
    one = [arg if arg != "3" else "1" for arg in invoke_argv(bed, "--lock", str(lock), "--dry-run", "--json",
                                                             job="tbfix")]
    planned = subprocess.run(one, capture_output=True, text=True, timeout=300, env=environment(work))
    assert planned.returncode == 0, planned.stderr
    report = json.loads(planned.stdout)
    [warning] = report["warnings"]
    assert "(#12902)" in warning and "one-node deployment goes ahead" in warning
    launch_phase = next(phase for phase in report["phases"] if phase["phase"] == "launch")
    assert launch_phase["action"] == "would start" and "(#12902)" in launch_phase["detail"]
    assert job_containers(cluster) == []


@pytest.mark.parametrize("task", [("deploy", "--artifact-dir", "engines/none"),
                                  ("launch", "--artifact", "none")])
def test_an_env_option_without_a_value_is_bad_input_before_any_node_is_touched(task, tmp_path):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[cluster]\nname = "lone"\n\n[[nodes]]\nname = "unreachable"\n'
                     'address = "192.0.2.1"\nrole = "head"\n')
    done = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), *task,
                           "--env", "STANDIN_LOAD_SECONDS", "--hosts", str(hosts)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--env 'STANDIN_LOAD_SECONDS': expected NAME=value" in done.stderr
    assert "Traceback" not in done.stderr
