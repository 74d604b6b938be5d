"""Sessions for tests, lint, lockfiles and benchmarks. `nox` alone runs what CI runs."""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import nox

# `session.run_install` (skipped by `nox -R`) and `default=` on sessions arrived in 2024.3.2.
nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["lint", "tests", "lock_check", "smoke"]
nox.options.reuse_venv = "yes"

ROOT = Path(__file__).parent
REQUIREMENTS = ROOT / "requirements"
# Order matters: a layer is compiled against the pins of the layers before it (-c host.txt).
LOCKS = ("host", "test", "lint", "container", "nox")
# Written by `invoke source.update`, not pip-compile; `lock -- --check` checks it offline.
TRTLLM_LOCK = REQUIREMENTS / "tensorrt-llm.lock.toml"

# The locks must name only what PyPI serves, with every file's hash, whatever this machine's pip
# configuration adds (local wheel folders, extra indexes).
ISOLATED_PIP = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "",
                "PIP_INDEX_URL": "", "PIP_CONSTRAINT": ""}


def install(session: nox.Session, *locks: str) -> None:
    for lock in locks:
        session.run_install("python", "-m", "pip", "install", "--quiet", "--require-hashes",
                            "-r", str(REQUIREMENTS / f"{lock}.txt"))


@nox.session(tags=["ci"])
def tests(session: nox.Session) -> None:
    """Run the test suite against real sshd, Docker and mpirun (what CI runs)."""
    install(session, "test")
    session.run("python", "-m", "pytest", *(session.posargs or ["tests", "-q"]))


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    """Lint the package, tests, tasks and benchmarks with ruff."""
    install(session, "lint")
    # --isolated: the rules below, not whatever ruff configuration the machine has.
    session.run("ruff", "check", "--isolated", "--line-length", "110", "--select", "E,F,W,B",
                *(session.posargs or ["."]))


def _compile(session: nox.Session, lock: str, output: Path) -> None:
    # Run from requirements/ with relative names: the "# via -r test.in" notes must not depend
    # on where the checkout lives, or every clone would see stale locks. A folder of wheels that an
    # .in file names (test.in: PyTorch's CPU build, not on PyPI) goes into its lock, so installing
    # it needs no pip configuration; this machine's own pip settings are kept out (ISOLATED_PIP).
    with session.chdir(REQUIREMENTS):
        session.run(
            "pip-compile", "--quiet", "--generate-hashes", "--allow-unsafe", "--strip-extras",
            "--no-emit-index-url", "--resolver=backtracking",
            "--output-file", str(output), f"{lock}.in",
            env={**ISOLATED_PIP, "CUSTOM_COMPILE_COMMAND": "nox -s lock"},
        )


@nox.session(default=False)
def lock(session: nox.Session) -> None:
    """Compile requirements/*.in into hash-pinned *.txt; `-- --check` fails on a stale lock."""
    if (REQUIREMENTS / "nox.txt").exists():
        install(session, "nox")
    else:  # the very first compile has no lock to install pip-tools from
        session.run_install("python", "-m", "pip", "install", "--quiet", "pip-tools")
    check = "--check" in session.posargs
    if check:  # the TensorRT-LLM lock too, in a session with the package's own requirements
        session.notify("trtllm_lock", [str(TRTLLM_LOCK)])
    stale = []
    for name in LOCKS:
        target = REQUIREMENTS / f"{name}.txt"
        if not check:
            _compile(session, name, target)
            continue
        # Recompile a copy: pip-compile keeps existing pins, so only an edited .in changes it.
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / target.name
            if target.exists():
                shutil.copy(target, copy)
            _compile(session, name, copy)
            if not target.exists() or not filecmp.cmp(copy, target, shallow=False):
                stale.append(target.name)
    if stale:
        session.error(f"stale lockfiles: {', '.join(stale)}; run `nox -s lock` and commit them")


@nox.session(default=False)
def trtllm_lock(session: nox.Session) -> None:
    """Check the TensorRT-LLM lock offline: its lock_hash matches its contents, fixes are resolved."""
    install(session, "host")
    # file:line messages for a hand-broken or stale lock; `invoke source.update` is the remedy.
    session.run("python", "-m", "trtllm_deploy.source.lockcheck", "--check",
                *(session.posargs or [str(TRTLLM_LOCK)]))


