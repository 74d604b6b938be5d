"""An image to one node, sending only the layers its engine does not have: how ``invoke push``
and the testbed get an image of this machine into the nodes' engines.

``docker save`` here (once, only if some node needs anything), then for each node an archive of
that save without the layer tars whose chain the node's engine already holds: ``docker load``
takes a layer from its archive only when the engine lacks that layer's chain, which was checked
against a real engine (20.10, graph-driver store). An engine that refuses the thinner archive gets
the whole one. After loading, the node's image ID and labels must equal this machine's.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.dockercli import LocalImage, docker, inspect_image
from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.targets import Target
from trtllm_deploy.push.channel import Channel

LOAD_TIMEOUT = 3600.0
END_OF_ARCHIVE = b"\0" * 1024
# One look for both facts: the image as the node has it, and every layer chain it holds. $1 the
# image, $2 its ID here. The node's layers are listed only when it lacks that ID (a node that has
# it holds every layer): an unchanged image costs one `docker image inspect`.
LOOK = Script("look at the node's image and layers", """
mark image
facts=$(docker image inspect --format '{{.Id}} {{json .Config.Labels}}' "$1" 2>/dev/null) && echo "$facts"
case "$facts" in "$2 "*) exit 0;; esac
mark layers
docker image ls -aq --no-trunc | sort -u | xargs -r docker image inspect --format '{{json .RootFS.Layers}}'
""", timeout=120)


@dataclass(frozen=True)
class ImagePlan:
    node: str
    image: LocalImage
    up_to_date: bool
    have: tuple[bool, ...]  # per layer: the node's engine has its chain

    @property
    def layers_to_send(self) -> int:
        return 0 if self.up_to_date else self.have.count(False)

    def describe(self) -> str:
        if self.up_to_date:
            return "up to date"
        return f"send {self.layers_to_send} of {len(self.have)} layer(s)"

    def as_json(self) -> dict:
        return {"up_to_date": self.up_to_date, "layers": len(self.have),
                "layers_to_send": self.layers_to_send}


@dataclass(frozen=True)
class ImageSent:
    reference: str
    image_id: str
    action: str  # "up to date" | "loaded" | "loaded whole" (the engine refused a thinner archive)
    bytes_sent: int
    bytes_skipped: int
    layers_sent: int
    seconds: float

    def as_json(self) -> dict:
        return {"reference": self.reference, "image_id": self.image_id, "action": self.action,
                "bytes_sent": self.bytes_sent, "bytes_skipped": self.bytes_skipped,
                "layers_sent": self.layers_sent, "seconds": round(self.seconds, 3)}


def inspect_local(reference: str) -> LocalImage:
    found = inspect_image(reference)
    if found is None:
        raise InputError(f"image {reference} is not on this machine: build it (invoke image) or "
                         "pull it first")
    return found


def chain_ids(diff_ids) -> list[str]:
    """Docker's layer chain IDs: a layer is the same only with the same layers below it."""
    chains: list[str] = []
    for diff in diff_ids:
        chains.append(diff if not chains else
                      "sha256:" + hashlib.sha256(f"{chains[-1]} {diff}".encode()).hexdigest())
    return chains


def parse_facts(image: str, layers: str) -> tuple[str | None, dict, set[str]]:
    """LOOK's sections → (the node's image ID or None, its labels, every chain it holds)."""
    image_id, labels = None, {}
    first = image.strip()
    if first:
        image_id, _, labels_text = first.partition(" ")
        labels = json.loads(labels_text or "null") or {}
    chains: set[str] = set()
    for line in layers.splitlines():
        if line.strip():
            chains.update(chain_ids(json.loads(line) or []))
    return image_id, labels, chains


def look(node: Node, target: Target, image: LocalImage) -> ImagePlan:
    seen = scripts.run(target, LOOK, image.reference, image.id)
    got, labels, chains = parse_facts(seen.sections.get("image", ""), seen.sections.get("layers", ""))
    have = tuple(got == image.id or chain in chains for chain in chain_ids(image.diff_ids))
    return ImagePlan(node.name, image, got == image.id and labels == image.labels, have)


