"""tests/waiting.py: the one polling helper returns what it waited for and fails saying what."""

import itertools

import pytest

from waiting import WaitedTooLong, until


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

