"""tests/waiting.py: the one polling helper returns what it waited for and fails saying what."""

import ast
import itertools
import subprocess
import time
from pathlib import Path

import pytest

from waiting import WaitedTooLong, gone, until


def test_until_returns_the_first_value_that_is_done():
    counter = itertools.count()
    assert until(lambda: next(counter), 5, "the counter to reach 3", done=lambda n: n >= 3) == 3


def test_until_fails_naming_what_it_waited_for_and_the_last_value_seen():
    with pytest.raises(WaitedTooLong) as caught:
        until(lambda: ["still", "here"], 0.05, "the list to empty", done=lambda v: v == [])
    assert "waited 0.05 s for the list to empty; last seen: ['still', 'here']" in str(caught.value)


def test_until_retries_only_the_exceptions_it_is_told_to():
    tries = iter([ConnectionRefusedError("not yet"), ConnectionRefusedError("not yet"), "up"])

    def probe():
        value = next(tries)
        if isinstance(value, Exception):
            raise value
        return value

    assert until(probe, 5, "the server", retry_on=(OSError,)) == "up"
    with pytest.raises(WaitedTooLong, match="last seen: ConnectionRefusedError"):
        until(lambda: probe_refused(), 0.05, "a server that never starts", retry_on=(OSError,))
    with pytest.raises(ValueError):
        until(lambda: int("x"), 5, "a probe that breaks")


def probe_refused():
    raise ConnectionRefusedError("refused")



def test_gone_wakes_when_the_processes_exit_and_names_those_that_do_not():
    # `sleep` here is the process waited on, not a pause: it is killed, or outlives the wait.
    quick = subprocess.Popen(["sleep", "60"])
    lasting = subprocess.Popen(["sleep", "60.123"])
    try:
        gone([], 1, "nothing")
        quick.kill()
        started = time.monotonic()
        gone([quick.pid], 5, "the killed sleep to end")  # a zombie has exited: no reaping needed
        assert time.monotonic() - started < 1
        quick.wait()
        gone([quick.pid], 1, "a process already reaped")
        still = r"waited 0.1 s for the sleeper; still running: \d+ 'sleep 60.123'"
        with pytest.raises(WaitedTooLong, match=still):
            gone([lasting.pid], 0.1, "the sleeper")
    finally:
        lasting.kill()
        lasting.wait()


# Where a test-side Python sleep is the thing itself, not a wait: the helper's pause between two
# looks, and the fake Hub's pacing of a slow download.
SLEEPS_ALLOWED = {"waiting.py": 1, "fakehub.py": 1}


def test_no_test_waits_by_sleeping():
    """A fixed sleep that hopes something has happened meanwhile is a flake waiting to happen; each
    test waits on the thing itself, or polls through `until`. Commands named `sleep` that run on a
    target (the thing killed or timed out) are not Python sleeps and are not counted here."""
    found = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        sleeps_from_time = {alias.asname or alias.name for node in ast.walk(tree)
                            if isinstance(node, ast.ImportFrom) and node.module in ("time", "asyncio")
                            for alias in node.names if alias.name == "sleep"}
        calls = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Attribute) and node.func.attr == "sleep"
             and isinstance(node.func.value, ast.Name) and node.func.value.id in ("time", "asyncio"))
            or (isinstance(node.func, ast.Name) and node.func.id in sleeps_from_time))]
        if len(calls) != SLEEPS_ALLOWED.get(path.name, 0):
            found[path.name] = calls
    assert found == {}, f"sleeps in tests (file: lines; wait on the event or use waiting.until): {found}"
