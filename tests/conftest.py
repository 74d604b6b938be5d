"""Shared fixtures: an isolated SSH environment, real sshd servers (see tests/sshd.py), the images
the tests build and the testbed (several simulated nodes with sshd and Docker)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sshd as sshd_module
from ci_skips import pytest_runtest_makereport  # noqa: F401 - under CI=true a skip fails
from sshd import SSHServer, start_sshd, write_hosts
from trtllm_deploy.errors import InputError
from trtllm_deploy.hosts import inventory
from trtllm_deploy.testbed import cluster, images


@pytest.fixture(autouse=True)
def isolated_ssh_environment(monkeypatch, tmp_path_factory):
    """Keep the developer's own SSH setup out of every test (as Fabric's own suite does).

    A fresh ``$HOME`` means no ``~/.ssh/config``, keys or known_hosts of the person running the
    tests; without an agent socket Paramiko cannot offer their agent's keys either.
    """
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("SSH_AGENT_PID", raising=False)
    return home


def _require_sshd() -> None:
    if not os.path.exists(sshd_module.SSHD):
        pytest.skip(f"{sshd_module.SSHD} is not installed (apt-get install openssh-server)")
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> SSHServer:
    """One real sshd on 127.0.0.1 for the whole session."""
    _require_sshd()
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def sshd_factory(tmp_path_factory) -> Callable[..., SSHServer]:
    """Starts more servers on demand (``sshd_factory()``); all are stopped after the test."""
    _require_sshd()
    started: list[SSHServer] = []

    def start(**kwargs) -> SSHServer:
        server = start_sshd(tmp_path_factory.mktemp("sshd-extra"), **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def make_node(tmp_path) -> Callable[..., inventory.Node]:
    """``make_node(server, name="n", **overrides)``: a Node read through ``inventory.load``.

    The node table is written to a real hosts.toml and validated like a user's file would be;
    ``overrides`` replace keys of :meth:`SSHServer.node_toml` (e.g. ``port=``, ``known_hosts=``,
    ``connect_timeout=``, ``identity_file=``).
    """
    count = 0

    def make(server: SSHServer, name: str = "node-0", **overrides) -> inventory.Node:
        nonlocal count
        count += 1
        path = tmp_path / f"hosts-{count}.toml"
        path.write_text('[cluster]\nname = "test"\n\n' + server.node_toml(name, **overrides))
        return inventory.load(path).node(name)

    return make


@pytest.fixture
def hosts_file(tmp_path) -> Callable[..., Path]:
    """``hosts_file(servers, extra="")``: a complete hosts.toml for ``servers`` (first is head)."""

    def make(servers, extra: str = "") -> Path:
        return write_hosts(tmp_path / "hosts.toml", servers, extra)

    return make


@pytest.fixture
def sshd_node(sshd, hosts_file) -> inventory.Node:
    """The Node of the session's sshd, as ``inventory.load`` reads it from a hosts.toml."""
    cluster = inventory.load(hosts_file([sshd]))
    return cluster.head


def past_the_clock_tick(*roots: Path) -> None:
    """Return once the file system's clock has moved past the ctime of every file under ``roots``:
    a file written now is newer than all of them (what the manifest's cache requires before it
    trusts a file), found by writing a probe until its ctime says so rather than sleeping."""
    newest = max(p.lstat().st_ctime_ns for root in roots for p in [root, *root.rglob("*")])
    probe = roots[0].parent / f".clock-probe-{os.getpid()}"
    for _ in range(1_000_000):
        probe.write_bytes(b"")
        if probe.stat().st_ctime_ns > newest:
            probe.unlink()
            return
    raise AssertionError(f"the file system clock under {roots[0].parent} did not move")


# --- Docker, the images and the testbed (the same code as `invoke testbed.*`) -----------------

@functools.lru_cache(maxsize=1)
def docker_unusable() -> str | None:
    """Why this machine's Docker engine cannot be used, or None (probed once)."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "the Docker engine is not running"
    return None


# Tests reach no outside host: the base is made here with debootstrap from the Debian mirror,
# never pulled from Docker Hub ("auto" would try `docker pull debian:bookworm-slim` first). A
# developer with an image of their own names it in TRTLLM_DEPLOY_TEST_BASE.
TEST_BASE = os.environ.get("TRTLLM_DEPLOY_TEST_BASE", "debootstrap")


@pytest.fixture(scope="session")
def base_image() -> str:
    """The Debian bookworm base every test image builds on (made with debootstrap)."""
    if docker_unusable():
        pytest.skip(docker_unusable())
    return images.resolve_base(TEST_BASE, report=_log)


@pytest.fixture(scope="session")
def standin_image(base_image, tmp_path_factory) -> str:
    """The stand-in runtime image (docker/standin/), built once per content."""
    return images.ensure(images.STANDIN, base_image, tmp_path_factory.mktemp("image-logs"),
                         report=_log).tag


def start_testbed(state_dir: Path, nodes: int, name: str, runtime: bool = True,
                  base: str = TEST_BASE, fabric: str | None = None
                  ) -> tuple[cluster.Testbed, cluster.UpReport]:
    """A testbed of its own for a test run: the first free subnet of 10.213.100-199.0/24."""
    for third in range(100, 200):
        layout = cluster.Layout(name=name, nodes=nodes, subnet=f"10.213.{third}.0/24",
                                state_dir=state_dir, fabric=fabric)
        bed = cluster.Testbed(layout, base=base, report=_log)
        try:
            return bed, bed.up(runtime=runtime)
        except BaseException as exc:  # a half-made testbed is removed, whatever stopped it
            bed.down(purge=False)
            if not (isinstance(exc, InputError) and "overlaps" in str(exc)):
                raise
    raise RuntimeError("no free 10.213.x.0/24 subnet for a test testbed")


@pytest.fixture(scope="session")
def testbed(base_image, standin_image, tmp_path_factory):
    """Three simulated nodes, each with sshd, its own Docker engine and the stand-in image loaded."""
    name = f"pytest{os.getpid()}"
    bed, report = start_testbed(tmp_path_factory.mktemp("testbed"), 3, name, base=base_image)
    try:
        assert report.runtime is not None and report.runtime.tag == standin_image
        yield bed, report
    finally:
        bed.down(purge=True)


def _log(line: str) -> None:
    print(line, file=sys.stderr)
