"""The TensorRT-LLM lock: which source, at which commit, built how — like a requirements lock.

``requirements/tensorrt-llm.lock.toml`` is written by ``invoke source.update`` and committed by the
user. Everything that decides what the image contains is in it, and its hash (``lock_hash``) is
the label an image carries: the same hash on a node means the same build, so nothing to do. The
lock records that hash itself, so that ``nox -s lock -- --check`` (:mod:`.lockcheck`) catches a
hand edit or a stale lock without a build node.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tomlkit
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      ValidationError)

from trtllm_deploy import atomic
from trtllm_deploy.tomlsource import (Problem, TomlFileError, commented, matching, problems_from, read,
                                      rewrite)

DEFAULT_PATH = Path("requirements/tensorrt-llm.lock.toml")
KINDS = ("source", "release", "wheel")
# Set by trtllm-deploy itself on every build; a lock may not override them through [build.options].
RESERVED_OPTIONS = ("CUDA_ARCHS", "IMAGE_NAME", "IMAGE_TAG", "IMAGE_WITH_TAG", "DOCKER_BUILD_OPTS")

_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAKE_VAR = re.compile(r"^[A-Z][A-Z0-9_]*$")
_ARCH = re.compile(r"^(native|\d{2,3}[af]?(-real)?)$")


def _cuda_archs(value: str) -> str:
    items = [item.strip() for item in value.split(";")]
    for item in items:
        if item.endswith("-virtual"):
            raise ValueError(f"{item!r}: -virtual is refused by TensorRT-LLM's CMake; use NN-real")
        if not _ARCH.match(item):
            raise ValueError(f"{item!r}: expected NN, NNa, NNf, NN-real (e.g. 121-real) or native, "
                             "separated by ';'")
    return ";".join(items)


def _options(value: dict) -> dict:
    for name in value:
        if not _MAKE_VAR.match(name):
            raise ValueError(f"{name!r}: expected a make variable name (capitals, digits, _)")
        if name in RESERVED_OPTIONS:
            raise ValueError(f"{name} is set by trtllm-deploy on every build "
                             "(cuda_archs, the image name and its labels); remove it from options")
    return value


Sha = Annotated[StrictStr, matching(
    _SHA.pattern, "expected a full 40-character lowercase commit SHA (git rev-parse gives it)")]
ShortSha = Annotated[StrictStr, matching(
    r"^[0-9a-f]{7,40}$", "expected a commit SHA: 7 to 40 lowercase hex characters")]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Submodule(_Table):
    path: StrictStr
    commit: Sha


class Source(_Table):
    repository: StrictStr
    ref: StrictStr = "main"
    commit: Sha | None = None        # None: not resolved yet (run source.update)
    version: StrictStr | None = None
    date: StrictStr | None = None
    trtllm_build: StrictBool | None = None
    submodules: list[Submodule] = []


class Build(_Table):
    kind: Literal["source", "release", "wheel"] = "source"
    base_image: StrictStr | None = None   # None: what the tree's docker/Dockerfile.multi names
    cuda_archs: Annotated[StrictStr, AfterValidator(_cuda_archs)] = "121-real"
    make_target: StrictStr = "release_build"
    jobs: Annotated[StrictInt, Field(ge=0, le=1024)] = 0
    options: Annotated[dict[StrictStr, StrictStr], AfterValidator(_options)] = {}


class Release(_Table):
    image: StrictStr | None = None


class Wheel(_Table):
    version: StrictStr | None = None
    # The hash-pinned requirements file source.update writes (relative to the lock's folder).
    requirements: StrictStr | None = None
    # A folder of wheels on the build node to install from instead of the package index.
    find_links: StrictStr | None = None


class Fix(_Table):
    """A commit the pinned tree must contain. Given by PR number only, ``source.update`` finds
    its commit in the repository's own history and records SHA and subject."""

    commit: ShortSha | None = None
    pr: Annotated[StrictInt, Field(ge=1)] | None = None
    title: StrictStr | None = None
    # "any": every deployment needs it (a pin without it is refused). "several": only a deployment
    # whose tensor-parallel ranks span nodes needs it (a pin without it serves on one node, warned).
    needed_for: Literal["any", "several"] = "any"
    # Written by source.update when the pinned history lacks the fix (why: not there, or reverted
    # by which commit); only a "several" fix may be missing from a lock.
    missing: StrictStr | None = None

    @property
    def name(self) -> str:
        return " ".join(filter(None, [self.commit[:12] if self.commit else None,
                                      f"(#{self.pr})" if self.pr else None, self.title]))


