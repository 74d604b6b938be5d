"""``invoke image``: the lock's image built on the build node, labelled; ``image.verify``: every
node's image checked against the lock.

Look first (:mod:`.plan`: the nodes' architectures, cores, memory and GPUs; an image already
carrying this lock's hash), let the lock's kind decide what to run (:mod:`.make` from source,
:mod:`.release`, :mod:`.wheel`), then run it detached on the build node with the whole log in a
file, following it for a progress bar, and explain a failure from the log.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass

from trtllm_deploy.errors import CheckFailed, DeployError
from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.shell import join
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import Target, expand
from trtllm_deploy.source import buildlog, digest, make, release, wheel
from trtllm_deploy.source.lock import LockFile
from trtllm_deploy.source.plan import (LABEL_ARCHS, LABEL_KIND, LABEL_LOCK, BuildPlan, image_ref,
                                       labels_on)

# $1 the log file, $2 the build's command line. The build runs in its own session, so losing the
# SSH connection does not stop it and stopping its process group stops all of it; its exit status
# lands next to the log.
START_BUILD = Script("start the image build", 'setsid sh -c \'sh -c "$1" >"$2" 2>&1; echo $? >"$2.rc"\' '
                     'build "$2" "$1" </dev/null >/dev/null 2>&1 & echo $!')
# $1 the first byte not read yet (1-based), $2 the log file. The dot after the log keeps its last
# line break (a section's text ends without one), so the bytes read are counted exactly.
READ_LOG = Script("read the image build's log",
                  'mark log; tail -c +"$1" "$2" 2>/dev/null; printf .; mark rc; cat "$2.rc" 2>/dev/null || :',
                  timeout=120)
RECORD_BUILD = Script("record what the image build cost", 'printf "%s\\n" "$1" > "$2"')
READ_RECORDS = Script("read the image builds' records",
                      'cat $(ls -t "$1"/image-*.log.json 2>/dev/null) 2>/dev/null || :')


def plan(cluster: Cluster, lockfile: LockFile, tree: str = "", cuda_archs: str | None = None,
         jobs: int | None = None, ccache: bool = False,
         reach: Callable[[Node], Target] = connect) -> BuildPlan:
    """Every check that can refuse the build, before anything is built: the lock's kind decides."""
    kind = lockfile.lock.build.kind
    if kind == "release":
        return release.plan(cluster, lockfile, reach)
    if kind == "wheel":
        return wheel.plan(cluster, lockfile, reach)
    return make.plan(cluster, lockfile, tree, cuda_archs, jobs, ccache, reach)


# --- building ----------------------------------------------------------------------------------

@dataclass
class BuildResult:
    image: str
    image_id: str
    seconds: float
    log: str            # the log file on the build node


Progress = Callable[[buildlog.Progress], None]


def last_source_build(target: Target, log_dir: str) -> dict | None:
    """The newest finished source build recorded on the build node (seconds, jobs), if any."""
    found = scripts.run(target, READ_RECORDS, expand(log_dir, target.home()), check=False)
    for line in found.stdout.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "source" and record.get("seconds"):
            return record
    return None


def build(cluster: Cluster, build_plan: BuildPlan, log_dir: str, progress: Progress | None = None,
          poll_s: float = 1.0, reach: Callable[[Node], Target] = connect) -> BuildResult:
    """Run the build detached on the build node (an SSH hiccup does not kill it), follow its log,
    and stop it on Ctrl-C. A failure is explained from the log."""
    target = reach(cluster.build_node)
    started = time.monotonic()
    try:
        directory = expand(log_dir, target.home())
        stamp = time.strftime("%Y%m%d-%H%M%S")
        log = posixpath.join(directory, f"image-{stamp}-{build_plan.lock_hash[:12]}.log")
        steps = " && ".join(join(argv) for argv in build_plan.commands)
        target.run(["mkdir", "-p", directory], timeout=60)
        for local, remote in build_plan.upload:
            target.run(["rm", "-rf", remote], timeout=60)
            target.put(local, remote)
        pid = scripts.run(target, START_BUILD, log, steps).stdout.strip()
        try:
            code = _follow(target, log, progress, poll_s)
        except BaseException:
            target.run(["kill", "-TERM", "--", f"-{pid}"], check=False, timeout=30)
            raise
        if code != 0:
            text = target.run(["cat", log], check=False, timeout=300).stdout
            raise CheckFailed(explain(text, code, log, cluster.build_node.name))
        image_id, _, labels_json = target.run(
            ["docker", "image", "inspect", "--format", "{{.Id}} {{json .Config.Labels}}",
             build_plan.image], timeout=60).stdout.strip().partition(" ")
        got = json.loads(labels_json or "null") or {}
        wrong = {k: v for k, v in build_plan.labels.items() if got.get(k) != v}
        if wrong:
            raise DeployError(f"the build finished but {build_plan.image} lacks the labels "
                              f"{sorted(wrong)}: does the Makefile pass DOCKER_BUILD_OPTS to "
                              "docker build?")
        seconds = time.monotonic() - started
        # What this build cost, for source.advise's time estimate of the next one.
        record = json.dumps({"image": build_plan.image, "kind": build_plan.labels.get(LABEL_KIND),
                             "jobs": build_plan.jobs, "seconds": round(seconds, 1),
                             "lock_hash": build_plan.lock_hash})
        scripts.run(target, RECORD_BUILD, record, f"{log}.json", check=False)
        return BuildResult(build_plan.image, image_id, seconds, log)
    finally:
        target.close()


