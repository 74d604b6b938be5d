"""Preflight: verdicts from recorded facts (pure), then the real thing over local and SSH nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from trtllm_deploy.hosts import inventory, preflight
from trtllm_deploy.hosts.facts import Output
from waiting import gone, until

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"

GB10_TABLE = (DATA / "nvidia-smi/gb10-580.95.05.txt").read_text()
# The row preflight's query gets on a GB10, assembled from the recorded GB10 outputs
# (name and compute capability 12.1, driver 580.95.05, memory.total [N/A]).
GB10_QUERY = "0, NVIDIA GB10, 12.1, 580.95.05, [N/A]\n"
H100_Q = (DATA / "nvidia-smi/h100-q-d-compute-580.159.04.txt").read_text()
H200_QUERY = next((DATA / "nvidia-smi").glob("h200x2-query-*.csv")).read_text()
DOCKER_NVIDIA = (DATA / "docker/nvidia-runtime-registered.json").read_text()
DOCKER_PLAIN = (DATA / "docker/debian12-docker.io.json").read_text()
MEMINFO = "MemTotal:       127601388 kB\nMemAvailable:   120000000 kB\n"

HOSTS = """
[[nodes]]
name = "spark-1"
address = "192.0.2.1"
role = "head"
[[nodes]]
name = "spark-2"
address = "192.0.2.2"
"""


@pytest.fixture
def cluster(tmp_path) -> inventory.Cluster:
    path = tmp_path / "hosts.toml"
    path.write_text(HOSTS)
    return inventory.load(path)


def ok(stdout: str = "") -> Output:
    return Output(0, stdout, "")


def disk(paths, free_bytes: int) -> Output:
    return ok("".join(f"{p}\t/dev/nvme0n1p2 3936818806784 1 {free_bytes} 1% /\n" for p in paths))


def healthy(node: inventory.Node, cluster: inventory.Cluster) -> preflight.Observation:
    outputs = {
        "arch": ok("aarch64\n"), "os": ok('ID=ubuntu\nVERSION_ID="24.04"\n'), "user": ok("nvidia\n"),
        "gpu_query": ok(GB10_QUERY), "cuda": ok(GB10_TABLE), "meminfo": ok(MEMINFO),
        "disk": disk(preflight.disk_paths(node, cluster).values(), 500 * 10**9),
        "docker": ok(DOCKER_NVIDIA),
        "git": ok("git version 2.43.0\n"), "git_lfs": ok("git-lfs/3.4.1 (GitHub; linux arm64; go 1.22.2)\n"),
        "mpirun": ok("mpirun (Open MPI) 4.1.6\n"),
    }
    return preflight.Observation(node, outputs, clock_offset=0.002, clock_uncertainty=0.001)


def statuses(checks) -> dict[str, str]:
    return {item.name: item.status for item in checks}


def changed(seen: preflight.Observation, **outputs: Output) -> preflight.Observation:
    return replace(seen, outputs={**seen.outputs, **outputs})


def test_a_healthy_gb10_head_passes_everything(cluster):
    checks = preflight.evaluate(healthy(cluster.head, cluster), cluster)
    assert set(statuses(checks).values()) == {"pass"}, checks
    by_name = {item.name: item for item in checks}
    assert by_name["gpu"].detail == "1 × NVIDIA GB10"
    assert by_name["compute"].detail == "12.1"
    assert by_name["cuda"].detail == "CUDA 13.0 (driver)"
    assert "unified" in by_name["memory"].detail
    assert {"git", "git-lfs", "mpirun", "disk:build"} <= set(by_name)


def test_a_worker_is_not_asked_for_build_tools(cluster):
    worker = cluster.nodes[1]
    names = set(statuses(preflight.evaluate(healthy(worker, cluster), cluster)))
    assert not names & {"git", "git-lfs", "mpirun", "disk:build"}


CASES = [
    ("no-driver", dict(gpu_query=Output(127, "", "nvidia-smi: not found"),
                       cuda=Output(127, "", "")),
     {"gpu": "fail", "compute": "skip", "driver": "skip", "cuda": "skip"}, "NVIDIA driver"),
    ("old-driver-and-cuda", dict(gpu_query=ok("0, NVIDIA GB10, 12.1, 575.57.08, [N/A]\n"),
                                 cuda=ok(GB10_TABLE.replace("Version: 13.0", "Version: 12.9"))),
     {"driver": "fail", "cuda": "fail"}, "reboot"),
    ("not-a-gb10", dict(gpu_query=ok(H200_QUERY), cuda=ok(H100_Q)),
     {"gpu": "warn", "compute": "pass"}, "assume a GB10"),
    ("fewer-gpus-than-declared", dict(gpu_query=ok("")), {"gpu": "fail"}, "nvidia-smi -L"),
    ("docker-permission", dict(docker=Output(1, (DATA / "docker/no-permission.stdout").read_text(),
                                             (DATA / "docker/no-permission.stderr").read_text())),
     {"docker": "fail", "nvidia-runtime": "skip"}, "usermod -aG docker nvidia"),
    ("docker-not-running", dict(docker=Output(1, (DATA / "docker/no-daemon.stdout").read_text(),
                                              (DATA / "docker/no-daemon.stderr").read_text())),
     {"docker": "fail"}, "systemctl enable --now docker"),
    ("docker-missing", dict(docker=Output(127, "", "docker: not found")), {"docker": "fail"},
     "install Docker"),
    ("no-nvidia-runtime", dict(docker=ok(DOCKER_PLAIN)), {"docker": "pass", "nvidia-runtime": "fail"},
     "nvidia-ctk runtime configure"),
    ("disk-full", dict(disk=None), {"disk:build": "fail", "disk:artifacts": "fail"}, "free space"),
    ("x86-host", dict(arch=ok("x86_64\n")), {"arch": "warn"}, "will not run on one"),
    ("no-git-lfs", dict(git_lfs=Output(1, "", "git: 'lfs' is not a git command.")),
     {"git-lfs": "fail", "git": "pass"}, "apt-get install -y git-lfs"),
    ("no-mpirun", dict(mpirun=Output(127, "", "")), {"mpirun": "fail"}, "openmpi-bin"),
    ("low-memory", dict(meminfo=ok("MemTotal: 127601388 kB\nMemAvailable: 2000000 kB\n")),
     {"memory": "warn"}, "drop_caches"),
]


@pytest.mark.parametrize("outputs,expected,remedy", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_failure_has_its_verdict_and_remedy(cluster, outputs, expected, remedy):
    seen = healthy(cluster.head, cluster)
    if "disk" in outputs:
        outputs["disk"] = disk(preflight.disk_paths(cluster.head, cluster).values(), 10 * 10**9)
    got = statuses(preflight.evaluate(changed(seen, **outputs), cluster))
    assert {name: got.get(name) for name in expected} == expected
    remedies = " ".join(item.remedy for item in preflight.evaluate(changed(seen, **outputs), cluster))
    assert remedy in remedies


def test_missing_nvidia_runtime_can_be_only_a_warning(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text("[preflight]\nrequire_nvidia_runtime = false\n" + HOSTS)
    cluster = inventory.load(path)
    seen = changed(healthy(cluster.head, cluster), docker=ok(DOCKER_PLAIN))
    assert statuses(preflight.evaluate(seen, cluster))["nvidia-runtime"] == "warn"


@pytest.mark.parametrize("offset,uncertainty,status", [
    (0.3, 0.01, "pass"), (2.0, 0.01, "fail"), (-2.0, 0.01, "fail"), (0.6, 0.2, "pass")])
def test_clock_skew_counts_the_measurement_uncertainty(cluster, offset, uncertainty, status):
    seen = replace(healthy(cluster.head, cluster), clock_offset=offset, clock_uncertainty=uncertainty)
    assert statuses(preflight.evaluate(seen, cluster))["clock"] == status


@pytest.mark.parametrize("index", [0, 1], ids=["head", "worker"])
def test_an_unreached_node_fails_reach_and_skips_exactly_what_a_reached_one_checks(cluster, index):
    node = cluster.nodes[index]
    seen = preflight.Observation(node, error="cannot connect to 192.0.2.2: refused")
    checks = preflight.evaluate(seen, cluster)
    assert checks[0].name == "reach" and checks[0].status == "fail"
    assert {item.status for item in checks[1:]} == {"skip"}
    reached = preflight.evaluate(healthy(node, cluster), cluster)
    assert [item.name for item in checks] == [item.name for item in reached]


def test_unreadable_gpu_output_fails_gpu_and_skips_what_needs_it(cluster):
    seen = changed(healthy(cluster.head, cluster), gpu_query=ok("0, NVIDIA GB10\n"))
    got = statuses(preflight.evaluate(seen, cluster))
    assert (got["gpu"], got["compute"], got["driver"], got["cuda"]) == ("fail", "skip", "skip", "skip")


def test_arch_names_the_operating_system(cluster):
    seen = changed(healthy(cluster.head, cluster),
                   os=ok('PRETTY_NAME="Ubuntu 24.04.3 LTS"\nID=ubuntu\n'))
    arch = next(c for c in preflight.evaluate(seen, cluster) if c.name == "arch")
    assert arch.detail == "aarch64 (Ubuntu 24.04.3 LTS)"


def test_summary_and_json(cluster):
    checks = preflight.evaluate(healthy(cluster.head, cluster), cluster)
    checks += preflight.evaluate(preflight.Observation(cluster.nodes[1], error="down"), cluster)
    data = preflight.as_json(cluster, checks)
    assert data["summary"]["ok"] is False and data["summary"]["fail"] == 1
    assert data["nodes"]["spark-1"][0] == {"name": "reach", "status": "pass",
                                          "detail": "SSH 192.0.2.1 as nvidia", "remedy": ""}


# --- the real thing: a local head and an SSH worker, GPU facts from the GB10 recordings ------

FAKE_NVIDIA_SMI = """#!/bin/sh
# Stands in for the GPU driver's tool only: prints what a DGX Spark printed (tests/data).
case "$*" in
  *--query-gpu*) cat "{query}" ;;
  *) cat "{table}" ;;
