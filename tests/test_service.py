"""The supervisor kept running on the head (``invoke supervise --install``): the worker-reboot test on a
two-node testbed of its own (real sshd, real Docker engines in each node, the supervisor's image
built here and sent to the head), and without Docker: the systemd units' text, how the mode is
chosen from what the head has (a real sshd session where a fake ``systemctl``/``sudo`` on PATH
stand in for systemd, which cannot run here), the head's view of the cluster, and bad input."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import docker_unusable, start_testbed
from trtllm_deploy.hosts import inventory, sshsetup, targets
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.serving import install, jobs, launch, servicefiles, state
from trtllm_deploy.serving.servicefiles import Head, Options
from trtllm_deploy.testbed import artifact as tiny
from waiting import until

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = "tiny-bf16-svc-test"
PORT = 8371
# How long after a worker's reboot the endpoint must answer again, with nothing done by hand (README).
BACK_WITHIN_S = 120
needs_docker = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


def cli(home: Path, hosts: Path, *args: str, docker: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "COLUMNS": "200"}
    if not docker:
        env["DOCKER_HOST"] = "unix:///nonexistent"
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), *args,
                           "--hosts", str(hosts)], capture_output=True, text=True, timeout=900,
                          cwd=home, env=env)


# --- without Docker: what is written, and how the mode is chosen ---------------------------------

TWO = """
[cluster]
name = "lab"
[defaults]
user = "ops"
identity_file = "/controller/key"
known_hosts = "/controller/known_hosts"
[defaults.container]
image = "nvcr.io/nvidia/tensorrt-llm/release:1.0.0"
[[nodes]]
name = "spark-1"
address = "192.168.1.11"
role = "head"
fabric = { address = "10.0.0.1" }
[[nodes]]
name = "spark-2"
address = "192.168.1.12"
port = 2222
fabric = { address = "10.0.0.2" }
[nodes.paths]
artifacts = "/data/engines"
"""
HEAD = Head("ops", 1000, 1000, "/home/ops", "container", "no systemd")


@pytest.fixture
def lab(tmp_path) -> inventory.Cluster:
    (tmp_path / "key").write_text("a key\n")
    (tmp_path / "hosts.toml").write_text(TWO.replace("/controller", str(tmp_path)))
    return inventory.load(tmp_path / "hosts.toml")


def test_the_heads_view_reaches_each_node_where_its_peers_do_with_the_heads_key(lab, tmp_path):
    head = Head("ops", 1000, 1000, str(tmp_path / "ops"), "container", "no systemd")
    (tmp_path / "ops" / ".ssh").mkdir(parents=True)
    (tmp_path / "ops" / ".ssh" / "id_ed25519").write_text("the head's key\n")
    text = servicefiles.head_view(lab, head)
    (tmp_path / "head.toml").write_text(text)
    seen = inventory.load(tmp_path / "head.toml")   # a valid inventory the supervisor loads
    assert [n.name for n in seen.nodes] == ["spark-1", "spark-2"] and seen.name == "lab"
    one, two = seen.nodes
    # The address peers use (not the fabric one), the port mpirun's ssh_config gives peers.
    assert (one.address, one.port, two.address, two.port) == ("192.168.1.11", 22, "192.168.1.12", 2222)
    assert one.fabric.address == "10.0.0.1" and two.paths.artifacts == "/data/engines"
    assert {n.identity_file for n in seen.nodes} == {f"{head.home}/.ssh/id_ed25519"}
    assert {n.known_hosts for n in seen.nodes} == {f"{head.home}/.ssh/known_hosts"}
    assert {n.user for n in seen.nodes} == {"ops"} and two.container.image == lab.head.container.image
    assert one.connection == "ssh" and one.is_head
    # The names the head's known_hosts must pin, as ssh.setup pins them.
    assert servicefiles.pinned_names(lab) == {"spark-1": "192.168.1.11", "spark-2": "[192.168.1.12]:2222"}
    pinned = "192.168.1.11 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA\n"
    with pytest.raises(install.InputError, match=r"spark-2 \(\[192.168.1.12\]:2222\).*ssh.setup"):
        install.check_pins(lab, pinned)
    install.check_pins(lab, pinned + "[192.168.1.12]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB\n")


def test_the_units_run_the_supervisor_container_in_the_foreground_restarted_always(lab):
    options = Options(on_failure="restart", hang_s=12.5)
    image = "trtllm-deploy/supervisor:0123456789abcdef"
    for mode, after, wanted_by in (("system", "After=docker.service network-online.target",
                                    "WantedBy=multi-user.target"),
                                   ("user", "After=network-online.target", "WantedBy=default.target")):
        head = Head("ops", 1000, 1001, "/home/o%ps", mode, "")
        text = servicefiles.unit(lab, head, image, options)
        lines = text.splitlines()
        assert after in lines and wanted_by in lines and "Restart=always" in lines
        assert ("Requires=docker.service" in lines) == (mode == "system")
        start = next(line for line in lines if line.startswith("ExecStart="))
        assert "/home/o%%ps/.ssh/id_ed25519" in start and "/home/o%ps" not in start.replace("%%", "")
        # systemd's quoting and specifiers: '%' doubled; split back, the very argv of a foreground run.
        words = shlex.split(start.removeprefix("ExecStart=").replace("%%", "%"))
        assert words == ["/usr/bin/docker", *servicefiles.docker_run(lab, head, image, options,
                                                                      detach=False)[1:]]
        assert words[1:4] == ["run", "--rm", "--name"] and "--restart" not in words
        assert "--user" in words and words[words.index("--user") + 1] == "1000:1001"
        assert "--on-failure=restart" in words and "--hang-s=12.5" in words
        assert "/home/o%ps/.ssh/id_ed25519:/home/o%ps/.ssh/id_ed25519:ro" in words
        assert servicefiles.unit_path(lab, head).endswith("/trtllm-deploy-supervisor-lab.service")
    detached = servicefiles.docker_run(lab, HEAD, image, options, detach=True)
    assert detached[2:5] == ["-d", "--restart", "unless-stopped"] and "--rm" not in detached
    assert "/home/ops/.local/state/trtllm-deploy/clusters/lab:/home/ops/.local/state/trtllm-deploy/" \
           "clusters/lab:rw" in detached
    assert not any(":rw" in w and ".ssh" in w for w in detached)   # the key and known_hosts: read-only


def test_changed_options_are_not_up_to_date(lab):
    one = servicefiles.wanted(lab, HEAD, "img:1", Options(), None)
    assert servicefiles.same(one, servicefiles.wanted(lab, HEAD, "img:1", Options(), None))
    assert not servicefiles.same(one, servicefiles.wanted(lab, HEAD, "img:1", Options(hang_s=9), None))
    assert not servicefiles.same(one, servicefiles.wanted(lab, HEAD, "img:2", Options(), None))
    assert not servicefiles.same(one, servicefiles.wanted(lab, HEAD, "img:1", Options(), "lock"))
    assert not servicefiles.same(None, one)


FAKE = {"sudo": "#!/bin/sh\n[ \"$FAKE_SUDO\" = ok ] || exit 1\n[ \"$1\" = -n ] && shift\nexec \"$@\"\n",
        "systemctl": "#!/bin/sh\n[ \"$1 $2\" = '--user show-environment' ] && [ \"$FAKE_USER_MANAGER\" = ok ]"
                     " && { echo HOME=$HOME; exit 0; }\nexit 1\n"}


@pytest.mark.parametrize("booted, sudo, manager, mode", [
    (False, "ok", "ok", "container"),       # no systemd on the head (the testbed)
    (True, "ok", "ok", "system"),           # sudo -n works: a system service
    (True, "no", "ok", "user"),             # no sudo: the user's own manager
    (True, "no", "no", "container"),        # systemd, but no way in: Docker keeps it running
])
def test_the_mode_is_chosen_from_what_the_head_has(sshd_factory, make_node, tmp_path, booted, sudo,
                                                   manager, mode):
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in FAKE.items():
        (fake / name).write_text(text.replace("$FAKE_SUDO", sudo).replace("$FAKE_USER_MANAGER", manager))
        (fake / name).chmod(0o755)
    server = sshd_factory()
    (server.home / ".ssh").mkdir(exist_ok=True)
    (server.home / ".ssh" / "id_ed25519").write_text("key\n")
    (server.home / ".ssh" / "known_hosts").write_text("10.1.2.3 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA\n")
    systemd = tmp_path / "run-systemd-system"
    if booted:
        systemd.mkdir()
    target = SSH(make_node(server))
    try:
        head, known = install.detect(target, booted=str(systemd), path=str(fake))
    finally:
        target.close()
    assert head.mode == mode, head
    assert head.home == str(server.home) and head.uid == os.getuid()
    assert known.startswith("10.1.2.3 ssh-ed25519")
    if mode == "container":
        assert ("is missing" in head.why) == (not booted)


def test_bad_input_is_refused_before_the_head_is_asked(sshd_factory, hosts_file, tmp_path):
    server = sshd_factory()
    hosts = hosts_file([server])
    home = tmp_path / "home"
    home.mkdir()
    for args, said in ((["--on-failure", "retry", "--install"], "--on-failure 'retry'"),
                       (["--install", "--uninstall"], "pass one of them"),
                       (["--install", "--build", "laptop"], "--build 'laptop'"),
                       (["--install", "--wait-s", "0"], "--wait-s above 0")):
        done = cli(home, hosts, "supervise", *args, docker=False)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done
    assert "Accepted publickey" not in server.log


def test_uninstall_with_nothing_installed_says_so(sshd_factory, hosts_file, tmp_path):
    server = sshd_factory(extra_config="SetEnv DOCKER_HOST=unix:///nonexistent\n")
    hosts = hosts_file([server])
    home = tmp_path / "home"
    home.mkdir()
    done = cli(home, hosts, "supervise", "--uninstall", docker=False)
    assert done.returncode == 0 and "nothing to remove" in done.stdout, done
    done = cli(home, hosts, "logs", "--supervisor", docker=False)
    assert done.returncode == 0 and "has no history" in done.stdout, done


def test_the_service_records_its_history_and_stops_cleanly_on_sigterm(lab, tmp_path):
    """The image's entry point as Docker runs it: options parsed, nothing deployed (so no node is
    asked anything), its history written beside the record, SIGTERM ends it with exit 0."""
    home = tmp_path / "home"
    home.mkdir()
    history = home / ".local/state/trtllm-deploy/clusters/lab/supervisor.jsonl"
    service = subprocess.Popen([sys.executable, "-m", "trtllm_deploy.serving.service", "run",
                                f"--hosts={lab.source}", "--on-failure=restart", "--hang-s=9.5"],
                               cwd=ROOT, env={**os.environ, "HOME": str(home)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: history.exists() and '"idle"' in history.read_text(), 30, "the service idle")
        service.send_signal(signal.SIGTERM)
        _, err = service.communicate(timeout=30)
    finally:
        service.kill()
    assert service.returncode == 0, err
    events = [json.loads(line) for line in history.read_text().splitlines()]
    assert [e["event"] for e in events] == ["started", "idle", "stopped"]
    assert events[0]["options"]["on_failure"] == "restart" and events[0]["options"]["hang_s"] == 9.5
    assert "keeps serving" in events[-1]["text"] and "Traceback" not in err


# --- on a two-node testbed of its own: a worker reboots, the deployment comes back by itself ------

@pytest.fixture(scope="module")
def bed(base_image, standin_image, tmp_path_factory):
    """Two nodes, ssh.setup done (every node trusts every node, the head pins them all), the
    artifact in every store; this machine's record of the deployments in a HOME of its own."""
    testbed, _ = start_testbed(tmp_path_factory.mktemp("svcbed"), 2, f"svc{os.getpid()}", base=base_image)
    try:
        cluster = testbed.inventory()
        sshsetup.apply(sshsetup.look(cluster))
        folder = tiny.make(tmp_path_factory.mktemp("artifact") / ARTIFACT)
        for node in cluster.nodes:
            target = SSH(node)
            store = targets.expand(node.paths.artifacts, target.home())
            target.run(["mkdir", "-p", store])
            target.put(folder, f"{store}/{ARTIFACT}")
            target.close()
        yield testbed, cluster, base_image
    finally:
        testbed.down(purge=True)


