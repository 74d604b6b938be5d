"""Follow a TensorRT-LLM image build log: which stage it is in, and why it failed.

Pure: lines or text in, plain data out. ``StageTracker`` turns the lines of
``make -C docker release_build`` (docker build of ``Dockerfile.multi`` → ``build_wheel.py`` →
CMake → Ninja/Make → wheel → image) into progress-bar updates; ``classify`` names the root cause
of a failed build and what to do about it. Both read the classic builder ("Step 5/20 : RUN ..."),
BuildKit's plain progress ("#12 123.4 ...") and BuildKit's terminal summary ("719.5 ...", " => ...").
Tested against real recorded logs under ``tests/data/build-logs/`` (see its SOURCES.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

STAGES = ("base image", "dependencies", "CMake configure", "compile", "wheel", "image export")
_BASE, _DEPS, _CONFIGURE, _COMPILE, _WHEEL, _EXPORT = range(len(STAGES))

# "#12 123.4 text", "#12 text", "#14 117.8" (plain progress); "719.5 text" (the summary BuildKit
# prints under a failed step). Only one of each is removed: the rest is the tool's own output.
_PLAIN_PREFIX = re.compile(r"^#\d+(?: \d+\.\d+)?(?: |$)")
_SUMMARY_PREFIX = re.compile(r"^\d+\.\d+(?: |$)")


def strip_prefix(line: str) -> str:
    """The line as the build step printed it, without BuildKit's "#N 12.3 " or "12.3 " in front."""
    line = line.rstrip("\r\n")
    match = _PLAIN_PREFIX.match(line) or _SUMMARY_PREFIX.match(line)
    return line[match.end():] if match else line


# --- stages -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Progress:
    """Where the build is: ``stage`` is ``STAGES[index]``; ``done``/``total`` only while compiling.

    Ninja's ``[N/M]`` gives done=N, total=M; Make's ``[ NN%]`` gives done=NN, total=100.
    ``line`` is the (prefix-stripped) line that moved it.
    """

    stage: str
    index: int
    stages: int
    done: int | None
    total: int | None
    line: str


# A Dockerfile step starting: classic "Step 3/20 : RUN ...", BuildKit "[devel 3/14] RUN ..." or
# "[2/7] RUN ..." (after "#N ", " => ", " => CACHED ", " => ERROR " or " > ").
_INSTRUCTION = (r"(?P<instruction>FROM|RUN|COPY|ADD|WORKDIR|ENV|ARG|LABEL|USER|EXPOSE|VOLUME|CMD"
                r"|ENTRYPOINT|SHELL|HEALTHCHECK|ONBUILD|STOPSIGNAL|MAINTAINER)\b(?P<rest>.*)")
_CLASSIC_STEP = re.compile(r"^Step \d+/\d+ : " + _INSTRUCTION, re.IGNORECASE)
# "[wheel 9/9] RUN", not Ninja's "[337/529] Building CUDA object"
_BUILDKIT_STEP = re.compile(r"\[(?:[\w.-]+ +)?\d+/\d+\] " + _INSTRUCTION)

_BASE_MARKERS = re.compile(
    r"^[\w.-]+: Pulling from |: Pull complete|^Status: Downloaded newer image|Pulling fs layer"
    r"|load metadata for |=> => resolve |=> => extracting sha256:|^extracting sha256:")
_DEPS_COMMAND = re.compile(r"install_\w+\.sh|apt-get |\bapt |pip3? install|\byum |\bdnf ")
_DEPS_MARKERS = re.compile(
    r"^(?:Get|Hit|Ign):\d+ https?://|^Reading package lists|^Setting up |^Unpacking "
    r"|^Selecting previously unselected package|^Collecting |^Downloading |^Requirement already"
    r"|^Installing collected packages|^Successfully installed ")