class Quantize(_Table):
    """NVIDIA Model Optimizer, for a variant made by quantizing another: engine.build runs the
    ``examples/llm_ptq/hf_ptq.py`` of this checkout inside the runtime image (whose own
    ``nvidia-modelopt`` package it uses). Not part of the image's lock hash: it changes artifacts,
    not images."""

    repository: StrictStr = "https://github.com/NVIDIA/Model-Optimizer.git"
    # A tag, or "auto": the version of the image's own nvidia-modelopt (hf_ptq.py of one version
    # does not run on another). The DGX Spark playbook used 0.45.0 (docs/SOURCES.md#serving-on-sparks).
    ref: StrictStr = "auto"
    commit: Sha | None = None          # when set, the checkout must be exactly this commit
    calib_size: Annotated[StrictInt, Field(ge=1, le=100000)] = 512
    dataset: StrictStr | None = None   # None: hf_ptq.py's default calibration set
    kv_cache_qformat: StrictStr | None = None  # None: hf_ptq.py's default


class RuntimeImage(_Table):
    """Another serving runtime's image, in a table named for the runtime (``[NAME] image = ...``;
    the runtime modules say which, and their default): pin it by digest, ``...@sha256:...``. Not
    part of the image's lock hash."""

    image: StrictStr


class Lock(_Table):
    # Any other table is a runtime's image (RuntimeImage).
    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, RuntimeImage] = Field(init=False)

    # The hash of what decides the image, as source.update computed it (see lock_hash()).
    lock_hash: Annotated[StrictStr, matching(_SHA256.pattern, "expected a SHA-256: 64 lowercase hex "
                                             "characters (invoke source.update writes it)")] | None = None
    source: Source
    build: Build
    release: Release = Release()
    wheel: Wheel = Wheel()
    fixes: list[Fix] = []
    quantize: Quantize = Quantize()

    @property
    def runtime_images(self) -> dict[str, RuntimeImage]:
        return dict(self.__pydantic_extra__ or {})

    def runtime_image(self, runtime: str) -> str | None:
        """The image the lock pins for ``runtime``, or None."""
        table = self.runtime_images.get(runtime)
        return table.image if table else None


_EXAMPLES = {
    "repository": 'repository = "https://github.com/NVIDIA/TensorRT-LLM.git"',
    "commit": 'commit = "<40-character SHA>"  (invoke source.update writes it)',
    "base_image": 'base_image = "nvcr.io/nvidia/pytorch:25.10-py3"',
    "cuda_archs": 'cuda_archs = "121-real"',
    "kind": 'kind = "source"',
    "title": 'title = "what the commit fixes, in one line"',
}


class LockError(TomlFileError):
    """The lock file is wrong; the message lists every problem with its line."""


@dataclass(frozen=True)
class LockFile:
    path: Path
    lock: Lock

    @property
    def hash(self) -> str:
        requirements = self.requirements_path
        extra = (hashlib.sha256(requirements.read_bytes()).hexdigest()
                 if requirements and requirements.exists() else None)
        return lock_hash(self.lock, extra)

    @property
    def requirements_path(self) -> Path | None:
        name = self.lock.wheel.requirements
        return self.path.parent / name if name else None

    def missing_fixes(self, across_nodes: bool) -> list[Fix]:
        """The required fixes the pinned tree lacks for a deployment on one node or across nodes."""
        return [fix for fix in self.lock.fixes if fix.missing
                and (across_nodes or fix.needed_for == "any")]

    def require_resolved(self) -> None:
        """Building and fetching need a commit, a base image and full fix SHAs."""
        lock, problems = self.lock, []
        if not lock.source.commit:
            problems.append(Problem(("source",), "no commit pinned yet",
                                    "run `invoke source.update` (it resolves the ref on the build node)"))
        if not lock.build.base_image:
            problems.append(Problem(("build",), "no base image yet",
                                    "run `invoke source.update`, or set [build] base_image"))
        for index, fix in enumerate(lock.fixes):
            if fix.missing:
                continue  # recorded as absent from the pin (a "several" fix): launch decides
            if not fix.commit or len(fix.commit) != 40:
                problems.append(Problem(("fixes", index), f"fix {fix.name} has no full commit SHA yet",
                                        "run `invoke source.update` to resolve it"))
        if problems:
            raise LockError(self.path, self.path.read_text(), problems)


def load(path: str | os.PathLike = DEFAULT_PATH) -> LockFile:
    source = Path(path)
    text, data = read(source, LockError, "create it with `invoke source.update` or pass --lock PATH")
    try:
        lock = Lock.model_validate(data)
    except ValidationError as exc:
        raise LockError(source, text, problems_from(exc, Lock, (), _EXAMPLES)) from None
    problems = []
    for index, fix in enumerate(lock.fixes):
        if not fix.commit and not fix.pr:
            problems.append(Problem(("fixes", index), "a fix needs a commit or a pr number",
                                    "add: pr = 1234 (source.update finds its commit)"))
    if lock.build.kind == "release" and not lock.release.image:
        problems.append(Problem(("build", "kind"), 'kind "release" needs [release] image',
                                'add: [release] image = "nvcr.io/nvidia/tensorrt-llm/release:<tag>"'))
    if lock.build.kind == "wheel" and not lock.wheel.version:
        problems.append(Problem(("build", "kind"), 'kind "wheel" needs [wheel] version',
                                'add: [wheel] version = "1.2.1"'))
    if problems:
        raise LockError(source, text, problems)
    return LockFile(source, lock)


