"""A small stand-in for NVIDIA/TensorRT-LLM's git repository, for tests of the source and image phases.

``make_upstream(root, base_image=...)`` writes two bare repositories side by side, built with real
git and the git-lfs storage layout, with reproducible SHAs (fixed authors and dates):

    root/TensorRT-LLM.git   main:  old ─ fix_a ─ submodule_bump ─ removal ─ tagged ─ tip
                                             └─ fix_b_unmerged          (feature/unmerged-fix)
                                   tag v1.3.0rc1 (annotated) on "tagged"
                            tip ─ emoji_fix ─ revert_a ─ reapply_a ─ revert_emoji   (feature/reverts)
                            tip ─ gpt_oss ─ lacks_flag                            (feature/interface-change)

From "removal" on, the tree has TensorRT-LLM's interface references where upstream keeps them
(tests/unittest/api_stability/..., tensorrt_llm/llmapi/llm_args.py), made from the project's own
recorded data (requirements/interface/tensorrt-llm/, see ``interface_files``); "lacks_flag"'s
trtllm-serve reference has lost the option of ``--pp_size``, which the project passes. "gpt_oss" merges #7937,
so the shipped lock's required fixes are all there except the ones only several nodes need.
    root/cutlass.git        the submodule 3rdparty/cutlass, URL "../cutlass.git" in .gitmodules

Consumers clone with ``file://`` URLs (``Upstream.url``) and need two things a GitHub clone does not:
  * ``protocol.file.allow=always`` for ``git submodule update`` (git >= 2.38.1 refuses file://
    and local-path submodules otherwise: "fatal: transport 'file' not allowed");
  * nothing for LFS: git-lfs (>= 2.12) reads ``lfs/objects`` of a file:// remote with its built-in
    standalone transfer agent, so ``git lfs pull`` (after ``git lfs install --local`` where no
    config installs the filter) fetches the real bytes, and so does a checkout where the smudge
    filter is installed (this machine's /etc/gitconfig has it). Without the filter, or with
    GIT_LFS_SKIP_SMUDGE=1, a checkout keeps the pointer text: ``git lfs ls-files`` marks it " - ",
    and the image build fails at link time as a real one does.

Every commit has ``docker/Makefile`` whose ``release_build`` runs a real ``docker build`` of a tiny
image FROM the given base (see MAKEFILE and BUILD_SCRIPT below for variables and failure modes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_NAME = "TensorRT-LLM.git"
SUBMODULE_NAME = "cutlass.git"
SUBMODULE_PATH = "3rdparty/cutlass"
SIDE_BRANCH = "feature/unmerged-fix"
TAG = "v1.3.0rc1"
REVERTS_BRANCH = "feature/reverts"
INTERFACE_BRANCH = "feature/interface-change"
# The project's record of the pinned TensorRT-LLM's interface, from which the stand-in's are made.
INTERFACE_DATA = Path(__file__).resolve().parents[1] / "requirements" / "interface" / "tensorrt-llm"
DROPPED_FLAG = "--pp_size"   # lacks_flag's trtllm-serve reference no longer has the option of this flag
# A required fix whose subject is not ASCII (an emoji outside the Basic Multilingual Plane, accents,
# a right-to-left word): what the lock must write and read back unchanged.
EMOJI_SUBJECT = ("🐛 [None][fix] Skip NCCL window registration on SM121 — «ünïcödé» שלום 𝄞 "
                 "(#15559)")
LFS_PATH = "cpp/tensorrt_llm/kernels/lib/libfake_kernels.a"
VERSION_FILE = "tensorrt_llm/version.py"
TRTLLM_BUILD_FILE = "tensorrt_llm/commands/build.py"
CONVERT_CHECKPOINT_FILE = "examples/models/core/llama/convert_checkpoint.py"
BUILD_VARS_FILE = "/opt/trtllm-fake/build-vars.env"  # inside the built image
FAIL_MODES = ("oom", "disk", "lfs", "download", "compiler", "arch")
# Variables the image records in BUILD_VARS_FILE (and the Makefile passes as build args).
BUILD_VARS = ("BASE_IMAGE", "BASE_TAG", "CUDA_ARCHS", "BUILD_WHEEL_OPTS", "BUILD_WHEEL_ARGS",
              "IMAGE_NAME", "IMAGE_TAG", "IMAGE_WITH_TAG", "STAGE", "DOCKER_BUILD_OPTS",
              "DOCKER_BUILD_ARGS", "PLATFORM", "LOCAL_USER", "GIT_COMMIT", "TRT_LLM_VER",
              "FAKE_FAIL", "FAKE_DELAY")

# What a consumer's git needs for the stand-in's submodule (file:// URLs): give it as environment.
FILE_PROTOCOL_ENV = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "protocol.file.allow",
                     "GIT_CONFIG_VALUE_0": "always"}

_IDENTITY = {"GIT_AUTHOR_NAME": "TensorRT-LLM Stand-in", "GIT_AUTHOR_EMAIL": "standin@trtllm-deploy.invalid",
             "GIT_COMMITTER_NAME": "TensorRT-LLM Stand-in",
             "GIT_COMMITTER_EMAIL": "standin@trtllm-deploy.invalid"}

# ---------------------------------------------------------------------------------------------
# Files of the stand-in tree

MAKEFILE = r"""# Stand-in for NVIDIA/TensorRT-LLM's docker/Makefile, written by trtllm-deploy's tests
# (tests/trtllm_repo.py). Same names and defaults for what `release_build` reads; the image it builds
# is tiny: its RUN step prints build-like progress and records every variable it was given in
# /opt/trtllm-fake/build-vars.env and in image labels.
#
# Unlike the real one: `docker build` (the legacy builder; no buildx needed) instead of
# `docker buildx build`, so --pull and --load are dropped from DOCKER_BUILD_OPTS (the base image is
# local and never pulled) and --force-rm is added (a failed RUN leaves no container behind, as with
# BuildKit); and FAKE_FAIL / FAKE_DELAY exist only here.