esac
"""


@pytest.fixture
def gpu_bin(tmp_path) -> Path:
    directory = tmp_path / "fake-gpu-bin"
    directory.mkdir()
    (tmp_path / "query.csv").write_text(GB10_QUERY)
    script = directory / "nvidia-smi"
    script.write_text(FAKE_NVIDIA_SMI.format(query=tmp_path / "query.csv",
                                             table=DATA / "nvidia-smi/gb10-580.95.05.txt"))
    script.chmod(0o755)
    return directory


def run_preflight(hosts: Path, path_dirs: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{path_dirs}:{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "preflight",
                           "--hosts", str(hosts), "--json", *extra],
                          capture_output=True, text=True, env=env, timeout=120)


def test_preflight_over_local_and_ssh_nodes(tmp_path, sshd_factory, gpu_bin):
    system_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    home = tmp_path / "worker-home"
    home.mkdir()
    # sshd takes the first SetEnv only, so HOME and PATH go on one line.
    worker = sshd_factory(home=False, extra_config=f"SetEnv HOME={home} PATH={gpu_bin}:{system_path}\n")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(
        '[cluster]\nname = "mixed"\n[preflight]\narch = "%s"\n\n'
        '[[nodes]]\nname = "here"\nconnection = "local"\nrole = "head"\n\n' % os.uname().machine
        + worker.node_toml("there", role="worker")
        + '\n[[nodes]]\nname = "gone"\naddress = "127.0.0.1"\nport = 9\nconnect_timeout = 3\n'
        f'identity_file = "{worker.client_key}"\nknown_hosts = "{worker.known_hosts}"\n'
    )
    done = run_preflight(hosts, str(gpu_bin))
    assert done.returncode == 1, done.stderr  # "gone" is down and there is no nvidia runtime here
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout)
    by_node = {name: {c["name"]: c for c in checks} for name, checks in report["nodes"].items()}
    for name in ("here", "there"):
        checks = by_node[name]
        assert checks["reach"]["status"] == "pass"
        assert checks["gpu"]["detail"] == "1 × NVIDIA GB10", name
        assert checks["driver"]["detail"] == "580.95.05" and checks["cuda"]["status"] == "pass"
        assert "unified" in checks["memory"]["detail"]
        assert checks["docker"]["status"] == "pass"
        assert checks["clock"]["status"] == "pass"
        assert checks["arch"]["status"] == "pass"
    assert "SSH" in by_node["there"]["reach"]["detail"]
    assert "mpirun" in by_node["here"] and "mpirun" not in by_node["there"]
    assert by_node["here"]["mpirun"]["status"] == "pass"
    assert by_node["gone"]["reach"]["status"] == "fail"
    assert "cannot connect" in by_node["gone"]["reach"]["detail"]
    assert "preflight:" in done.stderr and "gone" in done.stderr


def test_preflight_table_names_every_remedy(tmp_path, gpu_bin):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[[nodes]]\nname = "here"\nconnection = "local"\n')
    env = {**os.environ, "PATH": f"{gpu_bin}:{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "preflight",
                           "--hosts", str(hosts)], capture_output=True, text=True, env=env, timeout=120)
    assert "nvidia-runtime" in done.stdout and "nvidia-ctk runtime configure" in done.stdout
    assert "passed" in done.stdout and "failed" in done.stdout


SLOW_NVIDIA_SMI = """#!/bin/sh
# a GPU tool that hangs, as a wedged driver's does (the sleep is the hang Ctrl-C must end)
exec sleep {seconds}
"""


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_ctrl_c_during_preflight_exits_130_and_leaves_nothing_running(tmp_path, sshd_factory, where):
    seconds = f"37.{os.getpid() % 1000:03d}{len(where)}"
    bin_dir = tmp_path / "slow-bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(SLOW_NVIDIA_SMI.format(seconds=seconds))
    (bin_dir / "nvidia-smi").chmod(0o755)
    system_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    hosts = tmp_path / "hosts.toml"
    if where == "local":
        hosts.write_text('[[nodes]]\nname = "here"\nconnection = "local"\n')
    else:
        home = tmp_path / "home"
        home.mkdir()
        server = sshd_factory(home=False, extra_config=f"SetEnv HOME={home} PATH={bin_dir}:{system_path}\n")
        hosts.write_text(server.node_toml("there"))

    def sleepers() -> list[str]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if seconds.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
        return found

    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "preflight",
                             "--hosts", str(hosts)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        until(sleepers, 15, "the hanging nvidia-smi to start")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=15)
        assert proc.returncode == 130, stderr
        assert "interrupted" in stderr and "Traceback" not in stderr
        gone(map(int, sleepers()), 5, "the node's hanging nvidia-smi to end after Ctrl-C")
        assert sleepers() == [], "Ctrl-C left the node's command running"
    finally:
        proc.kill()
        for pid in sleepers():
            os.kill(int(pid), signal.SIGKILL)


# --- the machine running invoke ---------------------------------------------------------------

def test_a_driver_that_is_not_a_node_is_asked_only_for_an_ssh_client(cluster):
    checks = preflight.driver_checks(cluster, cluster.nodes, which=lambda tool: f"/usr/bin/{tool}")
    assert [(c.node, c.name, c.status) for c in checks] == [
        ("this machine", "role", "pass"), ("this machine", "ssh", "pass")]
    assert "no GPU, Docker or checkpoint disk" in checks[0].detail
    assert "spark-1" in checks[0].detail  # the head, where checkpoints are fetched and built
    missing = preflight.driver_checks(cluster, cluster.nodes, which=lambda tool: None)
    assert missing[-1].status == "fail" and "openssh-client" in missing[-1].remedy


def test_a_driver_that_is_a_node_adds_nothing(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text('[[nodes]]\nname = "spark-1"\nconnection = "local"\nrole = "head"\n'
                    '[[nodes]]\nname = "spark-2"\naddress = "192.0.2.2"\n')
    local = inventory.load(path)
    assert preflight.driver_checks(local, local.nodes, which=lambda tool: None) == []


def test_preflight_from_a_laptop_says_what_this_machine_needs(tmp_path, sshd_factory, gpu_bin):
    system_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    worker = sshd_factory(extra_config=f"SetEnv PATH={gpu_bin}:{system_path}\n")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[preflight]\narch = "%s"\n\n' % os.uname().machine
                     + worker.node_toml("spark-1", role="head"))
    done = run_preflight(hosts, str(gpu_bin))
    report = json.loads(done.stdout)
    mine = {c["name"]: c for c in report["nodes"]["this machine"]}
    assert mine["role"]["status"] == "pass" and mine["ssh"]["status"] == "pass", mine
    assert "fetched on spark-1" in mine["role"]["detail"]
