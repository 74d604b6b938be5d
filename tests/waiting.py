"""Waiting in tests: the one place where a test polls.

A test waits on the thing it waits for: a line on a process's output (``threading.Condition``),
a process exiting (``wait``; ``gone`` for one that is not our child), an ``Event``. Some things can
only be looked at again, e.g. an HTTP endpoint coming up or a process list on a node; for those,
``until`` looks, pauses a little longer each time (up to half a second), and on timeout fails
saying what it waited for and what it saw last. No test sleeps a fixed time in the hope that
something has happened meanwhile.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

FIRST_PAUSE = 0.01
LONGEST_PAUSE = 0.5


class WaitedTooLong(AssertionError):
    """``until``'s condition did not hold within its timeout."""


def until(probe: Callable[[], T], timeout: float, what: str, *, done: Callable[[T], object] = bool,
          retry_on: tuple[type[BaseException], ...] = ()) -> T:
    """Call ``probe`` until ``done(value)`` holds (by default: the value is truthy); return that value.

    ``what`` names what is waited for ("the stand-in to answer /health"). An exception of a type in
    ``retry_on`` counts as "not yet" (a refused connection while a server starts); any other
    exception, e.g. an ``assert`` in ``probe`` that the process has not died, ends the wait at once.
    On timeout: ``WaitedTooLong`` with ``what`` and the last value or exception seen.
    """
    deadline = time.monotonic() + timeout
    pause = FIRST_PAUSE
    last: object = "nothing (never looked)"
    while True:
        try:
            value = probe()
        except retry_on as exc:
            last = exc
        else:
            if done(value):
                return value
            last = value
        left = deadline - time.monotonic()
        if left <= 0:
            seen = repr(last)
            if len(seen) > 3000:
                seen = seen[:1500] + " ... " + seen[-1500:]
            raise WaitedTooLong(f"waited {timeout:g} s for {what}; last seen: {seen}")
        time.sleep(min(pause, left))  # the pause between two looks: polling, not synchronisation
        pause = min(pause * 2, LONGEST_PAUSE)


def gone(pids: Iterable[int], timeout: float, what: str) -> None:
    """Return once every process in ``pids`` has exited, woken by each exit (a pidfd per process,
    so it works for processes that are not our children); a pid already gone counts as exited.
    On timeout: ``WaitedTooLong`` with ``what`` and the command lines still running."""
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        running = dict(fds)
        deadline = time.monotonic() + timeout
        while running:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitedTooLong(f"waited {timeout:g} s for {what}; still running: "
                                    + "; ".join(f"{pid} {_cmdline(pid)}" for pid in sorted(running.values())))
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                running.pop(fd, None)
    finally:
        for fd in fds:
            os.close(fd)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return repr(file.read().replace(b"\0", b" ").decode(errors="replace").strip())
    except OSError:
        return "(gone)"
