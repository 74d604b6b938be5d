"""An artifact to one node: ask the node what it has, plan the difference, send only that.

The node answers with ``agent.py survey`` (per file: good in the current version, good or partly
received in staging); :func:`plan` turns the answer into steps; :func:`send` streams the missing
bytes into ``agent.py receive``, which verifies staging against the manifest on the node and then
makes it the current version in one rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trtllm_deploy import console
from trtllm_deploy.artifact import manifest, verify
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.scripts import run as run_step
from trtllm_deploy.hosts.targets import Target, TargetError, Unreachable, expand
from trtllm_deploy.push import agent
from trtllm_deploy.push.channel import Channel, Meter, Sink, token
from trtllm_deploy.push.reports import reason_in, report_in

SURVEY_TIMEOUT = 3600.0  # a cold check of a large artifact already on the node hashes all of it
MISSING_SCRIPTS = 3
# $1 the node's manifest.py, $2 its agent.py, $3 the agent's verb, then the verb's arguments. Exits
# MISSING_SCRIPTS while either is not on the node yet (the first push there, or a new version).
RUN_AGENT = Script("run the push agent", f'test -f "$1" && test -f "$2" || exit {MISSING_SCRIPTS}\n'
                   'm=$1; a=$2; v=$3; shift 3; exec python3 "$a" "$v" "$m" "$@"', timeout=SURVEY_TIMEOUT)
BLOCK_SLACK = 4096  # a file's last block, per file, when estimating the space it takes
# Streams per node at once: each is an SSH connection (a core to encrypt here, one to decrypt there)
# or a fabric connection, and a receiving process or thread that writes and hashes its files.
STREAMS = 4
# A stream more is opened for at least this much to send: connecting costs about what sending it does.
STREAM_BYTES = 16 << 20


@dataclass(frozen=True)
class FileStep:
    """What happens to one file of the artifact on one node."""

    path: str
    size: int
    action: str  # "staged" (received earlier) | "link" (same in the current version) | "resume" | "send"
    offset: int = 0

    @property
    def bytes_to_send(self) -> int:
        return self.size - self.offset if self.action in ("resume", "send") else 0


@dataclass(frozen=True)
class ArtifactPlan:
    """One node's difference from the wanted artifact, before anything is sent."""

    node: str
    name: str
    up_to_date: bool
    exists: bool
    free: int
    steps: tuple[FileStep, ...]

    @property
    def send_bytes(self) -> int:
        return sum(step.bytes_to_send for step in self.steps)

    @property
    def total_bytes(self) -> int:
        return sum(step.size for step in self.steps)

    @property
    def needed(self) -> int:
        """Free space the transfer takes: linked files share blocks with the current version."""
        sending = [step for step in self.steps if step.bytes_to_send]
        return self.send_bytes + BLOCK_SLACK * len(sending)

    @property
    def fits(self) -> bool:
        return self.up_to_date or self.needed <= self.free

    def count(self, action: str) -> int:
        return sum(1 for step in self.steps if step.action == action)

    def describe(self) -> str:
        if self.up_to_date:
            return "up to date"
        parts = [f"{verb} {self.count(action)}" for action, verb in (
            ("send", "send"), ("resume", "resume"), ("link", "keep"), ("staged", "already staged"))
            if self.count(action)]
        return f"{', '.join(parts)} file(s): {console.size(self.send_bytes)} to send"

    def as_json(self) -> dict:
        return {"up_to_date": self.up_to_date, "exists": self.exists, "free": self.free,
                "send_bytes": self.send_bytes, "total_bytes": self.total_bytes,
                "files": {step.path: {"action": step.action, "offset": step.offset,
                                      "size": step.size} for step in self.steps}}


@dataclass(frozen=True)
class ArtifactSent:
    """What pushing the artifact to one node did."""

    name: str
    action: str  # "up to date" | "sent" | "resumed" | "repaired"
    bytes_sent: int
    bytes_skipped: int
    files_sent: int
    seconds: float
    atomic: bool = True
    attempts: int = 1
    verify_seconds: float = 0.0  # the node checking staging against the manifest, before the swap
    streams: int = 0  # connections the last attempt used

    def as_json(self) -> dict:
        return {"name": self.name, "action": self.action, "bytes_sent": self.bytes_sent,
                "bytes_skipped": self.bytes_skipped, "files_sent": self.files_sent,
                "seconds": round(self.seconds, 3), "atomic": self.atomic, "attempts": self.attempts,
                "verify_seconds": round(self.verify_seconds, 3), "streams": self.streams}


