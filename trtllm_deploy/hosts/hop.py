"""One node reaching another: the OpenSSH command line a node runs to get at a peer's loopback port.

Heavy data moves node to node (an image pulled from the build node's registry, an artifact passed
along a chain), never through the machine running invoke. A node reaches a peer with the keys and
pinned host keys that ``ssh.setup`` gave every node (``~/.ssh/id_ed25519``, ``~/.ssh/known_hosts``),
host keys checked strictly, never a password prompt. Where the peer has a fabric address the
connection goes there (the fast private link), and its host key is looked up under the name
``ssh.setup`` pinned for the peer, since the fabric address itself is not pinned.
"""

from __future__ import annotations

from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.hosts.knownhosts import host_name

KEY = "~/.ssh/id_ed25519"  # what ssh.setup makes on every node (sshsetup.KEY)
KNOWN_HOSTS = "~/.ssh/known_hosts"
# Bulk data through a tunnel prefers AES-GCM, as push's own channel does (push/channel.py).
CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"


def address(peer: Node, fabric: bool = True) -> str:
    """Where another node reaches ``peer``: its fabric address if it has one (and ``fabric``), else
    the address in hosts.toml, else its name (as mpirun's ssh_config names it)."""
    if fabric and peer.fabric.address:
        return peer.fabric.address
    return peer.address or peer.name


def ssh_argv(peer: Node, fabric: bool = True) -> list[str]:
    """``ssh`` options and destination for a node to reach ``peer`` (the command goes after)."""
    where = address(peer, fabric)
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={KNOWN_HOSTS}", "-o", f"IdentityFile={KEY}",
            "-o", "IdentitiesOnly=yes", "-o", f"ConnectTimeout={int(peer.connect_timeout)}",
            "-o", "ServerAliveInterval=15", "-o", f"Ciphers={CIPHERS}", "-p", str(peer.port)]
    if where != (peer.address or peer.name):
        # ssh.setup pinned the peer under its address and its name; the fabric address is neither.
        argv += ["-o", f"HostKeyAlias={host_name(peer.name, peer.port)}"]
    if peer.user:
        argv += ["-l", peer.user]
    return [*argv, where]


def tunnel_argv(peer: Node, local_port: int, remote_port: int, fabric: bool = True) -> list[str]:
    """A tunnel from this node's loopback ``local_port`` to ``peer``'s loopback ``remote_port``; it
    stays in the foreground (``-N``) until killed, and fails at once if the port cannot be bound."""
    *options, where = ssh_argv(peer, fabric)
    return [*options, "-N", "-o", "ExitOnForwardFailure=yes",
            "-L", f"127.0.0.1:{int(local_port)}:127.0.0.1:{int(remote_port)}", where]