_CONFIGURE_MARKERS = re.compile(r"^-- |^CMake (?:Warning|Error|Deprecation)")
_NINJA = re.compile(r"^\[(?P<done>\d+)/(?P<total>\d+)\] ")
_MAKE = re.compile(r"^\[ *(?P<percent>\d+)%\] ")
_WHEEL_MARKERS = re.compile(
    r"bdist_wheel|^\* Building wheel|^Building wheel for |^Successfully built \S+\.whl"
    r"|^Successfully built tensorrt_llm|^creating '.*\.whl'")
_EXPORT_MARKERS = re.compile(
    r"exporting to (?:image|docker image format|oci image format)|exporting layers"
    r"|writing image sha256:|naming to |^Successfully built [0-9a-f]{12}$|^Successfully tagged ")


class StageTracker:
    """Feed it the log line by line; it says when the build moves on.

    ``feed(line)`` returns a ``Progress`` when the stage changes, or, while compiling, when the
    Ninja/Make counter changes; otherwise ``None``. The stage never goes backwards: the release
    stage's ``pip install`` of the built wheel, or a later ``FROM``, is not a step back.

    Inside a docker build the CMake/compile/wheel stages count only once the ``build_wheel.py``
    step has started: dependency install scripts in the devel image (UCX, NIXL, ...) run their own
    configure and Ninja, and must not be mistaken for TensorRT-LLM's compile. Fed a plain
    ``build_wheel.py`` log (no docker steps), they count from the first line.
    """

    def __init__(self) -> None:
        self._index = -1
        self._done: int | None = None
        self._total: int | None = None
        self._docker = False
        self._build_wheel = False
        self._progress: Progress | None = None

    @property
    def progress(self) -> Progress | None:
        """The last reported position, or ``None`` before any stage was seen."""
        return self._progress

    def feed(self, line: str) -> Progress | None:
        """Read one line of the log; the new position if it moved, else ``None``."""
        text = strip_prefix(line).strip()
        if not text:
            return None
        if "build_wheel.py" in text:
            self._build_wheel = True
        step = _CLASSIC_STEP.match(text) or _BUILDKIT_STEP.search(text)
        if step:
            self._docker = True
        found = self._stage_of(text, step)
        if found is None:
            return None
        index, done, total = found
        if index < self._index:
            return None
        if index == self._index and (done, total) == (self._done, self._total):
            return None
        if index == self._index and done is None:
            return None
        self._index, self._done, self._total = index, done, total
        self._progress = Progress(STAGES[index], index, len(STAGES), done, total, text)
        return self._progress

    def _stage_of(self, text: str, step: re.Match[str] | None) -> tuple[int, int | None, int | None] | None:
        if _EXPORT_MARKERS.search(text):
            return _EXPORT, None, None
        if step:
            instruction, rest = step["instruction"].upper(), step["rest"]
            if instruction == "FROM":
                return _BASE, None, None
            if instruction in ("RUN", "COPY", "ADD") and _DEPS_COMMAND.search(rest):
                return _DEPS, None, None
            return None
        if _BASE_MARKERS.search(text):
            return _BASE, None, None
        building = self._build_wheel or not self._docker
        if building and self._index >= _COMPILE and _WHEEL_MARKERS.search(text):
            return _WHEEL, None, None
        if building and (ninja := _NINJA.match(text)):
            return _COMPILE, int(ninja["done"]), int(ninja["total"])
        if building and (make := _MAKE.match(text)):
            return _COMPILE, int(make["percent"]), 100
        if building and _CONFIGURE_MARKERS.match(text):
            return _CONFIGURE, None, None
        if _DEPS_MARKERS.search(text):
            return _DEPS, None, None
        return None


