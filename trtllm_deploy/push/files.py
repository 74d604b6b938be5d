"""An artifact to one node: ask the node what it has, plan the difference, send only that.

The node answers with ``agent.py survey`` (per file: good in the current version, good or partly
received in staging); :func:`plan` turns the answer into steps; :func:`send` streams the missing
bytes into ``agent.py receive``, which verifies staging against the manifest on the node and then
makes it the current version in one rename.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trtllm_deploy import console, manifest
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.inventory import Node
from trtllm_deploy.push import agent
from trtllm_deploy.push.channel import Channel
from trtllm_deploy.targets import Target, TargetError, expand

SCRIPTS = "~/.cache/trtllm-deploy"  # the account's private directory, as engines.py uses
SURVEY_TIMEOUT = 3600.0  # a cold check of a large artifact already on the node hashes all of it
MISSING_SCRIPTS = 3
BLOCK_SLACK = 4096  # a file's last block, per file, when estimating the space it takes


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

    def as_json(self) -> dict:
        return {"name": self.name, "action": self.action, "bytes_sent": self.bytes_sent,
                "bytes_skipped": self.bytes_skipped, "files_sent": self.files_sent,
                "seconds": round(self.seconds, 3), "atomic": self.atomic, "attempts": self.attempts,
                "verify_seconds": round(self.verify_seconds, 3)}


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
        self.directory = expand(SCRIPTS, target.home())
        self.local = {"manifest": Path(manifest.__file__), "agent": Path(agent.__file__)}
        self.remote = {key: posixpath.join(self.directory, _shipped(path, f"push-{key}"))
                       for key, path in self.local.items()}

    def command(self, verb: str, artifacts: str, name: str, listen: str | None = None) -> list[str]:
        """The agent's command line; exits MISSING_SCRIPTS when a script is not there yet."""
        return ["sh", "-c", f'test -f "$1" && test -f "$2" || exit {MISSING_SCRIPTS}; '
                'm=$1; a=$2; v=$3; shift 3; exec python3 "$a" "$v" "$m" "$@"', "sh",
                self.remote["manifest"], self.remote["agent"], verb, artifacts, name,
                *(["--listen", listen] if listen else [])]

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


def survey(node: Node, target: Target, scripts: Scripts, name: str, wanted_text: str) -> dict:
    """The node's answer to "what do you have of this artifact?" (changes nothing there)."""
    argv = scripts.command("survey", node.paths.artifacts, name)
    done = target.run(argv, stdin=wanted_text, timeout=SURVEY_TIMEOUT, check=False)
    if done.exit_code == MISSING_SCRIPTS:
        scripts.send()
        done = target.run(argv, stdin=wanted_text, timeout=SURVEY_TIMEOUT, check=False)
    answer = _agent_answer(target, done.exit_code, done.stdout, done.stderr)
    if not answer.get("ok"):
        raise CheckFailed(f"{node.name}: {answer.get('error')}")
    return answer


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


def transfer(node: Node, target: Target, scripts: Scripts, planned: ArtifactPlan, local: Path,
             wanted: dict, progress: Callable[[int], None] | None, fabric: bool = False) -> dict:
    """Stream what the plan says into the node's receiver; the receiver's report."""
    listen = fabric_address(node) if fabric else None
    argv = scripts.command("receive", node.paths.artifacts, planned.name, listen)
    header = {"manifest": wanted, "link": [s.path for s in planned.steps if s.action == "link"]}
    channel = Channel(target, argv, progress, fabric=listen)
    try:
        channel.write(json.dumps(header, sort_keys=True).encode() + b"\n")
        for step in planned.steps:
            if not step.bytes_to_send:
                continue
            record = {"path": step.path, "offset": step.offset, "length": step.bytes_to_send}
            channel.write(json.dumps(record).encode() + b"\n")
            channel.send_file(local / step.path, step.offset, step.bytes_to_send)
        channel.write(b'{"end": true}\n')
    except (BrokenPipeError, ConnectionResetError):
        pass  # the receiver stopped reading: its report says why
    except BaseException:
        channel.kill()
        raise
    # After the last byte the node hashes what it received (and what it linked) before answering.
    code, out, err = channel.finish(timeout=SURVEY_TIMEOUT)
    if code == MISSING_SCRIPTS:
        raise TargetError(node.name, "the push agent disappeared from the node during the push")
    if not out.strip():
        detail = " ".join(err.strip().splitlines()[-2:]) or f"exit status {code}"
        raise TargetError(node.name, f"the transfer of {planned.name} stopped after "
                          f"{console.size(channel.sent)} of {console.size(planned.send_bytes)} ({detail}); "
                          "what arrived is kept on the node: push again to send only the rest")
    answer = _agent_answer(target, code, out, err)
    answer["sent"] = channel.sent
    return answer


def push(node: Node, target: Target, name: str, local: Path, wanted: dict,
         first: tuple[Scripts, ArtifactPlan] | None = None,
         progress: Callable[[int], None] | None = None, attempts: int = 2,
         fabric: bool = False) -> ArtifactSent:
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
        answer = transfer(node, target, scripts, planned, local, wanted, progress, fabric)
        sent += answer["sent"]
        if answer.get("ok"):
            action = "resumed" if resumed else "updated" if planned.exists else "sent"
            return ArtifactSent(name, action, sent, max(0, planned.total_bytes - sent), files,
                                time.monotonic() - started, bool(answer.get("atomic")), attempt,
                                float(answer.get("verify", {}).get("seconds", 0.0)))
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
