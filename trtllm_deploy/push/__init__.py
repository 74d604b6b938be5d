"""``invoke push``: every node gets what it lacks of an artifact and an image, all nodes at once.

Look, then act: each node is asked what it has (one command per node for the artifact, one for
the image), the differences become a :class:`NodePlan` per node, and only then is anything sent.
A node that lacks the room for its difference stops the push before any byte moves anywhere.

The artifact comes from a folder on this machine (:func:`source`) or from a node's store
(:func:`source_on`: the head's, where ``engine.build`` writes it). With more than one node to send
to it goes along a chain (:mod:`push.chain`), so the source's link carries it once; ``route="star"``
sends to every node straight from the source, as the baseline the fan-out benchmark compares with.

The image comes from the node that holds it (:func:`with_image`, found by :mod:`push.holder`: the
build node, where ``invoke image`` puts it), through a registry on that node's loopback that the
others pull from over SSH tunnels (:mod:`push.registry`); only an image that no node holds and
this machine's engine does goes from here, as thinned ``docker save`` archives (:mod:`push.layers`).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from trtllm_deploy.artifact import manifest, verify
from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.hosts.fanout import GroupResult, Outcome, fan_out
from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import Target
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.push import chain, channel, files, holder, layers, registry

Progress = Callable[[str, int], None]  # (node name, bytes just sent)


@dataclass(frozen=True)
class Source:
    """What is pushed: an artifact directory with its manifest (on this machine, or on ``node``:
    its ``paths.artifacts/NAME``), an image (held by ``image_node``, or by this machine's engine
    where that is None), or both."""

    artifact: Path | PurePosixPath | None = None
    wanted: dict | None = None
    image: layers.LocalImage | None = None
    node: Node | None = None
    image_node: Node | None = None
    manifest_sha256: str | None = None  # the manifest file's SHA-256, as launch records it

    @property
    def image_label(self) -> str:
        return self.image_node.name if self.image_node else holder.THIS_MACHINE

    @property
    def name(self) -> str | None:
        return self.artifact.name if self.artifact else None

    @property
    def origin(self) -> chain.Origin:
        if self.node:
            return chain.Origin(self.node.paths.artifacts, self.node)
        return chain.Origin(str(Path(self.artifact).resolve().parent))

    @property
    def label(self) -> str:
        return self.origin.label


def source(store: str | Path = "engines", name: str = "", image: str = "") -> Source:
    """Check what the user asked to push, here, before any node is touched (InputError: exit 2)."""
    if not name and not image:
        raise InputError("nothing to push: give --name ARTIFACT, --image REF, or both")
    artifact = wanted = None
    if name:
        verify.check_name(name)
        artifact = Path(store) / name
        if not artifact.is_dir():
            raise InputError(f"no artifact {name} in {store}/: build it first (invoke engine.build)"
                             f" or pass --store")
        try:
            wanted = manifest.load(artifact)
        except manifest.ManifestError as exc:
            raise InputError(f"{exc}; an artifact is pushed with its manifest (invoke engine.build "
                             "writes it)") from None
        for path, entry in wanted["files"].items():
            local = artifact / path
            if not local.is_file() or local.stat().st_size != entry["size"]:
                raise InputError(f"{local} does not match its manifest (missing or another size); "
                                 "rebuild the artifact (invoke engine.build)")
    digest = hashlib.sha256((artifact / manifest.MANIFEST).read_bytes()).hexdigest() if artifact else None
    return Source(artifact, wanted, layers.inspect_local(image) if image else None,
                  manifest_sha256=digest)


def source_on(node: Node, name: str, *, reach: Callable[[Node], Target] = connect,
              image: str = "") -> Source:
    """The artifact ``name`` in ``node``'s store, its manifest read there (nothing is copied here).
    A name that is not valid is an InputError; a store without it, or with files that do not match
    its manifest, is the node's CheckFailed."""
    verify.check_name(name)
    target = reach(node)
    try:
        answer = files.ask(node, target, files.Scripts(target), "manifest", node.paths.artifacts, name)
    except CheckFailed as exc:
        raise CheckFailed(f"{exc}: no artifact {name} with its manifest in {node.name}'s "
                          f"{node.paths.artifacts}; build it there first (invoke engine.build)") from None
    finally:
        target.close()
    if answer["damaged"]:
        raise CheckFailed(f"{node.name}: {node.paths.artifacts}/{name} does not match its manifest "
                          f"({', '.join(answer['damaged'][:3])}: missing or another size); rebuild it")
    return Source(PurePosixPath(node.paths.artifacts) / name, answer["manifest"],
                  layers.inspect_local(image) if image else None, node, manifest_sha256=answer["sha256"])


def with_image(src: Source, holding: holder.Holding) -> Source:
    """``src`` with the image ``holder.locate`` found, where it found it."""
    return replace(src, image=holding.image, image_node=holding.node)


