"""Build-log stages and failure causes, against real recorded logs (tests/data/build-logs/SOURCES.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trtllm_deploy.source import buildlog
from trtllm_deploy.source.buildlog import STAGES, StageTracker, classify, strip_prefix

LOGS = Path(__file__).parent / "data" / "build-logs"
PROGRESS = sorted((LOGS / "progress").glob("*.log"))


def recorded(name: str) -> str:
    return (LOGS / name).read_text()


def walk(tracker: StageTracker, *names: str) -> list[buildlog.Progress]:
    updates = []
    for name in names:
        for line in recorded(name).splitlines():
            if (update := tracker.feed(line)) is not None:
                updates.append(update)
    return updates


def stages_of(updates: list[buildlog.Progress]) -> list[str]:
    seen: list[str] = []
    for update in updates:
        if not seen or seen[-1] != update.stage:
            seen.append(update.stage)
    return seen


# --- prefixes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("line,text", [
    ("#22 3747.1 collect2: error: ld returned 1 exit status", "collect2: error: ld returned 1 exit status"),
    ("#4 [1/7] FROM docker.io/library/ubuntu:25.10", "[1/7] FROM docker.io/library/ubuntu:25.10"),
    ("#14 117.8", ""),
    ("#25 2.704   Obtaining dependency information for build",
     "  Obtaining dependency information for build"),
    ("719.5 gmake: *** [Makefile:179: tensorrt_llm] Error 2",
     "gmake: *** [Makefile:179: tensorrt_llm] Error 2"),
    ("Step 1/10 : FROM python:3.8-slim-buster", "Step 1/10 : FROM python:3.8-slim-buster"),
    ("[ 12%] Building CXX object x.o", "[ 12%] Building CXX object x.o"),
    ("1 catastrophic error detected in the compilation", "1 catastrophic error detected in the compilation"),
], ids=["buildkit-plain", "buildkit-step-header", "buildkit-empty-output", "buildkit-keeps-indent",
        "buildkit-summary", "classic-untouched", "make-untouched", "count-is-not-a-timestamp"])
def test_strip_prefix(line, text):
    assert strip_prefix(line) == text


# --- stages -----------------------------------------------------------------------------------

def test_progress_walks_every_stage_in_order_with_compile_counts():
    updates = walk(StageTracker(), *(f"progress/{path.name}" for path in PROGRESS))
    assert stages_of(updates) == list(STAGES)
    assert [(u.done, u.total) for u in updates if u.stage == "compile"] == [
        (12, 100), (14, 100), *((n, 529) for n in range(337, 345)), (1, 10)]
    last = updates[-1]
    assert (last.stage, last.index, last.stages) == ("image export", 5, 6)
    assert last.line == "exporting to docker image format"


def test_classic_builder_from_base_image_to_tagged_image():
    updates = walk(StageTracker(), "classic-start.log", "success-classic-tail.log")
    assert stages_of(updates) == ["base image", "dependencies", "image export"]
    assert [u.line for u in updates] == [
        "Step 1/5 : FROM ubuntu:18.04", "Step 3/5 : RUN apt-get update", "Successfully built 4f096a4a1408"]


def test_buildkit_plain_step_headers():
    updates = walk(StageTracker(), "buildkit-header-plain.log")
    assert [(u.stage, u.line[:40]) for u in updates] == [
        ("base image", "[internal] load metadata for docker.io/l"),
        ("dependencies", "[2/7] RUN apt-get update -qq && apt-get ")]


def test_successful_release_build_ends_in_image_export():
    updates = walk(StageTracker(), "success-release-build-tty.log")
    assert stages_of(updates) == ["dependencies", "image export"]
    assert updates[-1].line.startswith("=> exporting to image")


def test_stage_never_goes_backwards_on_a_stray_line():
    tracker = StageTracker()
    walk(tracker, *(f"progress/{path.name}" for path in PROGRESS[:5]))
    assert tracker.progress.stage == "compile"
    stray = [*recorded("progress/02-dependencies-plain.log").splitlines(), "Step 1/5 : FROM ubuntu:18.04",
             "#0 1027.8 -- Performing Test HAS_FLTO"]
    assert [tracker.feed(line) for line in stray] == [None] * len(stray)
    assert (tracker.progress.stage, tracker.progress.done) == ("compile", 14)


def test_in_a_docker_build_compiling_counts_only_once_build_wheel_runs():
    tracker = StageTracker()
    walk(tracker, "progress/01-base-image-tty.log")
    # a devel-image install script running CMake and Ninja is not TensorRT-LLM's compile
    assert walk(tracker, "progress/04-cmake-configure-plain.log", "progress/06-compile-ninja.log") == []
    assert stages_of(walk(tracker, "progress/03-build-wheel-plain.log",
                          "progress/06-compile-ninja.log")) == ["dependencies", "CMake configure", "compile"]


def test_a_plain_build_wheel_log_compiles_without_docker_steps():
    updates = walk(StageTracker(), "progress/04-cmake-configure-plain.log",
                   "progress/05-compile-make-plain.log")
    assert stages_of(updates) == ["CMake configure", "compile"]


def test_nothing_reported_before_a_stage_is_seen():
    tracker = StageTracker()
    assert tracker.feed("#0 building with \"default\" instance using docker driver") is None
    assert tracker.progress is None


# --- failures ---------------------------------------------------------------------------------

CASES = [
    ("oom-killed-make.log", "oom-killed", [
        "Killed",
        "make[3]: *** [tensorrt_llm/kernels/CMakeFiles/kernels_src.dir/build.make:5867:  "
        "tensorrt_llm/kernels/CMakeFiles/kernels_src.dir/cutlass_kernels/int8_gemm/"
        "int8_gemm_bf16.cu.o] Error 137",
        "make[3]: *** [tensorrt_llm/kernels/CMakeFiles/kernels_src.dir/build.make:5880: "
        "tensorrt_llm/kernels/CMakeFiles/kernels_src.dir/cutlass_kernels/int8_gemm/"
        "int8_gemm_fp16.cu.o] Error 137"]),
    ("oom-killed-cicc.log", "oom-killed", ["nvcc error   : 'cicc' died due to signal 9 (Kill signal)"]),
    ("oom-killed-cc1plus.log", "oom-killed", ["c++: fatal error: Killed signal terminated program cc1plus"]),
    ("disk-full.log", "disk-full", [
        "/root/P4C/backends/dpdk/dpdkContext.cpp:433:1: fatal error: error writing to /tmp/cc9wTTba.s: "
        "No space left on device",
        "The command '/bin/bash -c source /root/start_p4ovs.sh /root' returned a non-zer"]),
    ("disk-full-nvcc.log", "disk-full", [
        "src/operator/quantization/./.././../common/../operator/mxnet_op.h(772): catastrophic error: "
        "error while writing generated C file: No space left on device",
        "<built-in>: fatal error: when writing output to : No space left on device"]),
    ("disk-full-base-image.log", "disk-full", [
        "ERROR: failed to solve: failed to register layer: write /usr/local/cuda-11.8/targets/x86_64-linux/"
        "lib/libcusolver.so.11.4.1.48: no space left on device"]),
    ("lfs-missing.log", "lfs-missing", [
        "/usr/bin/ld:/src/tensorrt_llm/cpp/tensorrt_llm/batch_manager/x86_64-linux-gnu/"
        "libtensorrt_llm_batch_manager_static.a: file format not recognized; treating as linker script",
        "/usr/bin/ld:/src/tensorrt_llm/cpp/tensorrt_llm/batch_manager/x86_64-linux-gnu/"
        "libtensorrt_llm_batch_manager_static.a:1: syntax error"]),
    ("lfs-missing-buildkit.log", "lfs-missing", [
        "/usr/bin/ld:/app/tensorrt_llm/cpp/tensorrt_llm/batch_manager/x86_64-linux-gnu/"
        "libtensorrt_llm_batch_manager_static.pre_cxx11.a: file format not recognized; "
        "treating as linker script",
        "/usr/bin/ld:/app/tensorrt_llm/cpp/tensorrt_llm/batch_manager/x86_64-linux-gnu/"
        "libtensorrt_llm_batch_manager_static.pre_cxx11.a:1: syntax error"]),
    ("download-failed.log", "download-failed", [
        "Temporary failure resolving 'deb.debian.org'",
        "Temporary failure resolving 'security.debian.org'",
        "W: Failed to fetch http://deb.debian.org/debian/dists/buster/InRelease  "
        "Temporary failure resolving 'deb.debian.org'",
        "W: Failed to fetch http://security.debian.org/debian-security/dists/buster/updates/InRelease  "
        "Temporary failure resolving 'security.debian.org'",
        "ERROR: Service 'mtprotoproxy' failed to build: The command '/bin/sh -c apt-get update && "
        "apt-get install -y libcap2-bin && rm -rf /var/lib/apt/li"]),
    ("download-failed-buildkit.log", "download-failed", [
        "pip._vendor.urllib3.exceptions.ReadTimeoutError: HTTPSConnectionPool(host='files.pythonhosted.org', "
        "port=443): Read timed out.",
        "executor failed running [/bin/sh -c sed -i '/Items below this point will not be included in the "
        "Docker Image/,$d' requirements.txt && \tpip install --no-cache-dir --user -r requirements.txt]: "
        "exit code: 2"]),
    ("classic-start.log", "download-failed", [
        "Temporary failure resolving 'security.ubuntu.com'",
        "Temporary failure resolving 'archive.ubuntu.com'"]),
    ("compiler-error.log", "compiler-error", [
        "/data/share_user/zzd/tools/TensorRT-LLM/cpp/include/tensorrt_llm/runtime/iBuffer.h:139:40: "
        "error: ‘kFP8’ is not a member of ‘nvinfer1::DataType’",
        "/data/share_user/zzd/tools/TensorRT-LLM/cpp/include/tensorrt_llm/runtime/iBuffer.h:139:44: "
        "error: template argument 1 is invalid",
        "/data/share_user/zzd/tools/TensorRT-LLM/cpp/include/tensorrt_llm/runtime/iBuffer.h:163:65: "
        "error: ‘kINT64’ is not a member of ‘nvinfer1::DataType’; did you mean ‘kINT8’?",
        "/data/share_user/zzd/tools/TensorRT-LLM/cpp/include/tensorrt_llm/runtime/iBuffer.h:194:34: "
        "error: ‘kINT64’ is not a member of ‘nvinfer1::DataType’; did you mean ‘kINT8’?"]),
    ("compiler-error-nvcc.log", "compiler-error", [
        "/opt/tiger/llm-best-practice/TensorRT-LLM/cpp/tensorrt_llm/kernels/decoderMaskedMultiheadAttention/"
        "decoderMaskedMultiheadAttentionTemplate.h(2317): error: no instance of function template "
        "\"tensorrt_llm::kernels::mmha::Logit_value_fma\" matches the argument list"]),
    ("hash-mismatch.log", "hash-mismatch", [
        "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE. If you have updated "
        "the package versions, please update the hashes. Otherwise, examine the package contents "
        "carefully; someone may have tampered with them.",
        "Expected sha256 0000000000000000000000000000000000000000000000000000000000000000",
        "Got        25118dd9ef521e351952bd337cb88cc4503bb15e66f1f8df12bc33912e64b51a"]),
    ("download-failed-registry.log", "download-failed", [
        'Error response from daemon: Get "https://registry-1.docker.io/v2/": dial tcp: lookup '
        "registry-1.docker.io on 10.255.255.53:53: no such host"]),
    ("cuda-arch-unsupported.log", "cuda-arch-unsupported", [
        "nvcc fatal   : Unsupported gpu architecture 'compute_120'"]),
    ("submodule-missing.log", "submodule-missing", ["does not contain a CMakeLists.txt file."]),
    ("not-oom-resource-exhausted.log", "unknown", [
        "ERROR: failed to write file header root/.cshrc: rpc error: code = ResourceExhausted desc = grpc: "
        "received message larger than max (16307097 vs. 4194304)"]),
]


@pytest.mark.parametrize("name,kind,evidence", CASES, ids=[case[0].removesuffix(".log") for case in CASES])
def test_recorded_failure_is_classified_with_its_evidence(name, kind, evidence):
    failure = classify(recorded(name))
    assert (failure.kind, failure.evidence) == (kind, evidence)
    assert failure.title and failure.remedy


@pytest.mark.parametrize("name", [
    "success-release-build-tty.log", "success-classic-tail.log", "buildkit-header-plain.log",
    "progress/02-dependencies-plain.log", "progress/05-compile-make-plain.log",
    "progress/09-image-export-plain.log"])
def test_log_without_failure_is_none(name):
    assert classify(recorded(name)) is None


def test_warnings_before_a_written_image_are_not_a_failure():
    failed_fetch, image_written = recorded("classic-start.log"), recorded("success-classic-tail.log")
    assert classify(failed_fetch + image_written) is None
    assert classify(image_written + failed_fetch).kind == "download-failed"


@pytest.mark.parametrize("names,kind", [
    # the compile killed by the OOM killer, then the build stopping (LightX2V #422's line)
    (["oom-killed-cc1plus.log", "compiler-error.log"], "oom-killed"),
    (["oom-killed-make.log", "lfs-missing.log"], "oom-killed"),
    (["disk-full-nvcc.log", "compiler-error-nvcc.log"], "disk-full"),
    (["compiler-error.log", "lfs-missing.log"], "lfs-missing"),
    (["download-failed.log", "compiler-error.log"], "compiler-error"),
    (["compiler-error.log", "download-failed-buildkit.log"], "download-failed"),
], ids=["oom-beats-compiler-error", "oom-beats-lfs", "disk-full-beats-compiler-error",
        "lfs-beats-compiler-error", "compile-after-failed-fetch-is-the-cause", "download-after-compile"])
def test_most_specific_cause_wins(names, kind):
    log = "".join(recorded(name) for name in names)
    if kind == "oom-killed":
        log += "854.5 ninja: build stopped: subcommand failed.\n"
    assert classify(log).kind == kind


def test_ninja_and_make_stopping_alone_is_an_unknown_failure():
    # ModelTC/LightX2V#422's ninja line; the make line is NVIDIA/TensorRT-LLM#1904's title
    failure = classify("854.5 ninja: build stopped: subcommand failed.\n"
                       "make: *** [Makefile:64: release_build] Error 1\n")
    assert failure.kind == "unknown"
    assert failure.evidence == ["ninja: build stopped: subcommand failed.",
                                "make: *** [Makefile:64: release_build] Error 1"]


def test_docker_final_line_is_context_after_the_cause():
    failure = classify(recorded("download-failed-buildkit.log"))
    assert failure.evidence[-1].startswith("executor failed running")
    assert classify(recorded("download-failed-buildkit.log").splitlines()[-1]).kind == "unknown"


def test_lfs_pointer_text_in_a_log():
    # the pointer text as committed in NVIDIA/TensorRT-LLM PR #12440 (a file's content)
    failure = classify("version https://git-lfs.github.com/spec/v1\n"
                       "oid sha256:97caf696273574e75d797260df22a9ce4ec3f837e1e48b90040ffa499d4753db\n"
                       "size 453560\n")
    assert failure.kind == "lfs-missing"


def test_remedies_name_the_fix():
    remedy = {name: classify(recorded(name)).remedy for name in (
        "oom-killed-cicc.log", "disk-full.log", "lfs-missing.log")}
    assert "--jobs" in remedy["oom-killed-cicc.log"] and "`-j`" in remedy["oom-killed-cicc.log"]
    assert "63 GB" in remedy["disk-full.log"] and "docker builder prune" in remedy["disk-full.log"]
    assert "git lfs install && git lfs pull" in remedy["lfs-missing.log"]
    assert "invoke source" in remedy["lfs-missing.log"]


def test_kinds():
    assert buildlog.KINDS == ("oom-killed", "disk-full", "lfs-missing", "hash-mismatch", "download-failed",
                              "cuda-arch-unsupported", "submodule-missing", "compiler-error", "unknown")
