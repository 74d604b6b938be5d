"""Getting a container image from this machine into every node's Docker engine.

The way an image reaches a real node: ``docker save`` here once, the archive streamed over SSH into
``docker load`` on each node that lacks the image (all in parallel, nothing staged on the node),
then the image ID checked against this machine's. A node that already has the same image ID costs
one ``docker image inspect``.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from trtllm_deploy.errors import DeployError
from trtllm_deploy.hosts.dockercli import docker, image_id
from trtllm_deploy.hosts.fanout import GroupResult, fan_out
from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import Target


@dataclass(frozen=True)
class Delivery:
    """What delivering one image to one node did."""

    image: str
    image_id: str
    action: str          # "already there" | "loaded"
    bytes_sent: int
    seconds: float


def remote_image_id(target: Target, reference: str) -> str | None:
    result = target.run(["docker", "image", "inspect", "--format", "{{.Id}}", reference], check=False,
                        timeout=60)
    return result.stdout.strip() if result.ok else None


class _Archive:
    """``docker save`` of one image, made at most once and only if some node needs it."""

    def __init__(self, reference: str, folder: Path):
        self.reference = reference
        self.path = folder / "image.tar"
        self._lock = threading.Lock()
        self._made = False

    def get(self) -> Path:
        with self._lock:
            if not self._made:
                docker("save", "--output", str(self.path), self.reference, timeout=1800)
                self._made = True
        return self.path


def deliver(reference: str, nodes: Sequence[Node], *, reach: Callable[[Node], Target] = connect,
            ) -> GroupResult[Delivery]:
    """Make every node's engine have ``reference`` with this machine's image ID."""
    wanted = image_id(reference)
    if wanted is None:
        raise DeployError(f"image {reference} is not on this machine; build or pull it first")
    with tempfile.TemporaryDirectory(prefix="trtllm-deploy-image-") as scratch:
        archive = _Archive(reference, Path(scratch))

        def work(node: Node, target: Target) -> Delivery:
            started = time.monotonic()
            if remote_image_id(target, reference) == wanted:
                return Delivery(reference, wanted, "already there", 0, time.monotonic() - started)
            local = archive.get()
            target.stream(local, ["docker", "load", "--quiet"], timeout=1800)
            got = remote_image_id(target, reference)
            if got != wanted:
                raise DeployError(f"{node.name}: after loading, {reference} is {got or 'missing'}, "
                                  f"expected {wanted}")
            return Delivery(reference, wanted, "loaded", local.stat().st_size,
                            time.monotonic() - started)

        return fan_out(nodes, work, reach=reach)
