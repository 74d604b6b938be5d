"""Secrets (``HF_TOKEN`` and the like): taken from the environment, never put on a command line,
and replaced by ``***`` in every message, log line and error that could show them."""

from __future__ import annotations

import logging
import os
import threading

KNOWN = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "NGC_API_KEY")
MASK = "***"

_lock = threading.Lock()
_values: set[str] = set()


def register(value: str) -> str:
    """Remember ``value`` as secret so that :func:`redact` hides it from now on."""
    if "\n" in value or "\r" in value:
        raise ValueError("a secret may not contain a line break")
    if len(value) >= 4:  # masking a one-letter "secret" would mangle every message
        with _lock:
            _values.add(value)
    return value


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    if not text or not _values:
        return text
    with _lock:
        values = sorted(_values, key=len, reverse=True)
    for value in values:
        text = text.replace(value, MASK)
    return text


def from_environment(names: tuple[str, ...] = KNOWN) -> dict[str, str]:
    """The secrets among ``names`` that are set in this process's environment, registered."""
    found = {}
    for name in names:
        value = os.environ.get(name)
        if value:
            found[name] = register(value)
    return found


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        return True