def plan(node: str, name: str, wanted: dict, survey: dict) -> ArtifactPlan:
    """The node's survey → what to do with each file (pure: tested table-driven)."""
    steps = []
    for path, entry in sorted(wanted["files"].items()):
        seen = survey["files"].get(path, {})
        if seen.get("staged"):
            step = FileStep(path, entry["size"], "staged")
        elif seen.get("current"):
            step = FileStep(path, entry["size"], "link")
        elif 0 < seen.get("partial", 0) < entry["size"]:
            step = FileStep(path, entry["size"], "resume", seen["partial"])
        else:
            step = FileStep(path, entry["size"], "send")
        steps.append(step)
    return ArtifactPlan(node, name, bool(survey.get("up_to_date")), bool(survey.get("exists")),
                        int(survey.get("free", 0)), tuple(steps))


def _shipped(local: Path, stem: str) -> str:
    digest = hashlib.sha256(local.read_bytes()).hexdigest()[:16]
    return f"{stem}-{digest}.py"


class Scripts:
    """The node's copies of manifest.py and agent.py, named by content: sent only when changed."""

    def __init__(self, target: Target):
        self.target = target
        self.directory = expand(verify.STAGING, target.home())  # beside the manifest checker
        self.local = {"manifest": Path(manifest.__file__), "agent": Path(agent.__file__)}
        self.remote = {key: posixpath.join(self.directory, _shipped(path, f"push-{key}"))
                       for key, path in self.local.items()}

    def args(self, verb: str, artifacts: str, name: str, listen: str | None = None) -> list[str]:
        """RUN_AGENT's arguments for one verb (survey, receive or part)."""
        return [self.remote["manifest"], self.remote["agent"], verb, artifacts, name,
                *(["--listen", listen] if listen else [])]

    def command(self, verb: str, artifacts: str, name: str, listen: str | None = None) -> list[str]:
        """The agent's command line, for a channel that streams into it."""
        return RUN_AGENT.argv(self.args(verb, artifacts, name, listen))

    def ensure(self) -> Scripts:
        """Both on the target, sent if not (for a command that is not asked through :func:`ask`)."""
        found = self.target.run(["test", "-f", self.remote["manifest"], "-a", "-f", self.remote["agent"]],
                                timeout=60, check=False)
        if not found.ok:
            self.send()
        return self

    def send(self) -> None:
        self.target.run(["mkdir", "-p", "-m", "700", self.directory], timeout=60)
        for key, path in self.local.items():
            self.target.put(path, self.remote[key])


def _agent_answer(target: Target, code: int, out: str, err: str) -> dict:
    try:
        answer = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        detail = " ".join((err or out).strip().splitlines()[-3:])
        raise TargetError(target.name, f"the push agent exited with {code} and no report: "
                          f"{detail or 'no output'}") from None
    return answer


def ask(node: Node, target: Target, scripts: Scripts, verb: str, root: str, name: str,
        stdin: str | None = None) -> dict:
    """The agent's answer to one question (``survey``, ``manifest``), sending it first if the node
    lacks this version of it; a refusal is the node's CheckFailed."""
    args = scripts.args(verb, root, name)
    done = run_step(target, RUN_AGENT, *args, stdin=stdin, check=False)
    if done.exit_code == MISSING_SCRIPTS:
        scripts.send()
        done = run_step(target, RUN_AGENT, *args, stdin=stdin, check=False)
    answer = _agent_answer(target, done.exit_code, done.stdout, done.stderr)
    if not answer.get("ok"):
        raise CheckFailed(f"{node.name}: {answer.get('error')}")
    return answer


def survey(node: Node, target: Target, scripts: Scripts, name: str, wanted_text: str) -> dict:
    """The node's answer to "what do you have of this artifact?" (changes nothing there)."""
    return ask(node, target, scripts, "survey", node.paths.artifacts, name, wanted_text)


def look(node: Node, target: Target, name: str, wanted: dict) -> tuple[Scripts, ArtifactPlan]:
    scripts = Scripts(target)
    return scripts, plan(node.name, name, wanted, survey(node, target, scripts, name,
                                                         manifest.dumps(wanted)))


