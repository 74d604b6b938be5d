"""Finds the line of a key in a TOML file, so an error can point at it.

``tomllib`` keeps no positions, so this reads the file's table headers and ``key =`` lines itself.
It follows what inventory files use (tables, arrays of tables, dotted keys); for anything it cannot
place (a key inside an inline table, an array element) it answers with the nearest enclosing key.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=")


def _split_key(dotted: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", dotted)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def key_lines(text: str) -> dict[tuple, int]:
    """Map every key path the file spells out to its 1-based line number.

    Array-of-tables entries appear with their index: ``("nodes", 1, "port")``.
    """
    lines: dict[tuple, int] = {}
    counts: dict[tuple, int] = {}
    current: tuple = ()
    in_multiline = False
    for number, raw in enumerate(text.splitlines(), start=1):
        opens_or_closes = raw.count('"""') % 2 or raw.count("'''") % 2
        if in_multiline:
            in_multiline = not opens_or_closes
            continue
        in_multiline = bool(opens_or_closes)
        header = _HEADER.match(raw)
        if header:
            parts = tuple(_split_key(header.group(2)))
            if header.group(1) == "[[":
                path = _resolve(parts[:-1], counts) + parts[-1:]
                index = counts.get(path, -1) + 1
                counts[path] = index
                path = path + (index,)
            else:
                path = _resolve(parts, counts)
            current = path
            lines.setdefault(current, number)
            continue
        key = _KEY.match(raw)
        if key:
            lines.setdefault(current + tuple(_split_key(key.group(1))), number)
    return lines


def _resolve(path: tuple, counts: dict[tuple, int]) -> tuple:
    """Insert the current index after every array-of-tables prefix: nodes.fabric → nodes.2.fabric."""
    resolved: tuple = ()
    for part in path:
        resolved = resolved + (part,)
        if resolved in counts:
            resolved = resolved + (counts[resolved],)
    return resolved


def line_of(lines: dict[tuple, int], path: tuple) -> int | None:
    """The line of ``path`` in :func:`key_lines`' map, or of its nearest enclosing key there."""
    path = tuple(path)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None
