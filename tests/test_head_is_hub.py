"""The head is the hub (issue 14), end to end on the testbed: an image built on spark-1 from source
reaches the other nodes from spark-1, never through this machine, and the same deploy run from
inside spark-1 (``connection = "local"`` there) gives the same result.

This machine drives but is not a node. The runtime image is a source build of the stand-in
TensorRT-LLM repository (tests/trtllm_repo.py) made on spark-1 ``FROM`` the stand-in runtime, so it
serves, and only spark-1 has it until deploy moves it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import tomlkit

from conftest import docker_unusable
from trtllm_deploy.hosts import sshsetup, targets
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.testbed import artifact as tiny
from trtllm_repo import make_upstream

ROOT = Path(__file__).resolve().parents[1]
REMOTE = "/home/spark/hub-upstream"
PORT = 8373
INSIDE = "/opt/trtllm-deploy"  # the project and its libraries, copied into spark-1

pytestmark = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


def hub_hosts(testbed_hosts: Path, inside: bool = False) -> str:
    """The testbed's hosts.toml without its named runtime image (so the lock's image, built on
    spark-1, is what deploys); ``inside``: as spark-1 sees the cluster, itself "local" and the
    others reached with the key ssh.setup made there."""
    doc = tomlkit.parse(testbed_hosts.read_text())
    del doc["defaults"]["container"]["image"]
    if inside:
        doc["defaults"]["identity_file"] = "~/.ssh/id_ed25519"
        doc["defaults"]["known_hosts"] = "~/.ssh/known_hosts"
        doc["nodes"][0]["connection"] = "local"  # its address stays: where the others reach it
    return tomlkit.dumps(doc)


def run_invoke(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def on(node, *argv: str, check: bool = True) -> str:
    target = SSH(node)
    try:
        return target.run(list(argv), check=check, timeout=300).stdout
    finally:
        target.close()


def image_id(node, image: str) -> str:
    return on(node, "docker", "image", "inspect", "--format", "{{.Id}}", image, check=False).strip()


@pytest.fixture(scope="module")
def hub(testbed, tmp_path_factory):
    """The testbed with node-to-node SSH, the stand-in upstream on spark-1, a lock pinning it,
    the image built on spark-1 only, and a tiny artifact on this machine."""
    bed, report = testbed
    cluster = bed.inventory()
    sshsetup.apply(sshsetup.look(cluster))
    work = tmp_path_factory.mktemp("hub")
    made = make_upstream(work / "upstream", base_image=report.runtime.tag)
    head = SSH(cluster.head)
    try:
        head.run(["rm", "-rf", REMOTE])
        head.put(made.repo, f"{REMOTE}/TensorRT-LLM.git")
        head.put(made.submodule_repo, f"{REMOTE}/cutlass.git")
    finally:
        head.close()
    lock = work / "lock.toml"
    lock.write_text(f'[source]\nrepository = "file://{REMOTE}/TensorRT-LLM.git"\nref = "main"\n\n'
                    '[build]\ncuda_archs = "121-real"\n')
    hosts = work / "hosts.toml"
    hosts.write_text(hub_hosts(bed.layout.hosts_file))
    hosts = str(hosts)
    updated = run_invoke("source.update", "--hosts", hosts, "--lock", str(lock))
    assert updated.returncode == 0, updated.stderr
    built = run_invoke("image", "--hosts", hosts, "--lock", str(lock), "--json")
    assert built.returncode == 0, built.stderr
    image = json.loads(built.stdout)["image"]
    folder = tiny.make(work / "engines" / "tiny-bf16-tp3-hub")
    env = {**os.environ, "HOME": str(work / "home")}
    yield cluster, hosts, lock, image, folder, env
    for node in cluster.nodes:
        target = SSH(node)
        store = targets.expand(node.paths.artifacts, target.home())
        target.run(["sh", "-c", 'rm -rf "$1/$2" "$1/.$2".*', "sh", store, folder.name])
        target.run(["docker", "rmi", "-f", image], check=False)
        target.run(["rm", "-rf", REMOTE, INSIDE, "trtllm-deploy/build/TensorRT-LLM"], cwd="~", check=False)
        target.close()


def answers(address: str) -> str:
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 4, "temperature": 0}).encode()
    request = urllib.request.Request(f"http://{address}:{PORT}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)["choices"][0]["text"]


def deploy_args(hosts: str, lock: str, folder: str, job: str, *extra: str) -> list[str]:
    return ["deploy", "--artifact-dir", folder, "--tp", "3", "--job", job, "--port", str(PORT),
            "--env", "STANDIN_LOAD_SECONDS=1", "--hosts", hosts, "--lock", lock, "--json", *extra]


def forget(cluster, image: str, artifact: str) -> None:
    """The workers lose the image (and the jobs that used it) and every node the artifact, so the
    next deploy must send both."""
    for node in cluster.nodes:
        script = 'docker ps -aq --filter label=io.trtllm-deploy.job | xargs -r docker rm -f; ' \
                 'rm -rf "$HOME/trtllm-deploy/engines/$2" "$HOME/trtllm-deploy/engines/.$2".*'
        if node is not cluster.nodes[0]:
            script += '; docker rmi -f "$1"'
        on(node, "sh", "-c", script, "sh", image, artifact, check=False)
    assert all(image_id(node, image) == "" for node in cluster.nodes[1:])


def check_served(cluster, image: str, report: dict, artifact_from: str = "this machine") -> None:
    phases = {phase["phase"]: phase for phase in report["phases"]}
    push = phases["push"]
    assert push["action"] == "done", push
    came = push["from"]
    # The image's layers came from spark-1, where it was built, to each node that lacked it; the
    # artifact went along the chain from where it was given, each node passing it on.
    assert came["spark-1"]["image"]["from"] is None  # it has the image: nothing sent
    for node in ("spark-2", "spark-3"):
        assert came[node]["image"]["from"] == "spark-1" and came[node]["image"]["bytes_sent"] > 0, came
        assert "image: " in push["nodes"][node] and "from spark-1" in push["nodes"][node]
    assert [came[n]["artifact"]["from"] for n in ("spark-1", "spark-2", "spark-3")] == [
        artifact_from, "spark-1", "spark-2"], came
    assert "spark-1 (registry) → spark-2, spark-3" in push["detail"], push["detail"]
    assert phases["check"]["action"] == "done" and phases["verify"]["action"] == "done"
    wanted = image_id(cluster.nodes[0], image)
    assert wanted and all(image_id(node, image) == wanted for node in cluster.nodes)
    assert answers(cluster.head.address)


def test_an_image_built_on_spark_1_reaches_every_node_from_spark_1_and_serves(hub):
    cluster, hosts, lock, image, folder, env = hub
    forget(cluster, image, folder.name)
    plan = run_invoke(*deploy_args(hosts, str(lock), str(folder), "hub", "--dry-run"), env=env)
    assert plan.returncode == 0, plan.stderr
    would = {phase["phase"]: phase for phase in json.loads(plan.stdout)["phases"]}["push"]
    assert would["action"] == "would send", would
    assert "image: spark-1 (registry) → spark-2, spark-3" in would["detail"], would
    assert "artifact: this machine → spark-1 → spark-2 → spark-3" in would["detail"], would
    assert all(image_id(n, image) == "" for n in cluster.nodes[1:])  # the dry run changed nothing
    done = run_invoke(*deploy_args(hosts, str(lock), str(folder), "hub"), env=env)
    assert done.returncode == 0, done.stderr
    check_served(cluster, image, json.loads(done.stdout))
    # Nothing changed: nothing is sent.
    again = run_invoke(*deploy_args(hosts, str(lock), str(folder), "hub"), env=env)
    assert again.returncode == 0, again.stderr
    assert {p["phase"]: p["action"] for p in json.loads(again.stdout)["phases"]}["push"] == "up to date"
    run_invoke("stop", "--job", "hub", "--hosts", hosts, env=env)


def install_inside(container: str) -> None:
    """This checkout and its libraries (the test environment's site-packages: same Python minor
    version and C library as the testbed's Debian) into spark-1, run there with its own python3."""
    site = Path(subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run(["docker", "exec", container, "mkdir", "-p", f"{INSIDE}/repo"], check=True)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout
    pack = subprocess.Popen(["tar", "--null", "-T", "-", "-cf", "-"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    unpack = subprocess.Popen(["docker", "exec", "-i", container, "tar", "-C", f"{INSIDE}/repo", "-xf", "-"],
                              stdin=pack.stdout)
    pack.stdin.write(files)
    pack.stdin.close()
    assert unpack.wait(timeout=300) == 0 and pack.wait(timeout=300) == 0
    subprocess.run(f"tar -C {site.parent} -cf - {site.name} | docker exec -i {container} "
                   f"tar -C {INSIDE} -xf -", shell=True, check=True, timeout=300)


def test_the_same_deploy_run_inside_spark_1_gives_the_same_result(hub, testbed):
    cluster, hosts, lock, image, folder, env = hub
    bed, _ = testbed
    container = bed.layout.container(1)
    install_inside(container)
    forget(cluster, image, folder.name)
    text = hub_hosts(bed.layout.hosts_file, inside=True)
    on(cluster.head, "mkdir", "-p", "hub-inside")
    head = SSH(cluster.head)
    try:
        head.put(folder, f"hub-inside/{folder.name}")
        head.put(lock, "hub-inside/lock.toml")
        head.run(["sh", "-c", 'cat > hub-inside/hosts.toml'], stdin=text, cwd="~")
    finally:
        head.close()
    home = "/home/spark"
    done = subprocess.run(
        ["docker", "exec", "-u", "spark", "-w", f"{INSIDE}/repo", "-e", f"HOME={home}",
         "-e", f"PYTHONPATH={INSIDE}/site-packages", container, "python3", "-m", "invoke",
         *deploy_args(f"{home}/hub-inside/hosts.toml", f"{home}/hub-inside/lock.toml",
                      f"{home}/hub-inside/{folder.name}", "hubin")],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    check_served(cluster, image, json.loads(done.stdout), artifact_from="this machine")
    subprocess.run(["docker", "exec", "-u", "spark", "-w", f"{INSIDE}/repo", "-e", f"HOME={home}",
                    "-e", f"PYTHONPATH={INSIDE}/site-packages", container, "python3", "-m", "invoke",
                    "stop", "--job", "hubin", "--hosts", f"{home}/hub-inside/hosts.toml"],
                   capture_output=True, text=True, timeout=300)


def test_a_dry_run_that_would_make_the_artifact_says_every_later_phase_waits_for_it(hub):
    """Nothing made yet: engine.build would make it on the head, push would send it from there."""
    cluster, hosts, lock, image, folder, env = hub
    done = run_invoke("deploy", "--model", "llama-8b", "--precision", "nvfp4", "--tp", "3", "--hosts", hosts,
                      "--lock", str(lock), "--dry-run", "--json", env=env)
    assert done.returncode == 0, done.stderr
    phases = {phase["phase"]: phase for phase in json.loads(done.stdout)["phases"]}
    assert phases["engine"]["action"] == "would make" and "on spark-1" in phases["engine"]["detail"]
    assert phases["push"]["action"] == "would send" and "from spark-1" in phases["push"]["detail"]
    assert phases["check"]["action"] == "would probe" and phases["launch"]["action"] == "would start"