def on_head(cluster, *argv: str) -> str:
    target = SSH(cluster.head)
    try:
        return target.run(list(argv), check=False).stdout
    finally:
        target.close()


def answers(cluster) -> bool:
    body = json.dumps({"model": f"/artifacts/{ARTIFACT}", "prompt": "hello", "max_tokens": 2}).encode()
    request = urllib.request.Request(f"http://{cluster.head.address}:{PORT}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return bool(json.load(answer)["choices"][0]["text"])
    except (OSError, ValueError, LookupError):
        return False


def events(cluster) -> list[dict]:
    return install.look(cluster, lines=200).history


@needs_docker
def test_a_worker_reboot_comes_back_by_itself(bed, tmp_path, monkeypatch):
    testbed, cluster, base = bed
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))   # this machine's record of the deployments: the test's own
    hosts = testbed.layout.hosts_file
    wanted = state.Deployment(job="svc", runtime="trtllm", image=cluster.head.container.image,
                              artifact=ARTIFACT, tp=2, port=PORT, env=(("STANDIN_LOAD_SECONDS", "1"),))
    launch.launch(cluster, wanted, tmp_path / "tmp")
    install_args = ("supervise", "--install", "--on-failure", "restart", "--build", "here", "--base", base)
    name = f"trtllm-deploy-supervisor-{cluster.name}"
    try:
        # The plan first; --dry-run changes nothing on the head.
        planned = cli(home, hosts, *install_args, "--dry-run", "--json")
        assert planned.returncode == 0, planned.stderr
        steps = [step["action"] for step in json.loads(planned.stdout)["steps"]]
        assert "container Docker restarts" in steps[0] and "no systemd" in steps[0], steps
        assert any(f"copy this machine's record of {cluster.name} (current: svc)" in s for s in steps)
        assert on_head(cluster, "docker", "ps", "-aq", "--filter", f"name={name}") == ""
        assert "supervisor" not in on_head(cluster, "ls", ".config/trtllm-deploy")

        done = cli(home, hosts, *install_args, "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["mode"] == "container" and report["running"] and not report["up_to_date"]
        assert on_head(cluster, "docker", "inspect", "--format", "{{.HostConfig.RestartPolicy.Name}}",
                       name).strip() == "unless-stopped"
        again = cli(home, hosts, *install_args, "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["up_to_date"], again.stderr
        until(lambda: any(e["event"] == "watching" for e in events(cluster)), 60, "the supervisor watches")

        # The worker reboots; nothing is done by hand.
        rebooted = time.monotonic()
        subprocess.run(["docker", "restart", testbed.layout.container(2)], check=True, timeout=120)
        until(lambda: any(e["event"] == "relaunched" for e in events(cluster)) and answers(cluster),
              BACK_WITHIN_S, "the deployment serving again after spark-2's reboot")
        print(f"serving again {time.monotonic() - rebooted:.0f} s after the reboot", file=sys.stderr)
        history = events(cluster)
        seen = [e["event"] for e in history]
        assert seen.index("failure") < seen.index("relaunched"), seen

        # Changed options replace the installed one. A longer reboot (the node away for a while) is not
        # the deployment's failure: even under --on-failure stop it is launched again once the node is back.
        replaced = cli(home, hosts, *install_args[:3], "stop", *install_args[4:], "--json")
        assert replaced.returncode == 0 and not json.loads(replaced.stdout)["up_to_date"], replaced.stderr
        assert install.look(cluster).record["options"]["on_failure"] == "stop"
        until(lambda: [e["event"] for e in events(cluster)].count("started") == 2
              and events(cluster)[-1]["event"] == "watching", 60, "the new supervisor watches")
        subprocess.run(["docker", "stop", testbed.layout.container(2)], check=True, timeout=120)
        until(lambda: any(e["event"] == "waiting" and e["node"] == "spark-2" for e in events(cluster)), 60,
              "the supervisor waiting for spark-2")
        subprocess.run(["docker", "start", testbed.layout.container(2)], check=True, timeout=120)
        until(lambda: [e["event"] for e in events(cluster)][-2:] == ["relaunched", "watching"]
              and answers(cluster), BACK_WITHIN_S, "the deployment serving again after spark-2 came back")
        history = events(cluster)
        print("\n".join(json.dumps(e)[:300] for e in history), file=sys.stderr)
        late = [e["event"] for e in history][seen.index("relaunched") + 1:]
        assert late.index("node down") < late.index("waiting") < late.index("back") < late.index("relaunched")
        assert "gave up" not in late, late

        # The history and the head's view, from this machine.
        status = cli(home, hosts, "status", "--json")
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert shown["healthy"] and shown["supervisor"]["installed"] and shown["supervisor"]["running"]
        assert shown["deployment"]["job"] == "svc"
        table = cli(home, hosts, "status")
        assert "supervisor: installed on the head as a container service, running" in table.stdout, table
        logs = cli(home, hosts, "logs", "--supervisor")
        assert logs.returncode == 0 and " failure: " in logs.stdout and " relaunched: " in logs.stdout, logs

        # A second supervisor, in this terminal, is refused: both would act on one failure.
        second = cli(home, hosts, "supervise")
        assert second.returncode == 1 and f"installed on {cluster.head.name} already" in second.stderr, second

        # `invoke stop` from this machine: the supervisor steps aside and does not launch again what was
        # stopped on purpose; afterwards it idles, with nothing of the job left on any node.
        stopped = cli(home, hosts, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert "pausing the head's supervisor while this machine runs invoke stop svc" in stopped.stderr
        until(lambda: [e["event"] for e in events(cluster)][-4:] == ["paused", "resumed", "started", "idle"],
              60, "the supervisor paused for the stop, then idle")
        assert install.look(cluster).deployments.get("current") is None
        looks = jobs.look(launch.job_cluster(cluster, wanted), wanted)
        assert all(not seen.container for seen in looks.values()), looks

        # `invoke launch` from this machine: the supervisor steps aside, then watches the new job.
        started = cli(home, hosts, "launch", "--artifact", ARTIFACT, "--tp", "2", "--job", "svc2", "--port",
                      str(PORT), "--env", "STANDIN_LOAD_SECONDS=1", "--json")
        assert started.returncode == 0, started.stderr
        until(lambda: events(cluster)[-1] == {**events(cluster)[-1], "event": "watching", "job": "svc2"}, 60,
              "the supervisor watching svc2")
        assert install.look(cluster).deployments["current"]["job"] == "svc2"
        assert answers(cluster)

        # Uninstall: nothing of it is left on the head, and this machine has the record back.
        removed = cli(home, hosts, "supervise", "--uninstall", "--json")
        assert removed.returncode == 0 and json.loads(removed.stdout)["removed"], removed.stderr
        assert on_head(cluster, "docker", "ps", "-aq", "--filter", "label=io.trtllm-deploy.supervisor") == ""
        assert "supervisor" not in on_head(cluster, "ls", ".config/trtllm-deploy")
        assert on_head(cluster, "docker", "images", "-q", "trtllm-deploy/supervisor") == ""
        assert not install.look(cluster).installed
        after = cli(home, hosts, "supervise", "--uninstall")
        assert after.returncode == 0 and "nothing to remove" in after.stdout
    finally:
        on_head(cluster, "docker", "rm", "--force", name)
        launch.stop(cluster, "svc")
        launch.stop(cluster, "svc2")