@dataclass(frozen=True)
class NodePlan:
    node: str
    artifact: files.ArtifactPlan | None
    image: layers.ImagePlan | None

    @property
    def up_to_date(self) -> bool:
        return all(part is None or part.up_to_date for part in (self.artifact, self.image))

    def as_json(self) -> dict:
        return {"up_to_date": self.up_to_date,
                "artifact": self.artifact.as_json() if self.artifact else None,
                "image": self.image.as_json() if self.image else None}


@dataclass(frozen=True)
class NodePushed:
    node: str
    artifact: files.ArtifactSent | None
    image: layers.ImageSent | None
    seconds: float
    received_from: str | None = None  # the artifact's upstream: a node's name or "this machine"
    image_from: str | None = None     # where the image's layers came from, when any were sent

    @property
    def bytes_sent(self) -> int:
        return sum(part.bytes_sent for part in (self.artifact, self.image) if part)

    @property
    def bytes_skipped(self) -> int:
        return sum(part.bytes_skipped for part in (self.artifact, self.image) if part)

    def as_json(self) -> dict:
        return {"ok": True, "received_from": self.received_from, "image_from": self.image_from,
                "bytes_sent": self.bytes_sent, "bytes_skipped": self.bytes_skipped,
                "seconds": round(self.seconds, 3),
                "rate_bytes_per_s": round(self.bytes_sent / self.seconds) if self.seconds else 0,
                "artifact": self.artifact.as_json() if self.artifact else None,
                "image": self.image.as_json() if self.image else None}


def look(nodes: Sequence[Node], src: Source, *, reach: Callable[[Node], Target] = connect,
         ) -> GroupResult[NodePlan]:
    """Every node's difference from what is pushed (nothing sent, nothing changed)."""

    def one(node: Node, target: Target) -> NodePlan:
        planned = files.look(node, target, src.name, src.wanted)[1] if src.artifact else None
        image = layers.look(node, target, src.image) if src.image else None
        return NodePlan(node.name, planned, image)

    return fan_out(tuple(nodes), one, reach=reach)


def require_room(plans: GroupResult[NodePlan]) -> None:
    """Refuse the whole push, before any byte moves, if a node lacks the space for its part."""
    short = [files.no_room(o.node, o.value.artifact) for o in plans
             if o.ok and o.value.artifact and not o.value.artifact.fits]
    if short:
        raise CheckFailed("\n".join(str(error) for error in short))


TRANSPORTS = ("ssh", "fabric")
MAX_STREAMS = 16


def check_transport(transport: str) -> str:
    if transport not in TRANSPORTS:
        raise InputError(f"--transport {transport!r}: use ssh (the default, encrypted) or fabric "
                         "(plain TCP over a private fabric link, checked against the manifest)")
    return transport


def check_streams(streams: int) -> int:
    if not 1 <= streams <= MAX_STREAMS:
        raise InputError(f"--streams {streams}: use 1 to {MAX_STREAMS} connections per node "
                         f"(default {files.STREAMS})")
    return streams


def check_route(route: str | None) -> str | None:
    if route is not None and route not in chain.ROUTES:
        raise InputError(f"--route {route!r}: use chain (node to node, the default for several nodes)"
                         " or star (every node straight from the source)")
    return route


def needing(plans: GroupResult[NodePlan]) -> list[str]:
    """The nodes that lack some of the artifact, in inventory order."""
    return [o.node.name for o in plans
            if o.ok and o.value.artifact and not o.value.artifact.up_to_date]


def pick_route(plans: GroupResult[NodePlan], route: str | None = None) -> str:
    """As asked; else a chain when more than one node needs the artifact, a star otherwise."""
    return check_route(route) or ("chain" if len(needing(plans)) > 1 else "star")


def route_of(plans: GroupResult[NodePlan], src: Source, route: str | None = None) -> str:
    """The artifact's way in words, for --dry-run: ``spark-1 → spark-2 → spark-3``."""
    return chain.describe(src.label, needing(plans), pick_route(plans, route))


def needing_image(plans: GroupResult[NodePlan]) -> list[str]:
    """The nodes that lack the image (by ID and labels), in inventory order."""
    return [o.node.name for o in plans if o.ok and o.value.image and not o.value.image.up_to_date]


def image_route_of(plans: GroupResult[NodePlan], src: Source) -> str | None:
    """The image's way in words: ``spark-1 (registry) → spark-2, spark-3``; None when no node
    needs it."""
    names = needing_image(plans)
    if not src.image or not names:
        return None
    how = "registry" if src.image_node else "docker save"
    return f"{src.image_label} ({how}) → {', '.join(names)}"


