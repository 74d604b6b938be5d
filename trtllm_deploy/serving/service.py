"""The supervisor as a service on the head (``python -m trtllm_deploy.serving.service run``): what
``invoke supervise --install`` keeps running there, so supervision outlives the terminal and reboots.

It watches and handles failures as ``invoke supervise`` does (supervise.watch / supervise.handle),
and besides:

- on start, a current deployment of which nothing runs (the head rebooted) is launched again;
- before anything is launched again, every node of the job must answer over SSH and its Docker
  engine must answer (bounded by ``--node-wait-s``; each wait recorded, "waiting for spark-2");
- a failure while a node did not answer (a reboot) is not the deployment's fault: it is launched
  again as it was once the node is back, whatever ``--on-failure`` says, and it does not count
  towards a crash loop;
- SIGTERM stops watching cleanly; the deployment keeps serving.

Its state is the head's copy of the cluster's record (state.py, under the head user's home) and its
history is ``supervisor.jsonl`` beside it: one JSON object a line (``at``, ``event`` and details),
which ``invoke status`` and ``invoke logs --supervisor`` read from the head.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from trtllm_deploy.errors import DeployError
from trtllm_deploy.hosts import inventory
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.serving import containers, jobs, launch, state, supervise
from trtllm_deploy.serving.servicefiles import HISTORY, Options
from trtllm_deploy.serving.state import Deployment
from trtllm_deploy.source import lock as locks

POLL_S = 2.0   # between asks while a node is away


class History:
    """The supervisor's history: JSON lines appended beside the cluster's record, and on stderr."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def event(self, event: str, **details) -> None:
        line = json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event,
                           **details}, sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
        print(line, file=sys.stderr, flush=True)


def history_path(cluster: Cluster) -> Path:
    return Path(os.path.expanduser(state.STATE_DIR)) / cluster.name / HISTORY


def away(node: Node) -> str | None:
    """Why ``node`` does not answer (SSH, then its Docker engine), or None when it does."""
    try:
        target = connect(node)
    except DeployError as exc:
        return str(exc)
    try:
        done = target.run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30, check=False)
        return None if done.ok and done.stdout.strip() else f"its Docker engine does not answer: " \
            f"{(done.stderr or done.stdout).strip()[:200]}"
    except DeployError as exc:
        return str(exc)
    finally:
        target.close()


def wait_for(nodes: tuple[Node, ...], history: History, bound_s: float, stop: threading.Event) -> list[str]:
    """Until every node answers, ``bound_s`` passes or ``stop``; the names still away (none: all back)."""
    started = time.monotonic()
    told: set[str] = set()
    while True:
        missing = {node.name: why for node in nodes if (why := away(node)) is not None}
        for name, why in missing.items():
            if name not in told:
                history.event("waiting", node=name, why=why, text=f"waiting for {name} to come back")
                told.add(name)
        for name in sorted(told - set(missing)):
            history.event("back", node=name, after_s=round(time.monotonic() - started),
                          text=f"{name} answers again after {time.monotonic() - started:.0f} s")
        told &= set(missing)
        if not missing or stop.is_set() or time.monotonic() - started >= bound_s:
            if missing and not stop.is_set():
                history.event("still away", nodes=sorted(missing),
                              text=f"{', '.join(sorted(missing))} did not come back within {bound_s:.0f} s")
            return sorted(missing)
        stop.wait(POLL_S)


def other_jobs(cluster: Cluster, deployment: Deployment) -> list[str]:
    """Other jobs' containers running on the head: the deployment was replaced, not crashed."""
    try:
        target = connect(cluster.head)
        try:
            listed = target.run(["docker", "ps", "--filter", f"label={containers.LABEL_JOB}", "--format",
                                 f'{{{{.Label "{containers.LABEL_JOB}"}}}}'], check=False, timeout=60)
        finally:
            target.close()
    except DeployError:
        return []
    return sorted({job for job in listed.stdout.split() if job != deployment.job}) if listed.ok else []


def nothing_runs(cluster: Cluster, deployment: Deployment) -> bool:
    looks = jobs.look(launch.job_cluster(cluster, deployment), deployment)
    return not any(seen.container for seen in looks.values())


