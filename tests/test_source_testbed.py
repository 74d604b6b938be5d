"""Phase 2 for real: `invoke source.update`, `invoke source`, `invoke image`, `invoke image.verify`
on the testbed, against a git repository shaped like TensorRT-LLM (tests/trtllm_repo.py) kept on
the head node and reached with file:// URLs, with real git, git-lfs, make and Docker there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import docker_unusable
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.source import advise
from trtllm_deploy.source import lock as locks
from trtllm_repo import BUILD_VARS_FILE, make_upstream

ROOT = Path(__file__).resolve().parents[1]
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
REMOTE = "/home/spark/upstream"

pytestmark = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


def invoke(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*INVOKE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def upstream(testbed, tmp_path_factory):
    """The stand-in upstream, copied onto the head node; its base image is the stand-in runtime
    image, which every testbed node's engine already has."""
    bed, report = testbed
    made = make_upstream(tmp_path_factory.mktemp("upstream"), base_image=report.runtime.tag)
    head = SSH(bed.inventory().head)
    try:
        head.run(["rm", "-rf", REMOTE])
        head.put(made.repo, f"{REMOTE}/TensorRT-LLM.git")
        head.put(made.submodule_repo, f"{REMOTE}/cutlass.git")
        yield made
        head.run(["rm", "-rf", REMOTE, "trtllm-deploy/build/TensorRT-LLM"], cwd="~", check=False)
    finally:
        head.close()


@pytest.fixture
def hosts(testbed) -> str:
    bed, _ = testbed
    return str(bed.layout.hosts_file)


URL = f"file://{REMOTE}/TensorRT-LLM.git"


def first_lock(path: Path, fixes: str = "") -> Path:
    path.write_text(f'[source]\nrepository = "{URL}"\nref = "main"\n\n[build]\n'
                    'cuda_archs = "121-real"\n' + fixes)
    return path


