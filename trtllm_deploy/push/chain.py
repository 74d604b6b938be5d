"""An artifact from one store to many nodes, node to node: each node writes what it lacks and passes
every record on to the next one while it is still receiving, so the source's link carries the
artifact once however many nodes there are (a star would carry it once per node).

The source is a folder on this machine or a node's store (the head's, where ``engine.build`` writes);
``agent.py send`` runs there and streams into the first node. Every node runs ``agent.py receive
--listen`` with its control on SSH from this machine: the one-time token, its header (the manifest,
the files it lacks and from where), its port, then where the next node listens, and at the end its
report, after checking its staging against the manifest and swapping it in. A node that fails
mid-chain is left out of a second chain over the nodes still incomplete, which are asked again
what they have and so continue where they stopped.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts import hop
from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.hosts.targets import Target, TargetError
from trtllm_deploy.push import files
from trtllm_deploy.push.channel import BULK_CIPHERS, Channel, token

THIS_MACHINE = "this machine"
ROUTES = ("chain", "star")
ROUNDS = 3  # the first chain, and up to two more around the nodes that failed in it
# A node failing for one of these failed because a stream from upstream stopped (or its bytes
# were bad): asked again, it continues where it stopped. Others (its disk, its lock, its link to
# this machine) are its own and are reported.
AGAIN = ("truncated", "transport", "verify", "forward")


@dataclass(frozen=True)
class Origin:
    """Where the bytes start: ``root/NAME`` on a node (its store) or, with no node, this machine."""

    root: str
    node: Node | None = None

    @property
    def label(self) -> str:
        return self.node.name if self.node else THIS_MACHINE


def records(plans: Sequence[files.ArtifactPlan]) -> list[dict]:
    """What goes into a chain: per file, from the smallest offset any of its nodes needs; files
    no node needs are not sent. Largest first, so that the streams end together (pure)."""
    start: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for planned in plans:
        for step in planned.steps:
            if step.bytes_to_send:
                start[step.path] = min(start.get(step.path, step.size), step.offset)
                sizes[step.path] = step.size
    return sorted(({"path": path, "offset": offset, "length": sizes[path] - offset}
                   for path, offset in start.items()), key=lambda r: (-r["length"], r["path"]))


def needs(planned: files.ArtifactPlan) -> dict[str, int]:
    """The files this node writes, each from where its staging stops (pure)."""
    return {step.path: step.offset for step in planned.steps if step.bytes_to_send}


def groups(names: Sequence[str], route: str) -> list[list[str]]:
    """The chains a route makes of the nodes that need data: one through all, or one per node."""
    if not names:
        return []
    return [list(names)] if route == "chain" else [[name] for name in names]


def describe(origin: str, names: Sequence[str], route: str) -> str:
    """``spark-1 → spark-2 → spark-3``, or a star's ``spark-1 → spark-2, spark-3``."""
    if not names:
        return "nothing to send"
    if route == "chain":
        return " → ".join([origin, *names])
    return f"{origin} → {', '.join(names)}"


@dataclass
class Member:
    """One node of a running chain: its control channel and what it said."""

    node: Node
    target: Target
    scripts: files.Scripts
    planned: files.ArtifactPlan
    channel: Channel | None = None
    port: int = 0
    way: str = ""
    upstream: str = ""  # the node (or "this machine") its bytes came from
    got: int = 0  # bytes it said it received, as it went (a failed receive has no total)
    forward_failed: str | None = None  # this node could not reach the next one
    report: dict | None = None
    error: BaseException | None = None


def _way(up: Node | None, up_here: bool, member: Member, fabric: bool) -> str:
    """How the hop into ``member`` goes: "fabric" (plain TCP to its fabric address: a node to a
    node with one, or any hop when asked for), "loopback" (both ends are this machine), else
    "tunnel" (SSH to the member's loopback)."""
    if fabric or (up is not None and member.node.fabric.address):
        return "fabric"
    if up_here and isinstance(member.target, Local):
        return "loopback"
    return "tunnel"


