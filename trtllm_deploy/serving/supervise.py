"""The supervisor: watches a deployment's mpirun and every rank, tells busy from stuck, and acts.

Every ``interval`` seconds it looks at every node of the job at once (each rank's pid, mpirun's exit
status, the container) and at the runtime's progress: its iteration counter (``GET /metrics``, the
iteration stats trtllm-serve returns) and the tokens of its own small streamed request, kept in
flight. A *hang* is no progress while every process lives: no iteration and no token for ``hang_s``
while the probe waits. A saturated server that keeps iterating is busy, not stuck, however long
the probe queues; where the runtime reports no iterations the probe's own token is the last resort.

On a failure it reads the last lines of every rank's log, names the known failure (failures.toml)
with its remedy, removes every rank and container of the job from every node, and applies the
policy: ``stop``; ``restart`` the same deployment, backing off, until K failures in T minutes make
it a crash loop (then the next policy, rollback); or ``rollback`` (launch.roll_back: the last
deployment that served healthily for ``good_after_s`` and differs from the failing one, else the
fallback runtime, else stop, saying why). A deployment watched healthily for ``good_after_s`` is
recorded as good (state.promote).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from trtllm_deploy.errors import DeployError, InputError
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.runtimes import runtime
from trtllm_deploy.serving import jobs, launch, state
from trtllm_deploy.serving.state import Deployment
from trtllm_deploy.urls import http_url

POLICIES = ("stop", "restart", "rollback")
GOOD_AFTER_S = 300.0   # watched healthy this long, a deployment is good (a rollback target)


class Clock:
    """Time as the supervisor sees it; tests pass one they drive."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass(frozen=True)
class Failure:
    kind: str            # "dead" (a rank, mpirun or a container), "hang" or "crash loop"
    what: str
    looks: int           # the look that found it, from 1: it was found within looks x interval
    explanation: str = ""

    def as_json(self) -> dict:
        return {"kind": self.kind, "what": self.what, "looks": self.looks, "explanation": self.explanation}


@dataclass(frozen=True)
class Seen:
    """What one look saw of the runtime's progress."""

    iterations: int | None   # the runtime's iteration counter (None: it reports none)
    tokens: int              # tokens the probe has received so far
    waiting: float           # seconds the probe's current request has gone without a token (0: none)


class Progress:
    """Busy or stuck, from successive looks: stuck is the probe waiting while nothing moved for
    ``hang_s`` (neither an iteration nor a probe token)."""

    def __init__(self, hang_s: float, now: float) -> None:
        self.hang_s = hang_s
        self.moved_at = now
        self.marks: tuple | None = None

    def stuck(self, seen: Seen, now: float) -> float | None:
        """Seconds without progress when that makes a hang, else None."""
        marks = (seen.iterations, seen.tokens)
        if marks != self.marks:
            self.marks, self.moved_at = marks, now
        still = min(now - self.moved_at, seen.waiting)
        return still if seen.waiting > 0 and still > self.hang_s else None