def test_update_pins_main_to_its_commit_with_submodules_version_and_fixes(upstream, hosts, tmp_path):
    lock = first_lock(tmp_path / "lock.toml", "\n[[fixes]]\npr = 8803\n")
    done = invoke("source.update", "--hosts", hosts, "--lock", str(lock), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["changed"] is True and report["commit"] == upstream.tip
    written = locks.load(lock).lock
    assert written.source.commit == upstream.tip
    assert written.source.version == upstream.versions["tip"]
    assert written.source.trtllm_build is False          # the tip has no trtllm-build
    assert [(s.path, s.commit) for s in written.source.submodules] == [
        (upstream.submodule_path, upstream.submodule_at_tip)]
    assert written.build.base_image == upstream.base_image  # from the tree's Dockerfile.multi
    # The fix given by PR number is found in the history and recorded from the commit itself.
    assert written.fixes[0].commit == upstream.fix_a
    assert written.fixes[0].title == upstream.subjects["fix_a"]
    # Again: nothing to change, and the file is byte for byte the same.
    before = lock.read_text()
    again = json.loads(invoke("source.update", "--hosts", hosts, "--lock", str(lock), "--json").stdout)
    assert again["changed"] is False and lock.read_text() == before


@pytest.mark.parametrize("ref, role, has_build", [
    ("v1.3.0rc1", "tagged", False), ("old", "old", True)], ids=["tag", "old-sha"])
def test_update_resolves_a_tag_or_a_sha(upstream, hosts, tmp_path, ref, role, has_build):
    lock = first_lock(tmp_path / "lock.toml")
    asked = upstream.old if ref == "old" else ref
    done = invoke("source.update", "--hosts", hosts, "--lock", str(lock), "--ref", asked, "--json")
    assert done.returncode == 0, done.stderr
    written = locks.load(lock).lock
    assert written.source.commit == upstream.commit(role)
    assert written.source.trtllm_build is has_build
    assert written.source.version == upstream.versions[role]


def test_a_required_fix_that_is_not_in_the_pin_is_named_and_nothing_is_written(upstream, hosts, tmp_path):
    lock = first_lock(tmp_path / "lock.toml",
                      f'\n[[fixes]]\ncommit = "{upstream.fix_b_unmerged}"\ntitle = "fix B"\n')
    before = lock.read_text()
    done = invoke("source.update", "--hosts", hosts, "--lock", str(lock))
    assert done.returncode == 1
    assert upstream.fix_b_unmerged[:12] in done.stderr and "not in the history of" in done.stderr
    assert lock.read_text() == before


@pytest.fixture(scope="module")
def pinned(upstream, testbed, tmp_path_factory) -> Path:
    bed, _ = testbed
    lock = first_lock(tmp_path_factory.mktemp("pinned") / "lock.toml", "\n[[fixes]]\npr = 8803\n")
    done = invoke("source.update", "--hosts", str(bed.layout.hosts_file), "--lock", str(lock))
    assert done.returncode == 0, done.stderr
    return lock


def test_source_fetches_exactly_the_pin_with_lfs_then_is_up_to_date_without_the_network(
        upstream, pinned, hosts, testbed):
    bed, _ = testbed
    head = SSH(bed.inventory().head)
    tree = "trtllm-deploy/build/TensorRT-LLM"
    try:
        head.run(["rm", "-rf", tree], cwd="~")
        first = invoke("source", "--hosts", hosts, "--lock", str(pinned), "--json")
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["action"] == "fetched"
        assert head.run(["git", "rev-parse", "HEAD"], cwd=f"~/{tree}").stdout.strip() == upstream.tip
        lfs = head.run(["sha256sum", upstream.lfs_path], cwd=f"~/{tree}").stdout.split()[0]
        assert lfs == upstream.lfs_oid  # the real object, not the pointer
        # The upstream goes away: an up-to-date tree needs no network and does no work.
        head.run(["mv", REMOTE, REMOTE + ".away"])
        try:
            again = invoke("source", "--hosts", hosts, "--lock", str(pinned), "--json")
        finally:
            head.run(["mv", REMOTE + ".away", REMOTE])
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["action"] == "up to date"
        # A changed file is noticed and put right.
        head.run(["sh", "-c", f"echo tampered >> {upstream.lfs_path}"], cwd=f"~/{tree}")
        third = json.loads(invoke("source", "--hosts", hosts, "--lock", str(pinned), "--json").stdout)
        assert third["action"] == "fetched" and "local changes in the tree" in third["reasons"]
        lfs = head.run(["sha256sum", upstream.lfs_path], cwd=f"~/{tree}").stdout.split()[0]
        assert lfs == upstream.lfs_oid
    finally:
        head.close()


def _head_labels(bed, image: str) -> dict:
    head = SSH(bed.inventory().head)
    try:
        return json.loads(head.run(["docker", "image", "inspect", "--format",
                                    "{{json .Config.Labels}}", image]).stdout)
    finally:
        head.close()


def test_image_builds_labelled_then_is_up_to_date_and_verify_names_the_nodes_without_it(
        upstream, pinned, hosts, testbed, tmp_path):
    bed, _ = testbed
    built = invoke("image", "--hosts", hosts, "--lock", str(pinned), "--json", timeout=900)
    assert built.returncode == 0, built.stderr
    report = json.loads(built.stdout)
    lockfile = locks.load(pinned)
    labels = _head_labels(bed, report["image"])
    assert labels["io.trtllm-deploy.lock-hash"] == lockfile.hash
    assert labels["org.opencontainers.image.revision"] == upstream.tip
    assert labels["io.trtllm-deploy.cuda-archs"] == "121-real"
    # The upstream Makefile got the lock's choices.
    head = SSH(bed.inventory().head)
    try:
        recorded = head.run(["docker", "run", "--rm", "--entrypoint", "cat", report["image"],
                             BUILD_VARS_FILE]).stdout
    finally:
        head.close()
    assert "CUDA_ARCHS=121-real" in recorded
    assert f"--job_count {report['jobs']}" in recorded
    again = invoke("image", "--hosts", hosts, "--lock", str(pinned), "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["up_to_date"] is True
    # A changed lock is a new build, under a new hash; the old image stays what it was.
    changed = tmp_path / "changed.toml"
    changed.write_text(pinned.read_text().replace("options = {}",
                                                  'options = { BUILD_WHEEL_OPTS = "--benchmarks" }'))
    rebuilt = invoke("image", "--hosts", hosts, "--lock", str(changed), "--json", timeout=900)
    assert rebuilt.returncode == 0, rebuilt.stderr
    second = json.loads(rebuilt.stdout)
    assert second["up_to_date"] is False and second["image"] != report["image"]
    assert _head_labels(bed, second["image"])["io.trtllm-deploy.lock-hash"] == locks.load(changed).hash
    verify = invoke("image.verify", "--hosts", hosts, "--lock", str(pinned), "--json")
    assert verify.returncode == 1  # only the build node has it until push
    verdicts = {v["node"]: v for v in json.loads(verify.stdout)}
    assert verdicts["spark-1"]["ok"] is True
    assert verdicts["spark-2"]["ok"] is False and "missing" in verdicts["spark-2"]["detail"]


@pytest.mark.parametrize("mode, kind", [("oom", "oom-killed"), ("disk", "disk-full"), ("lfs", "lfs-missing"),
                                        ("arch", "cuda-arch-unsupported"),
                                        ("compiler", "compiler-error")])
def test_a_failed_build_is_explained_from_its_log(upstream, pinned, hosts, tmp_path, mode, kind):
    lock = tmp_path / "lock.toml"
    lock.write_text(pinned.read_text().replace("options = {}", f'options = {{ FAKE_FAIL = "{mode}" }}'))
    done = invoke("image", "--hosts", hosts, "--lock", str(lock), timeout=900)
    assert done.returncode == 1, done.stdout
    assert f"({kind})" in done.stderr
    assert "what to do:" in done.stderr and "the lines that show it" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_cross_architecture_build_is_refused_before_anything_runs(pinned, hosts, tmp_path):
    other = tmp_path / "hosts.toml"
    text = Path(hosts).read_text()
    arch = next(line for line in text.splitlines() if line.startswith("arch = "))
    other.write_text(text.replace(arch, 'arch = "aarch64"' if "x86_64" in arch else 'arch = "x86_64"'))
    done = invoke("image", "--hosts", str(other), "--lock", str(pinned))
    assert done.returncode == 1
    assert "cross-architecture build refused" in done.stderr


# --- the release kind: NVIDIA's image under a thin overlay --------------------------------------

RELEASE = "nvcr.io/nvidia/tensorrt-llm/release:1.3.0rc2"


@pytest.fixture(scope="module")
def release_image(upstream, testbed):
    """A local image shaped like a release image (it reports its commit and version the way the
    real one does, in its environment), on the head node only."""
    bed, report = testbed
    head = SSH(bed.inventory().head)
    try:
        make_release(head, report.runtime.tag, RELEASE, upstream.tip, upstream.versions["tip"])
        yield RELEASE
        head.run(["docker", "rmi", "--force", RELEASE], check=False)
    finally:
        head.close()


def make_release(head, base: str, name: str, commit: str, version: str) -> None:
    head.run(["sh", "-c", 'printf "FROM %s\\nENV TRT_LLM_GIT_COMMIT=%s TRT_LLM_VERSION=%s\\n" '
              '"$1" "$2" "$3" | docker build --quiet --tag "$4" -', "sh", base, commit, version, name],
             timeout=300)


def release_lock(pinned: Path, tmp_path: Path, image: str) -> Path:
    lock = tmp_path / "release.toml"
    lock.write_text(pinned.read_text().replace('kind = "source"', 'kind = "release"')
                    + f'\n[release]\nimage = "{image}"\n')
    return lock


def test_the_release_kind_labels_the_release_with_what_it_reports_and_verifies(
        release_image, pinned, hosts, testbed, tmp_path, upstream):
    bed, _ = testbed
    lock = release_lock(pinned, tmp_path, release_image)
    built = invoke("image", "--hosts", hosts, "--lock", str(lock), "--json", timeout=600)
    assert built.returncode == 0, built.stderr
    report = json.loads(built.stdout)
    assert report["image"].startswith("trtllm-deploy/tensorrt-llm:release-1.3.0rc2-")
    assert any("not pinned by digest" in note for note in report["notes"])
    labels = _head_labels(bed, report["image"])
    assert labels["io.trtllm-deploy.source-kind"] == "release"
    assert labels["io.trtllm-deploy.lock-hash"] == locks.load(lock).hash
    assert labels["org.opencontainers.image.revision"] == upstream.tip
    assert labels["org.opencontainers.image.version"] == upstream.versions["tip"]
    again = json.loads(invoke("image", "--hosts", hosts, "--lock", str(lock), "--json").stdout)
    assert again["up_to_date"] is True
    verdicts = {v["node"]: v for v in json.loads(
        invoke("image.verify", "--hosts", hosts, "--lock", str(lock), "--json").stdout)}
    assert verdicts["spark-1"]["ok"] and "release" in verdicts["spark-1"]["detail"]


def test_a_release_image_without_the_locked_digest_is_refused(release_image, pinned, hosts, tmp_path):
    lock = release_lock(pinned, tmp_path, f"{release_image}@sha256:{'0' * 64}")
    done = invoke("image", "--hosts", hosts, "--lock", str(lock))
    assert done.returncode == 1
    assert "not with the locked digest" in done.stderr


# --- the wheel kind: a pinned wheel onto the pinned base ----------------------------------------

def make_wheel(folder: Path, version: str, marker: str = "") -> Path:
    """A minimal, valid tensorrt-llm wheel (pure Python) that reports ``version``."""
    name = "tensorrt_llm"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f'__version__ = "{version}"\n# {marker}\n',
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: tensorrt-llm\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: trtllm-deploy-tests\n"
                              "Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(zipfile.ZipInfo(member, (2026, 1, 1, 0, 0, 0)), text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
            record.append(f"{member},sha256={digest.decode()},{len(text)}")
        record.append(f"{info}/RECORD,,")
        archive.writestr(zipfile.ZipInfo(f"{info}/RECORD", (2026, 1, 1, 0, 0, 0)), "\n".join(record) + "\n")
    return path


PIP_BASE = "trtllm-deploy-test/pytorch-like:1"


@pytest.fixture(scope="module")
def wheel_setup(testbed, tmp_path_factory):
    """On the head: a base image with pip (as the PyTorch base has) and a folder with the wheel."""
    bed, report = testbed
    head = SSH(bed.inventory().head)
    folder = tmp_path_factory.mktemp("wheels")
    make_wheel(folder, "1.2.1")
    try:
        head.run(["sh", "-c", 'printf "FROM %s\\nRUN python3 -m venv /opt/py && ln -s /opt/py/bin/pip '
                  '/usr/local/bin/pip\\n" "$1" | docker build --quiet --tag "$2" -', "sh",
                  report.runtime.tag, PIP_BASE], timeout=300)
        head.run(["rm", "-rf", "wheels"], cwd="~")
        head.put(folder, "~/wheels")
        yield head, folder
        head.run(["rm", "-rf", "wheels"], cwd="~", check=False)
    finally:
        head.close()


def test_the_wheel_kind_pins_the_wheel_by_hash_installs_it_and_refuses_a_swapped_one(
        wheel_setup, pinned, hosts, tmp_path, testbed):
    bed, _ = testbed
    head, folder = wheel_setup
    lock = tmp_path / "wheel.toml"
    text = pinned.read_text().replace('kind = "source"', 'kind = "wheel"')
    text = re.sub(r'base_image = ".*"', f'base_image = "{PIP_BASE}"', text)
    lock.write_text(text + '\n[wheel]\nversion = "1.2.1"\nfind_links = "~/wheels"\n')
    updated = invoke("source.update", "--hosts", hosts, "--lock", str(lock))
    assert updated.returncode == 0, updated.stderr
    requirements = (tmp_path / "tensorrt-llm-wheel.txt").read_text()
    wheel_hash = hashlib.sha256((folder / "tensorrt_llm-1.2.1-py3-none-any.whl").read_bytes()).hexdigest()
    assert f"tensorrt-llm==1.2.1 \\\n    --hash=sha256:{wheel_hash}" in requirements
    assert locks.load(lock).lock.wheel.requirements == "tensorrt-llm-wheel.txt"

    built = invoke("image", "--hosts", hosts, "--lock", str(lock), "--json", timeout=600)
    assert built.returncode == 0, built.stderr
    image = json.loads(built.stdout)["image"]
    assert image.startswith("trtllm-deploy/tensorrt-llm:wheel-1.2.1-")
    version = head.run(["docker", "run", "--rm", "--entrypoint", "/opt/py/bin/python", image, "-c",
                        "import tensorrt_llm; print(tensorrt_llm.__version__)"]).stdout.strip()
    assert version == "1.2.1"
    assert _head_labels(bed, image)["io.trtllm-deploy.source-kind"] == "wheel"

    # Someone replaces the wheel on the node with other bytes: the rebuild refuses it.
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    make_wheel(swapped, "1.2.1", marker="not the pinned bytes")
    head.put(swapped / "tensorrt_llm-1.2.1-py3-none-any.whl", "~/wheels/tensorrt_llm-1.2.1-py3-none-any.whl")
    head.run(["docker", "rmi", "--force", image])
    again = invoke("image", "--hosts", hosts, "--lock", str(lock), timeout=600)
    assert again.returncode == 1
    assert "(hash-mismatch)" in again.stderr and wheel_hash in again.stderr
    # The failed build left no container behind on the node.
    assert head.run(["docker", "ps", "--all", "--quiet", "--filter", "status=exited"]).stdout.strip() == ""


# --- source.advise --------------------------------------------------------------------------------

OLD_RELEASE = "nvcr.io/nvidia/tensorrt-llm/release:1.2.0rc0"


@pytest.mark.parametrize("release, choice", [("old", "wheel"), ("tip", "release")],
                         ids=["release-lacks-the-fix", "release-has-the-fix"])
def test_advise_picks_the_cheapest_source_that_has_every_required_fix(
        upstream, pinned, hosts, testbed, tmp_path, release_image, release, choice):
    bed, report = testbed
    head = SSH(bed.inventory().head)
    try:
        assert invoke("source", "--hosts", hosts, "--lock", str(pinned)).returncode == 0  # the clone
        # A source build measured on this node (built now, or earlier in the session).
        assert invoke("image", "--hosts", hosts, "--lock", str(pinned), timeout=900).returncode == 0
        image = release_image
        if release == "old":
            image = OLD_RELEASE
            make_release(head, report.runtime.tag, image, upstream.old, upstream.versions["old"])
        lock = release_lock(pinned, tmp_path, image)
        # The wheel: the version whose tag carries the fix (v1.3.0rc1 is after fix A).
        lock.write_text(lock.read_text() + f'\n[wheel]\nversion = "{upstream.tag.removeprefix("v")}"\n')
        done = invoke("source.advise", "--hosts", hosts, "--lock", str(lock), "--json")
        assert done.returncode == 0, done.stderr
        advice = json.loads(done.stdout)
        options = {option["kind"]: option for option in advice["options"]}
        assert advice["choice"] == choice
        assert options["source"]["fixes"] == "all 1 present"
        # The source build needs about 63 GB on the build path; the node shares this machine's disk,
        # which a CI machine may not have free. The option says so exactly when the disk is short.
        free_gb = int(head.run(["df", "--output=avail", "-B1", "."]).stdout.split()[-1]) / 2**30
        short = any(reason.startswith("the build path has") for reason in options["source"]["reasons"])
        if short:
            assert not options["source"]["usable"] and free_gb < advise.SOURCE_BUILD_GB + 1, free_gb
        else:
            assert options["source"]["usable"] and free_gb > advise.SOURCE_BUILD_GB - 1, free_gb
        assert "the last source build here took" in options["source"]["time"]
        assert options["wheel"]["usable"] and upstream.tagged[:12] in " ".join(options["wheel"]["reasons"])
        if release == "old":
            assert not options["release"]["usable"]
            missing = options["release"]["fixes"]
            assert missing.startswith("missing") and "#8803" in missing
        else:
            assert options["release"]["usable"] and options["release"]["fixes"] == "all 1 present"
        human = invoke("source.advise", "--hosts", hosts, "--lock", str(lock))
        assert f"use: {choice}" in human.stdout
    finally:
        head.run(["docker", "rmi", "--force", OLD_RELEASE], check=False)
        head.close()


# --- CUDA_ARCHS against the cluster's GPUs ---------------------------------------------------------

@pytest.fixture
def gb10_nodes(testbed):
    """Every node answers nvidia-smi's compute-capability query as a GB10 does ("12.1"), through a
    stand-in put in the node containers by the test (the nodes have no GPU)."""
    bed, _ = testbed
    script = ('#!/bin/sh\ncase "$*" in *compute_cap*) echo 12.1 ;; '
              '*) echo "stand-in nvidia-smi" >&2; exit 9 ;; esac\n')
    for index in bed.layout.indexes:
        subprocess.run(["docker", "exec", "-i", bed.layout.container(index), "sh", "-c",
                        "cat > /usr/local/bin/nvidia-smi && chmod 755 /usr/local/bin/nvidia-smi"],
                       input=script, text=True, check=True, timeout=60)
    yield
    for index in bed.layout.indexes:
        subprocess.run(["docker", "exec", bed.layout.container(index), "rm", "-f",
                        "/usr/local/bin/nvidia-smi"], timeout=60)


def test_update_derives_cuda_archs_from_the_gpus_and_image_refuses_one_that_misses_them(
        gb10_nodes, upstream, hosts, tmp_path):
    lock = tmp_path / "lock.toml"
    lock.write_text(f'[source]\nrepository = "{URL}"\n\n[build]\n')  # no cuda_archs chosen
    done = invoke("source.update", "--hosts", hosts, "--lock", str(lock))
    assert done.returncode == 0, done.stderr
    assert locks.load(lock).lock.build.cuda_archs == "121-real"
    lock.write_text(lock.read_text().replace('cuda_archs = "121-real"',
                                             'cuda_archs = "90-real;100-real"'))
    refused = invoke("image", "--hosts", hosts, "--lock", str(lock))
    assert refused.returncode == 1
    assert "does not cover the cluster's GPUs (compute capability 12.1)" in refused.stderr
    assert "'121-real'" in refused.stderr


def test_fetch_dry_run_looks_at_the_tree_and_writes_nothing(sshd_factory, hosts_file, tmp_path):
    server = sshd_factory(home=True)
    lock = tmp_path / "lock.toml"
    lock.write_text('[source]\nrepository = "https://github.com/NVIDIA/TensorRT-LLM.git"\n'
                    f'ref = "main"\ncommit = "{"c" * 40}"\n\n[build]\nkind = "source"\n'
                    'base_image = "nvcr.io/nvidia/pytorch:25.10-py3"\n')
    done = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "source", "--hosts",
                           str(hosts_file([server])), "--lock", str(lock), "--dry-run", "--json"],
                          capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "DOCKER_HOST": "unix:///nonexistent"})
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    commit = locks.load(lock).lock.source.commit
    [(node, action)] = [(step["node"], step["action"]) for step in plan["steps"]]
    assert plan["task"] == "source.fetch" and node == "node-0"
    assert action.startswith("clone ") and f"check out {commit}" in action and plan["notes"] == [
        "because: no clone yet"]
    assert "Accepted publickey" in server.log and list(server.home.iterdir()) == []
