"""``mpirun`` across nodes whose ranks run inside a container on each node.

mpirun runs in the head node's container. To start its daemon (``orted``) on another node it calls
an "rsh agent" with the node's name and a shell command; ours runs that command inside the runtime
container there: ``ssh <node> docker exec -i <container> bash -c '<command>'``. The containers run
no sshd. ssh reads a generated ssh_config (per node: address, user, port; host keys checked
against a pinned known_hosts; BatchMode) and authenticates through an agent socket mounted into
the container, so no private key is ever inside one. The files are mounted at the same place in
every node's container (a daemon checks that the agent exists when it starts), but only the head's
has the agent socket.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.hosts.shell import quote

# Where the head container sees the files below (mounted read-only).
MOUNT = "/run/trtllm-deploy/mpi"
AGENT_SOCKET = f"{MOUNT}/agent.sock"


def ssh_config(nodes: Sequence[Node], known_hosts: str = f"{MOUNT}/known_hosts") -> str:
    """An ssh_config naming every node by its inventory name, with strict host-key checking."""
    lines = ["# Written by trtllm-deploy for mpirun's rsh agent; one Host per node.", ""]
    for node in nodes:
        lines += [
            f"Host {node.name}",
            f"    HostName {node.address or node.name}",
            f"    Port {node.port}",
            *([f"    User {node.user}"] if node.user else []),
            f"    UserKnownHostsFile {known_hosts}",
            "    StrictHostKeyChecking yes",
            "    BatchMode yes",
            f"    IdentityAgent {AGENT_SOCKET}",
            f"    ConnectTimeout {int(node.connect_timeout)}",
            "    ServerAliveInterval 15",
            "",
        ]
    return "\n".join(lines)


def rsh_agent(container: str, config: str = f"{MOUNT}/ssh_config") -> str:
    """The agent script: ``agent <node> <command words...>`` runs the command in that node's container.

    OpenMPI hands the remote command over as words meant for a remote shell (with ``;`` and quotes
    of its own), so they are joined and given to ``bash -c`` inside the container, quoted once for
    the node's login shell.
    """
    return "\n".join([
        "#!/bin/bash",
        "# Written by trtllm-deploy: mpirun's rsh agent (plm_rsh_agent). Usage: agent NODE COMMAND...",
        "set -euo pipefail",
        'node=$1; shift',
        'command="$*"',
        f"exec ssh -F {quote(config)} -T \"$node\" docker exec -i {quote(container)} "
        "bash -c \"$(printf '%q' \"$command\")\"",
        "",
    ])


def mpirun_argv(hosts: Sequence[str], program: Sequence[str], *, slots: int = 1,
                interfaces: Sequence[str] = (), forward_env: Sequence[str] = (),
                env: Mapping[str, str] | None = None, agent: str = f"{MOUNT}/rsh-agent",
                as_root: bool = True) -> list[str]:
    """The mpirun command line: one rank per slot on each host in order (rank 0 on hosts[0])."""
    argv = ["mpirun", "--np", str(len(hosts) * slots),
            "--host", ",".join(f"{host}:{slots}" for host in hosts),
            "--map-by", "ppr:%d:node" % slots,
            "--mca", "plm_rsh_agent", agent,
            # Every daemon reports straight to mpirun. (plm_rsh_no_tree_spawn, the other way to
            # keep launching on the head, hangs OpenMPI 4.1 before it starts any daemon.)
            "--mca", "routed", "direct",
            "--mca", "btl", "self,tcp",
            "--tag-output"]
    if as_root:
        argv.append("--allow-run-as-root")
    if interfaces:
        joined = ",".join(interfaces)
        argv += ["--mca", "btl_tcp_if_include", joined, "--mca", "oob_tcp_if_include", joined]
    for name in forward_env:
        argv += ["-x", name]
    for name, value in (env or {}).items():
        argv += ["-x", f"{name}={value}"]
    return [*argv, *program]
