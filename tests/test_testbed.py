"""The testbed for real: node containers with sshd and their own Docker engine, on a network of
their own, and the stand-in runtime served by mpirun across three of them.

Traffic goes only to loopback and to the testbed's own addresses (TESTING.md).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_containers import authorize_head_key

from conftest import docker_unusable, start_testbed
from trtllm_deploy.errors import DeployError, InputError
from trtllm_deploy.hosts import inventory, sshkeys, targets
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.hosts.shell import join
from trtllm_deploy.serving import containers
from trtllm_deploy.testbed import cluster
from trtllm_deploy.testbed import layout as layouts
from waiting import until

ROOT = Path(__file__).resolve().parents[1]
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]

needs_docker = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


# --- input, without Docker --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, flag", [
    ({"nodes": 0}, "--nodes 0"),
    ({"nodes": 17}, "--nodes 17"),
    ({"name": "Bad_Name"}, "--name"),
    ({"subnet": "10.213.7.0/33"}, "--subnet"),
    ({"subnet": "8.8.8.0/24"}, "--subnet 8.8.8.0/24"),       # not private: never ours to take
    ({"subnet": "10.213.7.0/29"}, "--subnet 10.213.7.0/29"),  # no room for the nodes
], ids=["no-nodes", "too-many-nodes", "bad-name", "not-a-network", "public-subnet", "tiny-subnet"])
def test_a_bad_layout_is_refused_with_the_flag_to_fix(kwargs, flag):
    with pytest.raises(InputError) as caught:
        layouts.Layout(**kwargs)
    assert flag in str(caught.value)


def test_bad_input_on_the_command_line_exits_2_before_touching_docker(tmp_path):
    done = subprocess.run([*INVOKE, "testbed.up", "--nodes", "0", "--name", "never-made",
                           "--state-dir", str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--nodes 0: expected 1 to 16 nodes" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "state").exists()


def test_the_written_hosts_file_is_an_inventory_of_the_testbed(tmp_path):
    layout = layouts.Layout(name="inv", nodes=3, subnet="10.213.50.0/24", state_dir=tmp_path)
    sshkeys.keygen(layout.client_key)
    layout.hosts_file.write_text(layouts.hosts_toml(layout, "trtllm-deploy/standin:abc"))
    loaded = inventory.load(layout.hosts_file)
    assert [n.name for n in loaded.nodes] == ["spark-1", "spark-2", "spark-3"]
    assert [n.address for n in loaded.nodes] == ["10.213.50.11", "10.213.50.12", "10.213.50.13"]
    assert loaded.head.name == "spark-1"
    node = loaded.node("spark-2")
    assert (node.user, node.identity_file, node.known_hosts) == (
        "spark", str(layout.client_key), str(layout.known_hosts))
    assert node.container.image == "trtllm-deploy/standin:abc"
    assert node.fabric.interfaces == ["eth0"]


# --- the testbed ------------------------------------------------------------------------------

def _nodes(testbed):
    bed, _ = testbed
    return bed.inventory().nodes


@needs_docker
def test_every_node_answers_over_ssh_with_its_pinned_host_key(testbed):
    bed, report = testbed
    for node in _nodes(testbed):
        target = SSH(node)
        try:
            facts = target.run(["sh", "-c", "hostname; id -nG; docker info --format '{{.Driver}}'; "
                                "ip -4 -o addr show eth0"]).stdout.splitlines()
        finally:
            target.close()
        assert facts[0] == node.name
        assert "docker" in facts[1].split()
        assert facts[2] in ("overlay2", "vfs")
        assert f"inet {node.address}/24" in facts[3]
        # OpenSSH's own client agrees with the known_hosts the testbed wrote.
        done = subprocess.run(["ssh", "-F", "none", "-o", "BatchMode=yes",
                               "-o", "StrictHostKeyChecking=yes",
                               "-o", f"UserKnownHostsFile={bed.layout.known_hosts}",
                               "-i", str(bed.layout.client_key), f"spark@{node.address}", "hostname"],
                              capture_output=True, text=True, timeout=30)
        assert done.stdout.strip() == node.name, done.stderr
    assert len({n.fingerprint for n in report.nodes}) == 3  # each node its own host key


@needs_docker
def test_a_node_offering_another_nodes_host_key_is_refused(testbed, tmp_path):
    bed, _ = testbed
    first, second, _ = _nodes(testbed)
    # known_hosts that pins node 2's key for node 1's address: what a swapped node looks like.
    wrong = tmp_path / "known_hosts"
    key = (bed.layout.host_key(2).with_name("ssh_host_ed25519_key.pub")).read_text().split()
    wrong.write_text(f"{first.address} {key[0]} {key[1]}\n")
    target = SSH(first.model_copy(update={"known_hosts": str(wrong)}))
    with pytest.raises(targets.HostKeyRejected, match="HOST KEY CHANGED"):
        target.run(["true"])


@needs_docker
def test_each_node_runs_containers_in_its_own_engine_on_its_own_address(testbed):
    bed, report = testbed
    for node in _nodes(testbed):
        target = SSH(node)
        try:
            before = target.run(["docker", "ps", "--all", "--quiet"]).stdout.split()
            out = target.run(["docker", "run", "--rm", "--network", "host", report.runtime.tag,
                              "sh", "-c", "trtllm-serve --version; hostname; python3 -c "
                              "'import socket; print(socket.gethostbyname(socket.gethostname()))'"],
                             timeout=120).stdout.splitlines()
            others = target.run(["docker", "ps", "--all", "--quiet"]).stdout.split()
        finally:
            target.close()
        assert "stand-in" in out[0]
        assert out[1:] == [node.name, node.address]
        assert others == before  # --rm: each node's engine is its own and left as it was


@needs_docker
def test_up_again_reports_the_running_testbed_and_changes_nothing(testbed):
    bed, _ = testbed
    layout = bed.layout
    # Through the task, as a user runs it: the same code path as the fixture.
    done = subprocess.run([*INVOKE, "testbed.up", "--nodes", "3", "--name", layout.name,
                           "--subnet", layout.subnet, "--state-dir", str(layout.state_dir),
                           "--base", bed.base, "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout)
    assert again["changed"] is False
    assert [n["action"] for n in again["nodes"]] == ["already running"] * 3
    assert [n["runtime_image"] for n in again["nodes"]] == ["already there"] * 3
    status = subprocess.run([*INVOKE, "testbed.status", "--name", layout.name,
                             "--state-dir", str(layout.state_dir), "--json"],
                            capture_output=True, text=True, timeout=60)
    containers = json.loads(status.stdout)["containers"]
    assert sorted(containers) == [layout.container(i) for i in (1, 2, 3)]
    assert {info["state"] for info in containers.values()} == {"running"}


# --- the stand-in served by mpirun across three nodes -----------------------------------------

JOB = "serve-test"
MODEL = "serve-test-model"  # in each node's artifact store
PORT = 8000


class Serving:
    """The stand-in across the testbed: one container per node (host network, started by
    trtllm_deploy.serving.containers), mpirun in the head's, reaching the others through the rsh agent."""

    def __init__(self, bed, image: str, workdir: Path):
        self.cluster = bed.inventory()
        self.nodes = self.cluster.nodes
        self.head = self.cluster.head
        self.image = image
        self.workdir = workdir
        self.targets = {node.name: SSH(node) for node in self.nodes}
        self.container = containers.container_name(self.cluster, JOB)

    def run(self, node, argv, **kwargs):
        return self.targets[node.name].run(argv, **kwargs)

    def start(self, env: dict[str, str] | None = None) -> None:
        authorize_head_key(self.cluster)
        model = self.workdir / "model"
        model.mkdir(exist_ok=True)
        (model / "config.json").write_text(json.dumps({"model_type": "llama",
                                                       "architectures": ["LlamaForCausalLM"]}))
        (model / "model.safetensors").write_bytes(b"\0" * 1024)
        for node in self.nodes:
            self.targets[node.name].put(model, f"{node.paths.artifacts}/{MODEL}")
        containers.up(self.cluster, containers.Job(JOB, image=self.image, artifact=MODEL),
                      self.workdir / "job")
        argv = containers.mpirun_argv(
            self.cluster, ["trtllm-llmapi-launch", "trtllm-serve", f"{containers.ARTIFACTS}/{MODEL}",
                           "--tp_size", "3", "--host", "0.0.0.0", "--port", str(PORT)])
        exec_env = [f"--env={key}={value}" for key, value in (env or {}).items()]
        self.run(self.head, ["docker", "exec", "--detach", *exec_env, self.container, "sh", "-c",
                             join(argv) + " >/tmp/serve.log 2>&1"])

    def url(self, path: str) -> str:
        return f"http://{self.head.address}:{PORT}{path}"

    def log(self) -> str:
        return self.run(self.head, ["docker", "exec", self.container, "cat", "/tmp/serve.log"],
                        check=False).stdout

    def wait_healthy(self, deadline_s: float = 90) -> None:
        def status() -> int:
            with urllib.request.urlopen(self.url("/health"), timeout=2) as answer:
                return answer.status

        try:
            until(status, deadline_s, "the stand-in to answer /health with 200",
                  done=lambda code: code == 200, retry_on=(urllib.error.URLError, OSError))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{self.log()[-3000:]}") from None

    def stop(self) -> None:
        stopped = containers.down(self.cluster, JOB)
        for node in self.nodes:
            place = targets.expand(f"{node.paths.artifacts}/{MODEL}", self.targets[node.name].home())
            self.run(node, ["rm", "-rf", place], check=False)
        for target in self.targets.values():
            target.close()
        assert all(o.ok and o.value.clean for o in stopped), stopped.summary()


