"""vLLM: the rollback runtime, serving the same checkpoint from its own pinned image.

vLLM's own multi-node mode: one process per node (node 0 serves HTTP, the others run
``--headless``), meeting at the head's address; mpirun only starts them and hands out node ranks.
Its image is the lock's ``[vllm] image``, else NVIDIA's DGX Spark playbook image.
"""

from __future__ import annotations

from pathlib import Path

from trtllm_deploy.runtimes.interface import ROOT, argsource
from trtllm_deploy.runtimes.runtime import Runtime, Serve
from trtllm_deploy.source.lock import LockFile

NAME = "vllm"
IMAGE = "nvcr.io/nvidia/vllm:26.05-py3"   # docs/SOURCES.md#the-rollback-runtime
# The node rank is the MPI rank; every node but the first runs headless (no API server).
NODE_RANK = ('rank=${OMPI_COMM_WORLD_RANK:-0}; if [ "$rank" -gt 0 ]; then set -- "$@" --headless; fi; '
             'exec "$@" --node-rank "$rank"')
MASTER_PORT = 29501
HOST_IP = "VLLM_HOST_IP"   # the address this node's processes announce


def program(serve: Serve) -> list[str]:
    return ["sh", "-c", NODE_RANK, "vllm-node", "vllm", "serve", serve.model,
            "--tensor-parallel-size", str(serve.tp),
            "--pipeline-parallel-size", str(serve.pp), "--distributed-executor-backend", "mp",
            "--nnodes", str(serve.ranks), "--master-addr", serve.head,
            "--master-port", str(MASTER_PORT), "--host", "0.0.0.0", "--port", str(serve.port)]


# `vllm serve`'s options at the pinned vLLM (the stand-in takes exactly these), read from vLLM's
# source by runtimes/interface/argsource.py: the parser's files, the dataclasses typing them, the
# config modules their defaults point into.
SERVE_OPTIONS = Path("requirements/interface/vllm/serve_options.json")
PARSER_SOURCES = ("vllm/entrypoints/openai/cli_args.py", "vllm/engine/arg_utils.py",
                  "vllm/entrypoints/cli/serve.py")
ARG_CLASSES = ("FrontendArgs", "BaseFrontendArgs", "AsyncEngineArgs", "EngineArgs")
CONFIG_SOURCES = "vllm/config/"


def serve_options(texts: dict[str, str | None], version: str) -> dict:
    """serve_options.json's content from vLLM's source texts at ``version`` (path → text)."""
    table = argsource.extract(texts, PARSER_SOURCES, ARG_CLASSES, CONFIG_SOURCES, "FrontendArgs")
    return {"version": version, **table}


def write_serve_options(texts: dict[str, str | None], version: str, where: str) -> None:
    """Record `vllm serve`'s options at ``version``; ``where`` says what the texts were read from."""
    path = ROOT / SERVE_OPTIONS
    argsource.write(path, serve_options(texts, version), path.with_name("SOURCES.md"),
                    f"the options of `vllm serve` in vLLM {version} ({where})")


def image(lockfile: LockFile) -> str:
    """The lock's ``[vllm] image`` (pin it by digest), else the playbook's."""
    return lockfile.lock.runtime_image(NAME) or IMAGE


def node_env(address: str) -> dict[str, str]:
    """The address this node announces: its fabric's, else its own."""
    return {HOST_IP: address} if address else {}


RUNTIME = Runtime(
    name=NAME, product="vLLM", server="vLLM", program=program, image=image, role="rollback",
    node_env=node_env, node_vars=(HOST_IP,), says=(NAME,))
