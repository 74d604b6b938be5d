"""Reaching a node: :func:`connect` picks the target its inventory entry asks for, and
:class:`Connections` is what a run of several phases shares, so each node is reached once.

A run that wants sharing says so: ``with Connections() as shared: cluster = shared.share(cluster)``.
The nodes of that cluster carry the shared connections to every phase they are handed to, and
``connect`` gives each caller the node's one SSH connection; leaving the block closes them all.
Nodes from anywhere else get a connection of their own, closed by whoever opened it.
"""

from __future__ import annotations

import threading
from dataclasses import replace

from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.hosts.targets import Target


class Connections:
    """One SSH connection per node for a whole run, opened on first use, closed by :meth:`close`."""

    def __init__(self) -> None:
        self._open: dict[tuple, SSH] = {}
        self._lock = threading.Lock()

    def share(self, cluster: Cluster) -> Cluster:
        """``cluster`` with every node carrying these connections to whatever it is handed to."""
        nodes = []
        for node in cluster.nodes:
            node = node.model_copy()
            node._connections = self
            nodes.append(node)
        return replace(cluster, nodes=tuple(nodes))

    def target(self, node: Node) -> SSH:
        """The node's shared SSH target; its ``close()`` leaves the connection to :meth:`close`."""
        key = (node.name, node.host, node.port, node.user, node.identity_file, node.known_hosts)
        with self._lock:
            target = self._open.get(key)
            if target is None:
                target = self._open[key] = SSH(node)
                target.shared = True
            return target

    def close(self) -> None:
        with self._lock:
            opened, self._open = list(self._open.values()), {}
        for target in opened:
            target.disconnect()

    def __enter__(self) -> Connections:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def connect(node: Node, shared: Connections | None = None) -> Target:
    """The target that reaches ``node`` as its inventory entry says (no connection made yet): from
    ``shared``, or the connections the node carries, where there are any."""
    if node.connection == "local":
        return Local(node.name, default_timeout=node.command_timeout)
    shared = shared or node._connections
    return shared.target(node) if shared is not None else SSH(node)