def _listen(way: str, member: Member) -> str:
    return files.fabric_address(member.node) if way == "fabric" else "127.0.0.1"


def _to(way: str, up: Node | None, member: Member) -> dict:
    """Where the node (or this machine) before ``member`` connects to reach its receiver."""
    if way != "tunnel":
        return {"address": _listen(way, member), "port": member.port}
    if up is not None:  # node to node, with the keys ssh.setup gave every node
        return {"tunnel": hop.tunnel_argv(member.node, 0, member.port), "port": member.port}
    if not isinstance(member.target, SSH):
        raise TargetError(member.node.name, "push reaches a node over SSH or on this machine only")
    *options, where = member.target.openssh_argv()  # this machine: the inventory's own key
    return {"port": member.port, "tunnel": [
        *options, "-o", f"Ciphers={BULK_CIPHERS}", "-N", "-o", "ExitOnForwardFailure=yes",
        "-L", f"127.0.0.1:0:127.0.0.1:{member.port}", where]}


def _secret_then(ch: Channel, secret: bytes, line: dict) -> None:
    os.write(ch.stdin.fd, secret + b"\n")  # the token is never in argv and not counted as data
    ch.write(json.dumps(line, sort_keys=True).encode() + b"\n")


def _read(ch: Channel, key: str, progress: Callable[[int], None] | None,
          said_early: Callable[[dict], None] | None = None) -> tuple[dict, tuple]:
    """An agent's lines to its end: progress lines counted, a forwarding failure passed on at
    once, the last line its report."""
    report: dict = {}
    for raw in ch.proc.stdout:
        try:
            said = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(said, dict):
            continue
        if set(said) == {key}:
            if progress:
                progress(int(said[key]))
        elif set(said) == {"forward_error"}:
            if said_early:
                said_early(said)
        else:
            report = said
    return report, ch.finish(timeout=files.SURVEY_TIMEOUT)


def _stop_waiting(live: list[Member], after: Member | None, why: str) -> None:
    """The node after ``after`` (the first with None) waits for a connection that will not come:
    tell it so, so that it ends now and is asked again in the next round."""
    if after is not None and after not in live:
        return  # it never listened, so it was never anyone's upstream
    index = live.index(after) + 1 if after else 0
    if index < len(live):
        live[index].channel.tell(json.dumps({"stop": why}).encode() + b"\n")  # unless it ended