BASE_IMAGE         ?= $(shell grep '^ARG BASE_IMAGE=' Dockerfile.multi | grep -o '=.*' | tr -d '="')
BASE_TAG           ?= $(shell grep '^ARG BASE_TAG=' Dockerfile.multi | grep -o '=.*' | tr -d '="')
IMAGE_NAME         ?= tensorrt_llm
IMAGE_TAG          ?= latest
LOCAL_USER         ?= 0
STAGE              ?=
IMAGE_WITH_TAG     ?= $(IMAGE_NAME)$(if $(STAGE),/$(STAGE)):$(IMAGE_TAG)
DOCKER_BUILD_OPTS  ?= --pull --load
DOCKER_BUILD_ARGS  ?=
PLATFORM           ?= $(shell uname -m | grep -q 'aarch64' && echo "arm64" || echo "amd64")
CUDA_ARCHS         ?= $(if $(filter arm64,$(PLATFORM)),'90-real;100-real;120-real',)
BUILD_WHEEL_OPTS   ?=
BUILD_WHEEL_ARGS   ?= $(shell grep '^ARG BUILD_WHEEL_ARGS=' Dockerfile.multi | grep -o '=.*' | tr -d '="') --extra-cmake-vars NVRTC_DYNAMIC_LINKING=ON$(if $(CUDA_ARCHS), --cuda_architectures $(CUDA_ARCHS))$(if $(BUILD_WHEEL_OPTS), $(BUILD_WHEEL_OPTS))
GIT_COMMIT         ?= $(shell git rev-parse HEAD)
TRT_LLM_VERSION    ?= $(shell grep '^__version__' ../tensorrt_llm/version.py | grep -o '=.*' | tr -d '= "')
TRT_LLM_VER        = $(TRT_LLM_VERSION)
# FAKE_FAIL=oom|disk|lfs|download|compiler|arch: fail the way a real build does, with its log lines.
FAKE_FAIL          ?=
# FAKE_DELAY: seconds to sleep after each progress line (a slow build, to follow or interrupt).
FAKE_DELAY         ?= 0
BUILD_VARS         := __BUILD_VARS__

# Build args are passed single-quoted, so any value (spaces, quotes, ';') arrives as given.
quote = '$(subst ','\'',$(1))'
arg = --build-arg $(call quote,$(1)=$($(1)))

base_pull:
	@echo "Checking base image: $(BASE_IMAGE):$(BASE_TAG)"
	@docker image inspect --format '{{.Id}}' $(BASE_IMAGE):$(BASE_TAG) >/dev/null 2>&1 || \
		{ echo "Base image $(BASE_IMAGE):$(BASE_TAG) is not in this Docker engine (the stand-in never pulls)" >&2; exit 1; }

%_build: base_pull
	@echo "Building docker image: $(IMAGE_WITH_TAG)"
	docker build --force-rm $(filter-out --pull --load,$(DOCKER_BUILD_OPTS)) $(DOCKER_BUILD_ARGS) \
		$(foreach name,$(BUILD_VARS),$(call arg,$(name))) \
		$(if $(STAGE), --target $(STAGE)) \
		--file Dockerfile.multi \
		--tag $(IMAGE_WITH_TAG) \
		..

devel_%: STAGE = devel
release_%: STAGE = release

build: devel_build ;

.PHONY: base_pull build
"""  # noqa: E501 - the real Makefile's long lines, kept whole

DOCKERFILE = """# Stand-in for NVIDIA/TensorRT-LLM's docker/Dockerfile.multi (tests/trtllm_repo.py): the same
# base-image arguments and stage names; `release` runs scripts/fake_build_wheel.sh.
ARG BASE_IMAGE={base_image}
ARG BASE_TAG={base_tag}

FROM ${{BASE_IMAGE}}:${{BASE_TAG}} AS base

FROM base AS devel

