"""``invoke diagnose.*``: the parsers against real recorded outputs (tests/data/diagnostics/, see its
SOURCES.md), the bandwidth formula against nccl-tests' own rows, the plain-host paths as far as a
machine without a GPU goes, then every task for real across the testbed's three nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from charts import colour, read_png
from conftest import docker_unusable
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.measure.diagnose import bundle, gpu, link, nccl, nccl_bench, profile

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "diagnostics"
needs_docker = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


def read(name: str) -> str:
    return (DATA / name).read_text()


# --- the bandwidth formula: the same as nccl-tests' ------------------------------------------------

@pytest.mark.parametrize("op, ranks, factor", [
    ("all_reduce", 2, 1.0), ("all_reduce", 3, 4 / 3), ("all_reduce", 8, 1.75),
    ("all_gather", 2, 0.5), ("all_gather", 3, 2 / 3), ("all_gather", 8, 0.875),
], ids=lambda v: str(v))
def test_bus_factor(op, ranks, factor):
    assert nccl_bench.bus_factor(op, ranks) == pytest.approx(factor)


@pytest.mark.parametrize("name", ["h200x2-nccl-tests-2.19.6-all_gather_perf.txt",
                                  "h200x2-nccl-tests-2.19.6-all_reduce_perf.txt",
                                  "h200x2-nccl-tests-2.19.6-16G-both.txt",
                                  "gb10x2-nccl-tests-2.20.0-all_reduce-excerpt.txt"])
def test_our_formula_gives_nccl_tests_own_numbers(name):
    """Every recorded nccl-tests row: our algbw and busbw from its size and time, to its rounding."""
    rows = nccl.parse_nccl_tests(read(name))
    assert rows
    for row in rows:
        algbw, busbw = nccl_bench.bandwidth(row.op, row.size, row.ranks, row.time_us / 1e6)
        assert algbw == pytest.approx(row.algbw, abs=0.011, rel=2e-3)
        assert busbw == pytest.approx(row.busbw, abs=0.011, rel=2e-3)


@pytest.mark.parametrize("text, size", [("16G", 16 << 30), ("512M", 512 << 20), ("4096", 4096),
                                        ("1k", 1024), ("2GB", 2 << 30)])
def test_sizes_read_as_nccl_tests_does(text, size):
    assert nccl_bench.parse_size(text) == size


def test_a_size_that_is_not_one():
    with pytest.raises(ValueError, match="expected a number"):
        nccl_bench.parse_size("lots")


# --- nccl_bench's output, nccl-tests' tables, NCCL's INFO log ---------------------------------------

def test_the_bench_lines_recorded_on_two_h200():
    found = nccl.parse_bench(read("h200x2-nccl_bench-torch-nccl-debug-info.log"))
    assert [(m.op, m.size) for m in found][:2] == [("all_reduce", 1 << 20), ("all_reduce", 16 << 20)]
    assert len(found) == 10 and all(m.correct and m.ranks == 2 for m in found)
    last = found[-1]
    assert (last.op, last.size, last.time_us, last.busbw) == ("all_gather", 4 << 30, 7038.4, 305.108)
    cupy = nccl.parse_bench(read("h200x2-nccl_bench-cupy.log"))
    assert [m.busbw for m in cupy if m.op == "all_reduce"] == [208.656, 326.304, 343.365]


def test_the_bench_lines_survive_mpiruns_tags():
    line = read("h200x2-nccl_bench-cupy.log").splitlines()[1]
    assert nccl.parse_bench(f"[1,0]<stdout>:{line}\n") == nccl.parse_bench(line)


def test_nccl_tests_tables():
    gather = nccl.parse_nccl_tests(read("h200x2-nccl-tests-2.19.6-all_gather_perf.txt"))
    assert [m.size for m in gather] == [1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30, 4 << 30]
    assert (gather[-1].op, gather[-1].ranks, gather[-1].busbw) == ("all_gather", 2, 292.29)
    both = nccl.parse_nccl_tests(read("h200x2-nccl-tests-2.19.6-16G-both.txt"))
    assert [(m.op, m.size, m.busbw) for m in both] == [("all_gather", 16 << 30, 302.48),
                                                        ("all_reduce", 16 << 30, 346.47)]
    spark = nccl.parse_nccl_tests(read("gb10x2-nccl-tests-2.20.0-all_reduce-excerpt.txt"))
    assert (spark[-1].op, spark[-1].size, spark[-1].ranks, spark[-1].busbw) == ("all_reduce", 65536, 2, 0.97)


def test_sockets_on_one_host_are_told_as_such():
    found = nccl.parse_transport(read("h200x2-nccl_bench-torch-nccl-debug-info.log"))
    assert (found.network, found.rdma, found.nodes) == ("Socket", False, 1)
    assert found.paths == {"P2P/CUMEM": 48}
    assert found.ib_problem == "NET/IB : No device found."
    assert "one node" in found.describe()


def test_rdma_over_roce_is_recognised():
    found = nccl.parse_transport(read("dgxh100-nccl-2.19.3-roce-info-excerpt.log"))
    assert (found.network, found.rdma) == ("IB", True)
    assert found.devices == ("mlx5_10:1/RoCE", "mlx5_11:1/RoCE")
    assert found.describe() == "RDMA (NET/IB: mlx5_10:1/RoCE, mlx5_11:1/RoCE)"


def test_no_info_lines_say_what_to_pass():
    found = nccl.parse_transport(read("h200x2-nccl_bench-cupy.log"))
    assert found.network is None and "NCCL_DEBUG=INFO" in found.describe()


@pytest.mark.parametrize("name, op, size, gate, passed, reason", [
    ("h200x2-nccl-tests-2.19.6-16G-both.txt", "all_gather", 16 << 30, 21.875, True, "302.48 GB/s ≥ 21.875"),
    ("gb10x2-nccl-tests-2.20.0-all_reduce-excerpt.txt", "all_reduce", 16 << 30, 21.875, False,
     "0.97 GB/s < 21.875"),
    ("h200x2-nccl-tests-2.19.6-all_reduce_perf.txt", "all_reduce", 1 << 30, 400, False, "328.70 GB/s < 400"),
    ("h200x2-nccl-tests-2.19.6-all_reduce_perf.txt", "all_gather", 1 << 30, 1, False, "no all_gather result"),
], ids=["h200-16G-passes", "spark-small-sizes-fail", "own-gate", "other-op"])
def test_the_gate(name, op, size, gate, passed, reason):
    verdict = nccl.judge(nccl.parse_nccl_tests(read(name)), op, size, gate)
    assert verdict.passed is passed and reason in verdict.reason


def test_the_commands():
    assert nccl.nccl_tests_argv("all_gather", "16G") == ["all_gather_perf", "-b", "16G", "-e", "16G",
                                                         "-g", "1"]
    argv = nccl.local_argv(2, "all_reduce", "1G", python="python3")
    assert argv[argv.index("-np") + 1] == "2"
    assert ["-x", "NCCL_DEBUG"] == argv[argv.index("NCCL_DEBUG") - 1:argv.index("NCCL_DEBUG") + 1]
    assert argv[-6:] == ["python3", str(nccl.BENCH), "--op", "all_reduce", "--sizes", "1G"]


def test_on_a_plain_host_without_mpi4py_the_reason_is_given():
    """The plain-host path for real (mpirun, the bench) as far as this GPU-less machine goes."""
    if not __import__("shutil").which("mpirun"):
        pytest.skip("mpirun is not installed")
    done = subprocess.run([sys.executable, "-m", "trtllm_deploy.measure.diagnose.nccl", "--np", "1",
                           "--size", "1M"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1
    assert "mpi4py is not installed" in done.stdout or "no NCCL binding" in done.stdout, done.stdout


# --- nvidia-smi dmon and --query-gpu ------------------------------------------------------------------

def test_dmon_idle_recorded_on_two_h200():
    samples = gpu.parse_dmon(read("h200x2-dmon-pucm-DT-idle.txt"))
    assert len(samples) == 8 and {s["gpu"] for s in samples} == {0, 1}
    assert samples[0] == {"gpu": 0, "t": 0.0, "power": 76.0, "temperature": 32.0, "memory temperature": 34.0,
                          "sm utilisation": 0.0, "memory utilisation": 0.0, "memory clock": 3201.0,
                          "sm clock": 345.0, "memory used": 0.0}
    assert samples[-1]["t"] == 3.0


def test_dmon_under_nccl_load_summarised():
    summary = gpu.summarize(gpu.parse_dmon(read("h200x2-dmon-pucm-DT-d1-c40-nccl-load.txt")))
    assert set(summary) == {0, 1}
    assert summary[0]["sm utilisation"]["max"] == 100.0 and summary[0]["sm utilisation"]["samples"] == 40
    assert summary[0]["sm clock"]["max"] == 1980.0
    assert summary[1]["power"]["max"] == 295.0


@pytest.mark.parametrize("text", ["-", "N/A", "[N/A]", "[Not Supported]", ""])
def test_fields_not_reported_are_none_never_zero(text):
    """dmon prints '-' for what a device does not report (its man page); --query-gpu prints [N/A]."""
    assert gpu._number(text) is None


def test_gb10_query_memory_reads_not_reported():
    samples = gpu.parse_query(
        (ROOT / "tests/data/nvidia-smi/gb10-query-memory.used-memory.total-utilization.memory.noheader.csv")
        .read_text(), ["memory.used", "memory.total", "utilization.memory"])
    assert samples == [{"gpu": 0, "memory used": None, "memory utilisation": 0.0}]
    stats = gpu.summarize(samples)[0]
    assert stats["memory used"] is None
    assert gpu.cell(stats["memory used"], "MB") == "not reported"


def test_query_lms_recorded_on_two_h200():
    fields = ["timestamp", "index", "utilization.gpu", "memory.used", "memory.total", "power.draw",
              "clocks.sm", "clocks.mem", "temperature.gpu"]
    samples = gpu.parse_query(read("h200x2-query-lms500.csv"), fields)
    assert len(samples) == 40 and samples[1]["gpu"] == 1 and samples[1]["power"] == 78.63
    assert samples[2]["t"] == pytest.approx(0.527)


@pytest.mark.parametrize("seconds, interval, count", [(30, 1, "30"), (10, 3, "4"), (0.5, 1, "1")])
def test_the_sampling_command(seconds, interval, count):
    assert gpu.dmon_argv(seconds, interval) == ["nvidia-smi", "dmon", "-s", "pucm", "-o", "DT", "-d",
                                                str(interval), "-c", count]


def test_the_chart_is_a_png_with_a_line_per_gpu():
    samples = gpu.parse_dmon(read("h200x2-dmon-pucm-DT-d1-c40-nccl-load.txt"))
    data, legend = gpu.chart({"node-a": samples})
    (width, height), colours = read_png(data)
    assert (width, height) == (800, 160 * len(gpu.CHARTED))
    assert legend == {"node-a/gpu0": "blue", "node-a/gpu1": "orange"}
    assert colour("blue") in colours and colour("orange") in colours and colour("green") not in colours


def test_the_chart_has_a_panel_per_metric_on_a_linear_time_axis():
    samples = gpu.parse_dmon(read("h200x2-dmon-pucm-DT-d1-c40-nccl-load.txt"))
    figure, _ = gpu.chart_figure({"node-a": samples})
    panels = figure.get_axes()
    assert [axes.get_title(loc="left").split(",")[0] for axes in panels] == list(gpu.CHARTED)
    assert panels[-1].get_xlabel() == "seconds" and all(axes.get_xscale() == "linear" for axes in panels)
    for axes in panels:
        assert [line.get_label() for line in axes.get_lines()] == ["node-a/gpu0", "node-a/gpu1"]


# --- ethtool, ip -j, ping --------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("debian12-ethtool-veth.txt", {"speed_mbps": 10000, "speed": "10000Mb/s", "duplex": "Full",
                                   "link": True}),
    ("debian12-ethtool-lo.txt", {"speed_mbps": None, "speed": None, "duplex": None, "link": True}),
    ("qemu-vm-ethtool-1000Mbs-excerpt.txt", {"speed_mbps": 1000, "speed": "1000Mb/s", "duplex": "Full",
                                             "link": True}),
    ("openwrt-sfp-ethtool-speed-unknown-excerpt.txt", {"speed_mbps": None, "speed": "Unknown!",
                                                       "duplex": "Unknown", "link": False}),
], ids=["veth", "loopback", "1000Mbs", "speed-unknown"])
def test_ethtool(name, expected):
    assert link.parse_ethtool(read(name)) == expected


def test_ip_json_recorded_in_a_namespace():
    links = link.parse_ip_link(read("debian12-ip-j-link-netns.json"))
    assert links["lo"] == {"mtu": 65536, "operstate": "DOWN", "up": False}
    assert links["va"] == {"mtu": 1500, "operstate": "UP", "up": True}
    addresses = link.parse_ip_addr(read("debian12-ip-j-addr-netns.json"))
    assert addresses["va"] == ["10.99.0.1/24"] and addresses["vb"] == []


@pytest.mark.parametrize("name, expected", [
    ("debian12-ping-c3-q-loopback.txt",
     {"transmitted": 3, "received": 3, "loss_pct": 0.0, "rtt_ms": 0.088}),
    ("debian12-ping-c3-q-unanswered.txt",
     {"transmitted": 3, "received": 0, "loss_pct": 100.0, "rtt_ms": None}),
], ids=["answered", "unanswered"])
def test_ping_summary(name, expected):
    assert link.parse_ping(read(name)) == expected


def _node(name, mtu, cidr, fabric=("f0",), extra=None):
    links = {"lo": {"mtu": 65536, "operstate": "UNKNOWN", "up": True},
             "f0": {"mtu": mtu, "operstate": "UP", "up": True}}
    addresses = {"lo": ["127.0.0.1/8"], "f0": [cidr], **(extra or {})}
    for ifname in extra or {}:
        links[ifname] = {"mtu": 1500, "operstate": "UP", "up": True}
    return link.NodeLinks(name, list(fabric), links, addresses, {"f0": {"speed_mbps": 200000}})


def test_mtu_differing_on_the_two_ends_of_a_link():
    a, b = _node("a", 9000, "192.168.100.1/24"), _node("b", 1500, "192.168.100.2/24")
    ok = {"transmitted": 3, "received": 3, "loss_pct": 0.0, "rtt_ms": 0.1}
    a.ping, b.ping = {"b": ok}, {"a": ok}
    problems = link.link_problems({"a": a, "b": b}, {"a": "192.168.100.1", "b": "192.168.100.2"})
    assert problems == ["MTU differs on a's f0 ↔ b's f0: 9000 against 1500",
                        "MTU differs on b's f0 ↔ a's f0: 1500 against 9000"]


def test_node_checks_duplicate_subnet_down_and_slow():
    node = _node("a", 9000, "192.168.100.1/24", fabric=("f0", "f1"), extra={"f1": ["192.168.100.9/24"]})
    node.links["f1"]["operstate"], node.links["f1"]["up"] = "DOWN", False
    node.ethtool["f1"] = {"speed_mbps": 100000}
    assert link.node_problems(node, 200000) == [
        "f1 is down (DOWN)", "f1 runs at 100000 Mb/s, below 200000 Mb/s",
        "duplicate subnet: 192.168.100.0/24 on f0, f1"]
    assert link.node_problems(_node("b", 9000, "10.0.0.1/24", fabric=("f0", "gone")), None) == [
        "gone does not exist"]


# --- secrets never reach the archive; the profile's command -----------------------------------------

PLANTED = {
    "hf": "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "gh": "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789ab",
    "key": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
           "-----END OPENSSH PRIVATE KEY-----",
    "env": "MY_API_KEY=s3cr3t-value-123",
    "json": '"GITHUB_TOKEN": "tok-in-json-456"',
    "bearer": "Authorization: Bearer abc.def.ghi",
}


@pytest.mark.parametrize("kind", list(PLANTED))
def test_scrub(kind):
    text = f"before {PLANTED[kind]} after"
    scrubbed = bundle.scrub(text)
    assert "***" in scrubbed and scrubbed.startswith("before") and scrubbed.endswith("after")
    for secret in ("AbCdEfGhIj", "b3BlbnNzaC1r", "s3cr3t", "tok-in-json", "abc.def.ghi"):
        assert secret not in scrubbed


def test_registered_secrets_are_scrubbed_too():
    from trtllm_deploy import secrets

    secrets.register("plain-looking-value-789")
    assert bundle.scrub("x plain-looking-value-789 y") == "x *** y"


def test_the_profile_command():
    assert profile.nsys_argv(["trtllm-serve", "m"], 20, "/tmp/p/serve") == [
        "nsys", "profile", "--trace=cuda,nvtx,osrt,mpi", "--sample=none", "--duration", "20",
        "--force-overwrite=true", "--output", "/tmp/p/serve", "trtllm-serve", "m"]


# --- on the testbed ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bed(testbed):
    from test_containers import authorize_head_key

    bed, report = testbed
    cluster = bed.inventory()
    authorize_head_key(cluster)
    return bed, cluster


def _invoke(hosts: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "tasks.py").write_text("from invoke import Collection\n"
                                       "from trtllm_deploy.cli import diagnose\n"
                                       "ns = Collection()\nns.add_collection(diagnose.ns)\n")
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(tmp_path), *args,
                           "--hosts", str(hosts)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})


@needs_docker
def test_link_matrix_and_mtu_on_the_testbed(bed, tmp_path):
    testbed, cluster = bed
    report = link.run(cluster, min_speed_mbps=None)
    names = [node.name for node in cluster.nodes]
    assert report.ok, report.as_json()
    assert sorted(report.addresses) == sorted(names)
    for name in names:
        assert sorted(report.nodes[name].ping) == sorted(n for n in names if n != name)
        assert all(result["received"] == 3 for result in report.nodes[name].ping.values())
        assert report.nodes[name].links["eth0"]["mtu"] == 1500
    # One end of a link changed: both directions name it.
    container = testbed.layout.container(2)
    subprocess.run(["docker", "exec", container, "ip", "link", "set", "eth0", "mtu", "1400"], check=True)
    try:
        done = _invoke(testbed.layout.hosts_file, tmp_path, "diagnose.link", "--min-speed", "0")
    finally:
        subprocess.run(["docker", "exec", container, "ip", "link", "set", "eth0", "mtu", "1500"], check=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"MTU differs on {names[0]}'s eth0 ↔ {names[1]}'s eth0: 1500 against 1400" in done.stdout
    assert f"MTU differs on {names[1]}'s eth0 ↔ {names[0]}'s eth0: 1400 against 1500" in done.stdout


@needs_docker
def test_gpu_sampling_on_nodes_without_a_gpu_says_so(bed, tmp_path):
    testbed, cluster = bed
    report = gpu.sample_nodes(cluster, 1, 1, tmp_path / "gpu")
    assert sorted(report["failed"]) == sorted(node.name for node in cluster.nodes)
    assert all("nvidia-smi is not installed" in reason for reason in report["failed"].values())
    assert (tmp_path / "gpu" / f"{cluster.nodes[0].name}.dmon.txt").exists()
    assert report["chart"] is None


@needs_docker
def test_nccl_in_the_containers_without_a_binding_fails_clearly(bed, tmp_path):
    """The whole path for real: containers on every node, the bench copied into each, mpirun from
    the head's container across all three; the stand-in image has no PyTorch or CuPy, and says so."""
    testbed, cluster = bed
    done = _invoke(testbed.layout.hosts_file, tmp_path, "diagnose.nccl", "--size", "1M", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    report = __import__("json").loads(done.stdout)
    assert report["tool"] == "nccl_bench" and report["passed"] is False
    assert "no NCCL binding" in report["verdict"]["reason"] or "mpi4py" in report["verdict"]["reason"]
    left = SSH(cluster.head).run(["docker", "ps", "-aq", "--filter",
                                          "label=io.trtllm-deploy.job=nccl"])
    assert left.stdout.strip() == ""


@needs_docker
def test_profile_without_nsys_names_what_to_install(bed, tmp_path):
    testbed, cluster = bed
    missing = f"nsys .* is not installed on {cluster.head.name}.*nsight-systems-cli"
    with pytest.raises(CheckFailed, match=missing):
        profile.run(cluster, 5, tmp_path, program=["true"], in_container=False)
    done = _invoke(testbed.layout.hosts_file, tmp_path, "diagnose.profile", "--seconds", "5",
                   "--program", "true")
    assert done.returncode == 1 and "nsight-systems-cli" in done.stderr


@needs_docker
def test_bundle_holds_the_nodes_and_logs_but_no_planted_secret(bed, tmp_path):
    testbed, cluster = bed
    node = cluster.nodes[1]
    ssh = SSH(node)
    folder = "~/.local/state/trtllm-deploy/jobs/pytest-diagnose/logs"
    planted = "\n".join(["serving started", f"HF_TOKEN={PLANTED['hf']}", PLANTED["gh"], PLANTED["key"],
                         "last line of the log"]) + "\n"
    try:
        ssh.run(["sh", "-c", f'mkdir -p {folder} && cat > {folder}/rank-1.log'], stdin=planted)
        out = tmp_path / "bundle.tar.gz"
        done = _invoke(testbed.layout.hosts_file, tmp_path, "diagnose.bundle", "--out", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        ssh.run(["rm", "-rf", "~/.local/state/trtllm-deploy/jobs/pytest-diagnose"], check=False)
        ssh.close()
    with tarfile.open(out) as archive:
        texts = {m.name: archive.extractfile(m).read().decode() for m in archive.getmembers() if m.isfile()}
    assert f"nodes/{cluster.nodes[0].name}.txt" in texts and "link.json" in texts
    assert "Linux" in texts[f"nodes/{cluster.nodes[0].name}.txt"]
    log = texts[f"logs/pytest-diagnose/{node.name}/rank-1.log"]
    assert "last line of the log" in log and "HF_TOKEN=***" in log
    raw = out.read_bytes()
    everything = "".join(texts.values()) + zlib.decompress(raw, 16 + zlib.MAX_WBITS).decode("latin-1")
    for secret in ("AbCdEfGhIjKlMnOpQrSt", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU"):
        assert secret not in everything
    assert oct(out.stat().st_mode & 0o777) == "0o600"


def test_profile_dry_run_shows_the_command_and_runs_nothing(sshd_factory, hosts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))   # this machine's record: none
    server = sshd_factory(home=True)
    out = tmp_path / "profiled"
    done = _invoke(hosts_file([server]), tmp_path, "diagnose.profile", "--program", "python3 -c pass",
                   "--seconds", "7", "--out", str(out), "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["task"] == "diagnose.profile" and plan["dry_run"]
    (node, command), (here, fetch) = [(s["node"], s["action"]) for s in plan["steps"]]
    assert node == "node-0" and command.startswith("nsys profile ") and "--duration 7" in command
    assert command.split(" (")[0].endswith("python3 -c pass")
    assert here == "this machine" and str(out) in fetch
    assert not out.exists() and "Accepted publickey" not in server.log
    # Without --program it profiles the deployment: with none recorded, the same refusal as a real run.
    nothing = _invoke(hosts_file([server]), tmp_path, "diagnose.profile", "--dry-run")
    assert nothing.returncode == 1 and "nothing to profile" in nothing.stderr