def no_room(node: Node, planned: ArtifactPlan) -> CheckFailed:
    return CheckFailed(
        f"{node.name}: not enough free space for {planned.name} in {node.paths.artifacts}: "
        f"{console.size(planned.needed)} needed, {console.size(planned.free)} free. Free some space "
        "there, or point paths.artifacts in hosts.toml at a larger disk; nothing was sent")


def fabric_address(node: Node) -> str:
    """Where the fast transport reaches the node: its fabric address, else its SSH address."""
    return node.fabric.address or node.host


def _streams(sinks: list[Sink], steps: list[FileStep], local: Path, ends: list[bool]) -> None:
    """Every step sent over one of the sinks, each sink taking the next file when it is free
    (largest first, so that the streams end together); a sink whose ``ends`` is true gets its end
    record. The first failure stops the other streams after their current file and is raised."""
    pending = iter(steps)
    lock = threading.Lock()
    failures: list[BaseException] = []

    def stream(sink: Sink, end: bool) -> None:
        try:
            while not failures:
                with lock:
                    step = next(pending, None)
                if step is None:
                    break
                record = {"path": step.path, "offset": step.offset, "length": step.bytes_to_send}
                sink.write(json.dumps(record).encode() + b"\n")
                sink.send_file(local / step.path, step.offset, step.bytes_to_send)
            if end and not failures:
                sink.write(b'{"end": true}\n')
        except BaseException as exc:  # noqa: B036 - raised in the caller's thread below
            failures.append(exc)

    threads = [threading.Thread(target=stream, args=pair, daemon=True)
               for pair in zip(sinks, ends, strict=True)]
    for thread in threads[1:]:
        thread.start()
    stream(sinks[0], ends[0])  # the first stream in this thread: Ctrl-C reaches it here
    for thread in threads[1:]:
        thread.join()
    if failures:
        raise failures[0]


def _part_report(part: Channel) -> dict:
    """An extra SSH stream's report, or what to say about one that ended without it."""
    try:
        return _agent_answer(part.target, *part.finish(timeout=SURVEY_TIMEOUT))
    except TargetError as exc:
        # The node may have said why before its SSH channel went down (ssh exits 255 when the
        # connection drops as the part exits): its report, where it came, is the reason.
        said = report_in(part.output[1]) if part.output else None
        return said or {"ok": False, "kind": "truncated", "error": f"a stream of the push stopped: {exc}"}


