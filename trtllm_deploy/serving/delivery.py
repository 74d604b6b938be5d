"""What deploy's push phase sends, from where, and how it says so.

The artifact is a folder on this machine (``--artifact-dir``) or the head's store (where
``engine.build`` makes it); the image is wherever a node holds it (the build node first), else
this machine's engine. Both go node to node (``trtllm_deploy.push``); this module turns that into
the words and the data deploy reports: the route each one takes, and per node, where its bytes
came from.
"""

from __future__ import annotations

from pathlib import Path

from trtllm_deploy import console, push
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.push import holder


def artifact_source(folder: Path, node: Node | None) -> push.Source:
    """The artifact as push takes it: ``folder`` on this machine, or ``folder.name`` in ``node``'s
    store (its manifest read there)."""
    if node is None:
        return push.source(folder.parent, folder.name)
    return push.source_on(node, folder.name)


def backend(src: push.Source) -> str:
    """How the artifact is served: TensorRT engines or a checkpoint, as its manifest says."""
    return (src.wanted.get("provenance") or {}).get("backend", "pytorch")


def locate_image(cluster: Cluster, reference: str) -> holder.Holding:
    """The node that holds the image (the build node, then the head, then any), else this machine."""
    return holder.locate(cluster.nodes, reference, prefer=(cluster.build_node_name, cluster.head.name))


def routes(plans, src: push.Source) -> str:
    """The way of each part that some node lacks: ``artifact: a → b → c; image: a (registry) → b, c``."""
    ways = []
    if src.artifact is not None and push.needing(plans):
        ways.append(f"artifact: {push.route_of(plans, src)}")
    image = push.image_route_of(plans, src)
    if image:
        ways.append(f"image: {image}")
    return "; ".join(ways)


def came_from(pushed: push.NodePushed) -> tuple[str, dict]:
    """One node's words for the summary, and the same as data for ``--json``: for the artifact and
    the image, the bytes sent and where they came from."""
    words, data = [], {}
    for part, sent, origin in (("artifact", pushed.artifact, pushed.received_from),
                               ("image", pushed.image, pushed.image_from)):
        if sent is None:
            continue
        if sent.action == "up to date" or not origin:
            words.append(f"{part} up to date")
            data[part] = {"action": "up to date", "bytes_sent": 0, "from": None}
        else:
            words.append(f"{part}: {console.size(sent.bytes_sent)} from {origin}")
            data[part] = {"action": sent.action, "bytes_sent": sent.bytes_sent,
                          "bytes_skipped": sent.bytes_skipped, "from": origin}
    return "; ".join(words), data
