"""tests/waiting.py: the one polling helper returns what it waited for and fails saying what."""

import itertools
import subprocess
import time

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
