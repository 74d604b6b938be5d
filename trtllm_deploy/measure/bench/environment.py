"""What a result was measured on: the endpoint's own word (/v1/models, /version, its Server
header) and, given a hosts file, what the project recorded about the deployment serving it."""

from __future__ import annotations

import json
import platform
import socket
import urllib.error
import urllib.request
from pathlib import Path

from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.runtimes import runtime as runtimes

from .client import Endpoint


def _get(url: str, timeout: float = 10.0) -> tuple[dict | None, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            headers = {k.lower(): v for k, v in answer.headers.items()}
            try:
                return json.loads(answer.read() or b"null"), headers
            except ValueError:
                return None, headers
    except urllib.error.HTTPError as exc:
        return None, {k.lower(): v for k, v in exc.headers.items()}


def runtime_of(entry: dict, server: str) -> str:
    """The serving runtime in the project's words (a runtime's name), from what the endpoint says:
    the runtime it names, else whose model it says it is, else its server header."""
    return runtimes.of_endpoint(str(entry.get("runtime", "")), str(entry.get("owned_by", "")), server)


def endpoint_facts(endpoint: Endpoint) -> dict:
    """The served model and runtime as the endpoint describes itself; fails if it does not answer."""
    try:
        models, headers = _get(f"{endpoint.url}/v1/models")
    except (OSError, urllib.error.URLError) as exc:
        raise CheckFailed(f"{endpoint.url}/v1/models does not answer ({exc}): is the server up? "
                          "(`invoke status` shows a deployment's endpoint)") from None
    entries = (models or {}).get("data") or []
    if not entries:
        raise CheckFailed(f"{endpoint.url}/v1/models lists no model: is this an OpenAI-compatible server?")
    entry = entries[0]
    try:
        version, _ = _get(f"{endpoint.url}/version")
    except (OSError, urllib.error.URLError):
        version = None
    server = headers.get("server", "")
    return {"url": endpoint.url, "model": entry.get("id"), "owned_by": entry.get("owned_by"),
            "runtime": runtime_of(entry, server),
            "version": (version or {}).get("version") if isinstance(version, dict) else None,
            "server_header": server, "standin": bool(entry.get("standin")) or "(stand-in)" in str(entry),
            "max_model_len": entry.get("max_model_len"), "root": entry.get("root")}


def deployment_facts(hosts: str) -> tuple[dict, Endpoint | None]:
    """The current deployment of the cluster in ``hosts`` (image, artifact, tp, nodes, manifest hash,
    the locked TensorRT-LLM commit) and its endpoint on the head."""
    from trtllm_deploy.errors import InputError
    from trtllm_deploy.hosts import inventory
    from trtllm_deploy.serving import state
    from trtllm_deploy.source import lock as locks

    cluster = inventory.load(hosts)
    deployment = state.current(cluster)
    if deployment is None:
        raise InputError(f"no deployment is recorded for cluster {cluster.name!r}: run `invoke launch` "
                         "first, or pass --url")
    facts = {"cluster": cluster.name, "job": deployment.job, "runtime": deployment.runtime,
             "image": deployment.image, "image_id": deployment.image_id, "artifact": deployment.artifact,
             "manifest_sha256": deployment.manifest_sha256, "tp": deployment.tp, "pp": deployment.pp,
             "nodes": list(deployment.nodes) or [n.name for n in cluster.nodes[:deployment.ranks]],
             "env": dict(deployment.env), "started": deployment.started}
    try:
        lock = locks.load(locks.DEFAULT_PATH)
        facts["tensorrt_llm_commit"] = lock.lock.source.commit
        facts["tensorrt_llm_version"] = lock.lock.source.version
    except Exception:   # a checkout without the lock still benchmarks; the commit stays unknown
        facts["tensorrt_llm_commit"] = None
    return facts, Endpoint(cluster.head.address, deployment.port)


def client_facts() -> dict:
    return {"host": socket.gethostname(), "python": platform.python_version(),
            "platform": platform.platform(), "client": "trtllm-deploy bench (asyncio, raw HTTP/1.1)"}


def tokenizer_dir(deployment: dict | None, given: str) -> Path | None:
    """Where the model's tokenizer.json may be on this machine: as given, else engines/<artifact>."""
    if given:
        return Path(given).expanduser()
    if deployment and deployment.get("artifact"):
        return Path("engines") / deployment["artifact"]
    return None
