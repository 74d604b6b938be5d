"""Images the lock names by digest (``NAME:TAG@sha256:D``) are exactly manifest D on every node.

A tag is a name that moves: the registry's ``NAME:TAG`` may be re-pushed, and a node that pulls it
afterwards has another image under the same words. So each node is looked at twice, by tag and by
digest, and judged against the others (:func:`judge`, pure): the node has D (``RepoDigests``), or
its image has the same ID as a node that has D (``docker load`` keeps the ID but not the registry
digest: what ``invoke push`` delivers), or the tag moved (drift), or it has nothing to compare.
:func:`resolve` gives launch the image ID each node runs, so the pinned image runs even where the
tag moved since.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.dockercli import LocalImage, parse_image
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.targets import Target
from trtllm_deploy.source.lock import LockFile

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Verdict states: the node runs the pinned image (pinned, same-id) or not (the rest).
PINNED, SAME_ID, DRIFT, MISSING, UNVERIFIED = "pinned", "same image ID", "drift", "missing", "unverified"
GOOD = (PINNED, SAME_ID)


@dataclass(frozen=True)
class Pin:
    """One image the lock names by digest: ``what`` says where (``[NAME] image``)."""

    what: str
    reference: str

    @property
    def name(self) -> str:
        return split(self.reference)[0]

    @property
    def tag(self) -> str | None:
        return split(self.reference)[1]

    @property
    def digest(self) -> str:
        return split(self.reference)[2] or ""

    @property
    def tagged(self) -> str | None:
        """``NAME:TAG``, what a node looks it up by (None: the lock names no tag)."""
        return f"{self.name}:{self.tag}" if self.tag else None

    @property
    def by_digest(self) -> str:
        return f"{self.name}@{self.digest}"


def split(reference: str) -> tuple[str, str | None, str | None]:
    """``NAME[:TAG][@sha256:D]`` → (NAME, TAG, D); a registry's port is not a tag."""
    name, _, digest = reference.partition("@")
    head, _, last = name.rpartition("/")
    tag = None
    if ":" in last:
        last, tag = last.split(":", 1)
        name = f"{head}/{last}" if head else last
    return name, tag, digest or None


def familiar(name: str) -> str:
    """Docker Hub's long and short names are the same repository (``docker.io/library/x`` = ``x``)."""
    for prefix in ("docker.io/", "index.docker.io/"):
        name = name.removeprefix(prefix)
    return name.removeprefix("library/")


def pin_of(reference: str, what: str = "the image") -> Pin | None:
    """The reference as a pin, when it names a digest; None for a bare tag or ID."""
    digest = split(reference)[2]
    if not digest:
        return None
    if not _DIGEST.match(digest):
        raise CheckFailed(f"{what} {reference}: the digest after @ is not sha256:<64 hex>; write it "
                          "as `docker buildx imagetools inspect` prints it")
    return Pin(what, reference)


def pins(lockfile: LockFile) -> list[Pin]:
    """The images every node runs that the lock names by digest: the runtimes' images."""
    found = [pin_of(table.image, f"[{runtime}] image")
             for runtime, table in lockfile.lock.runtime_images.items()]
    return [pin for pin in found if pin is not None]


def pinned_reference(lockfile: LockFile | None, image: str) -> str:
    """``image``, or the lock's digest reference when the lock pins that ``NAME:TAG`` (its runtime
    images, its release image): what launch runs, so a tag that moved does not change the image."""
    if lockfile is None or not image or "@" in image:
        return image
    name, tag, _ = split(image)
    named = [table.image for table in lockfile.lock.runtime_images.values()]
    named += [lockfile.lock.release.image or ""]
    for reference in named:
        pinned_name, pinned_tag, digest = split(reference)
        if digest and pinned_tag == (tag or "latest") and familiar(pinned_name) == familiar(name):
            return reference
    return image


# --- looking -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seen:
    """A node's answers for one pin: what ``NAME:TAG`` is there, and what ``NAME@D`` is."""

    tagged: LocalImage | None
    pinned: LocalImage | None


def _inspect(target: Target, reference: str | None) -> LocalImage | None:
    if not reference:
        return None
    done = target.run(["docker", "image", "inspect", "--format", "{{json .}}", reference],
                      check=False, timeout=60)
    return parse_image(reference, done.stdout.strip()) if done.ok and done.stdout.strip() else None


def look_on(target: Target, pin: Pin) -> Seen:
    return Seen(_inspect(target, pin.tagged), _inspect(target, pin.by_digest))


# --- judging (pure) ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    node: str
    image: str          # the lock's reference
    state: str          # PINNED, SAME_ID, DRIFT, MISSING or UNVERIFIED
    detail: str
    image_id: str | None = None   # the pinned image's ID on this node, where it runs it

    @property
    def ok(self) -> bool:
        return self.state in GOOD

    def as_json(self) -> dict:
        return {"node": self.node, "image": self.image, "state": self.state, "ok": self.ok,
                "detail": self.detail, "image_id": self.image_id}


