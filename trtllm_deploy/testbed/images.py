"""The testbed's images, built on this machine once and cached by content.

An image's tag is a hash of everything that goes into it: its build context (the Dockerfile and
the files it copies) and the base image's ID. Same inputs → same tag → nothing to build. The base
is a parameter: ``debian:bookworm-slim`` where it can be pulled, otherwise a Debian bookworm root
made here with debootstrap and imported (the CI machine reaches Debian's mirror, not Docker Hub).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trtllm_deploy.errors import DeployError, InputError
from trtllm_deploy.hosts.dockercli import docker, image_id

ROOT = Path(__file__).resolve().parents[2]
SLIM = "debian:bookworm-slim"
DEBOOTSTRAP_TAG = "trtllm-deploy/base:bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
LABEL_CONTENT = "io.trtllm-deploy.content"
LABEL_BASE = "io.trtllm-deploy.base"
# Change when the way images are made changes, so old tags are not mistaken for new ones.
RECIPE = "1"
_SKIP = re.compile(r"(^|/)(__pycache__|\.pytest_cache|\.ruff_cache)(/|$)|\.pyc$")


@dataclass(frozen=True)
class ImageSpec:
    """An image the project builds: its repository name, Dockerfile folder and build context."""

    repository: str
    dockerfile: str             # folder of the Dockerfile, relative to the project root
    context: tuple[str, ...]    # project-relative files and folders copied into the build context
    title: str

    def files(self, root: Path = ROOT) -> list[tuple[str, Path]]:
        """Every file of the build context, as (name in the context, path here), sorted."""
        found: list[tuple[str, Path]] = []
        for entry in self.context:
            path = root / entry
            if path.is_file():
                found.append((entry, path))
            elif path.is_dir():
                for item in sorted(path.rglob("*")):
                    name = item.relative_to(root).as_posix()
                    if item.is_file() and not _SKIP.search(name):
                        found.append((name, item))
            else:
                raise DeployError(f"{self.title}: {entry} is missing from the project")
        return sorted(found)


NODE = ImageSpec("trtllm-deploy/testbed-node", "docker/testbed-node", ("docker/testbed-node",),
                 "testbed node image")
STANDIN = ImageSpec("trtllm-deploy/standin", "docker/standin",
                    ("docker/standin", "requirements/container.txt", "trtllm_deploy/testbed/standin",
                     "trtllm_deploy/artifact/manifest.py", "trtllm_deploy/runtimes/__init__.py",
                     "trtllm_deploy/runtimes/interface", "requirements/interface"),
                    "stand-in runtime image")


# Certificate authorities this machine trusts beyond the system's (a site's TLS-inspecting proxy):
# copied into every build context as site-ca/, so pip inside a build trusts what pip here trusts.
SITE_CA = Path("/usr/local/share/ca-certificates")


def site_ca_files(folder: Path = SITE_CA) -> list[tuple[str, Path]]:
    if not folder.is_dir():
        return []
    return [(f"site-ca/{path.name}", path) for path in sorted(folder.glob("*.crt")) if path.is_file()]


def context_files(spec: ImageSpec, root: Path = ROOT) -> list[tuple[str, Path]]:
    """Everything the build context holds: the spec's files and the site's extra CAs."""
    return spec.files(root) + site_ca_files()


def content_hash(spec: ImageSpec, base_id: str, root: Path = ROOT) -> str:
    """The hash that names an image: recipe, base image ID, and every context file (name, mode, bytes)."""
    digest = hashlib.sha256(f"recipe {RECIPE}\nbase {base_id}\n".encode())
    for name, path in context_files(spec, root):
        executable = os.access(path, os.X_OK)
        digest.update(f"{name}\0{int(executable)}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --- the base image ---------------------------------------------------------------------------

Report = Callable[[str], None]


def resolve_base(base: str = "auto", mirror: str = DEFAULT_MIRROR, report: Report = print) -> str:
    """The base image to build on, as a reference this engine has, making it if needed.

    ``auto``: ``debian:bookworm-slim`` if present or pullable, else debootstrap. ``debootstrap``:
    always the locally made one. Anything else: an image reference that must exist or be pullable.
    """
    if base in ("auto", "debootstrap"):
        if base == "auto" and (image_id(SLIM) or _pull(SLIM, report)):
            return SLIM
        if not image_id(DEBOOTSTRAP_TAG):
            _debootstrap(DEBOOTSTRAP_TAG, mirror, report)
        return DEBOOTSTRAP_TAG
    if not (image_id(base) or _pull(base, report)):
        raise InputError(f"--base {base}: no such image here and it cannot be pulled; use "
                         "--base debootstrap to make a Debian bookworm base locally")
    return base


def _pull(reference: str, report: Report) -> bool:
    report(f"pulling {reference}")
    done = docker("pull", "--quiet", reference, timeout=600, check=False)
    if done.returncode != 0:
        report(f"cannot pull {reference}: {done.stderr.decode(errors='replace').strip()[:200]}")
    return done.returncode == 0


def _debootstrap(tag: str, mirror: str, report: Report) -> None:
    if shutil.which("debootstrap") is None:
        raise DeployError("no Debian base image here and debootstrap is not installed; install it "
                          "(apt-get install debootstrap) or pass --base with an image you have")
    if os.geteuid() != 0:
        raise DeployError("making the base image with debootstrap needs root; run as root, or pass "
                          f"--base with an image you have (e.g. `docker pull {SLIM}` elsewhere)")
    report(f"making a Debian bookworm base image with debootstrap from {mirror} (about a minute)")
    with tempfile.TemporaryDirectory(prefix="trtllm-deploy-base-") as scratch:
        root = Path(scratch) / "root"
        done = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root), mirror],
                              capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise DeployError(f"debootstrap from {mirror} failed:\n{tail}\n  what to do: check that "
                              "this machine reaches the mirror (or pass --mirror)")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / junk).glob("*"):
                if item.is_file():
                    item.unlink()
        archive = Path(scratch) / "root.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        docker("import", "--change", "CMD [\"bash\"]", "--change", f"LABEL {LABEL_BASE}=debootstrap",
               str(archive), tag, timeout=600)


# --- building ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Built:
    tag: str
    image_id: str
    cached: bool
    seconds: float


_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")


def ensure(spec: ImageSpec, base: str, log_dir: Path, report: Report = print,
           progress: Callable[[int, int, str], None] | None = None) -> Built:
    """Build ``spec`` on ``base`` unless an image with the same content hash exists (then: cached).

    The whole build log goes to ``log_dir``; ``progress(step, steps, line)`` follows the build.
    """
    started = time.monotonic()
    base_id = image_id(base)
    if base_id is None:
        raise DeployError(f"base image {base} is not on this machine")
    digest = content_hash(spec, base_id)
    tag = f"{spec.repository}:{digest[:16]}"
    existing = image_id(tag)
    if existing:
        return Built(tag, existing, True, time.monotonic() - started)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{spec.repository.replace('/', '_')}-{digest[:16]}.log"
    report(f"building the {spec.title} ({tag}); log: {log}")
    with tempfile.TemporaryDirectory(prefix="trtllm-deploy-context-") as scratch:
        (Path(scratch) / "site-ca").mkdir()  # present even when empty: Dockerfiles COPY it
        for name, path in context_files(spec):
            dest = Path(scratch) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        argv = ["docker", "build", "--file", f"{scratch}/{spec.dockerfile}/Dockerfile",
                "--build-arg", f"BASE={base}", "--label", f"{LABEL_CONTENT}={digest}",
                "--label", f"{LABEL_BASE}={base_id}", "--tag", tag, scratch]
        returncode = _run_logged(argv, log, progress)
    if returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-20:])
        raise DeployError(f"building the {spec.title} failed (exit {returncode}); last lines of "
                          f"{log}:\n{tail}")
    return Built(tag, image_id(tag) or "", False, time.monotonic() - started)


def _run_logged(argv: list[str], log: Path, progress) -> int:
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder prints "Step N/M" we follow
    with open(log, "w") as sink:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True, errors="replace")
        try:
            for line in proc.stdout:
                sink.write(line)
                match = _STEP.match(line)
                if match and progress:
                    progress(int(match[1]), int(match[2]), match[3][:80])
            return proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