class Service:
    """One supervisor: the loop over the current deployment, its crash-loop count and history."""

    def __init__(self, cluster: Cluster, options: Options, history: History, *,
                 lockfile: locks.LockFile | None = None, stop: threading.Event | None = None) -> None:
        self.cluster, self.options, self.history, self.lockfile = cluster, options, history, lockfile
        self.stop = stop or threading.Event()
        self.loop = supervise.CrashLoop(limit=options.restarts, window_s=options.restart_window_min * 60)
        self.idle = False

    def run(self) -> None:
        self.history.event("started", cluster=self.cluster.name, options=asdict(self.options),
                           text=f"supervisor started ({self.options.on_failure} on a failure)")
        first = True
        while not self.stop.is_set():
            try:
                self.once(first)
                first = False
            except DeployError as exc:
                self.history.event("error", text=str(exc))
                self.stop.wait(10)
        self.history.event("stopped", text="stopped watching; the deployment keeps serving")

    def once(self, first: bool) -> None:
        deployment = state.current(self.cluster)
        if deployment is None:
            if not self.idle:
                self.history.event("idle", text="nothing is deployed; waiting for a deployment")
                self.idle = True
            self.stop.wait(max(self.options.interval * 5, 5))
            return
        self.idle = False
        nodes = launch.job_cluster(self.cluster, deployment).nodes
        if first:
            self.wait(nodes)
            if nothing_runs(self.cluster, deployment):
                self.relaunch(deployment, time.monotonic(), "nothing of it runs (the head restarted?)")
                return
        self.history.event("watching", job=deployment.job, nodes=list(deployment.nodes),
                           text=f"watching {deployment.job} on {', '.join(deployment.nodes)}")
        failure = supervise.watch(self.cluster, deployment, interval=self.options.interval,
                                  hang_s=self.options.hang_s, stop=self.stop,
                                  good_after_s=self.options.good_after_s,
                                  on_good=self.promoter(deployment))
        if failure is None:
            return
        found = time.monotonic()
        self.history.event("failure", job=deployment.job, kind=failure.kind, what=failure.what,
                           explanation=failure.explanation)
        replaced = other_jobs(self.cluster, deployment)
        if replaced:
            state.record(self.cluster, current=None)
            self.history.event("gave up", job=deployment.job, why=f"{', '.join(replaced)} runs on the head "
                               f"instead (launched from elsewhere): not relaunching {deployment.job}; run "
                               "`invoke supervise --install` again to watch it")
            return
        gone = [node.name for node in nodes if away(node) is not None]
        if gone:
            self.history.event("node down", nodes=gone, text=f"{', '.join(gone)} does not answer: a node "
                               "went away (a reboot?), not a crash of the deployment; it is launched "
                               "again once every node is back")
            self.wait(nodes)
            self.relaunch(deployment, found, f"{', '.join(gone)} came back")
            return
        if self.wait(nodes):
            return   # a node went away after the failure; the next round looks again
        self.handle(deployment, failure, found)

    def wait(self, nodes) -> list[str]:
        return wait_for(nodes, self.history, self.options.node_wait_s, self.stop)

    def promoter(self, deployment: Deployment):
        def promoted() -> None:
            supervise.promote(self.cluster, deployment)()
            self.history.event("promoted", job=deployment.job, text=f"{deployment.job} served healthily "
                               f"for {self.options.good_after_s:.0f} s: recorded as good")
        return promoted

    def relaunch(self, deployment: Deployment, since: float, why: str) -> None:
        """Launch ``deployment`` again as it was (not counted as a crash: nothing of it failed)."""
        with tempfile.TemporaryDirectory(prefix="trtllm-deploy-") as tmp:
            try:
                launch.stop(self.cluster, deployment.job)   # leftovers of it, on any node
                done = launch.launch(self.cluster, deployment, Path(tmp), lockfile=self.lockfile,
                                     report=lambda line: self.history.event("note", text=line))
            except DeployError as exc:
                state.record(self.cluster, current=deployment)   # still what should serve
                wait = self.loop.failed(time.monotonic())
                self.history.event("relaunch failed", job=deployment.job, text=str(exc))
                if wait is None:
                    state.record(self.cluster, current=None)
                    self.history.event("gave up", job=deployment.job,
                                       why=f"launching it again failed: {self.loop.reason()}")
                else:
                    self.stop.wait(wait)
                return
        self.history.event("relaunched", job=done.deployment.job, why=why,
                           after_s=round(time.monotonic() - since, 1),
                           text=f"relaunched {done.deployment.job} after {time.monotonic() - since:.0f} s "
                                f"({why})")

    def handle(self, deployment: Deployment, failure: supervise.Failure, found: float) -> None:
        with tempfile.TemporaryDirectory(prefix="trtllm-deploy-") as tmp:
            handled = supervise.handle(self.cluster, deployment, failure, self.options.on_failure, Path(tmp),
                                       report=lambda line: self.history.event("note", text=str(line)),
                                       loop=self.loop, lockfile=self.lockfile)
        if handled.relaunched is not None:
            job = handled.relaunched.deployment.job
            self.history.event("relaunched", job=job, policy=handled.policy,
                               after_s=round(time.monotonic() - found, 1),
                               text=f"relaunched {job} after {time.monotonic() - found:.0f} s "
                                    f"({handled.policy})")
        else:
            self.history.event("gave up", job=deployment.job, policy=handled.policy, why=handled.gave_up)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trtllm_deploy.serving.service")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="watch the cluster's current deployment until SIGTERM")
    run.add_argument("--hosts", required=True)
    run.add_argument("--lock", default="")
    for key, value in asdict(Options()).items():
        run.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    cluster = inventory.load(args.hosts)
    options = Options(**{key: getattr(args, key) for key in asdict(Options())})
    lockfile = locks.load(args.lock) if args.lock else None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Service(cluster, options, History(history_path(cluster)), lockfile=lockfile, stop=stop).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