def _follow(target: Target, log: str, progress: Progress | None, poll_s: float) -> int:
    tracker = buildlog.StageTracker()
    offset, pending = 1, ""
    while True:
        read = scripts.run(target, READ_LOG, offset, log, check=False)
        body = read.sections.get("log", ".")[:-1]
        offset += len(body.encode())
        lines = (pending + body).split("\n")
        pending = lines.pop()
        for line in lines:
            step = tracker.feed(line)
            if step and progress:
                progress(step)
        rc = read.sections.get("rc", "").strip()
        if rc:
            return int(rc)
        time.sleep(poll_s)


def explain(text: str, code: int, log: str, node: str) -> str:
    failure = buildlog.classify(text)
    if failure is None:
        tail = "\n".join(f"    {line}" for line in text.strip().splitlines()[-15:])
        return f"the image build failed on {node} (exit {code}); the whole log: {log}\n{tail}"
    evidence = "\n".join(f"    {line}" for line in failure.evidence)
    return (f"the image build failed on {node}: {failure.title} ({failure.kind}); the whole log: "
            f"{log}\n  the lines that show it:\n{evidence}\n  what to do: {failure.remedy}")


# --- verifying ---------------------------------------------------------------------------------

@dataclass
class Verdict:
    node: str
    image: str
    ok: bool
    detail: str


def verify(cluster: Cluster, lockfile: LockFile, nodes=None,
           reach: Callable[[Node], Target] = connect) -> list[Verdict]:
    """Every node's image against the lock: present, and labelled with this lock's hash and commit;
    then every image the lock names by digest (:mod:`.digest`): that digest on each node, or the
    same image ID as a node that has it, else drift."""
    image = image_ref(lockfile)
    expected = {LABEL_LOCK: lockfile.hash}
    if lockfile.lock.build.kind == "source":
        expected["org.opencontainers.image.revision"] = lockfile.lock.source.commit

    def check(node: Node, target: Target) -> Verdict:
        got = labels_on(target, image)
        if got is None:
            return Verdict(node.name, image, False, "missing: build it (invoke image) and push it")
        wrong = [f"{key}={got.get(key)!r} (lock: {value[:12]})" for key, value in expected.items()
                 if got.get(key) != value]
        if wrong:
            return Verdict(node.name, image, False, "differs from the lock: " + "; ".join(wrong))
        revision = got.get("org.opencontainers.image.revision") or "unknown"
        return Verdict(node.name, image, True, f"{got.get(LABEL_KIND)}: commit {revision[:12]}, "
                       f"CUDA_ARCHS {got.get(LABEL_ARCHS) or 'the release default'}")

    chosen = list(nodes or cluster.nodes)
    results = fan_out(chosen, check, reach=reach)
    verdicts = [outcome.value if outcome.ok else Verdict(outcome.node.name, image, False, outcome.reason)
                for outcome in results]
    for pin in digest.pins(lockfile):
        verdicts += [Verdict(seen.node, pin.reference, seen.ok, f"{pin.what}: {seen.state}: {seen.detail}")
                     for seen in digest.look(chosen, pin, reach)]
    return verdicts
