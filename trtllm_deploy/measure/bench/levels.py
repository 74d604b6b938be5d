"""What a level of a result is, the same in tables, charts, the comparison and its gate: a
concurrency, a request rate (with its cap) or a context depth."""

from __future__ import annotations


def level_key(level: dict) -> tuple:
    """What identifies a level across results: its request rate (and cap), its context depth (and
    concurrency) or its concurrency."""
    if "request_rate" in level:
        return (1, level["request_rate"], level.get("concurrency") or 0)
    if "depth" in level:
        return (2, level["depth"], level.get("concurrency") or 1)
    return (0, level["concurrency"], 0)


def level_label(key: tuple) -> int | str:
    """A level's key as tables and verdicts show it: the concurrency, "5/s" ("5/s cap 8"), or the
    depth "d4096" ("d4096 c2" at two streams)."""
    mode, value, other = key
    if mode == 2:
        return f"d{value}" + (f" c{other}" if other > 1 else "")
    return f"{value:g}/s" + (f" cap {other}" if other else "") if mode == 1 else value


def level_x(level: dict) -> float:
    """A level on a chart's x axis: its request rate, its depth, or its concurrency."""
    for key in ("request_rate", "depth"):
        if key in level:
            return level[key]
    return level["concurrency"]


def ms(figure: dict, key: str) -> str:
    value = (figure or {}).get(key)
    return "-" if value is None else f"{value:.2f}"