def expected_bytes(plans: GroupResult[NodePlan], route: str | None = None) -> dict[str, int]:
    """What each node's link will carry (for a progress bar): along a chain every node receives
    what any node still needs, in a star its own difference."""
    if pick_route(plans, route) == "star":
        return {o.node.name: o.value.artifact.send_bytes for o in plans if o.ok and o.value.artifact}
    union = sum(r["length"] for r in chain.records(
        [o.value.artifact for o in plans if o.ok and o.value.artifact]))
    return {name: union for name in needing(plans)}


def send(plans: GroupResult[NodePlan], src: Source, *, progress: Progress | None = None,
         reach: Callable[[Node], Target] = connect, transport: str = "ssh",
         streams: int = files.STREAMS, route: str | None = None,
         forward_timeout: float | None = None) -> GroupResult[NodePushed]:
    """Apply every node's plan; nodes whose look failed keep that failure.

    The artifact goes along a chain from its source (see :mod:`push.chain`) when ``route`` is
    "chain" (the default where more than one node needs it), or from a node's store straight to
    each node; a star from this machine is the direct transfer, over up to ``streams`` connections
    per node (``transport="fabric"``: plain TCP to each node's fabric address, control, token and
    verdict on SSH). The image goes from its holder's registry to every node that lacks it (the
    registry runs only while some node needs layers), or from this machine's engine over SSH."""
    fabric = check_transport(transport) == "fabric"
    check_streams(streams)
    chosen = pick_route(plans, route)
    by_name = {o.node.name: o for o in plans}
    reachable = [o.node for o in plans if o.ok]
    chained: dict = {}
    try:
        if src.artifact and (chosen == "chain" or src.node):
            source = reach(src.node) if src.node else Local()
            try:
                chained = chain.push(src.origin, source, src.wanted, src.name,
                                     [(o.node, o.value.artifact) for o in plans if o.ok], reach=reach,
                                     route=chosen, streams=streams, fabric=fabric, progress=progress,
                                     forward_timeout=forward_timeout)
            finally:
                source.close()
        from_here = src.image is not None and src.image_node is None
        with layers.scratch() as folder, _serving(src, plans, reach) as served:
            saved = layers.SavedImage(src.image, Path(folder)) if from_here else None

            def one(node: Node, target: Target) -> NodePushed:
                started = time.monotonic()
                planned: NodePlan = by_name[node.name].value
                count = (lambda n: progress(node.name, n)) if progress else None
                artifact = image = received_from = None
                before = 0.0
                if node.name in chained:
                    if isinstance(chained[node.name], BaseException):
                        raise chained[node.name]
                    artifact, received_from = chained[node.name]
                    before = artifact.seconds
                elif src.artifact:
                    first = (files.Scripts(target), planned.artifact)
                    artifact = files.push(node, target, src.name, src.artifact, src.wanted, first,
                                          count, fabric=fabric, streams=streams)
                    received_from = None if artifact.action == "up to date" else chain.THIS_MACHINE
                if saved:
                    image = layers.push(node, target, saved, planned.image, count)
                elif served is not None and planned.image is not None:
                    image = registry.pull(node, target, served, planned.image, count)
                elif planned.image is not None:
                    image = layers.ImageSent(src.image.reference, src.image.id, "up to date", 0, 0, 0, 0.0)
                image_from = src.image_label if image is not None and image.action != "up to date" else None
                return NodePushed(node.name, artifact, image, before + time.monotonic() - started,
                                  received_from, image_from)

            done = fan_out(reachable, one, reach=reach)
    except BaseException:
        channel.stop_all()  # Ctrl-C: the nodes keep what they received, for resuming
        raise
    return GroupResult([done[o.node.name] if o.ok else Outcome(o.node, error=o.error) for o in plans])


@contextmanager
def _serving(src: Source, plans: GroupResult[NodePlan], reach: Callable[[Node], Target]):
    """The image in its holder's registry while the nodes pull, if some node lacks it; else None."""
    if src.image_node is None or not needing_image(plans):
        yield None
        return
    target = reach(src.image_node)
    try:
        with registry.serve(src.image_node, target, src.image) as served:
            yield served
    finally:
        target.close()


def push(nodes: Sequence[Node], src: Source, *, progress: Progress | None = None,
         reach: Callable[[Node], Target] = connect, transport: str = "ssh",
         streams: int = files.STREAMS, route: str | None = None,
         forward_timeout: float | None = None) -> GroupResult[NodePushed]:
    """Look, check room everywhere, then send: the whole phase, as smoke and launch call it."""
    check_transport(transport)
    check_streams(streams)
    check_route(route)
    plans = look(nodes, src, reach=reach)
    require_room(plans)
    return send(plans, src, progress=progress, reach=reach, transport=transport, streams=streams,
                route=route, forward_timeout=forward_timeout)


class Counter:
    """Bytes sent per node, safe to add to from every node's thread (for tests and benchmarks)."""

    def __init__(self):
        self.sent: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, node: str, count: int) -> None:
        with self._lock:
            self.sent[node] = self.sent.get(node, 0) + count