def run(origin: Origin, source: Target, members: list[Member], wanted: dict, name: str, *,
        streams: int, fabric: bool, progress: Callable[[str, int], None] | None = None,
        forward_timeout: float | None = None) -> dict:
    """One chain, origin → members in order; each member's ``report`` or ``error`` is set, and
    the sender's report is returned."""
    sent = records([m.planned for m in members])
    total = sum(r["length"] for r in sent)
    count = max(1, min(streams, len(sent), total // files.STREAM_BYTES))
    secret = token()
    ups = [origin.node, *(m.node for m in members[:-1])]
    here = [isinstance(source, Local), *(isinstance(m.target, Local) for m in members[:-1])]
    extra = {"forward_timeout": forward_timeout} if forward_timeout else {}
    for index, (m, up, up_here) in enumerate(zip(members, ups, here, strict=True)):
        m.way = _way(up, up_here, m, fabric)
        m.channel = Channel(m.target, m.scripts.command("receive", m.node.paths.artifacts, name,
                                                        _listen(m.way, m)))
        header = {"manifest": wanted, "streams": count, "need": needs(m.planned), "progress": True,
                  "link": [s.path for s in m.planned.steps if s.action == "link"],
                  "forward": index < len(members) - 1, **extra}
        try:
            _secret_then(m.channel, secret, header)
        except OSError:
            pass  # it stopped at once: its report says why
    for m in members:
        said = m.channel.answer()
        m.port = int(said.get("port", 0))
        if "ok" in said:
            m.report = said  # it refused before listening: that line is its report
    # Each node learns where the next one listens; one that did not start is routed around.
    live = [m for m in members if m.port]
    for before, m in zip([None, *live[:-1]], live, strict=True):
        m.upstream = before.node.name if before else origin.label
    for index, m in enumerate(live):
        if m is members[-1]:
            continue  # the last of the chain was told to forward nothing
        after = live[index + 1] if index + 1 < len(live) else None
        # Unless it has stopped already: then its report says why.
        m.channel.tell(json.dumps({"to": _to(after.way, m.node, after) if after else None}).encode()
                       + b"\n")
    sender = None
    answers: dict = {}
    if live:
        sender = Channel(source, files.Scripts(source).ensure().command("send", origin.root, name))
        _secret_then(sender, secret, {"steps": sent, "streams": count, **extra,
                                      "to": _to(live[0].way, origin.node, live[0])})

    def gather(m: Member) -> None:
        def tick(count: int) -> None:
            m.got += count
            if progress:
                progress(m.node.name, count)

        def cut_off(said: dict) -> None:
            m.forward_failed = str(said["forward_error"])
            _stop_waiting(live, m, f"{m.node.name} cannot reach it: {m.forward_failed}")

        try:
            report, (code, out, err) = _read(m.channel, "got", tick, cut_off)
            report = report or m.report or {}
            if code == files.MISSING_SCRIPTS:
                raise TargetError(m.node.name, "the push agent disappeared from the node")
            if "ok" not in report:
                detail = " ".join(err.strip().splitlines()[-2:]) or f"exit status {code}"
                raise TargetError(m.node.name, f"the push agent ended without a report ({detail})")
            m.report = report
        except BaseException as exc:  # noqa: B036 - kept for this node's outcome
            m.error = exc
        if m.error is not None or not m.report.get("ok"):
            # The next node may still wait for this one's connection (a node cut off at the
            # start passes nothing on): it need not wait out its timeout.
            _stop_waiting(live, m, f"{m.node.name} stopped: {m.error or m.report.get('error')}")

    def gather_sender() -> None:
        try:
            answers["report"], (code, _, err) = _read(sender, "sent", None)
            if "ok" not in answers["report"]:
                detail = " ".join(err.strip().splitlines()[-2:]) or f"exit status {code}"
                answers["report"] = {"ok": False, "error": f"it ended without a report ({detail})"}
        except BaseException as exc:  # noqa: B036 - the members' reports say what it did
            answers["error"] = exc
        if not answers.get("report", {}).get("ok"):
            why = answers.get("report", {}).get("error") or answers.get("error")
            _stop_waiting(live, None, f"the sender on {origin.label} stopped: {why}")

    threads = [threading.Thread(target=gather, args=(m,), daemon=True) for m in members]
    if sender:
        threads.append(threading.Thread(target=gather_sender, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()  # Ctrl-C here: the caller stops every channel
    if "error" in answers and not any(m.report and m.report.get("ok") for m in members):
        for m in members:
            m.error = m.error or answers["error"]
    said = answers.get("report", {})
    if sender and not said.get("ok"):
        # A node cut off at the start says only that nothing came: the sender says why.
        why = said.get("error") or answers.get("error")
        for m in members:
            if m.report and not m.report.get("ok"):
                m.report["error"] = f"{m.report.get('error')} (the sender on {origin.label}: {why})"
    return said


def _run_or_fail(origin: Origin, source: Target, members: list[Member], *args, **kwargs) -> None:
    """:func:`run` in a thread of its own: what stops it is every unfinished member's error."""
    try:
        run(origin, source, members, *args, **kwargs)
    except BaseException as exc:  # noqa: B036 - reported per node; Ctrl-C reaches the main thread
        for m in members:
            if m.report is None and m.error is None:
                m.error = exc


def _failure(node: Node, name: str, report: dict) -> CheckFailed:
    if report.get("kind") == "full":
        return CheckFailed(f"{node.name}: the disk under {node.paths.artifacts} filled up while "
                           f"receiving {name}: {report.get('error')}. What was received is kept "
                           "for resuming; free some space and push again")
    problems = report.get("verify", {}).get("problems", [])[:3]
    return CheckFailed(f"{node.name}: {name} was not made current: {report.get('error')}"
                       + (f" {problems}" if problems else "")
                       + ("; what arrived is kept on the node: push again to send only the rest"
                          if report.get("kind") in AGAIN else ""))


@dataclass
class _Tally:
    """One node's account over the rounds it took part in."""

    sent: int = 0
    files: int = 0
    rounds: int = 0
    resumed: bool = False
    exists: bool = False


def push(origin: Origin, source: Target, wanted: dict, name: str,
         plans: Sequence[tuple[Node, files.ArtifactPlan]], *, reach: Callable[[Node], Target],
         route: str = "chain", streams: int = files.STREAMS, fabric: bool = False,
         progress: Callable[[str, int], None] | None = None, rounds: int = ROUNDS,
         forward_timeout: float | None = None) -> dict[str, tuple | BaseException]:
    """Every node's plan applied from ``origin`` along the route, routing around nodes that fail;
    per node ``(ArtifactSent, received_from)`` or the error it failed with."""
    started = time.monotonic()
    outcome: dict[str, tuple | BaseException] = {}
    tally = {node.name: _Tally() for node, _ in plans}
    pending: list[tuple[Node, files.ArtifactPlan | None]] = []
    for node, planned in plans:
        if planned.up_to_date:
            outcome[node.name] = (files.ArtifactSent(name, "up to date", 0, planned.total_bytes, 0,
                                                     time.monotonic() - started), None)
        else:
            pending.append((node, planned))
    for round_ in range(1, rounds + 1):
        if not pending:
            break
        chains = groups([node.name for node, _ in pending], route)
        members: dict[str, Member] = {}
        opened: list[Target] = []
        try:
            for node, planned in pending:
                target = reach(node)
                opened.append(target)
                try:
                    scripts, planned = ((files.Scripts(target), planned) if planned else
                                        files.look(node, target, name, wanted))
                except BaseException as exc:  # noqa: B036 - this node is out of the next chain
                    outcome[node.name] = exc
                    continue
                if planned.up_to_date:
                    outcome[node.name] = (files.ArtifactSent(name, "up to date", 0, planned.total_bytes,
                                                             0, time.monotonic() - started), None)
                elif not planned.fits:
                    outcome[node.name] = files.no_room(node, planned)
                else:
                    members[node.name] = Member(node, target, scripts, planned)
                    tally[node.name].resumed |= (planned.count("resume") + planned.count("staged")) > 0
                    tally[node.name].exists |= planned.exists
            runs = [[members[n] for n in chain if n in members] for chain in chains]
            workers = [threading.Thread(target=_run_or_fail, daemon=True, args=(origin, source, chain,
                                        wanted, name), kwargs={"streams": streams, "fabric": fabric,
                                                               "progress": progress,
                                                               "forward_timeout": forward_timeout})
                       for chain in runs if chain]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        finally:
            for target in opened:
                target.close()
        pending = []
        if any(m.forward_failed for chain in runs for m in chain):
            route = "star"  # some node cannot reach the next: the rest straight from the source
        for chain in runs:
            for m in chain:
                count = tally[m.node.name]
                count.rounds += 1
                report = m.report or {}
                count.sent += int(report.get("received", m.got))
                count.files += int(report.get("written", 0))
                if m.error is not None:
                    outcome[m.node.name] = m.error
                elif report.get("ok"):
                    action = ("resumed" if count.resumed else "updated" if count.exists else "sent")
                    outcome[m.node.name] = (files.ArtifactSent(
                        name, action, count.sent, max(0, m.planned.total_bytes - m.planned.send_bytes),
                        count.files, time.monotonic() - started, bool(report.get("atomic")),
                        count.rounds, float(report.get("verify", {}).get("seconds", 0.0)),
                        int(report.get("streams", 1))), m.upstream)
                elif report.get("kind") in AGAIN and round_ < rounds:
                    pending.append((m.node, None))  # asked again: it continues where it stopped
                else:
                    outcome[m.node.name] = _failure(m.node, name, report)
    return outcome

