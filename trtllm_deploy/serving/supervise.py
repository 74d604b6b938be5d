"""The supervisor: watches a deployment's mpirun and every rank, and acts when one fails.

Every ``interval`` seconds it looks at every node of the job at once (each rank's pid, mpirun's exit
status, the container), and keeps one small request (1 token, temperature 0) in flight against the
endpoint: a request that has waited ``hang_s`` without an answer while every process lives is a
hang (a rank stuck in a collective stalls every token). On a failure it reads the last lines of
every rank's log, names the known failure (failures.toml) with its remedy, removes every rank and
container of the job from every node, and applies the policy: ``stop``, ``restart`` the same
deployment, or ``rollback`` to the last known good one.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from dataclasses import dataclass

from trtllm_deploy.errors import InputError
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.runtimes import runtime
from trtllm_deploy.serving import jobs, launch, state
from trtllm_deploy.serving.state import Deployment
from trtllm_deploy.urls import http_url

POLICIES = ("stop", "restart", "rollback")


@dataclass(frozen=True)
class Failure:
    kind: str            # "dead" (a rank, mpirun or a container) or "hang"
    what: str
    looks: int           # the look that found it, from 1: it was found within looks x interval
    explanation: str = ""

    def as_json(self) -> dict:
        return {"kind": self.kind, "what": self.what, "looks": self.looks, "explanation": self.explanation}


class HangProbe:
    """One 1-token completion in flight at a time; how long the current one has waited."""

    def __init__(self, node: Node, port: int, timeout: float = 600.0, models: str = "/v1/models"):
        self.url = http_url(node.host, port)
        self.models = models
        self.timeout = timeout
        self.sent_at: float | None = None
        self.model: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sent_at = time.monotonic()
            try:
                if self.model is None:
                    with urllib.request.urlopen(f"{self.url}{self.models}", timeout=self.timeout) as answer:
                        self.model = json.load(answer)["data"][0]["id"]
                body = json.dumps({"model": self.model, "prompt": "ping", "max_tokens": 1,
                                   "temperature": 0}).encode()
                request = urllib.request.Request(f"{self.url}/v1/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    answer.read()
            except OSError:
                pass  # a refused or reset connection is the process checks' business
            self.sent_at = None
            self._stop.wait(0.5)

    def waited(self) -> float:
        sent = self.sent_at
        return 0.0 if sent is None else time.monotonic() - sent

    def close(self) -> None:
        self._stop.set()


def watch(cluster: Cluster, deployment: Deployment, *, interval: float = 1.0,
          hang_s: float = 8.0, duration: float | None = None,
          stop: threading.Event | None = None) -> Failure | None:
    """Watch until a failure (returned, explained) or ``duration`` seconds / ``stop`` (None)."""
    nodes = launch.job_cluster(cluster, deployment)
    probe = HangProbe(nodes.head, deployment.port, models=runtime.get(deployment.runtime).ready)
    started = time.monotonic()
    count = 0
    try:
        while (duration is None or time.monotonic() - started < duration) and not (stop and stop.is_set()):
            looked_at = time.monotonic()
            count += 1
            wrong = jobs.trouble(jobs.look(nodes, deployment), deployment, nodes.head.name)
            if wrong:
                return Failure("dead", wrong, count, jobs.explain(nodes, deployment, wrong))
            waited = probe.waited()
            if waited > hang_s:
                what = (f"no answer to a 1-token request for {waited:.0f} s while every rank and mpirun "
                        "are alive: a hang")
                return Failure("hang", what, count, jobs.explain(nodes, deployment, what))
            time.sleep(max(0.0, interval - (time.monotonic() - looked_at)))
    finally:
        probe.close()
    return None


@dataclass
class Handled:
    failure: Failure
    policy: str
    stopped: bool
    relaunched: launch.Launched | None = None

    def as_json(self) -> dict:
        return {"failure": self.failure.as_json(), "policy": self.policy, "stopped": self.stopped,
                "relaunched": self.relaunched.as_json() if self.relaunched else None}


def handle(cluster: Cluster, deployment: Deployment, failure: Failure, policy: str, tmp,
           report=lambda line: None, **gate) -> Handled:
    """Tear the failed job down everywhere (verified), then apply ``policy``."""
    if policy not in POLICIES:
        raise InputError(f"--on-failure {policy!r}: expected one of {', '.join(POLICIES)}")
    report(f"{failure.kind}: {failure.what}; removing {deployment.job} from every node")
    launch.stop(cluster, deployment.job)
    handled = Handled(failure, policy, True)
    target = None
    if policy == "restart":
        target = deployment
    elif policy == "rollback":
        target = state.last_good(cluster)
        if target is None:
            report("no last known good deployment is recorded: nothing to roll back to")
    if target is not None:
        report(f"{policy}: launching {target.job} ({target.runtime}, {target.artifact})")
        handled.relaunched = launch.launch(cluster, target, tmp, report=report, **gate)
    return handled