FROM devel AS release
ARG BUILD_WHEEL_ARGS="--clean --benchmarks"
# Few instructions: under the vfs storage driver of the testbed nodes' engines, every step copies
# the whole file system of the image (the legacy builder runs a container even for ARG and LABEL).
ARG {arg_names}
COPY . /src/tensorrt_llm/
RUN cd /src/tensorrt_llm && sh scripts/fake_build_wheel.sh ${{BUILD_WHEEL_ARGS}}
ENV TRT_LLM_GIT_COMMIT=${{GIT_COMMIT}} \\
    TRT_LLM_VERSION=${{TRT_LLM_VER}}
LABEL io.trtllm-fake.stand-in="1" \\
      io.trtllm-fake.git-commit="${{GIT_COMMIT}}" \\
      io.trtllm-fake.version="${{TRT_LLM_VER}}" \\
      io.trtllm-fake.cuda-archs="${{CUDA_ARCHS}}" \\
      io.trtllm-fake.build-wheel-args="${{BUILD_WHEEL_ARGS}}" \\
      io.trtllm-fake.build-wheel-opts="${{BUILD_WHEEL_OPTS}}" \\
      io.trtllm-fake.image="${{IMAGE_WITH_TAG}}" \\
      io.trtllm-fake.docker-build-opts="${{DOCKER_BUILD_OPTS}}"
"""

# The failure lines are taken from real TensorRT-LLM build logs in its issue tracker (#28, #72, #824,
# #434) and from nvcc/gcc's own wording; paths are this tree's.
BUILD_SCRIPT = r"""#!/bin/sh
# Stand-in for scripts/build_wheel.py (trtllm-deploy's tests/trtllm_repo.py): prints what a real
# build prints, fails the ways a real build fails (FAKE_FAIL, a missing LFS object, an empty
# submodule), and records the variables it was given in /opt/trtllm-fake/build-vars.env.
set -eu
src=$(pwd)
lib=cpp/tensorrt_llm/kernels/lib/libfake_kernels.a
out=/opt/trtllm-fake
total=4123
delay="${FAKE_DELAY:-0}"
version="${TRT_LLM_VER:-0.0.0}"

say() {
    echo "$1"
    if [ "$delay" != 0 ]; then sleep "$delay"; fi
}

stop() {  # the lines after the failing one, as build_wheel.py prints them; exit 1
    for line in "$@"; do echo "$line"; done
    echo "ninja: build stopped: subcommand failed."
    echo "Traceback (most recent call last):"
    echo "  File \"$src/scripts/build_wheel.py\", line 1012, in <module>"
    echo "    main(**vars(args))"
    echo "subprocess.CalledProcessError: Command 'cmake --build . --config Release --parallel 20 --target build_wheel_targets' returned non-zero exit status 1."
    exit 1
}

case "${FAKE_FAIL:-}" in
    ""|oom|disk|lfs|download|compiler|arch) ;;
    *) echo "fake_build_wheel.sh: unknown FAKE_FAIL=${FAKE_FAIL} (oom|disk|lfs|download|compiler|arch)"; exit 2 ;;
esac

say "-- The CXX compiler identification is GNU 13.3.0"
say "-- The CUDA compiler identification is NVIDIA 13.0.88"
say "-- GPU architectures: ${CUDA_ARCHS:-(default)}"
say "-- build_wheel.py arguments: $*"
if [ "${FAKE_FAIL:-}" = download ]; then
    echo "Cloning into 'googletest-src'..."
    echo "fatal: unable to access 'https://github.com/google/googletest.git/': Failed to connect to github.com port 443 after 131050 ms: Connection timed out"
    echo "CMake Error at googletest-subbuild/googletest-populate-prefix/tmp/googletest-populate-gitclone.cmake:39 (message):"
    echo "  Failed to clone repository: 'https://github.com/google/googletest.git'"
    echo "-- Configuring incomplete, errors occurred!"
    exit 1
fi
if [ ! -f 3rdparty/cutlass/CMakeLists.txt ]; then
    echo "CMake Error at tensorrt_llm/CMakeLists.txt:42 (add_subdirectory):"
    echo "  The source directory"
    echo ""
    echo "    $src/3rdparty/cutlass"
    echo ""
    echo "  does not contain a CMakeLists.txt file."
    echo "-- Configuring incomplete, errors occurred!"
    exit 1
fi
say "-- Configuring done (23.4s)"
say "-- Generating done (3.1s)"
say "-- Build files have been written to: $src/cpp/build"
say "[1/$total] Building CXX object tensorrt_llm/common/CMakeFiles/common_src.dir/logger.cpp.o"
say "[2/$total] Building CUDA object tensorrt_llm/kernels/CMakeFiles/kernels_src.dir/quantization.cu.o"
say "[3/$total] Building CUDA object tensorrt_llm/kernels/CMakeFiles/kernels_src.dir/samplingTopKKernels.cu.o"
kernel="tensorrt_llm/kernels/CMakeFiles/kernels_src.dir/customAllReduceKernels.cu.o"
case "${FAKE_FAIL:-}" in
    oom) stop "FAILED: $kernel" "nvcc error   : 'cicc' died due to signal 9 (Kill signal)" ;;
    disk) stop "FAILED: $kernel" \
        "$src/cpp/tensorrt_llm/kernels/customAllReduceKernels.cu(1): catastrophic error: error while writing generated C++ file: No space left on device" \
        "1 catastrophic error detected in the compilation of \"$src/cpp/tensorrt_llm/kernels/customAllReduceKernels.cu\"." \
        "Compilation terminated." ;;
    compiler) stop "FAILED: $kernel" \
        "$src/cpp/tensorrt_llm/kernels/customAllReduceKernels.cu(212): error: identifier \"__nv_fp4x2_e2m1\" is undefined" \
        "1 error detected in the compilation of \"$src/cpp/tensorrt_llm/kernels/customAllReduceKernels.cu\"." ;;
    arch) stop "FAILED: $kernel" "nvcc fatal   : Unsupported gpu architecture 'compute_121'" ;;
