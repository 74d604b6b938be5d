"""Secrets (``HF_TOKEN`` and the like): never put on a command line, and replaced by ``***`` in
every message and error that could show them once a target has been given them."""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping

MASK = "***"

# One rule for the whole project: hosts.toml's container env and the tasks' --env refuse these names.
_SECRETISH = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL",
                        re.IGNORECASE)


def looks_secret(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (``HF_TOKEN``, ``AWS_SECRET_…``)."""
    return bool(_SECRETISH.search(name))

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


def register_all(secrets: Mapping[str, str] | None) -> dict[str, str]:
    """Register every value of ``secrets`` (as passed to a target's run) and return them."""
    return {name: register(value) for name, value in (secrets or {}).items()}


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    if not text or not _values:
        return text
    with _lock:
        values = sorted(_values, key=len, reverse=True)
    for value in values:
        text = text.replace(value, MASK)
    return text
