"""Where an image to send is: which node holds it, asked of every node at once.

The image a deployment runs is built on the build node (source kind), pulled there (release kind)
or made there (wheel kind); a named image may have been pulled by hand on any node. The holder is
the first of the preferred nodes (the build node, then the head) that has it, else any other node
that has it, in inventory order. Only where no node has it and this machine's own engine does (the
testbed, or an image the user loaded here) does it go from this machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.hosts import dockercli
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.dockercli import LocalImage
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.hosts.targets import Target
from trtllm_deploy.push import registry

THIS_MACHINE = "this machine"


@dataclass(frozen=True)
class Holding:
    """The image and where it is: ``node`` None means this machine's engine."""

    image: LocalImage
    node: Node | None = None

    @property
    def label(self) -> str:
        return self.node.name if self.node else THIS_MACHINE


def locate(nodes: Sequence[Node], reference: str, prefer: Sequence[str] = (), *,
           reach: Callable[[Node], Target] = connect,
           here: Callable[[str], LocalImage | None] = dockercli.inspect_image) -> Holding:
    """The holder of ``reference`` among ``nodes``: the preferred ones are asked first (one command
    each, at once), the others only when none of those has it; else this machine.

    Raises CheckFailed naming every node asked when nobody has it."""
    registry.repository_and_tag(reference)  # an ID or a malformed name: InputError before anything
    ranked = [node for name in dict.fromkeys(prefer) for node in nodes if node.name == name]
    seen = []
    for group in (ranked, [node for node in nodes if node not in ranked]):
        asked = list(fan_out(tuple(group), lambda node, target: registry.find(node, target, reference),
                             reach=reach))
        seen += asked
        for outcome in asked:  # in the group's order: the build node before the head
            if outcome.ok and outcome.value is not None:
                return Holding(outcome.value, outcome.node)
    local = here(reference)
    if local is not None:
        return Holding(local)
    unreached = [f"{o.node.name} ({o.reason})" for o in seen if not o.ok]
    asked = ", ".join(o.node.name for o in seen if o.ok)
    raise CheckFailed(f"no node has the image {reference}" + (f" (asked {asked})" if asked else "")
                      + (f"; not reached: {'; '.join(unreached)}" if unreached else "")
                      + ", nor this machine: build it on the build node (invoke image) or pull it there")


HERE = "here"


def at(nodes: Sequence[Node], reference: str, where: str, *,
       reach: Callable[[Node], Target] = connect) -> Holding:
    """The image where the user said it is: ``here`` (this machine's engine) or a node's name."""
    if where == HERE:
        found = dockercli.inspect_image(reference)
        if found is None:
            raise CheckFailed(f"image {reference} is not in this machine's Docker engine (--image-from "
                              "here); build or pull it here, or leave --image-from out to find it on "
                              "the nodes")
        return Holding(found)
    node = next((n for n in nodes if n.name == where), None)
    if node is None:
        raise InputError(f"--image-from {where!r}: no node of that name; use {HERE} or one of "
                         f"{', '.join(n.name for n in nodes)}")
    target = reach(node)
    try:
        return Holding(registry.inspect(node, target, reference), node)
    finally:
        target.close()