def digest(text: str | None) -> str | None:
    """The SHA-256 of a file's text as :func:`lock_hash` takes it (the wheel kind's requirements)."""
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def lock_hash(lock: Lock, requirements_digest: str | None = None) -> str:
    """The hash of what decides the image's contents (not dates, the ref asked for, or job count);
    for the wheel kind, the requirements file's content too."""
    build = lock.build
    decisive = {
        "kind": build.kind, "base_image": build.base_image, "cuda_archs": build.cuda_archs,
        "make_target": build.make_target, "options": dict(sorted(build.options.items())),
    }
    if build.kind == "source":
        decisive |= {"repository": lock.source.repository, "commit": lock.source.commit,
                     "submodules": sorted((s.path, s.commit) for s in lock.source.submodules)}
    elif build.kind == "release":
        decisive |= {"release": lock.release.image}
    else:
        decisive |= {"wheel": lock.wheel.version, "requirements": requirements_digest,
                     "find_links": bool(lock.wheel.find_links)}
    canonical = json.dumps(decisive, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- writing it back -------------------------------------------------------------------------

HEADER = """\
# The TensorRT-LLM this project builds and serves. Written by `invoke source.update`; commit it.
# Edit [build], [release], [wheel] and [[fixes]] by hand if you must, then run source.update again.
# lock_hash: the SHA-256 of what decides the image (kind, base image, CUDA_ARCHS, make target and
# options, and the repository, commit and submodules, the release image, or the wheel and its
# requirements), the label images carry. `nox -s lock -- --check` recomputes it: a value edited
# by hand since source.update wrote the lock fails the check.
"""


def _table(values: dict) -> tomlkit.items.Table:
    """A table of the values that are set (None: the key is left out), in the order given."""
    table = tomlkit.table()
    for key, value in values.items():
        if value is not None:
            table[key] = value
    return table


def _tables(rows: list[dict]) -> tomlkit.items.AoT:
    # Made whole before it joins the document: tomlkit spaces the tables apart only then.
    tables = tomlkit.aot()
    for row in rows:
        tables.append(_table(row))
    return tables


def document(lock: Lock) -> tomlkit.TOMLDocument:
    """The lock as a TOML document, in a stable order (a rewrite with nothing changed is
    byte-identical)."""
    doc = tomlkit.document()
    for line in HEADER.splitlines():
        doc.add(tomlkit.comment(line.removeprefix("# ")))
    doc.add(tomlkit.nl())
    if lock.lock_hash:
        doc["lock_hash"] = lock.lock_hash
        doc.add(tomlkit.nl())
    source = lock.source
    doc["source"] = _table({key: getattr(source, key) for key in
                            ("repository", "ref", "commit", "version", "date", "trtllm_build")})
    if source.submodules:
        doc["source"]["submodules"] = _tables([{"path": submodule.path, "commit": submodule.commit}
                                               for submodule in source.submodules])
    build = lock.build
    jobs = commented(build.jobs, "0: sized from the build node's memory at build time")
    options = tomlkit.inline_table()
    options.update(build.options)
    doc["build"] = _table({"kind": build.kind, "base_image": build.base_image or None,
                           "cuda_archs": build.cuda_archs, "make_target": build.make_target,
                           "jobs": jobs, "options": options})
    if lock.release.image:
        doc["release"] = _table({"image": lock.release.image})
    if lock.wheel.version:
        doc["wheel"] = _table({key: getattr(lock.wheel, key) or None
                               for key in ("version", "requirements", "find_links")})
    if lock.quantize != Quantize():
        doc["quantize"] = _table(lock.quantize.model_dump(exclude_none=True))
    for runtime, table in lock.runtime_images.items():
        doc[runtime] = _table({"image": table.image})
    if lock.fixes:
        doc["fixes"] = _tables([{"commit": fix.commit, "pr": fix.pr, "title": fix.title,
                                 "needed_for": None if fix.needed_for == "any" else fix.needed_for,
                                 "missing": fix.missing} for fix in lock.fixes])
    return doc


def dumps(lock: Lock, previous: str | None = None) -> str:
    """The lock as TOML; written into ``previous`` (the file's text before) where given, so that
    the user's comments stay."""
    return rewrite(previous, document(lock))


def write(path: Path, lock: Lock) -> None:
    """Rewrite the lock file keeping its comments, atomically (a crash leaves the old one or the
    new one)."""
    atomic.write_text(path, dumps(lock, path.read_text() if path.exists() else None))

