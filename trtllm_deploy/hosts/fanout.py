"""Runs one piece of work on many nodes at once and keeps every node's outcome.

One node's failure never hides another's result; the summary names each failed node and why.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from trtllm_deploy.errors import CheckFailed, DeployError
from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import Target
from trtllm_deploy.secrets import redact

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome(Generic[T]):
    node: Node
    value: T | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def reason(self) -> str:
        if self.error is None:
            return ""
        if isinstance(self.error, DeployError):
            return str(self.error).removeprefix(f"{self.node.name}: ")
        return redact(f"{type(self.error).__name__}: {self.error}")


class GroupResult(Generic[T]):
    """Outcomes in inventory order, by node name."""

    def __init__(self, outcomes: list[Outcome[T]]):
        self.outcomes = {outcome.node.name: outcome for outcome in outcomes}

    def __getitem__(self, name: str) -> Outcome[T]:
        return self.outcomes[name]

    def __iter__(self):
        return iter(self.outcomes.values())

    @property
    def failed(self) -> list[Outcome[T]]:
        return [outcome for outcome in self if not outcome.ok]

    def summary(self) -> str:
        failed = self.failed
        if not failed:
            return f"all {len(self.outcomes)} node(s) succeeded"
        lines = [f"{len(failed)} of {len(self.outcomes)} node(s) failed:"]
        lines += [f"  {outcome.node.name}: {outcome.reason}" for outcome in failed]
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        if self.failed:
            raise CheckFailed(self.summary())


def fan_out(
    nodes: tuple[Node, ...] | list[Node],
    work: Callable[[Node, Target], T],
    *,
    reach: Callable[[Node], Target] = connect,
    workers: int | None = None,
) -> GroupResult[T]:
    """Run ``work(node, target)`` on every node in parallel, each with its own target.

    Ctrl-C closes every open connection (which ends the commands in flight) and re-raises.
    """
    opened: list[Target] = []
    lock = threading.Lock()

    def one(node: Node) -> Outcome[T]:
        target = reach(node)
        with lock:
            opened.append(target)
        try:
            return Outcome(node, value=work(node, target))
        except Exception as exc:  # noqa: BLE001 - every node's failure is reported, none raised
            return Outcome(node, error=exc)
        finally:
            target.close()

    pool = ThreadPoolExecutor(max_workers=workers or max(1, len(nodes)),
                              thread_name_prefix="node")
    futures = [pool.submit(one, node) for node in nodes]
    try:
        wait(futures)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            for target in opened:
                try:
                    target.close()
                except Exception:  # noqa: BLE001 - closing on the way out; nothing to report
                    pass
        raise
    pool.shutdown()
    return GroupResult([future.result() for future in futures])
