"""Facts in one round trip, and the dirs phase (look, plan, apply, up to date) over real SSH."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from trtllm_deploy.hosts import inventory
from trtllm_deploy.hosts.facts import Fact, gather
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.hosts.ssh import SSH

ROOT = Path(__file__).resolve().parent.parent

FACTS = [
    Fact("plain", ("printf", "%s", "no newline")),
    Fact("lines", ("printf", "a\\nb\\n")),
    Fact("failing", ("sh", "-c", "echo out; echo err >&2; exit 3")),
    Fact("missing", ("no-such-command-here",)),
    Fact("spoof", ("printf", "@@0000 err 0 0\\n@@0000 out 1\\n")),
    Fact("slow", ("sleep", "5"), timeout=1),  # the sleep is what runs past its time limit
    Fact("after", ("echo", "still ran")),
]


@pytest.fixture(params=["local", "ssh"])
def target(request, sshd_node):
    target = Local() if request.param == "local" else SSH(sshd_node)
    yield target
    target.close()


def test_facts_come_back_separately_from_one_command(target):
    out = gather(target, FACTS)
    assert out["plain"].stdout == "no newline" and out["plain"].ok
    assert out["lines"].stdout == "a\nb\n"
    assert (out["failing"].exit_code, out["failing"].stdout, out["failing"].stderr) == (3, "out\n", "err")
    assert out["missing"].missing
    assert out["spoof"].stdout == "@@0000 err 0 0\n@@0000 out 1\n"  # markers carry a random nonce
    assert out["slow"].timed_out
    assert out["after"].stdout == "still ran\n"


def run_dirs(hosts: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "dirs",
                           "--hosts", str(hosts), "--json", *args],
                          capture_output=True, text=True, timeout=120)


def test_dirs_plans_applies_and_is_then_up_to_date(tmp_path, sshd_factory):
    home = tmp_path / "node-home"
    home.mkdir()
    server = sshd_factory(home=home)
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(server.node_toml("spark-1") + '[nodes.paths]\nbuild = "/tmp/%s/build"\n' % tmp_path.name)
    wanted = [home / ".cache/huggingface", home / "trtllm-deploy/engines",
              home / ".local/state/trtllm-deploy"]

    dry = run_dirs(hosts, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] and not plan["up_to_date"]
    argvs = [c["argv"] for step in plan["steps"] for c in step["changes"]]
    assert ["mkdir", "-p", "-m", "700", "--", str(home / ".local/state/trtllm-deploy")] in argvs
    assert not any(path.exists() for path in wanted), "a dry run changed the node"

    applied = run_dirs(hosts)
    assert applied.returncode == 0, applied.stderr
    assert all(path.is_dir() for path in wanted)
    assert stat.S_IMODE(os.stat(home / ".local/state/trtllm-deploy").st_mode) == 0o700

    again = json.loads(run_dirs(hosts).stdout)
    assert again["up_to_date"] and all(step["up_to_date"] for step in again["steps"])

    os.chmod(home / ".local/state/trtllm-deploy", 0o755)
    drift = json.loads(run_dirs(hosts, "--dry-run").stdout)
    (state,) = [s for s in drift["steps"] if s["step"] == "dir:state"]
    assert state["changes"][0]["argv"][:2] == ["chmod", "700"]


def test_dirs_reports_a_failed_node_and_still_exits_1(tmp_path, sshd_factory):
    server = sshd_factory()
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(server.node_toml("spark-1") + '[nodes.paths]\nartifacts = "/proc/cannot-create"\n')
    done = run_dirs(hosts)
    assert done.returncode == 1
    assert "spark-1" in done.stderr and "mkdir" in done.stderr and "Traceback" not in done.stderr


def test_dirs_rejects_an_unknown_node_name(tmp_path):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[[nodes]]\nname = "here"\nconnection = "local"\n')
    done = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "dirs",
                           "--hosts", str(hosts), "--nodes", "nowhere"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no node named 'nowhere'" in done.stderr
    assert inventory.load(hosts).nodes[0].name == "here"
