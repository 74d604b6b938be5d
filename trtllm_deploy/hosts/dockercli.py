"""This machine's Docker engine, through its CLI: the one place the driving machine runs `docker`."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass

from trtllm_deploy.errors import DeployError


def docker(*args: str, timeout: float = 120, check: bool = True, input: bytes | None = None,
           ) -> subprocess.CompletedProcess:
    """Run the local ``docker`` CLI; a failure becomes a DeployError naming the command."""
    if shutil.which("docker") is None:
        raise DeployError("docker is not installed on this machine; install Docker (apt-get install "
                          "docker.io) to use the testbed")
    try:
        done = subprocess.run(["docker", *args], capture_output=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        raise DeployError(f"`docker {' '.join(args[:3])}` did not finish within {timeout:.0f} s; "
                          "is the Docker engine healthy (`docker info`)?") from None
    if check and done.returncode != 0:
        error = done.stderr.decode(errors="replace").strip() or done.stdout.decode(errors="replace")
        raise DeployError(f"`docker {' '.join(args[:3])}` failed: {error.strip()[-2000:]}")
    return done


def text(done: subprocess.CompletedProcess) -> str:
    return done.stdout.decode(errors="replace").strip()


def require_engine() -> None:
    """Fail clearly when this machine has no running Docker engine."""
    done = docker("info", "--format", "{{.ServerVersion}}", timeout=30, check=False)
    if done.returncode != 0:
        raise DeployError("the Docker engine on this machine is not running (`docker info` failed); "
                          "start it (e.g. `sudo systemctl start docker`) and try again")


def image_id(reference: str) -> str | None:
    """The local image's ID, or None when this engine does not have it."""
    done = docker("image", "inspect", "--format", "{{.Id}}", reference, check=False)
    return text(done) if done.returncode == 0 else None


@dataclass(frozen=True)
class LocalImage:
    """An image as this machine's engine has it."""

    reference: str
    id: str
    labels: dict
    diff_ids: tuple[str, ...]       # its layers, bottom first
    digests: tuple[str, ...] = ()   # repository digests (NAME@sha256:…), where it came from a registry
    tags: tuple[str, ...] = ()      # the names it answers to (NAME:TAG)

    @property
    def standin(self) -> bool:
        return self.labels.get("io.trtllm-deploy.standin") == "true"

    def provenance(self) -> dict:
        return {"ref": self.reference, "id": self.id, "repo_digests": list(self.digests)}


def inspect_image(reference: str) -> LocalImage | None:
    """The local image, or None when this machine has no such image (or no Docker at all)."""
    if shutil.which("docker") is None:
        return None
    done = docker("image", "inspect", "--format", "{{json .}}", reference, check=False, timeout=60)
    if done.returncode != 0:
        return None
    return parse_image(reference, text(done))


def parse_image(reference: str, inspected: str) -> LocalImage:
    """``docker image inspect --format '{{json .}}'`` of one image, wherever it ran."""
    data = json.loads(inspected)
    return LocalImage(reference, data["Id"], (data.get("Config") or {}).get("Labels") or {},
                      tuple((data.get("RootFS") or {}).get("Layers") or ()),
                      tuple(data.get("RepoDigests") or ()), tuple(data.get("RepoTags") or ()))
