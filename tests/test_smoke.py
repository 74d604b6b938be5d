"""`invoke smoke` on the testbed's head with the stand-in runtime: served, answered, stopped; and
the ways a start goes wrong (a known failure line, a stall) are reported with nothing left running.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_standin import write_checkpoint

from conftest import docker_unusable
from trtllm_deploy.artifact import manifest as manifests
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.serving.smoke import CONTAINER

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("artifacts") / "tiny-bf16-tp1-test"
    write_checkpoint(folder, manifest=False)  # config and weights, as engine.build leaves them
    (folder / "llm-api.yaml").write_text("kv_cache_config:\n  free_gpu_memory_fraction: 0.9\n"
                                         "print_iter_log: false\n")
    manifests.write(folder, manifests.create(folder, {"model": "tiny"}))
    return folder


def hosts_with(testbed, tmp_path, env: str = "") -> Path:
    bed, _ = testbed
    text = bed.layout.hosts_file.read_text()
    if env:
        text = text.replace("[defaults.container]\n", f"[defaults.container]\nenv = {{ {env} }}\n")
    path = tmp_path / "hosts.toml"
    path.write_text(text)
    return path


def smoke(hosts: Path, artifact: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "smoke",
                           "--hosts", str(hosts), "--artifact-dir", str(artifact), *extra],
                          capture_output=True, text=True, timeout=300)


def left_running(testbed) -> str:
    bed, _ = testbed
    head = SSH(bed.inventory().head)
    try:
        return head.run(["docker", "ps", "--all", "--quiet", "--filter", f"name={CONTAINER}"]).stdout
    finally:
        head.close()


def test_smoke_serves_answers_and_stops_on_the_stand_in(testbed, artifact, tmp_path):
    done = smoke(hosts_with(testbed, tmp_path, 'STANDIN_LOAD_SECONDS = "1"'), artifact, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["standin"] is True and report["answer"]
    steps = {step["name"]: step for step in report["steps"]}
    assert steps["artifact"]["ok"]
    assert steps["artifact"]["detail"] in ("tiny-bf16-tp1-test copied to spark-1, verified there",
                                           "tiny-bf16-tp1-test already on spark-1, verified there")
    assert steps["image"]["ok"] is None and "stand-in" in steps["image"]["detail"]
    assert steps["ready"]["ok"] and steps["token rate"]["ok"]
    assert left_running(testbed) == ""
    human = smoke(hosts_with(testbed, tmp_path), artifact)
    assert human.returncode == 0 and human.stdout.startswith("STAND-IN RUN")
    assert "already on spark-1" in human.stdout  # a verified copy is not sent again


@pytest.mark.parametrize("env, extra, words", [
    ('STANDIN_FAULT = "oom"', (), ["CUDA out of memory", "what to do:", "drop_caches"]),
    ('STANDIN_FAULT = "hang", STANDIN_LOAD_SECONDS = "2"', ("--stall-s", "4"),
     ["no progress for 4 s"]),
], ids=["known-failure-line", "stall"])
def test_a_start_that_goes_wrong_is_explained_and_leaves_nothing(testbed, artifact, tmp_path, env,
                                                                extra, words):
    done = smoke(hosts_with(testbed, tmp_path, env), artifact, *extra)
    assert done.returncode == 1, done.stdout
    for word in words:
        assert word in done.stderr
    assert "Traceback" not in done.stderr
    assert left_running(testbed) == ""


@pytest.fixture(scope="module")
def release_like(testbed):
    """An image that reports a TensorRT-LLM commit and version the way release images do (over the
    stand-in, which still does the serving)."""
    bed, report = testbed
    name = "trtllm-deploy-test/release-like:1"
    head = SSH(bed.inventory().head)
    try:
        head.run(["sh", "-c", 'printf "FROM %s\\nLABEL io.trtllm-deploy.standin=false\\n'
                  'ENV TRT_LLM_GIT_COMMIT=%s TRT_LLM_VERSION=1.3.0rc2\\n" "$1" "$2" | '
                  'docker build --quiet --tag "$3" -', "sh", report.runtime.tag, "c" * 40, name],
                 timeout=300)
        yield name
        head.run(["docker", "rmi", "--force", name], check=False)
    finally:
        head.close()


@pytest.mark.parametrize("commit, ok", [("c" * 40, True), ("d" * 40, False)], ids=["same", "other"])
def test_smoke_checks_the_image_against_the_lock(testbed, artifact, tmp_path, release_like, commit, ok):
    hosts = hosts_with(testbed, tmp_path)
    text = hosts.read_text()
    image_line = next(line for line in text.splitlines() if line.startswith("image = "))
    hosts.write_text(text.replace(image_line, f'image = "{release_like}"'))
    lock = tmp_path / "lock.toml"
    lock.write_text(f'[source]\nrepository = "https://example.invalid/TensorRT-LLM.git"\n'
                    f'commit = "{commit}"\nversion = "1.3.0rc2"\n\n[build]\n')
    done = smoke(hosts, artifact, "--lock", str(lock), "--json")
    report = json.loads(done.stdout)
    steps = {step["name"]: step for step in report["steps"]}
    assert report["standin"] is False
    assert steps["image commit"]["ok"] is ok and steps["image version"]["ok"] is True
    assert done.returncode == (0 if ok else 1)
    assert left_running(testbed) == ""


def test_smoke_dry_run_plans_on_the_head_and_runs_nothing(sshd_factory, hosts_file, artifact, tmp_path):
    """No node needed to plan: the head's sshd sees no login, so no container and no copy."""
    server = sshd_factory(home=True)
    done = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "smoke", "--hosts",
                           str(hosts_file([server])), "--artifact-dir", str(artifact), "--port", "8377",
                           "--dry-run", "--json"], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "DOCKER_HOST": "unix:///nonexistent"})
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["task"] == "smoke" and plan["dry_run"] and {s["node"] for s in plan["steps"]} == {"node-0"}
    assert any(f"start container {CONTAINER}" in s["action"] and "port 8377" in s["action"]
               for s in plan["steps"])
    assert "Accepted publickey" not in server.log and list(server.home.iterdir()) == []