class SavedImage:
    """``docker save`` of one image, made at most once and only when some node needs a layer."""

    def __init__(self, image: LocalImage, folder: Path):
        self.image = image
        self.path = folder / "image.tar"
        self._lock = threading.Lock()
        self.members: list[tuple[str, int, int]] | None = None  # name, start, end in the archive
        self.layer_names: list[str] = []

    def ready(self) -> SavedImage:
        with self._lock:
            if self.members is None:
                docker("save", "--output", str(self.path), self.image.reference, timeout=LOAD_TIMEOUT)
                self._index()
        return self

    def _index(self) -> None:
        members = []
        with tarfile.open(self.path) as archive:
            for member in archive:
                padded = -(-member.size // 512) * 512 if member.isfile() else 0
                members.append((member.name, member.offset, member.offset_data + padded))
            found = json.load(archive.extractfile("manifest.json"))
        digest = self.image.id.split(":", 1)[-1]
        entry = next((e for e in found if digest in e["Config"]), found[0])
        self.layer_names = list(entry["Layers"])
        if len(self.layer_names) != len(self.image.diff_ids):
            raise CheckFailed(f"docker save of {self.image.reference} lists {len(self.layer_names)} "
                              f"layers, the image has {len(self.image.diff_ids)}")
        self.members = members

    def ranges(self, have: tuple[bool, ...]) -> tuple[list[tuple[int, int]], int]:
        """Byte ranges of the archive without the layers the node has; and the bytes left out."""
        needed = {name for name, held in zip(self.layer_names, have, strict=True) if not held}
        skip = set(self.layer_names) - needed
        ranges, skipped = [], 0
        for name, start, end in self.members:
            if name in skip:
                skipped += end - start
            else:
                ranges.append((start, end))
        return ranges, skipped


def _load(target: Target, saved: SavedImage, have: tuple[bool, ...],
          progress: Callable[[int], None] | None) -> tuple[int, int, int, str]:
    """Stream the archive (less what the node has) into ``docker load``; (code, sent, skipped, err)."""
    ranges, skipped = saved.ranges(have)
    channel = Channel(target, ["docker", "load", "--quiet"], progress)
    try:
        for start, end in ranges:
            channel.send_file(saved.path, start, end - start)
        channel.write(END_OF_ARCHIVE)
    except (BrokenPipeError, ConnectionResetError):
        pass
    except BaseException:
        channel.kill()
        raise
    code, out, err = channel.finish(timeout=LOAD_TIMEOUT)
    return code, channel.sent, skipped, (err or out).strip()


def push(node: Node, target: Target, saved: SavedImage, first: ImagePlan | None = None,
         progress: Callable[[int], None] | None = None) -> ImageSent:
    started = time.monotonic()
    image = saved.image
    planned = first or look(node, target, image)
    total_layers = len(planned.have)
    if planned.up_to_date:
        return ImageSent(image.reference, image.id, "up to date", 0, 0, 0, time.monotonic() - started)
    saved.ready()
    code, sent, skipped, error = _load(target, saved, planned.have, progress)
    action, layers = "loaded", planned.layers_to_send
    if code != 0 and any(planned.have):
        whole = (False,) * total_layers
        code, more, skipped, error = _load(target, saved, whole, progress)
        sent, action, layers = sent + more, "loaded whole", total_layers
    if code != 0:
        raise CheckFailed(f"{node.name}: docker load of {image.reference} failed: {error[-500:]}")
    after = look(node, target, image)
    if not after.up_to_date:
        raise CheckFailed(f"{node.name}: after loading, {image.reference} does not have this "
                          f"machine's ID {image.id[:19]} and labels")
    return ImageSent(image.reference, image.id, action, sent, skipped, layers,
                     time.monotonic() - started)


def scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="trtllm-deploy-push-")
