"""TOML files the user writes: reading them, errors that point at the line of the key, and
writing them back (``rewrite``) with the user's comments where they were.

``tomllib`` keeps no positions, so this reads the file's table headers and ``key =`` lines itself.
It follows what inventory files use (tables, arrays of tables, dotted keys); for anything it cannot
place (a key inside an inline table, an array element) it answers with the nearest enclosing key.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
from pydantic import AfterValidator, BaseModel, ValidationError
from tomlkit.container import Container
from tomlkit.items import AoT, Item, Table

from trtllm_deploy.errors import InputError

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


# --- a TOML file the user wrote, validated by a pydantic model --------------------------------

@dataclass(frozen=True)
class Problem:
    """One thing wrong with the file."""

    path: tuple
    message: str
    remedy: str


class TomlFileError(InputError):
    """Every problem of one file, each as ``file:line: key: message`` and what to do."""

    def __init__(self, source: Path, text: str, problems: list[Problem]):
        self.source, self.problems = source, problems
        lines: list[str] = []
        lines_by_key = key_lines(text)
        located = [(line_of(lines_by_key, p.path), p) for p in problems]
        for line, problem in sorted(located, key=lambda item: item[0] or 0):
            where = f"{source}:{line}" if line else str(source)
            key = dotted(problem.path)
            said = [f"{where}: {key + ': ' if key else ''}{problem.message}",
                    f"  what to do: {problem.remedy}"]
            if said[0] not in lines:  # a [defaults] key is wrong once, not once per node
                lines += said
        super().__init__("\n".join(lines))


def dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read(source: Path, error: type[TomlFileError], missing_remedy: str) -> tuple[str, dict]:
    """The file's text and its parsed TOML; unreadable or invalid TOML is an ``error``."""
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(source, "", [Problem((), "file not found", missing_remedy)]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise error(source, "", [Problem((), f"cannot read the file: {reason}",
                                         "check the path and its permissions")]) from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f"{source}:{match.group(1)}" if match else str(source)
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise InputError(f"{where}: not valid TOML: {reason}"
                         + (f" (column {match.group(2)})" if match else "")
                         + "\n  what to do: fix the syntax; see https://toml.io for the format") from None


# One wording per type, for what pydantic expected ("int_type") and what the file held (int).
_TYPE_WORDS = {
    "bool": "a boolean (true or false)",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "string": "a string",
    "list": "an array",
    "dict": "a table",
    "model": "a table",
    "model_attributes": "a table",
}


def _kind(value: Any) -> str:
    return _TYPE_WORDS.get(type(value).__name__, type(value).__name__)


def _fields_at(model: type[BaseModel], path: tuple) -> list[str]:
    """The keys allowed in the table at ``path`` (for "did you mean")."""
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def problems_from(error: ValidationError, model: type[BaseModel], prefix: tuple,
                  examples: dict[str, str], secret_fix: str = "") -> list[Problem]:
    """pydantic's errors as Problems: the key, what was expected, what the file held, a fix."""
    problems = []
    for item in error.errors():
        loc = tuple(item["loc"])
        # pydantic names the member of a union it tried ("int", "float"); that is noise here.
        loc = tuple(part for part in loc if part not in ("int", "float", "str", "[key]"))
        path = prefix + loc
        kind, value = item["type"], item.get("input")
        last = next((p for p in reversed(path) if isinstance(p, str)), "")
        example = examples.get(last)
        fix = f"write it like: {example}" if example else "correct the value"
        if kind == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                Problem(path, f"unknown key; {hint}allowed here: {', '.join(allowed)}",
                        f"rename or remove {loc[-1]!r}")
            )
        elif kind == "missing":
            problems.append(Problem(path, "required key is missing", f"add it: {fix}"))
        elif kind == "literal_error":
            expected = item.get("ctx", {}).get("expected", "")
            options = re.findall(r"'([^']*)'", expected)
            close = difflib.get_close_matches(str(value), options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                Problem(path, f"expected one of {expected}, got {value!r}{hint}",
                        f"use one of {expected}")
            )
        elif kind.endswith("_type"):
            wanted = _TYPE_WORDS.get(kind.removesuffix("_type"), item["msg"])
            problems.append(
                Problem(path, f"expected {wanted}, got {_kind(value)} ({value!r})", fix)
            )
        elif kind == "value_error":
            message = item["msg"].removeprefix("Value error, ")
            if "secret" in message and secret_fix:
                fix = secret_fix.format(key=last)
            problems.append(Problem(path, f"{message}; got {value!r}", fix))
        else:
            problems.append(Problem(path, f"{item['msg']}; got {value!r}", fix))
    return problems


def merge(base: dict, over: dict) -> dict:
    """``over`` laid on ``base`` key by key, tables merged all the way down (neither is changed)."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def matching(pattern: str, expected: str) -> AfterValidator:
    """A pydantic validator: the string must match ``pattern``, else the error says ``expected``."""
    regex = re.compile(pattern)

    def check(value: str) -> str:
        if not regex.match(value):
            raise ValueError(expected)
        return value

    return AfterValidator(check)


# --- writing -------------------------------------------------------------------------------------

def rewrite(previous: str | None, document: tomlkit.TOMLDocument) -> str:
    """``document`` as TOML text. Given ``previous`` (the file as it is now), the document is written
    into it instead: a value that did not change is left as the user spelled it, a changed one is
    replaced in place, keys the document lacks are removed and new ones added, and every comment
    stays where it was. Whatever the previous text, the result reads back as ``document``."""
    if previous is None:
        return document.as_string()
    try:
        kept = tomlkit.parse(previous)
    except tomlkit.exceptions.ParseError:  # nothing of it can be kept: write the document afresh
        return document.as_string()
    _write_into(kept, document)
    return kept.as_string()


def commented(value: Any, comment: str) -> Item:
    """``value`` as a TOML item followed on its line by ``  # comment``."""
    item = tomlkit.item(value)
    item.comment(comment)
    item.trivia.comment_ws = "  "
    return item


def _item(table: Container | Table, key: str) -> Item:
    # Indexing gives plain Python values for some types (bool); their formatting lives on the item.
    return (table.value if isinstance(table, Table) else table).item(key)


def _same(old: Item, new: Item) -> bool:
    old_value, new_value = old.unwrap(), new.unwrap()
    return type(old_value) is type(new_value) and old_value == new_value


def _write_into(old: Container | Table, new: Container | Table) -> None:
    for key in [key for key in old if key not in new]:
        del old[key]
    for key in new:
        value = _item(new, key)
        if key not in old:
            if isinstance(value, (Table, AoT)):  # a blank line between it and the header after it
                (value if isinstance(value, Table) else value[-1]).add(tomlkit.nl())
            old[key] = value
            continue
        there = _item(old, key)
        if isinstance(value, Table) and isinstance(there, Table):  # inline tables are values
            _write_into(there, value)
        elif isinstance(value, AoT) and isinstance(there, AoT):  # table by table, by position
            for old_table, new_table in zip(there, value, strict=False):
                _write_into(old_table, new_table)
            while len(there) > len(value):
                del there[-1]
            for new_table in list(value)[len(there):]:
                there.append(new_table)
        elif not _same(there, value):
            old[key] = value