class Probe:
    """The runtime seen from outside: one streamed 1-token completion in flight at a time, and the
    runtime's own progress from its metrics endpoint (``Runtime.progress``: an iteration or a
    generated-token counter, whichever the runtime reports); the highest value seen is kept."""

    def __init__(self, url: str, serving: runtime.Runtime | None = None, timeout: float = 600.0) -> None:
        serving = serving or runtime.default()
        self.url = url
        self.models = serving.ready
        self.metrics = serving.metrics
        self.progress = serving.progress
        self.timeout = timeout
        self.sent_at: float | None = None
        self.tokens = 0
        self.iterations: int | None = None
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
                                   "temperature": 0, "stream": True}).encode()
                request = urllib.request.Request(f"{self.url}/v1/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    for line in answer:
                        if line.startswith(b"data: ") and b'"text"' in line:
                            self.tokens += 1
                            self.sent_at = None   # answered; the rest of the stream is its end
            except (OSError, ValueError, LookupError):
                pass  # a refused or reset connection is the process checks' business
            self.sent_at = None
            self._stop.wait(0.5)

    def seen(self) -> Seen:
        self._read_metrics()
        sent = self.sent_at
        return Seen(self.iterations, self.tokens, 0.0 if sent is None else time.monotonic() - sent)

    def _read_metrics(self) -> None:
        if self.metrics is None:
            return
        try:
            with urllib.request.urlopen(f"{self.url}{self.metrics}", timeout=5) as answer:
                found = self.progress(answer.read())
        except OSError:
            return
        if found is not None:
            self.iterations = max(found, self.iterations or 0)

    def close(self) -> None:
        self._stop.set()


def endpoint(node: Node, deployment: Deployment) -> str:
    return http_url(node.host, deployment.port)


def watch(cluster: Cluster, deployment: Deployment, *, interval: float = 1.0,
          hang_s: float = 8.0, duration: float | None = None, stop: threading.Event | None = None,
          good_after_s: float | None = None, on_good: Callable[[], None] = lambda: None) -> Failure | None:
    """Watch until a failure (returned, explained) or ``duration`` seconds / ``stop`` (None)."""
    nodes = launch.job_cluster(cluster, deployment)
    probe = Probe(endpoint(nodes.head, deployment), runtime.get(deployment.runtime))
    try:
        return observe(lambda: jobs.trouble(jobs.look(nodes, deployment), deployment, nodes.head.name),
                       probe.seen, lambda what: jobs.explain(nodes, deployment, what),
                       interval=interval, hang_s=hang_s, duration=duration, stop=stop,
                       good_after_s=good_after_s, on_good=on_good)
    finally:
        probe.close()


def observe(trouble: Callable[[], str | None], seen: Callable[[], Seen], explain: Callable[[str], str], *,
            interval: float = 1.0, hang_s: float = 8.0, duration: float | None = None,
            stop: threading.Event | None = None, good_after_s: float | None = None,
            on_good: Callable[[], None] = lambda: None, clock: Clock | None = None) -> Failure | None:
    """The watch loop, on any process check and progress source: a dead process or a hang is
    returned as a Failure; ``on_good`` is called once after ``good_after_s`` without one."""
    clock = clock or Clock()
    started = clock.now()
    progress = Progress(hang_s, started)
    count = 0
    good = good_after_s is None
    while (duration is None or clock.now() - started < duration) and not (stop and stop.is_set()):
        looked_at = clock.now()
        count += 1
        wrong = trouble()
        if wrong:
            return Failure("dead", wrong, count, explain(wrong))
        still = progress.stuck(seen(), clock.now())
        if still is not None:
            what = (f"no progress for {still:.0f} s (no iteration, no token) while a request waits and "
                    "every rank and mpirun are alive: a hang")
            return Failure("hang", what, count, explain(what))
        if not good and clock.now() - started >= good_after_s:
            good = True
            on_good()
        clock.sleep(max(0.0, interval - (clock.now() - looked_at)))
    return None


@dataclass
class CrashLoop:
    """``restart``'s limit: backs off (doubling from ``backoff_s``) and gives up after ``limit``
    failures within ``window_s``."""

    limit: int = 3
    window_s: float = 600.0
    backoff_s: float = 5.0
    backoff_max_s: float = 120.0
    failures: list[float] = field(default_factory=list)

    def failed(self, now: float) -> float | None:
        """Record a failure at ``now``: the seconds to wait before restarting, or None to give up."""
        self.failures = [t for t in self.failures if now - t < self.window_s] + [now]
        if len(self.failures) >= self.limit:
            return None
        return min(self.backoff_s * 2 ** (len(self.failures) - 1), self.backoff_max_s)

    def reason(self) -> str:
        return (f"a crash loop: {len(self.failures)} failures within {self.window_s / 60:g} min "
                f"(the limit is {self.limit})")


@dataclass
class Handled:
    failure: Failure
    policy: str
    stopped: bool
    relaunched: launch.Launched | None = None
    gave_up: str | None = None      # why nothing serves again, where nothing does

    def as_json(self) -> dict:
        return {"failure": self.failure.as_json(), "policy": self.policy, "stopped": self.stopped,
                "relaunched": self.relaunched.as_json() if self.relaunched else None,
                "gave_up": self.gave_up}


@dataclass
class Actions:
    """What handling does to the cluster; tests of the policies pass their own."""

    stop: Callable = launch.stop
    roll_back: Callable = launch.roll_back
    launch: Callable = launch.launch   # last: the field's name hides the module below it


def handle(cluster: Cluster, deployment: Deployment, failure: Failure, policy: str, tmp,
           report=lambda line: None, *, loop: CrashLoop | None = None, clock: Clock | None = None,
           lockfile=None, actions: Actions | None = None, **gate) -> Handled:
    """Tear the failed job down everywhere (verified), then apply ``policy``: ``restart`` after its
    back-off until ``loop`` calls it a crash loop, then ``rollback``; ``rollback`` to what
    launch.roll_back chooses, else stop."""
    if policy not in POLICIES:
        raise InputError(f"--on-failure {policy!r}: expected one of {', '.join(POLICIES)}")
    clock, actions = clock or Clock(), actions or Actions()
    report(f"{failure.kind}: {failure.what}; removing {deployment.job} from every node")
    actions.stop(cluster, deployment.job)
    handled = Handled(failure, policy, True)
    if policy == "stop":
        handled.gave_up = f"--on-failure stop: {deployment.job} failed ({failure.what})"
        return handled
    if policy == "restart":
        loop = loop if loop is not None else CrashLoop()
        wait = loop.failed(clock.now())
        while wait is not None:   # a start that fails is one more failure of the loop
            report(f"restart: launching {deployment.job} again in {wait:.0f} s")
            clock.sleep(wait)
            try:
                handled.relaunched = actions.launch(cluster, deployment, tmp, report=report,
                                                    lockfile=lockfile, **gate)
                return handled
            except DeployError as exc:
                report(f"restart failed: {exc}")
                wait = loop.failed(clock.now())
        report(f"restart: {deployment.job} is in {loop.reason()}; giving up on restarting it, next: "
               f"rollback\n{failure.explanation}")
        handled.policy = "restart, then rollback (crash loop)"
        handled.failure = Failure("crash loop", f"{loop.reason()}; the last: {failure.what}",
                                  failure.looks, failure.explanation)
    try:
        handled.relaunched = actions.roll_back(cluster, deployment, tmp, report=report, lockfile=lockfile,
                                               **gate)
    except DeployError as exc:
        handled.gave_up = f"rollback: {exc}"
        report(handled.gave_up)
    return handled


def promote(cluster: Cluster, deployment: Deployment) -> Callable[[], None]:
    """What a watch calls once the deployment has served healthily long enough: record it good."""
    return lambda: state.promote(cluster, deployment)