def stream_completion(url: str, prompt: str, max_tokens: int, timeout: float) -> list[dict]:
    body = json.dumps({"model": "/model", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        for raw in answer:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return chunks
            chunks.append(json.loads(line[len("data: "):]))
    raise AssertionError("the stream ended without [DONE]")


@pytest.fixture(scope="module")
def serving(testbed, tmp_path_factory):
    bed, report = testbed
    deployment = Serving(bed, report.runtime.tag, tmp_path_factory.mktemp("serving"))
    try:
        deployment.start({"STANDIN_TOKENS_PER_S": "200", "STANDIN_LOAD_SECONDS": "1"})
        deployment.wait_healthy()
        yield deployment
    finally:
        deployment.stop()


@needs_docker
def test_mpirun_across_three_nodes_serves_a_streamed_completion(serving):
    chunks = stream_completion(serving.url("/v1/completions"), "Hello testbed", 12, timeout=60)
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks)
    assert len([c for c in chunks if c["choices"][0]["text"]]) == 12
    assert "stand-in" in chunks[0]["model"]
    # Deterministic: the same prompt gives the same text; another prompt another text.
    again = stream_completion(serving.url("/v1/completions"), "Hello testbed", 12, timeout=60)
    assert "".join(c["choices"][0]["text"] for c in again) == text
    other = stream_completion(serving.url("/v1/completions"), "Another prompt", 12, timeout=60)
    assert "".join(c["choices"][0]["text"] for c in other) != text
    # Every rank ran on its own node, inside that node's container.
    log = serving.log()
    for rank in range(3):
        assert f"[1,{rank}]" in log


@needs_docker
def test_killing_one_ranks_process_fails_or_stalls_serving(serving):
    third = serving.nodes[2]
    killed = serving.run(third, ["docker", "exec", serving.container, "pkill", "-KILL", "-f", "trtllm-serve"],
                         check=False)
    assert killed.exit_code == 0, killed.stderr
    started = time.monotonic()
    outcome = "answered"
    try:
        chunks = stream_completion(serving.url("/v1/completions"), "after the loss", 50, timeout=8)
        outcome = f"answered {len(chunks)} chunks"
    except (urllib.error.URLError, OSError, AssertionError, json.JSONDecodeError) as exc:
        outcome = f"failed: {type(exc).__name__}"
    assert not outcome.startswith("answered"), (outcome, time.monotonic() - started)
    # mpirun notices the lost rank and the job ends: the head's serving process is gone too.
    until(lambda: serving.run(serving.head, ["docker", "exec", serving.container, "pgrep", "-f", "mpirun"],
                              check=False).exit_code, 30, "mpirun to end after a rank was killed",
          done=lambda code: code != 0)
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(serving.url("/health"), timeout=2)


# --- down -------------------------------------------------------------------------------------

@needs_docker
def test_down_removes_everything_it_made_and_nothing_else(base_image, tmp_path):
    name = f"pydown{os.getpid()}"
    bed, report = start_testbed(tmp_path / "state", 1, name, runtime=False, base=base_image)
    layout = bed.layout
    # Something of the user's that looks like ours but is not labelled: it must survive.
    bystander = f"trtllm-{name}-node9"
    subprocess.run(["docker", "create", "--name", bystander, report.image.tag], check=True,
                   capture_output=True)
    try:
        assert bed.leftovers()["containers"] == [layout.container(1)]
        removed = bed.down()
        assert removed == {"containers": [layout.container(1)], "networks": [layout.network],
                           "volumes": []}
        assert bed.leftovers() == {"containers": [], "networks": [], "volumes": []}
        listed = subprocess.run(["docker", "ps", "--all", "--format", "{{.Names}}"],
                                capture_output=True, text=True).stdout.split()
        assert layout.container(1) not in listed and bystander in listed
        networks = subprocess.run(["docker", "network", "ls", "--format", "{{.Name}}"],
                                  capture_output=True, text=True).stdout.split()
        assert layout.network not in networks
        assert layout.client_key.exists() and not layout.hosts_file.exists()  # keys kept
        assert bed.down() == {"containers": [], "networks": [], "volumes": []}  # idempotent
        bed.down(purge=True)
        assert not layout.state_dir.exists()
    finally:
        subprocess.run(["docker", "rm", "--force", bystander], capture_output=True)
        bed.down(purge=True)


@needs_docker
def test_a_failed_up_takes_back_what_it_made(base_image, tmp_path):
    layout = layouts.Layout(name=f"pyfail{os.getpid()}", nodes=2, subnet="10.213.230.0/24",
                            state_dir=tmp_path / "state")
    bed = cluster.Testbed(layout, base=base_image)
    try:
        with pytest.raises(DeployError, match="was not ready after"):
            bed.up(runtime=False, ready_timeout=0)  # no node can be ready in no time
        assert bed.leftovers() == {"containers": [], "networks": [], "volumes": []}
        assert not layout.hosts_file.exists()
    finally:
        bed.down(purge=True)


@needs_docker
def test_ctrl_c_during_up_exits_130_and_leaves_nothing(base_image, tmp_path):
    name = f"pyint{os.getpid()}"
    state = tmp_path / "state"
    bed = cluster.Testbed(layouts.Layout(name=name, nodes=3, subnet="10.213.231.0/24",
                                         state_dir=state))
    # Docker tells when the first node container is created (its events since a second ago, so
    # none is missed between starting to listen and `up` starting).
    events = subprocess.Popen(["docker", "events", "--since", str(int(time.time()) - 1),
                               "--filter", "type=container", "--filter", "event=create",
                               "--filter", f"label={layouts.LABEL}={name}",
                               "--format", "{{.Actor.Attributes.name}}"], stdout=subprocess.PIPE, text=True)
    proc = subprocess.Popen([*INVOKE, "testbed.up", "--nodes", "3", "--name", name, "--no-runtime",
                             "--subnet", "10.213.231.0/24", "--state-dir", str(state),
                             "--base", base_image],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    up_ended = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([events.stdout, up_ended], [], [], 120)
        assert events.stdout in ready, ("no node container appeared within 120 s"
                                         if not ready else proc.communicate(timeout=60))
        assert events.stdout.readline().strip() in bed.containers()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert bed.leftovers() == {"containers": [], "networks": [], "volumes": []}
    finally:
        os.close(up_ended)
        events.kill()
        events.wait()
        proc.kill()
        bed.down(purge=True)