def transfer(node: Node, target: Target, scripts: Scripts, planned: ArtifactPlan, local: Path,
             wanted: dict, progress: Callable[[int], None] | None, fabric: bool = False,
             streams: int = STREAMS) -> dict:
    """Stream what the plan says into the node's receiver, over up to ``streams`` connections at
    once (each an SSH connection, or each a fabric connection); the receiver's report."""
    listen = fabric_address(node) if fabric else None
    steps = sorted((step for step in planned.steps if step.bytes_to_send),
                   key=lambda step: (-step.bytes_to_send, step.path))
    count = max(1, min(streams, len(steps), planned.send_bytes // STREAM_BYTES))
    header = {"manifest": wanted, "link": [s.path for s in planned.steps if s.action == "link"],
              "streams": count}
    meter = Meter(progress)
    control = Channel(target, scripts.command("receive", node.paths.artifacts, planned.name, listen),
                      meter=meter)
    parts: list[Channel] = []
    ready: dict = {}
    reports: list[dict] | None = None  # the parts' reports, once gathered
    try:
        # The other SSH streams connect while the receive prepares staging; each is told the
        # manifest (and so starts writing) only once the receive says it holds the node's lock.
        for _ in range(0 if listen else count - 1):
            parts.append(Channel(target, scripts.command("part", node.paths.artifacts, planned.name),
                                 meter=meter))
        secret = token() if listen else b""
        if listen:
            os.write(control.stdin.fd, secret + b"\n")  # before the header; not counted as data
        control.write(json.dumps(header, sort_keys=True).encode() + b"\n")
        ready = control.answer()
        if listen and "port" in ready:
            sinks = [control.connect(listen, ready["port"], secret) for _ in range(count)]
            _streams(sinks, steps, local, [True] * count)
        elif ready.get("ready"):
            for part in parts:
                part.write(json.dumps({"manifest": wanted}, sort_keys=True).encode() + b"\n")
            _streams([control.stdin, *(part.stdin for part in parts)], steps, local,
                     [False] + [True] * len(parts))
            reports = [_part_report(part) for part in parts]
            control.write(json.dumps({"end": True, "parts": reports}).encode() + b"\n")
        else:
            for part in parts:
                part.kill()  # the receive refused before it was ready: its report says why
    except (BrokenPipeError, ConnectionResetError):
        # A stream's receiving side stopped reading (a full disk, say) and said why in its report;
        # the other streams stopped after their current file. The receive is told every part's
        # report, so the reason reaches it whichever stream failed first; where the receive itself
        # stopped, its own report says why and this end record has no reader.
        if parts and ready.get("ready") and reports is None:
            reports = [_part_report(part) for part in parts]
            try:
                control.write(json.dumps({"end": True, "parts": reports}).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
        for part in parts:
            part.kill()
    except BaseException:
        for part in parts:
            part.kill()
        control.kill()
        raise
    # After the last byte the node hashes what it received (and what it linked) before answering.
    try:
        code, out, err = control.finish(timeout=SURVEY_TIMEOUT)
    except Unreachable:
        # The connection went down as the receive exited: what it said before, or a part's
        # reason, still says why; without either, the link is the reason.
        if control.output is None or not (report_in(control.output[1]) or reason_in(reports)):
            raise
        code, out, err = control.output
    if code == MISSING_SCRIPTS:
        raise TargetError(node.name, "the push agent disappeared from the node during the push")
    out = f"{json.dumps(ready)}\n{out}" if "ok" in ready else out  # a refusal, read as "ready"
    last = (out.strip().splitlines() or [""])[-1]  # after "ready" or "port", the report
    said = report_in(out)
    if said is None or said.get("kind") == "truncated":
        # The receive ended without the end record that carries the parts' reports (or with its
        # own stream cut): a part that said why it stopped (its disk filled up) is the reason.
        reason = reason_in(reports)
        if reason is not None:
            return reason | {"sent": meter.sent}
    if '"ok"' not in last or '"kind": "truncated"' in last:
        detail = " ".join(err.strip().splitlines()[-2:]) or f"exit status {code}"
        raise TargetError(node.name, f"the transfer of {planned.name} stopped after "
                          f"{console.size(meter.sent)} of {console.size(planned.send_bytes)} ({detail}); "
                          "what arrived is kept on the node: push again to send only the rest")
    answer = _agent_answer(target, code, out, err)
    answer["sent"] = meter.sent
    return answer


def push(node: Node, target: Target, name: str, local: Path, wanted: dict,
         first: tuple[Scripts, ArtifactPlan] | None = None,
         progress: Callable[[int], None] | None = None, attempts: int = 2,
         fabric: bool = False, streams: int = STREAMS) -> ArtifactSent:
    """Make the node's ``paths.artifacts/name`` the artifact under ``local``, sending only what it
    lacks. A file that fails verification on the node is sent again, once."""
    started = time.monotonic()
    scripts, planned = first or look(node, target, name, wanted)
    if planned.up_to_date:
        return ArtifactSent(name, "up to date", 0, planned.total_bytes, 0, time.monotonic() - started)
    resumed = planned.count("resume") + planned.count("staged") > 0
    sent = files = 0
    for attempt in range(1, attempts + 1):
        if not planned.fits:
            raise no_room(node, planned)
        files += sum(1 for step in planned.steps if step.bytes_to_send)
        answer = transfer(node, target, scripts, planned, local, wanted, progress, fabric, streams)
        sent += answer["sent"]
        if answer.get("ok"):
            action = "resumed" if resumed else "updated" if planned.exists else "sent"
            return ArtifactSent(name, action, sent, max(0, planned.total_bytes - sent), files,
                                time.monotonic() - started, bool(answer.get("atomic")), attempt,
                                float(answer.get("verify", {}).get("seconds", 0.0)),
                                int(answer.get("streams", 1)))
        if answer.get("kind") == "full":
            raise CheckFailed(f"{node.name}: the disk under {node.paths.artifacts} filled up while "
                              f"receiving {name}: {answer.get('error')}. What was received is kept "
                              "for resuming; free some space and push again")
        if answer.get("kind") != "verify" or attempt == attempts:
            problems = answer.get("verify", {}).get("problems", [])[:3]
            raise CheckFailed(f"{node.name}: {name} was not made current: {answer.get('error')}"
                              + (f" {problems}" if problems else ""))
        scripts, planned = look(node, target, name, wanted)
    raise AssertionError("unreachable")
