"""The stand-in TensorRT-LLM repository (tests/trtllm_repo.py) keeps the promises other tests rely on:
its history shape, its submodule and LFS object over file://, and a `make -C docker release_build`
that really builds, records what it was given, and fails on demand."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

import trtllm_repo
from trtllm_repo import FILE_PROTOCOL_ENV, Upstream, checkout, make_upstream, remove_build_images

BASE = "trtllm-deploy/base:bookworm"  # named in the tree only; the tests without Docker never use it
ROLES = ("old", "fix_a", "fix_b_unmerged", "submodule_bump", "removal", "tagged", "tip", "emoji_fix",
         "revert_a", "reapply_a", "revert_emoji", "gpt_oss", "lacks_flag")


def git(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if check and done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {done.stderr}")
    return done.stdout.strip() if check else done


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Upstream:
    return make_upstream(tmp_path_factory.mktemp("upstream"), base_image=BASE)


def bare(upstream: Upstream, *args: str, check: bool = True):
    return git(f"--git-dir={upstream.repo}", *args, check=check)


# --- the history ---------------------------------------------------------------------------------

def test_built_fast_and_reproducibly_wherever_it_lives(tmp_path):
    started = time.monotonic()
    first = make_upstream(tmp_path / "a", base_image=BASE)
    elapsed = time.monotonic() - started
    second = make_upstream(tmp_path / "b" / "deeper", base_image=BASE)
    assert elapsed < 2.0
    for role in ROLES + ("tag_object", "submodule_at_old", "submodule_at_tip"):
        assert getattr(first, role) == getattr(second, role), role
    assert len(set(first.commit(role) for role in ROLES)) == len(ROLES)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["TensorRT-LLM.git", "cutlass.git"]
    other = make_upstream(tmp_path / "c", base_image="debian:bookworm-slim")
    assert other.tip != first.tip  # the base image is part of the tree (docker/Dockerfile.multi)


@pytest.mark.parametrize("ancestor, descendant, expected", [
    ("old", "tip", True),
    ("fix_a", "tip", True),
    ("fix_a", "old", False),
    ("fix_a", "fix_b_unmerged", True),
    ("fix_b_unmerged", "tip", False),
    ("fix_b_unmerged", "tagged", False),
    ("submodule_bump", "removal", True),
    ("removal", "tagged", True),
    ("tagged", "tip", True),
    ("tip", "tagged", False),
], ids=lambda value: value if isinstance(value, str) else None)
def test_ancestry(upstream, ancestor, descendant, expected):
    done = bare(upstream, "merge-base", "--is-ancestor", upstream.commit(ancestor),
                upstream.commit(descendant), check=False)
    assert done.returncode == (0 if expected else 1)


def test_main_is_linear_and_the_side_branch_forks_at_fix_a(upstream):
    main = bare(upstream, "rev-list", "--reverse", "main").split()
    assert main == [upstream.old, upstream.fix_a, upstream.submodule_bump, upstream.removal,
                    upstream.tagged, upstream.tip]
    side = bare(upstream, "rev-list", f"refs/heads/{upstream.side_branch}").split()
    assert side == [upstream.fix_b_unmerged, upstream.fix_a, upstream.old]
    assert bare(upstream, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert "(#8803)" in bare(upstream, "log", "-1", "--format=%s", upstream.fix_a)
    assert bare(upstream, "log", "-1", "--format=%s", upstream.fix_b_unmerged) == \
        upstream.subjects["fix_b_unmerged"]


def test_the_reverts_branch_reverts_as_upstream_does(upstream):
    branch = bare(upstream, "rev-list", f"refs/heads/{upstream.reverts_branch}").split()
    assert branch[:5] == [upstream.revert_emoji, upstream.reapply_a, upstream.revert_a, upstream.emoji_fix,
                          upstream.tip]

    def message(role: str) -> str:
        return bare(upstream, "log", "-1", "--format=%B", upstream.commit(role))

    # git revert's subject and body, with the squash merge's "(#N)" after the subject.
    assert message("revert_a") == (f'Revert "{upstream.subjects["fix_a"]}" (#11300)\n\n'
                                   f"This reverts commit {upstream.fix_a}.")
    assert message("reapply_a") == (f'Revert "{upstream.subjects["revert_a"]}" (#11400)\n\n'
                                    f"This reverts commit {upstream.revert_a}.")
    assert message("revert_emoji") == f'Revert "{trtllm_repo.EMOJI_SUBJECT}" (#11500)'
    assert message("emoji_fix") == trtllm_repo.EMOJI_SUBJECT
    assert any(ord(c) > 0xFFFF for c in trtllm_repo.EMOJI_SUBJECT)  # beyond the BMP
    ops = "tensorrt_llm/_torch/distributed/ops.py"
    contents = {role: bare(upstream, "show", f"{upstream.commit(role)}:{ops}") + "\n"
                for role in ("fix_a", "revert_a", "reapply_a")}
    assert contents == {"fix_a": trtllm_repo.ALLREDUCE_AFTER, "revert_a": trtllm_repo.ALLREDUCE_BEFORE,
                        "reapply_a": trtllm_repo.ALLREDUCE_AFTER}


def test_the_interface_references_are_made_from_the_projects_own_data(upstream):
    from trtllm_deploy.runtimes.interface import REFERENCE_PATHS, extract

    files = trtllm_repo.interface_files()
    assert files, f"no interface data in {trtllm_repo.INTERFACE_DATA} to make the references from"
    # The stand-in llm_args.py reads back, through the project's extractor, as the recorded data.
    main = REFERENCE_PATHS["llm_args_models.json"]
    recorded = json.loads((trtllm_repo.INTERFACE_DATA / "llm_args_models.json").read_text())
    assert extract.models({main: files[main]}, main) == recorded
    for role in ("removal", "tip", "gpt_oss", "lacks_flag"):
        for path, text in files.items():
            blob = bare(upstream, "show", f"{upstream.commit(role)}:{path}") + "\n"
            assert (blob == text) is not (role == "lacks_flag" and path.endswith("trtllm_serve_cli.yaml"))
    assert bare(upstream, "cat-file", "-e", f"{upstream.submodule_bump}:{main}", check=False).returncode != 0
    serve_cli = REFERENCE_PATHS["trtllm_serve_cli.yaml"]
    serve = yaml.safe_load(bare(upstream, "show", f"{upstream.lacks_flag}:{serve_cli}"))
    pinned = yaml.safe_load(files[serve_cli])
    flags = {name: option["flags"] for name, option in pinned["commands"]["serve"]["options"].items()}
    dropped = [name for name, names in flags.items() if trtllm_repo.DROPPED_FLAG in names]
    assert len(dropped) == 1 and set(serve["commands"]["serve"]["options"]) == set(flags) - set(dropped)


@pytest.mark.parametrize("role, has_trtllm_build", [
    ("old", True), ("fix_a", True), ("submodule_bump", True), ("removal", False), ("tip", False)])
def test_trtllm_build_exists_until_the_engine_backend_is_removed(upstream, role, has_trtllm_build):
    sha = upstream.commit(role)
    for path in (trtllm_repo.TRTLLM_BUILD_FILE, trtllm_repo.CONVERT_CHECKPOINT_FILE):
        assert (bare(upstream, "cat-file", "-e", f"{sha}:{path}", check=False).returncode == 0) \
            is has_trtllm_build, path
    assert ("trtllm-build=" in bare(upstream, "show", f"{sha}:setup.py")) is has_trtllm_build


def test_version_file_changes_along_main(upstream):
    seen = {}
    for role in ROLES:
        text = bare(upstream, "show", f"{upstream.commit(role)}:{trtllm_repo.VERSION_FILE}")
        seen[role] = re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)
    assert seen == upstream.versions
    assert (seen["old"], seen["tagged"], seen["tip"]) == ("1.2.0rc0", "1.3.0rc1", "1.3.0rc2")


def test_refs_as_a_remote_lists_them(upstream):
    listing = dict(line.split("\t")[::-1] for line in git("ls-remote", upstream.url).splitlines())
    assert listing["refs/heads/main"] == upstream.tip
    assert listing[f"refs/heads/{upstream.side_branch}"] == upstream.fix_b_unmerged
    assert listing[f"refs/tags/{upstream.tag}"] == upstream.tag_object != upstream.tagged
    assert listing[f"refs/tags/{upstream.tag}^{{}}"] == upstream.tagged


def test_submodule_pointer_moves_and_its_url_is_relative(upstream):
    def gitlink(role: str) -> str:
        line = bare(upstream, "ls-tree", upstream.commit(role), upstream.submodule_path)
        mode, kind, sha = line.split("\t")[0].split()
        assert (mode, kind) == ("160000", "commit")
        return sha

    assert gitlink("old") == gitlink("fix_a") == upstream.submodule_at_old
    assert gitlink("submodule_bump") == gitlink("tip") == upstream.submodule_at_tip
    assert upstream.submodule_at_old != upstream.submodule_at_tip
    assert git(f"--git-dir={upstream.submodule_repo}", "rev-list", "main").split() == \
        [upstream.submodule_at_tip, upstream.submodule_at_old]
    gitmodules = bare(upstream, "show", f"{upstream.tip}:.gitmodules")
    assert "url = ../cutlass.git" in gitmodules


def test_lfs_file_is_a_pointer_in_git_and_the_object_is_in_the_bare_repo(upstream, tmp_path):
    blob = bare(upstream, "show", f"{upstream.tip}:{upstream.lfs_path}") + "\n"
    assert blob == upstream.lfs_pointer
    assert upstream.lfs_object.read_bytes() == upstream.lfs_content
    assert upstream.lfs_object.relative_to(upstream.repo).parts[:2] == ("lfs", "objects")
    # git-lfs itself builds the same pointer from these bytes (and compares it with ours).
    content = tmp_path / "libfake_kernels.a"
    content.write_bytes(upstream.lfs_content)
    subprocess.run(["git", "lfs", "pointer", f"--file={content}", "--stdin"],
                   input=upstream.lfs_pointer.encode(), capture_output=True, check=True)
    assert "filter=lfs" in bare(upstream, "show", f"{upstream.tip}:.gitattributes")


# --- a clone over file:// ------------------------------------------------------------------------

def test_clone_of_a_copy_gets_submodule_and_lfs_content_with_the_documented_settings(upstream, tmp_path):
    # Copied side by side somewhere else, as tests put them onto a node: relative URLs still work.
    elsewhere = tmp_path / "upstream"
    elsewhere.mkdir()
    for repo in (upstream.repo, upstream.submodule_repo):
        shutil.copytree(repo, elsewhere / repo.name)
    url = (elsewhere / upstream.repo.name).as_uri()
    tree = tmp_path / "clone"
    no_system = {"GIT_CONFIG_NOSYSTEM": "1"}  # no LFS filter from /etc/gitconfig ($HOME is fresh)
    git("clone", "--quiet", url, str(tree), env=no_system)
    lib = tree / upstream.lfs_path

    # A clone where no config installs the LFS filter: the pointer text, and git lfs says the
    # object is not there (" - ").
    assert lib.read_text() == upstream.lfs_pointer
    assert git("lfs", "ls-files", cwd=tree) == f"{upstream.lfs_oid[:10]} - {upstream.lfs_path}"

    # git >= 2.38.1 refuses a file:// submodule unless protocol.file.allow=always.
    refused = git("submodule", "update", "--init", cwd=tree, check=False, env=no_system)
    assert refused.returncode != 0 and "transport 'file' not allowed" in refused.stderr
    git("submodule", "update", "--init", "--recursive", cwd=tree, env={**no_system, **FILE_PROTOCOL_ENV})
    assert git("rev-parse", "HEAD", cwd=tree / upstream.submodule_path) == upstream.submodule_at_tip
    assert (tree / upstream.submodule_path / "include/cutlass/version.h").read_text() == \
        '#define CUTLASS_VERSION "4.3.0"\n'

    # LFS over file:// needs no settings: git-lfs's standalone transfer reads lfs/objects.
    git("lfs", "install", "--local", cwd=tree, env=no_system)
    git("lfs", "pull", cwd=tree, env=no_system)
    assert lib.read_bytes() == upstream.lfs_content
    assert git("lfs", "ls-files", cwd=tree, env=no_system) == \
        f"{upstream.lfs_oid[:10]} * {upstream.lfs_path}"
    assert git("status", "--porcelain", "--ignore-submodules=none", cwd=tree, env=no_system) == ""

    # Where the filter is installed, the checkout itself fetches the object over file://.
    smudging = tmp_path / "smudging"
    git("-c", "filter.lfs.process=git-lfs filter-process", "-c", "filter.lfs.required=true",
        "clone", "--quiet", url, str(smudging), env=no_system)
    assert (smudging / upstream.lfs_path).read_bytes() == upstream.lfs_content


def test_exact_commits_fetch_by_sha_including_the_unmerged_fix(upstream, tmp_path):
    tree = checkout(upstream, tmp_path / "old", upstream.old)
    assert git("rev-parse", "HEAD", cwd=tree) == upstream.old
    assert git("rev-parse", "HEAD", cwd=tree / upstream.submodule_path) == upstream.submodule_at_old
    assert (tree / upstream.lfs_path).read_bytes() == upstream.lfs_content
    assert (tree / trtllm_repo.TRTLLM_BUILD_FILE).exists()
    git("fetch", "--quiet", "--no-tags", "origin", upstream.fix_b_unmerged, cwd=tree)
    assert git("merge-base", "--is-ancestor", upstream.fix_a, upstream.fix_b_unmerged, cwd=tree,
               check=False).returncode == 0


def test_split_image():
    assert trtllm_repo.split_image("trtllm-deploy/base:bookworm") == ("trtllm-deploy/base", "bookworm")
    assert trtllm_repo.split_image("localhost:5000/x") == ("localhost:5000/x", "latest")
    assert trtllm_repo.split_image("nvcr.io/nvidia/pytorch:25.10-py3@sha256:ab") == \
        ("nvcr.io/nvidia/pytorch", "25.10-py3@sha256:ab")
    with pytest.raises(ValueError):
        trtllm_repo.split_image("debian@sha256:ab")


# --- docker/Makefile -----------------------------------------------------------------------------

def make(tree: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed (apt-get install make)")
    done = subprocess.run(["make", "--no-print-directory", "-C", str(tree / "docker"), *args],
                          capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"make {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def tip_tree(upstream, tmp_path_factory) -> Path:
    return checkout(upstream, tmp_path_factory.mktemp("tip") / "TensorRT-LLM")


@pytest.mark.parametrize("name, args, expected", [
    ("IMAGE_WITH_TAG", ["STAGE=release"], "tensorrt_llm/release:latest"),
    ("IMAGE_WITH_TAG", ["STAGE=release", "IMAGE_NAME=x/y", "IMAGE_TAG=t"], "x/y/release:t"),
    ("DOCKER_BUILD_OPTS", [], "--pull --load"),
    ("BUILD_WHEEL_ARGS", ["PLATFORM=amd64"],
     "--clean --benchmarks --extra-cmake-vars NVRTC_DYNAMIC_LINKING=ON"),
    ("BUILD_WHEEL_ARGS", ["PLATFORM=arm64"], "--clean --benchmarks --extra-cmake-vars "
                                             "NVRTC_DYNAMIC_LINKING=ON --cuda_architectures "
                                             "'90-real;100-real;120-real'"),
    ("BUILD_WHEEL_ARGS", ["CUDA_ARCHS=121-real", "BUILD_WHEEL_OPTS=-j 4"],
     "--clean --benchmarks --extra-cmake-vars NVRTC_DYNAMIC_LINKING=ON --cuda_architectures 121-real -j 4"),
    ("BASE_IMAGE", [], "trtllm-deploy/base"),
    ("BASE_TAG", [], "bookworm"),
    ("TRT_LLM_VERSION", [], "1.3.0rc2"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_makefile_variables_and_defaults_match_the_real_ones(tip_tree, name, args, expected):
    done = make(tip_tree, "-s", "--eval", "print-%: ; @echo \"$($*)\"", f"print-{name}", *args)
    assert done.stdout.strip() == expected


def test_makefile_release_build_command(upstream, tip_tree):
    done = make(tip_tree, "-n", "release_build", "CUDA_ARCHS=121-real",
                "DOCKER_BUILD_OPTS=--pull --load --label io.test=1")
    command = done.stdout
    assert "docker build --force-rm --label io.test=1" in command  # --pull/--load dropped
    assert "--target release" in command and "--tag tensorrt_llm/release:latest" in command
    assert f"--build-arg 'GIT_COMMIT={upstream.tip}'" in command


# --- the real docker build ----------------------------------------------------------------------

def build(tree: Path, *args: str, name: str) -> subprocess.CompletedProcess:
    done = make(tree, "release_build", f"IMAGE_NAME={name}", "IMAGE_TAG=t", *args, check=False)
    remove_build_images(done.stdout)
    return done


@pytest.fixture
def image_name() -> str:
    return f"trtllm-deploy-test/fake-trtllm-{uuid.uuid4().hex[:8]}"


def test_release_build_builds_an_image_that_records_what_it_was_given(upstream, base_image,
                                                                      tmp_path, image_name):
    tree = checkout(make_upstream(tmp_path / "up", base_image=base_image), tmp_path / "tree")
    done = make(tree, "release_build", "CUDA_ARCHS=121-real", "BUILD_WHEEL_OPTS=-j 4",
                f"IMAGE_NAME={image_name}", "IMAGE_TAG=t1",
                "DOCKER_BUILD_OPTS=--pull --load --label io.test.k=v", check=False)
    image = f"{image_name}/release:t1"
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        log = done.stdout
        assert "-- Build files have been written to: /src/tensorrt_llm/cpp/build" in log
        assert re.search(r"^\[\d+/\d+\] Building CUDA object ", log, re.M)
        assert "Successfully built tensorrt_llm-1.3.0rc2-cp312-cp312-linux_" in log
        labels = subprocess.run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}",
                                 image], capture_output=True, text=True, check=True).stdout
        assert '"io.test.k":"v"' in labels and '"io.trtllm-fake.cuda-archs":"121-real"' in labels
        recorded = subprocess.run(["docker", "run", "--rm", "--network", "none", image, "cat",
                                   trtllm_repo.BUILD_VARS_FILE], capture_output=True, text=True,
                                  check=True).stdout
        values = dict(line.split("=", 1) for line in recorded.splitlines())
    finally:
        remove_build_images(done.stdout)
    head = git("rev-parse", "HEAD", cwd=tree)
    base_name, base_tag = trtllm_repo.split_image(base_image)
    assert values == {
        "BASE_IMAGE": base_name, "BASE_TAG": base_tag, "CUDA_ARCHS": "121-real",
        "BUILD_WHEEL_OPTS": "-j 4",
        "BUILD_WHEEL_ARGS": "--clean --benchmarks --extra-cmake-vars NVRTC_DYNAMIC_LINKING=ON "
                            "--cuda_architectures 121-real -j 4",
        "IMAGE_NAME": image_name, "IMAGE_TAG": "t1", "IMAGE_WITH_TAG": image, "STAGE": "release",
        "DOCKER_BUILD_OPTS": "--pull --load --label io.test.k=v", "DOCKER_BUILD_ARGS": "",
        "PLATFORM": values["PLATFORM"], "LOCAL_USER": "0", "GIT_COMMIT": head,
        "TRT_LLM_VER": "1.3.0rc2", "FAKE_FAIL": "", "FAKE_DELAY": "0",
        "LFS_SHA256": upstream.lfs_oid, "CUTLASS_VERSION": "4.3.0"}
    assert subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0


@pytest.fixture(scope="module")
def trees(base_image, tmp_path_factory) -> dict[str, Path]:
    """The tip checked out fully, without `git lfs pull`, and without submodules."""
    root = tmp_path_factory.mktemp("trees")
    up = make_upstream(root / "up", base_image=base_image)
    return {"full": checkout(up, root / "full"),
            "no_lfs": checkout(up, root / "no_lfs", lfs=False),
            "no_submodules": checkout(up, root / "no_submodules", submodules=False)}


@pytest.mark.parametrize("tree, args, line", [
    ("full", ["FAKE_FAIL=oom"], "nvcc error   : 'cicc' died due to signal 9 (Kill signal)"),
    ("full", ["FAKE_FAIL=disk"], "No space left on device"),
    ("full", ["FAKE_FAIL=lfs"], "libfake_kernels.a: file format not recognized; treating as linker script"),
    ("full", ["FAKE_FAIL=download"], "Failed to connect to github.com port 443"),
    ("full", ["FAKE_FAIL=compiler"], "error: identifier \"__nv_fp4x2_e2m1\" is undefined"),
    ("full", ["FAKE_FAIL=arch"], "nvcc fatal   : Unsupported gpu architecture 'compute_121'"),
    ("full", ["FAKE_FAIL=typo"], "unknown FAKE_FAIL=typo"),
    ("no_lfs", [], "libfake_kernels.a: file format not recognized; treating as linker script"),
    ("no_submodules", [], "3rdparty/cutlass\n\n  does not contain a CMakeLists.txt file."),
], ids=["oom", "disk", "lfs", "download", "compiler", "arch", "unknown-mode", "lfs-not-pulled",
        "submodule-not-checked-out"])
def test_release_build_fails_like_a_real_one(trees, image_name, tree, args, line):
    done = build(trees[tree], *args, name=image_name)
    assert done.returncode != 0
    assert line in done.stdout
    assert "Successfully built tensorrt_llm" not in done.stdout
    assert subprocess.run(["docker", "image", "inspect", f"{image_name}/release:t"],
                          capture_output=True).returncode != 0


def test_release_build_refuses_a_base_image_the_engine_lacks(trees, image_name):
    done = build(trees["full"], "BASE_IMAGE=trtllm-deploy-test/no-such-image", name=image_name)
    assert done.returncode != 0
    assert "is not in this Docker engine" in done.stderr