esac
say "[4120/$total] Building CUDA object tensorrt_llm/kernels/CMakeFiles/kernels_src.dir/unfusedAttentionKernels.cu.o"
say "[4121/$total] Linking CXX static library tensorrt_llm/libtensorrt_llm_static.a"
if [ "${FAKE_FAIL:-}" = lfs ] || head -c 40 "$lib" | grep -q '^version https://git-lfs'; then
    stop "[4122/$total] Linking CXX shared library tensorrt_llm/libtensorrt_llm.so" \
        "FAILED: tensorrt_llm/libtensorrt_llm.so" \
        "/usr/bin/ld:$src/$lib: file format not recognized; treating as linker script" \
        "/usr/bin/ld:$src/$lib:1: syntax error" \
        "collect2: error: ld returned 1 exit status"
fi
say "[4122/$total] Linking CXX shared library tensorrt_llm/libtensorrt_llm.so"
say "[$total/$total] Linking CXX shared library tensorrt_llm/libnvinfer_plugin_tensorrt_llm.so"
wheel="tensorrt_llm-${version}-cp312-cp312-linux_$(uname -m).whl"
say "Successfully built $wheel"

mkdir -p "$out"
for name in __BUILD_VARS__; do
    eval "value=\${$name-}"
    printf '%s=%s\n' "$name" "$value"
done > "$out/build-vars.env"
echo "LFS_SHA256=$(sha256sum "$lib" | cut -d' ' -f1)" >> "$out/build-vars.env"
echo "CUTLASS_VERSION=$(grep -o 'CUTLASS_VERSION \"[^\"]*\"' 3rdparty/cutlass/include/cutlass/version.h | cut -d'"' -f2)" >> "$out/build-vars.env"
echo "$wheel" > "$out/wheel"
"""  # noqa: E501 - log lines are quoted whole

SETUP_PY = '''"""Stand-in for TensorRT-LLM's setup.py (tests/trtllm_repo.py): only the console scripts."""
from setuptools import find_packages, setup

setup(
    name="tensorrt_llm",
    packages=find_packages(),
    entry_points={{"console_scripts": [
{scripts}    ]}},
)
'''

ALLREDUCE_BEFORE = '''"""AllReduce for tensor parallelism (stand-in)."""


def allreduce_workspace(mapping):
    return {"mapping": mapping}
'''

ALLREDUCE_AFTER = '''"""AllReduce for tensor parallelism (stand-in)."""
_WORKSPACES = {}


def allreduce_workspace(mapping):
    # Cached: re-allocating the workspace for every wrapper hung multi-GPU runs (#8781).
    return _WORKSPACES.setdefault(mapping, {"mapping": mapping})
