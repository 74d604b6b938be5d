"""Each node's own communication variables: its fabric's (hosts.toml), and what its runtime needs
per node. They are set in the node's container and in a file every rank there reads, never
forwarded by mpirun from the head.
"""

from __future__ import annotations

from trtllm_deploy.hosts import shell
from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.runtimes import runtime as runtimes
from trtllm_deploy.runtimes.runtime import Runtime

# The variables that differ per node (the fabric's, and each runtime's own): never passed with
# mpirun -x, never in mpirun's own environment either (OpenMPI hands the OMPI_MCA_ ones it sees to
# every daemon).
FABRIC_VARS = ("NCCL_SOCKET_IFNAME", "UCX_NET_DEVICES", "OMPI_MCA_btl_tcp_if_include",
               "OMPI_MCA_oob_tcp_if_include", "GLOO_SOCKET_IFNAME", "NCCL_IB_HCA",
               "TP_SOCKET_IFNAME", *runtimes.node_vars())


def fabric_env(node: Node, runtime: Runtime) -> dict[str, str]:
    """The node's own communication variables, from its hosts.toml fabric entry, and the ones the
    runtime needs per node, from its address."""
    interfaces = ",".join(node.fabric.interfaces)
    rdma = node.fabric.rdma_devices
    env: dict[str, str] = {}
    if interfaces:
        env.update({"NCCL_SOCKET_IFNAME": interfaces, "GLOO_SOCKET_IFNAME": interfaces,
                    "TP_SOCKET_IFNAME": interfaces, "OMPI_MCA_btl_tcp_if_include": interfaces,
                    "OMPI_MCA_oob_tcp_if_include": interfaces})
    env.update(runtime.node_env(str(node.fabric.address or node.address or "")))
    if rdma:
        env["NCCL_IB_HCA"] = ",".join(rdma)
        env["UCX_NET_DEVICES"] = ",".join(f"{device}:1" for device in rdma)
    elif interfaces:
        env["UCX_NET_DEVICES"] = interfaces
    return env


def node_env_file(node: Node, runtime: Runtime) -> str:
    """``NAME='value'`` lines of the node's own fabric variables (sourced by every rank there)."""
    env = fabric_env(node, runtime)
    return "".join(f"{key}={shell.quote(value)}\n" for key, value in env.items()
                   if key in FABRIC_VARS)