def _short(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


def _carries(image: LocalImage, digest: str) -> bool:
    return any(entry.endswith(f"@{digest}") for entry in image.digests)


def _registry_digests(image: LocalImage, pin: Pin) -> list[str]:
    """The digests the image has under the pin's repository name (where it was pulled from there)."""
    return [entry.split("@", 1)[1] for entry in image.digests
            if familiar(entry.split("@", 1)[0]) == familiar(pin.name)]


def _remedy(pin: Pin) -> str:
    return (f"pull the pinned digest there (docker pull {pin.by_digest}, or invoke push from a node "
            f"that has it), or re-pin with `invoke source.update` if the new image is wanted")


def judge(pin: Pin, seen: Mapping[str, Seen]) -> list[Verdict]:
    """Each node against the pin, and against the nodes that have it by digest (pure)."""
    holders = {node: s.pinned.id for node, s in seen.items() if s.pinned is not None}
    holders |= {node: s.tagged.id for node, s in seen.items()
                if node not in holders and s.tagged is not None and _carries(s.tagged, pin.digest)}
    ids = sorted(set(holders.values()))
    verdicts = []
    for node, s in seen.items():
        tag = pin.tagged or pin.name
        if node in holders:
            mine = holders[node]
            detail = f"has {pin.digest[:19]} (image {_short(mine)})"
            if len(ids) > 1:
                others = ", ".join(f"{n} {_short(i)}" for n, i in holders.items() if i != mine)
                detail += (f"; other nodes have the same digest as another image ID ({others}): "
                           "another platform of a multi-platform index?")
            if s.tagged is not None and s.tagged.id != mine:
                detail += (f"; the tag {tag} there is another image ({_short(s.tagged.id)}): it moved "
                           "upstream, launch runs the pinned digest")
            verdicts.append(Verdict(node, pin.reference, PINNED, detail, mine))
            continue
        if s.tagged is None:
            verdicts.append(Verdict(node, pin.reference, MISSING,
                                    f"has neither {tag} nor {pin.by_digest}: {_remedy(pin)}"))
            continue
        mine = s.tagged.id
        same = sorted(n for n, i in holders.items() if i == mine)
        if same:
            how = ("no registry digest: loaded with docker load" if not s.tagged.digests
                   else f"registry digests {', '.join(s.tagged.digests)}")
            verdicts.append(Verdict(node, pin.reference, SAME_ID,
                                    f"{tag} is image {_short(mine)} ({how}), the same image ID as "
                                    f"{', '.join(same)}, which has {pin.digest[:19]}", mine))
            continue
        moved = _registry_digests(s.tagged, pin)
        if moved:
            verdicts.append(Verdict(node, pin.reference, DRIFT,
                                    f"tag {tag} on node {node} is {', '.join(moved)} (image "
                                    f"{_short(mine)}), the lock pins {pin.digest} — the tag moved; "
                                    + _remedy(pin)))
        elif holders:
            where = ", ".join(f"{n} {_short(i)}" for n, i in holders.items())
            verdicts.append(Verdict(node, pin.reference, DRIFT,
                                    f"tag {tag} on node {node} is image {_short(mine)} "
                                    + (f"(registry digests {', '.join(s.tagged.digests)})"
                                       if s.tagged.digests else "(no registry digest: loaded with "
                                       "docker load)")
                                    + f", not the pinned {pin.digest[:19]} ({where}); " + _remedy(pin)))
        else:
            verdicts.append(Verdict(node, pin.reference, UNVERIFIED,
                                    f"tag {tag} on node {node} is image {_short(mine)} with no registry "
                                    f"digest to compare, and no node has {pin.by_digest} to compare its "
                                    f"ID with; pull the pinned digest on one node (docker pull "
                                    f"{pin.by_digest}), then invoke push"))
    return verdicts


# --- on the cluster ------------------------------------------------------------------------------

def look(nodes: list[Node], pin: Pin, reach: Callable[[Node], Target] = connect) -> list[Verdict]:
    """Every node looked at for ``pin`` (two ``docker image inspect``), then judged together; a
    node that could not be reached is a verdict too."""
    seen = fan_out(nodes, lambda node, target: look_on(target, pin), reach=reach)
    answered = {o.node.name: o.value for o in seen if o.ok}
    judged = {v.node: v for v in judge(pin, answered)}
    return [judged.get(o.node.name) or Verdict(o.node.name, pin.reference, UNVERIFIED,
                                               f"could not look: {o.reason}") for o in seen]


def resolve(cluster: Cluster, reference: str,
            reach: Callable[[Node], Target] = connect) -> dict[str, str]:
    """For a reference with a digest: the image ID each node runs (the pinned image there); a node
    whose image is not the pinned one refuses the whole job, before anything starts. ``{}`` for a
    reference without a digest (each node runs what the tag names)."""
    pin = pin_of(reference)
    if pin is None:
        return {}
    verdicts = look(list(cluster.nodes), pin, reach)
    bad = [v for v in verdicts if not v.ok]
    if bad:
        raise CheckFailed(f"{reference} is not the pinned image on {', '.join(v.node for v in bad)}; "
                          "nothing was started:\n" + "\n".join(f"  {v.node}: {v.detail}" for v in bad))
    return {v.node: v.image_id for v in verdicts if v.image_id}
