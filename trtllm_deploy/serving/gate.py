"""The HTTP gate every serving phase passes: the endpoint's health, the wait until it is ready, and
one fixed prompt at temperature 0 that must be answered at a minimum token rate.

Ready means: the runtime's health endpoint answers 200. The wait goes on while the ranks' logs
move, and ends on a stall, a dead rank or a dead mpirun (explained from the logs), not on a clock.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import NamedTuple

from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.runtimes import runtime
from trtllm_deploy.serving import jobs
from trtllm_deploy.serving.state import Deployment
from trtllm_deploy.urls import http_url

PROMPT = "The capital of France is"


def healthy(node: Node, port: int, timeout: float = 3.0, path: str = "/health") -> bool:
    """Whether the endpoint on ``node`` answers ``path`` (its runtime's health check) with 200."""
    try:
        with urllib.request.urlopen(http_url(node.host, port, path), timeout=timeout) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def serving(node: Node, deployment: Deployment) -> bool:
    """Whether the deployment's endpoint on ``node`` says it is healthy."""
    return healthy(node, deployment.port, path=runtime.get(deployment.runtime).health)


def wait_ready(cluster: Cluster, deployment: Deployment, stall_s: float, poll_s: float = 1.0) -> float:
    """Seconds until the health check answers. Waits while the ranks' logs grow; gives up on a
    stall of ``stall_s``, a dead rank or mpirun (explained from the logs)."""
    started = last_change = time.monotonic()
    sizes: dict = {}
    while True:
        if serving(cluster.head, deployment):
            return time.monotonic() - started
        looks = jobs.look(cluster, deployment)
        wrong = jobs.trouble(looks, deployment, cluster.head.name)
        if wrong:
            raise CheckFailed(jobs.explain(cluster, deployment, f"{wrong} before serving was ready"))
        now_sizes = {(node, rank): size for node, seen in looks.items()
                     for rank, (_, size) in seen.ranks.items()}
        if now_sizes != sizes:
            sizes, last_change = now_sizes, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            what = f"no progress in the ranks' logs for {stall_s:.0f} s and not ready"
            raise CheckFailed(jobs.explain(cluster, deployment, what))
        time.sleep(poll_s)


class Answer(NamedTuple):
    text: str
    tokens: int
    tokens_per_s: float


def ask(node: Node, port: int, max_tokens: int = 16, timeout: float = 300.0,
        models: str = "/v1/models") -> Answer:
    """The fixed prompt at temperature 0: the answer, its tokens and their rate (the gate of launch,
    deploy's verify and smoke). ``models`` is where the runtime lists the model it serves."""
    with urllib.request.urlopen(http_url(node.host, port, models), timeout=10) as answer:
        model = json.load(answer)["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    request = urllib.request.Request(http_url(node.host, port, "/v1/completions"), data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        reply = json.load(answer)
    seconds = time.monotonic() - started
    tokens = (reply.get("usage") or {}).get("completion_tokens") or 0
    return Answer(reply["choices"][0]["text"].strip(), tokens, tokens / seconds if seconds else 0.0)