'''


def _version_py(version: str) -> str:
    return f'"""TensorRT-LLM version (stand-in)."""\n__version__ = "{version}"\n'


def _setup_py(trtllm_build: bool) -> str:
    scripts = (['"trtllm-build=tensorrt_llm.commands.build:main"'] if trtllm_build else []) + [
        '"trtllm-serve=tensorrt_llm.commands.serve:main"']
    return SETUP_PY.format(scripts="".join(f"        {line},\n" for line in scripts))


def lfs_content() -> bytes:
    """The LFS-tracked library's real bytes: an ``ar`` archive header and 4 KiB of fixed noise."""
    noise, block = b"", b"trtllm-deploy fake kernels"
    while len(noise) < 4096:
        block = hashlib.sha256(block).digest()
        noise += block
    return b"!<arch>\n" + noise


def lfs_pointer(content: bytes) -> str:
    """The pointer file git-lfs commits in place of ``content`` (spec v1)."""
    oid = hashlib.sha256(content).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(content)}\n"


def split_image(reference: str) -> tuple[str, str]:
    """``"name:tag"`` (a digest may follow) as the Dockerfile's BASE_IMAGE and BASE_TAG."""
    name_tag, at, digest = reference.partition("@")
    if ":" not in name_tag.rsplit("/", 1)[-1]:
        if at:
            raise ValueError(f"{reference!r}: give the base image a tag before its digest, since "
                             "the Dockerfile writes FROM ${BASE_IMAGE}:${BASE_TAG}")
        return name_tag, "latest"
    colon = name_tag.rindex(":")
    return name_tag[:colon], name_tag[colon + 1:] + at + digest


def interface_files(data: Path = INTERFACE_DATA) -> dict[str, str]:
    """Upstream path → text of TensorRT-LLM's interface references for the stand-in tree, made from
    the project's recorded data: the api_stability references as recorded, and an llm_args.py
    written from ``llm_args_models.json`` that the project's extractor reads back as that same
    data (tests/test_trtllm_repo.py checks it). Empty where the data is not there."""
    from trtllm_deploy.runtimes.interface import REFERENCE_PATHS

    files = {}
    for name, upstream in REFERENCE_PATHS.items():
        path = data / name
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        files[upstream] = llm_args_source(json.loads(text)) if name.endswith(".json") else text
    return files


def llm_args_source(extracted: dict) -> str:
    """Python source whose classes have exactly the fields, defaults, bounds and aliases that
    ``extracted`` (an ``llm_args_models.json``) records: a stand-in for llm_args.py."""
    lines = ['"""LLM-API arguments (stand-in written by trtllm-deploy\'s tests from its recorded '
             'interface data; not NVIDIA\'s code)."""', ""]
    for name, expression in extracted.get("aliases", {}).items():
        lines.append(f"{name} = {expression}")
    for name, values in extracted.get("enums", {}).items():
        lines += ["", "", f"class {name}(str, Enum):"]
        lines += [f"    MEMBER_{index} = {value!r}" for index, value in enumerate(values)] or ["    pass"]
    for name, model in extracted.get("models", {}).items():
        bases = ", ".join(model.get("bases") or ["BaseModel"])
        lines += ["", "", f"class {name}({bases}):",
                  f"    model_config = ConfigDict(extra={model['extra']!r})"]
        for field_name, entry in model["fields"].items():
            lines.append(f"    {field_name}: {entry['annotation']}{_field_value(entry)}")
    return "\n".join(lines) + "\n"


def _field_value(field: dict) -> str:
    def literal(value) -> str:
        return value["expr"] if isinstance(value, dict) and set(value) == {"expr"} else repr(value)

    extras = []
    if field.get("aliases"):
        extras.append("validation_alias=AliasChoices(" + ", ".join(map(repr, field["aliases"])) + ")")
    extras += [f"{bound}={field[bound]!r}" for bound in ("gt", "ge", "lt", "le") if bound in field]
    if "status" in field:
        extras.append(f"status={field['status']!r}")
    if "default_factory" in field:
        return " = Field(" + ", ".join([f"default_factory={field['default_factory']}", *extras]) + ")"
    if field["required"]:
        return " = Field(" + ", ".join(["...", *extras]) + ")" if extras else ""
    if extras:
        return " = Field(" + ", ".join([f"default={literal(field['default'])}", *extras]) + ")"
    return f" = {literal(field['default'])}"


def without_option(reference: str, flag: str, command: str = "serve") -> str:
    """A trtllm-serve reference (trtllm_serve_cli.yaml) without ``command``'s option that has
    ``flag`` among its flags, as when upstream removes an option."""
    import yaml

    data = yaml.safe_load(reference)
    options = data["commands"][command]["options"]
    (name,) = [name for name, option in options.items() if flag in option.get("flags", ())]
    del options[name]
    return (f"# trtllm_serve_cli.yaml without {name} ({flag}), by trtllm-deploy's tests\n"
            + yaml.safe_dump(data, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# The history


@dataclass(frozen=True)
class Upstream:
    """What ``make_upstream`` built: where, and the SHAs by the role they play in tests."""

    root: Path
    repo: Path                # bare TensorRT-LLM.git
    submodule_repo: Path      # bare cutlass.git beside it
    base_image: str           # what docker/Dockerfile.multi names (ARG BASE_IMAGE / BASE_TAG)
    old: str                  # has tensorrt_llm/commands/build.py (trtllm-build); the root commit
    fix_a: str                # the required fix, on main
    submodule_bump: str       # moves 3rdparty/cutlass from submodule_at_old to submodule_at_tip
    removal: str              # deletes the TensorRT-engine backend (build.py, convert_checkpoint.py)
    tagged: str               # the commit the annotated tag points at
    tip: str                  # main's head
    fix_b_unmerged: str       # on SIDE_BRANCH only (its parent is fix_a); never an ancestor of main
    # On REVERTS_BRANCH, after the tip, each the child of the one before:
    emoji_fix: str            # a fix for PR #15559 whose subject is EMOJI_SUBJECT
    revert_a: str             # reverts fix_a the way `git revert` and GitHub do (subject and body)
    reapply_a: str            # reverts revert_a: fix_a's change is back
    revert_emoji: str         # reverts emoji_fix by subject only (no "This reverts commit" body)
    # On INTERFACE_BRANCH after the tip (None where the project has no interface data):
    gpt_oss: str | None       # #7937, the shipped lock's required fix; the interface as recorded
    lacks_flag: str | None    # its trtllm-serve reference lacks the option of DROPPED_FLAG
    tag_object: str           # the annotated tag object's own SHA
    submodule_at_old: str
    submodule_at_tip: str
    lfs_content: bytes
    tag: str = TAG
    branch: str = "main"
    side_branch: str = SIDE_BRANCH
    reverts_branch: str = REVERTS_BRANCH
    interface_branch: str = INTERFACE_BRANCH
    submodule_path: str = SUBMODULE_PATH
    lfs_path: str = LFS_PATH
    versions: dict[str, str] = field(default_factory=dict)   # role -> __version__ at that commit
    subjects: dict[str, str] = field(default_factory=dict)   # role -> commit subject

    @property
    def url(self) -> str:
        """``file://`` URL of the superproject (its submodule resolves to ``../cutlass.git``)."""
        return self.repo.as_uri()

    @property
    def submodule_url(self) -> str:
        return self.submodule_repo.as_uri()

    @property
    def lfs_oid(self) -> str:
        return hashlib.sha256(self.lfs_content).hexdigest()

    @property
    def lfs_pointer(self) -> str:
        return lfs_pointer(self.lfs_content)

    @property
    def lfs_object(self) -> Path:
        """Where the bare repository keeps the LFS object (git-lfs's layout)."""
        oid = self.lfs_oid
        return self.repo / "lfs" / "objects" / oid[:2] / oid[2:4] / oid

    def commit(self, role: str) -> str:
        """The SHA of a role by name (``"old"``, ``"fix_a"``, ..., ``"fix_b_unmerged"``)."""
        return getattr(self, role)


class _Builder:
    """Commits into a bare repository from a scratch work tree, with fixed identities and dates."""

    def __init__(self, bare: Path, scratch: Path):
        self.bare = bare
        self.work = scratch / bare.name
        self.work.mkdir(parents=True)
        # No global/system config (a developer's lfs filters, signing, hooks) takes part.
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(scratch),
                    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "LC_ALL": "C",
                    "GIT_INDEX_FILE": str(scratch / f"{bare.name}.index"), **_IDENTITY}
        self.gitlinks: dict[str, str] = {}  # submodule path -> SHA, kept until changed
        self.git("init", "--quiet", "--bare", "--initial-branch=main", str(bare), cwd=scratch)

    def git(self, *args: str, cwd: Path | None = None, date: str | None = None,
            stdin: str | None = None) -> str:
        env = dict(self.env)
        if date:
            env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = date
        base = [] if cwd else [f"--git-dir={self.bare}", f"--work-tree={self.work}"]
        done = subprocess.run(["git", *base, *args], cwd=cwd or self.work, env=env, input=stdin,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def write(self, files: dict[str, str | bytes | None]) -> None:
        for path, content in files.items():
            target = self.work / path
            if content is None:
                target.unlink()
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)

    def commit(self, subject: str, date: str, parent: str | None, ref: str | None = "refs/heads/main",
               files: dict[str, str | bytes | None] | None = None,
               gitlinks: dict[str, str] | None = None, body: str | None = None) -> str:
        self.write(files or {})
        self.git("add", "--all")  # would drop a gitlink (no checkout of it here): set them again
        self.gitlinks.update(gitlinks or {})
        for path, sha in self.gitlinks.items():
            self.git("update-index", "--add", "--cacheinfo", f"160000,{sha},{path}")
        tree = self.git("write-tree")
        sha = self.git("commit-tree", tree, *(["-p", parent] if parent else []), "-m", subject,
                       *(["-m", body] if body else []), date=date)
        if ref:
            self.git("update-ref", ref, sha)
        return sha


def _dates(day: str) -> str:
    return f"{day}T10:00:00+00:00"


def _make_submodule(bare: Path, scratch: Path) -> tuple[str, str]:
    cutlass = _Builder(bare, scratch)

    def files(minor: int) -> dict[str, str | bytes | None]:
        return {"CMakeLists.txt": f"project(CUTLASS VERSION 4.{minor}.0 LANGUAGES CXX)\n",
                "include/cutlass/version.h": f'#define CUTLASS_VERSION "4.{minor}.0"\n'}

    first = cutlass.commit("Release v4.2.0", _dates("2025-09-01"), None, files=files(2))
    second = cutlass.commit("Release v4.3.0", _dates("2025-12-01"), first, files=files(3))
    return first, second


def make_upstream(root: Path, *, base_image: str) -> Upstream:
    """Build the stand-in TensorRT-LLM and cutlass bare repositories under ``root``.

    ``base_image`` ("name:tag", an image present in the engine that will run the build) is what
    docker/Dockerfile.multi names as ARG BASE_IMAGE / BASE_TAG, so it is part of every tree: the
    SHAs are the same for the same ``base_image`` wherever ``root`` is.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base_name, base_tag = split_image(base_image)
    repo, submodule_repo = root / REPO_NAME, root / SUBMODULE_NAME
    scratch = Path(tempfile.mkdtemp(prefix=".trtllm-repo-", dir=root))
    try:
        sub_old, sub_tip = _make_submodule(submodule_repo, scratch)
        content = lfs_content()
        oid = hashlib.sha256(content).hexdigest()
        # Where git-lfs keeps objects in a bare repository, and where its standalone file transfer
        # agent looks for them when the remote is a file:// URL.
        stored = repo / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
        upstream = _Builder(repo, scratch)
        stored.parent.mkdir(parents=True)
        stored.write_bytes(content)

        build_vars = " ".join(BUILD_VARS)
        arg_names = " ".join(name for name in BUILD_VARS if name != "BUILD_WHEEL_ARGS")
        versions, subjects = {}, {}

        def commit(role: str, subject: str, day: str, parent: str | None, version: str,
                   ref: str = "refs/heads/main", **kwargs) -> str:
            files = kwargs.setdefault("files", {})
            files[VERSION_FILE] = _version_py(version)
            versions[role], subjects[role] = version, subject
            return upstream.commit(subject, _dates(day), parent, ref=ref, **kwargs)

        old = commit("old", "[None][chore] Bump version to 1.2.0rc0 (#8000)", "2025-10-01", None,
                     "1.2.0rc0", gitlinks={SUBMODULE_PATH: sub_old}, files={
                         "README.md": "# TensorRT-LLM (stand-in)\n\nBuilt by trtllm-deploy's "
                                      "tests/trtllm_repo.py for tests; not NVIDIA's code.\n",
                         ".gitattributes": "*.a filter=lfs diff=lfs merge=lfs -text\n",
                         ".gitmodules": f'[submodule "{SUBMODULE_PATH}"]\n\tpath = {SUBMODULE_PATH}\n'
                                        f"\turl = ../{SUBMODULE_NAME}\n",
                         ".dockerignore": ".git\n**/.git\n",
                         "setup.py": _setup_py(trtllm_build=True),
                         "tensorrt_llm/__init__.py": "from tensorrt_llm.version import __version__\n",
                         "tensorrt_llm/commands/__init__.py": "",
                         TRTLLM_BUILD_FILE: '"""trtllm-build (stand-in)."""\n\n\ndef main():\n'
                                            '    raise SystemExit("stand-in")\n',
                         "tensorrt_llm/commands/serve.py": '"""trtllm-serve (stand-in)."""\n\n\n'
                                                           'def main():\n    raise SystemExit("stand-in")\n',
                         CONVERT_CHECKPOINT_FILE: '"""Convert a Llama checkpoint (stand-in)."""\n',
                         "tensorrt_llm/_torch/distributed/ops.py": ALLREDUCE_BEFORE,
                         LFS_PATH: lfs_pointer(content),
                         "scripts/fake_build_wheel.sh": BUILD_SCRIPT.replace("__BUILD_VARS__", build_vars),
                         "docker/Makefile": MAKEFILE.replace("__BUILD_VARS__", build_vars),
                         "docker/Dockerfile.multi": DOCKERFILE.format(
                             base_image=base_name, base_tag=base_tag, arg_names=arg_names),
                     })
        fix_a = commit("fix_a", "[#8781][fix] Cache the AllReduce wrapper to avoid re-allocating "
                       "workspace which caused a hang (#8803)", "2025-11-02", old, "1.2.0rc0",
                       files={"tensorrt_llm/_torch/distributed/ops.py": ALLREDUCE_AFTER})
        fix_b = commit("fix_b_unmerged", "[None][feat] GPT-OSS Sm120/Sm121 Support (#7937)",
                       "2025-11-10", fix_a, "1.2.0rc0", ref=f"refs/heads/{SIDE_BRANCH}",
                       files={"tensorrt_llm/_torch/models/sm121.py": '"""SM121 kernels (stand-in)."""\n'})
        upstream.write({"tensorrt_llm/_torch/models/sm121.py": None})  # not on main
        bump = commit("submodule_bump", "[None][chore] Update cutlass to v4.3.0 (#9100)",
                      "2025-12-01", fix_a, "1.2.0rc1", gitlinks={SUBMODULE_PATH: sub_tip})
        interface = interface_files()
        removal = commit("removal", "[TRTLLM-9000][chore] Remove the TensorRT engine backend "
                         "(#10800)", "2026-02-16", bump, "1.3.0rc0",
                         files={TRTLLM_BUILD_FILE: None, CONVERT_CHECKPOINT_FILE: None,
                                "setup.py": _setup_py(trtllm_build=False), **interface})
        tagged = commit("tagged", "[None][chore] Bump version to 1.3.0rc1 (#11000)", "2026-03-02",
                        removal, "1.3.0rc1")
        tip = commit("tip", "[None][chore] Bump version to 1.3.0rc2 (#11200)", "2026-03-16", tagged,
                     "1.3.0rc2")
        upstream.git("tag", "--annotate", TAG, "-m", f"TensorRT-LLM {TAG}", tagged,
                     date=_dates("2026-03-03"))
        # Reverts as upstream writes them: `git revert` (GitHub's revert button) gives the subject
        # 'Revert "<subject>"' and the body "This reverts commit <sha>."; the squash merge of the
        # revert's own PR appends "(#N)" to the subject.
        branch = f"refs/heads/{REVERTS_BRANCH}"
        emoji = commit("emoji_fix", EMOJI_SUBJECT, "2026-03-20", tip, "1.3.0rc2", ref=branch,
                       files={"tensorrt_llm/_torch/distributed/nccl_window.py": "REGISTER = False\n"})
        revert_a = commit("revert_a", f'Revert "{subjects["fix_a"]}" (#11300)', "2026-03-23", emoji,
                          "1.3.0rc2", ref=branch, body=f"This reverts commit {fix_a}.",
                          files={"tensorrt_llm/_torch/distributed/ops.py": ALLREDUCE_BEFORE})
        reapply_a = commit("reapply_a", f'Revert "{subjects["revert_a"]}" (#11400)', "2026-03-25",
                           revert_a, "1.3.0rc2", ref=branch, body=f"This reverts commit {revert_a}.",
                           files={"tensorrt_llm/_torch/distributed/ops.py": ALLREDUCE_AFTER})
        revert_emoji = commit("revert_emoji", f'Revert "{EMOJI_SUBJECT}" (#11500)', "2026-03-27",
                              reapply_a, "1.3.0rc2", ref=branch,
                              files={"tensorrt_llm/_torch/distributed/nccl_window.py": None})
        gpt_oss = lacks_flag = None
        serve_cli = next((path for path in interface if path.endswith("trtllm_serve_cli.yaml")), None)
        if serve_cli:
            # The work tree is the tip's again (revert_emoji undid the last of the branch).
            branch = f"refs/heads/{INTERFACE_BRANCH}"
            gpt_oss = commit("gpt_oss", "[None][feat] GPT-OSS Sm120/Sm121 Support (#7937)", "2026-03-30",
                             tip, "1.3.0rc3", ref=branch,
                             files={"tensorrt_llm/_torch/models/sm121.py":
                                    '"""SM121 kernels (stand-in)."""\n'})
            lacks_flag = commit("lacks_flag", f"[None][feat] Drop trtllm-serve {DROPPED_FLAG} (#11600)",
                                "2026-04-01", gpt_oss, "1.3.0rc3", ref=branch,
                                files={serve_cli: without_option(interface[serve_cli], DROPPED_FLAG)})
        tag_object = upstream.git("rev-parse", f"refs/tags/{TAG}")
        return Upstream(root=root, repo=repo, submodule_repo=submodule_repo, base_image=base_image,
                        old=old, fix_a=fix_a, submodule_bump=bump, removal=removal, tagged=tagged,
                        tip=tip, fix_b_unmerged=fix_b, tag_object=tag_object, emoji_fix=emoji,
                        revert_a=revert_a, reapply_a=reapply_a, revert_emoji=revert_emoji,
                        gpt_oss=gpt_oss, lacks_flag=lacks_flag,
                        submodule_at_old=sub_old, submodule_at_tip=sub_tip, lfs_content=content,
                        versions=versions, subjects=subjects)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# For tests that use the stand-in


def checkout(upstream: Upstream, dest: Path, commit: str | None = None, *, submodules: bool = True,
             lfs: bool = True) -> Path:
    """A working tree of ``upstream`` at ``commit`` (default: the tip), detached, the way a build
    node prepares one; ``submodules=False`` / ``lfs=False`` leave those steps out (with
    ``lfs=False`` the LFS file stays a pointer even where git's config installs the LFS filter)."""
    env = {**os.environ, **FILE_PROTOCOL_ENV, **({} if lfs else {"GIT_LFS_SKIP_SMUDGE": "1"})}

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(dest), *args], env=env, check=True, capture_output=True)

    dest.mkdir(parents=True, exist_ok=True)
    git("init", "--quiet")
    git("remote", "add", "origin", upstream.url)
    git("fetch", "--quiet", "--no-tags", "origin", commit or upstream.tip)
    git("checkout", "--quiet", "--detach", commit or upstream.tip)
    if submodules:
        git("submodule", "update", "--quiet", "--init", "--recursive")
    if lfs:
        git("lfs", "install", "--local")
        git("lfs", "pull")
    return dest


def remove_build_images(log: str) -> None:
    """Remove what a legacy ``docker build`` whose output is ``log`` left in the engine: the image it
    tagged, and on a failure the untagged step images (they are cache and outlive the build)."""
    tags = re.findall(r"^Successfully tagged (\S+)$", log, re.M)
    steps = re.findall(r"^ ---> ([0-9a-f]{12})$", log, re.M)
    for tag in tags:
        subprocess.run(["docker", "rmi", tag], capture_output=True)
    if tags or not steps:
        return
    # The last step image: removing it removes its untagged parents too. Docker refuses an image
    # that has children (a cache hit shared with another image), and a tagged one is never touched.
    listed = subprocess.run(["docker", "image", "inspect", "--format", "{{len .RepoTags}}", steps[-1]],
                            capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip() == "0":
        subprocess.run(["docker", "rmi", steps[-1]], capture_output=True)
