"""The known failures (``failures.toml``): which one a log shows, and what to do about it."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from trtllm_deploy import secrets

TABLE = Path(__file__).with_name("failures.toml")


@dataclass(frozen=True)
class Known:
    name: str
    pattern: re.Pattern
    remedy: str
    runtimes: tuple[str, ...] = ()   # the runtimes it is seen with (none named: any)


@cache
def table(path: Path = TABLE) -> tuple[Known, ...]:
    entries = tomllib.loads(path.read_text())["failure"]
    return tuple(Known(entry["name"], re.compile(entry["pattern"]), entry["remedy"],
                       tuple(entry.get("runtimes", ()))) for entry in entries)


@cache
def table_for(runtime: str) -> tuple[Known, ...]:
    """The known failures a runtime's logs may show."""
    return tuple(known for known in table() if not known.runtimes or runtime in known.runtimes)


def match(log: str, runtime: str | None = None) -> Known | None:
    """The first known failure the log shows (of ``runtime``'s, when one is named), or None."""
    known = table() if runtime is None else table_for(runtime)
    return next((entry for entry in known if entry.pattern.search(log)), None)


def explain(what: str, log: str, lines: int = 8, runtime: str | None = None) -> str:
    """``what`` happened, the log's last lines (secrets masked), and the known cause and remedy."""
    tail = "\n".join(f"    {line}" for line in secrets.redact(log).strip().splitlines()[-lines:])
    known = match(log, runtime)
    if known is not None:
        return f"{what}: {known.name}\n{tail}\n  what to do: {known.remedy}"
    return f"{what}; the last lines of its log:\n{tail}"
