"""vLLM: the rollback runtime, serving the same checkpoint from its own pinned image.

vLLM's own multi-node mode: one process per node (node 0 serves HTTP, the others run
``--headless``), meeting at the head's address; mpirun only starts them and hands out node ranks.
Its image is the lock's ``[vllm] image``, else NVIDIA's DGX Spark playbook image.
"""

from __future__ import annotations

import ast
import json
from functools import cache
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
            "--master-port", str(MASTER_PORT), "--host", serve.listen, "--port", str(serve.port)]


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


# Its Prometheus metrics at the pinned vLLM, read from vLLM's source (METRICS_SOURCE) by
# prometheus_metrics(); the supervisor's progress is the generated-token counter (docs/SOURCES.md).
METRICS = Path("requirements/interface/vllm/metrics.json")
METRICS_SOURCE = "vllm/v1/metrics/loggers.py"
PROGRESS = "vllm:generation_tokens"
_KINDS = {"_counter_cls": "counter", "_gauge_cls": "gauge", "_histogram_cls": "histogram"}


def prometheus_metrics(text: str) -> dict[str, dict]:
    """The metrics vLLM's Prometheus logger declares (``self._counter_cls(name=..., labelnames=...)``),
    read from its source text with ast: name → kind and label names."""
    tree = ast.parse(text)
    lists = {target.id: [item.value for item in node.value.elts]
             for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
             and all(isinstance(item, ast.Constant) for item in node.value.elts)
             for target in node.targets if isinstance(target, ast.Name)}
    found = {}
    for node in ast.walk(tree):
        kind = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and _KINDS.get(node.func.attr))
        words = {word.arg: word.value for word in node.keywords} if kind else {}
        if kind and isinstance(words.get("name"), ast.Constant):
            found[words["name"].value] = {"kind": kind, "labels": _labels(words.get("labelnames"), lists)}
    return dict(sorted(found.items()))


def _labels(node: ast.expr | None, lists: dict[str, list]) -> list:
    """A ``labelnames=`` argument: a list, a list's name, or a sum of those."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _labels(node.left, lists) + _labels(node.right, lists)
    if isinstance(node, ast.Name):
        return list(lists.get(node.id, []))
    if isinstance(node, ast.List):
        return [item.value for item in node.elts if isinstance(item, ast.Constant)]
    return []


def write_metrics(text: str, version: str, where: str) -> None:
    """Record vLLM's metrics at ``version`` from METRICS_SOURCE's ``text``; ``where``: read from what."""
    data = {"version": version, "source": f"{METRICS_SOURCE} ({where})",
            "metrics": prometheus_metrics(text)}
    (ROOT / METRICS).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


@cache
def metrics() -> dict[str, dict]:
    """vLLM's metrics at the pinned version (METRICS)."""
    return json.loads((ROOT / METRICS).read_text(encoding="utf-8"))["metrics"]


def exposed(name: str) -> str:
    """A metric's sample name in the text ``GET /metrics`` returns: prometheus_client adds ``_total``
    to a counter's."""
    return f"{name}_total" if metrics()[name]["kind"] == "counter" else name


def generated_tokens(body: bytes) -> int | None:
    """The tokens vLLM has generated (PROGRESS, summed over engines), from its ``/metrics`` text."""
    sample, total, seen = exposed(PROGRESS), 0.0, False
    for line in body.decode("utf-8", "replace").splitlines():
        name, _, rest = line.partition("{") if "{" in line.split(" ", 1)[0] else line.partition(" ")
        if name == sample:
            value = rest.rsplit("}", 1)[-1].split()
            try:
                total, seen = total + float(value[0]), True
            except (IndexError, ValueError):
                continue
    return int(total) if seen else None


def image(lockfile: LockFile) -> str:
    """The lock's ``[vllm] image`` (pin it by digest), else the playbook's."""
    return lockfile.lock.runtime_image(NAME) or IMAGE


def node_env(address: str) -> dict[str, str]:
    """The address this node announces: its fabric's, else its own."""
    return {HOST_IP: address} if address else {}


RUNTIME = Runtime(
    name=NAME, product="vLLM", server="vLLM", program=program, image=image, role="rollback",
    node_env=node_env, node_vars=(HOST_IP,), says=(NAME,), progress=generated_tokens)