@nox.session(tags=["ci"])
def lock_check(session: nox.Session) -> None:
    """Fail when a lockfile no longer matches its requirements/*.in (same as lock -- --check)."""
    session.notify("lock", ["--check"])


@dataclass(frozen=True)
class Pinned:
    """What the pinned source build builds: read from the TensorRT-LLM lock, logged before it runs."""

    repository: str
    commit: str
    version: str
    cuda_archs: str

    @classmethod
    def from_lock(cls, path: Path) -> Pinned | None:
        data = tomllib.loads(path.read_text())
        source, build = data.get("source", {}), data.get("build", {})
        if not source.get("commit"):
            return None
        return cls(source["repository"], source["commit"], source.get("version", "?"),
                   build.get("cuda_archs", "121-real"))


@nox.session(default=False, tags=["build"])
def build(session: nox.Session) -> None:
    """The pinned TensorRT-LLM source build on the build node (args go to invoke, e.g. --hosts)."""
    install(session, "host")
    lock = next((Path(arg.split("=", 1)[1]) for arg in session.posargs if arg.startswith("--lock=")),
                TRTLLM_LOCK)
    pinned = Pinned.from_lock(lock)
    if pinned is None:
        session.error(f"{lock} pins no commit yet: run `invoke source.update` and commit the lock")
    session.log(f"building TensorRT-LLM {pinned.version} at {pinned.commit} from {pinned.repository} "
                f"for CUDA_ARCHS {pinned.cuda_archs}")
    session.run("invoke", "source", *session.posargs)
    session.run("invoke", "image", *session.posargs)


SMOKE_SUBNET = "10.213.6.0/24"


@nox.session(tags=["ci", "smoke"])
def smoke(session: nox.Session) -> None:
    """Phase 3 without a GPU: the stand-in serves a tiny artifact on a 1-node testbed (says so)."""
    install(session, "host")
    state = Path(tempfile.mkdtemp(prefix="trtllm-deploy-smoke-"))
    testbed = ["--name", "smoke", "--state-dir", str(state)]
    # The debootstrap base: CI never reaches for Docker Hub (TRTLLM_DEPLOY_TEST_BASE names another).
    base = os.environ.get("TRTLLM_DEPLOY_TEST_BASE", "debootstrap")
    session.run("invoke", "testbed.up", "--nodes", "1", "--subnet", SMOKE_SUBNET, "--base", base, *testbed)
    try:
        folder = state / "artifact" / "testbed-tiny-bf16-tp1"
        session.run("python", "-m", "trtllm_deploy.testbed.artifact", str(folder))
        session.run("invoke", "smoke", "--hosts", str(state / "hosts.toml"), "--artifact-dir",
                    str(folder), *session.posargs)
    finally:
        session.run("invoke", "testbed.down", "--purge", *testbed)


BENCHMARKS = {
    "preflight": "benchmarks/preflight_fanout.py",  # preflight across 1, 2, 4 and 8 SSH nodes
    "testbed": "benchmarks/testbed_up.py",          # 3-node testbed bring-up, images cached
    "manifest": "benchmarks/manifest_hashing.py",   # manifest create/verify on 4 GiB vs sha256sum
    "push": "benchmarks/push.py",                   # 4 GiB and an image to 2 workers vs scp/rsync/raw TCP
    "fanout": "benchmarks/fanout.py",               # 4 GiB to 1, 3, 5 sshd workers: star, chain, rsync
    "deploy": "benchmarks/deploy_noop.py",          # deploy with nothing to do on 2, 4 and 6 nodes
    "clients": "benchmarks/bench_clients.py",       # our bench client vs aiperf, guidellm, llama-benchy, vllm
}
# Run only when named: installs the other load generators (about 17 GB of virtual environments, vllm 9.5).
ON_REQUEST = ("clients",)


@nox.session(default=False, tags=["bench"])
def bench(session: nox.Session) -> None:
    """Run the benchmarks and print their tables (`-- testbed` picks one; other args pass on)."""
    install(session, "test")
    chosen = ([arg for arg in session.posargs if arg in BENCHMARKS]
              or [name for name in BENCHMARKS if name not in ON_REQUEST])
    rest = [arg for arg in session.posargs if arg not in BENCHMARKS]
    for name in chosen:
        session.run("python", BENCHMARKS[name], *rest)