# --- failures ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """Why a build failed: ``kind`` (see ``KINDS``), a one-line ``title``, the few log lines that
    show it (prefix-stripped, in log order, docker's own final error line last as context), and
    the ``remedy`` to print."""

    kind: str
    title: str
    evidence: list[str]
    remedy: str


@dataclass(frozen=True)
class _Kind:
    name: str
    title: str
    pattern: re.Pattern[str]
    remedy: str


# Most specific root cause first: an OOM kill or a full disk makes the compiler fail, so those
# win over the compiler error, "make: *** Error" and "ninja: build stopped" that follow them.
_KINDS = (
    _Kind(
        "oom-killed",
        "The compiler was killed for lack of memory",
        re.compile(
            r"Killed signal terminated program|died due to signal 9|^Killed$|^\S.*: \d+ Killed\b"
            r"|\] Error 137$|exit code: 137\b|virtual memory exhausted|out of memory allocating"
            r"|ResourceExhausted.*(?:cannot allocate memory|out of memory)", re.IGNORECASE),
        "Build with fewer parallel compile jobs: each nvcc/cc1plus process can need several GB, "
        "and on a DGX Spark that memory is shared with the GPU. Lower `--jobs` (passed on as "
        "build_wheel.py `-j`), for example to half of what this build used, and run it again.",
    ),
    _Kind(
        "disk-full",
        "The disk filled up during the build",
        re.compile(r"no space left on device|\bENOSPC\b|\[Errno 28\]|Disk quota exceeded",
                   re.IGNORECASE),
        "Free disk space: the TensorRT-LLM image build needs about 63 GB. Remove old build cache "
        "with `docker builder prune`, or point the build path (and Docker's data root) at a "
        "bigger disk, then run the build again.",
    ),
    _Kind(
        "lfs-missing",
        "Git LFS files in the source tree are pointers, not the real binaries",
        re.compile(
            r"file format not recognized; treating as linker script"
            r"|\.(?:a|so)(?:\.\d+)*:1: syntax error"
            r"|version https://git-lfs\.github\.com/spec/v1"
            r"|unknown type name 'oid'|'version' does not name a type"),
        "Fetch the Git LFS objects in the TensorRT-LLM checkout: `git lfs install && git lfs pull` "
        "(`invoke source` does this), then run the build again.",
    ),
    _Kind(
        "hash-mismatch",
        "A downloaded package does not match the hash the lock pinned",
        re.compile(r"THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE"
                   r"|^\s*Expected sha256 [0-9a-f]{64}$|^\s*Got +[0-9a-f]{64}$"),
        "A package file changed since the lock was made (a replaced wheel, a mirror serving other "
        "bytes, or tampering). Find out which; if the change is expected, run `invoke "
        "source.update` to pin it again.",
    ),
    _Kind(
        "download-failed",
        "A download failed",
        re.compile(
            r"Could not resolve host|Temporary failure in name resolution"
            r"|Temporary failure resolving|Failed to fetch|Unable to fetch some archives"
            r"|Connection timed out|Operation timed out|ReadTimeoutError:|Read timed out\.$"
            r"|Max retries exceeded|NewConnectionError|Connection reset by peer"
            r"|Network is unreachable|Failed to connect to .* port|unable to access 'https?://"
            r"|unable to connect to \S+:|TLS handshake timeout|dial tcp .*: i/o timeout"
            r"|dial tcp: lookup \S+ on \S+: no such host"
            r"|^curl: \(\d+\)|The requested URL returned error: 5\d\d|^ERROR 5\d\d: "
            r"|\b50[0234] (?:Internal Server Error|Bad Gateway|Service Unavailable|Gateway Time-?out)"
            r"|Connection failed; retrying"),
        "Check that this node resolves and reaches the host named above (DNS, proxy, firewall; "
        "a proxy must also reach the build as HTTP_PROXY/HTTPS_PROXY build args), then run the "
        "build again: the steps that finished are cached.",
    ),
    _Kind(
        "cuda-arch-unsupported",
        "The CUDA toolkit in the build image does not know the GPU architecture asked for",
        re.compile(r"Unsupported gpu architecture 'compute_\d+[af]?'"),
        "The base image's nvcc is older than the GPU: compute capability 12.1 (GB10) needs a "
        "CUDA 12.9 or newer toolkit. Use the base image the pinned tree's docker/Dockerfile.multi "
        "names (`invoke source.update` records it), or pin a newer TensorRT-LLM commit.",
    ),
    _Kind(
        "submodule-missing",
        "A git submodule of the source tree is not checked out",
        re.compile(r"does not contain a CMakeLists\.txt file"),
        "Check out the submodules at their recorded commits: `git submodule update --init "
        "--recursive` in the TensorRT-LLM tree (`invoke source` does this), then build again.",
    ),
    _Kind(
        "compiler-error",
        "The C++/CUDA sources did not compile",
        # gcc/clang "file:line[:col]: [fatal ]error:", nvcc "file(line): [catastrophic ]error:"
        re.compile(r"^\S+?:\d+(?::\d+)?: (?:fatal )?error: "
                   r"|^\S+?\(\d+\)(?: \(col\. \d+\))?: (?:catastrophic )?error: "),
        "Read the first error above: the pinned TensorRT-LLM commit does not compile here. Check "
        "that it supports this CUDA toolkit and the CUDA_ARCHS value, or pin another commit.",
    ),
)

KINDS = tuple(kind.name for kind in _KINDS) + ("unknown",)

# The build stopped, without saying why: used for "unknown" when no root cause above is found.
_FAILED = re.compile(
    r"^FAILED: |^ninja: build stopped|^g?make(?:\[\d+\])?: \*\*\* .*Error \d+"
    r"|^subprocess\.CalledProcessError|returned non-zero exit status|^ERROR: |^=> ERROR ")
# docker's own last word on the failure: context, never the cause by itself.
_DOCKER_FINAL = re.compile(
    r"^ERROR: failed to (?:solve|build)|^failed to solve|^executor failed running"
    r"|^The command '.*' returned a non-zer|^ERROR: Service '.*' failed to build"
    r"|^ERROR: process \".*\" did not complete successfully")
# The image is there: the build succeeded whatever it printed before.
_IMAGE_WRITTEN = re.compile(r"naming to |^Successfully tagged |writing image sha256:")
_MAX_EVIDENCE = 4


def classify(log: str) -> Failure | None:
    """The root cause of a failed build log, or ``None`` if the log shows no failure.

    Kinds, most specific first: ``oom-killed``, ``disk-full``, ``lfs-missing``, ``hash-mismatch``,
    ``download-failed``, ``cuda-arch-unsupported``, ``submodule-missing``, ``compiler-error``;
    ``unknown`` when the build failed ("make: ***", "ninja: build stopped", docker's "failed to
    solve", ...) for a reason not recognised.
    """
    lines = [strip_prefix(line).strip() for line in log.splitlines()]
    final = next((line for line in reversed(lines) if _DOCKER_FINAL.search(line)), None)
    found = {kind.name: [n for n, line in enumerate(lines) if kind.pattern.search(line)]
             for kind in _KINDS}
    # An image written after every warning-looking line: apt's "W: Failed to fetch" on one
    # mirror, say, did not stop the build.
    finished = [n for n, line in enumerate(lines) if _IMAGE_WRITTEN.search(line)]
    trouble = [n for n, line in enumerate(lines) if _FAILED.search(line) or _DOCKER_FINAL.search(line)]
    if finished and all(n < finished[-1] for n in trouble + [n for at in found.values() for n in at]):
        return None
    for kind in _KINDS:
        at = found[kind.name]
        # apt and pip live through a failed mirror: a compile that went on past the last failed
        # download shows the downloads were not what stopped the build.
        if kind.name == "download-failed" and at and any(n > at[-1] for n in found["compiler-error"]):
            continue
        if at:
            hits = _first_unique(lines[n] for n in at)
            return Failure(kind.name, kind.title, _with_context(hits, final), kind.remedy)
    failed = _first_unique(line for line in lines if _FAILED.search(line))
    if failed or final:
        return Failure(
            "unknown", "The build failed for a reason not recognised", _with_context(failed, final),
            "Read the log around the lines above; the cause is not one this tool knows.")
    return None


def _first_unique(lines: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for line in lines:
        if line not in seen:
            seen.append(line)
            if len(seen) == _MAX_EVIDENCE:
                break
    return seen


def _with_context(hits: list[str], final: str | None) -> list[str]:
    return hits + [final] if final and final not in hits else hits
