"""A Python program's argparse options, read from its source text, and a parser made from them.

For programs whose parser is assembled from dataclasses (one ``--field-name`` per field) and
``add_argument`` calls, some of the form ``add_argument("--name", "-alias", **group_kwargs["name"])``
typed by the dataclass field of that name: :func:`extract` reads the given source files with
:mod:`ast` (never importing them) into a JSON-ready table of each option's flags, kind (int, float,
str, bool, json), choices, nargs, action and default. A bool field becomes ``--x`` / ``--no-x``
(argparse's BooleanOptionalAction); a list field ``nargs="+"``; a Literal field its choices; a
default written as ``SomeConfig.field`` is that config class's (the ``configs`` sources).
:class:`ArgsTable` puts those options on an argparse parser. runtimes/ modules name the program,
its files and classes; the stand-in builds its parsers from the tables inside its image, so this
module uses the standard library only.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
from pathlib import Path

KINDS = {"int": "int", "float": "float", "str": "str", "bool": "bool", "Path": "str"}


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Subscript):
        return _name(node.value)
    return ""


def _kind(annotation: ast.expr | None) -> tuple[str, list | None, str | None]:
    """(kind, choices, nargs) for a dataclass field's annotation, as the parser is made from it."""
    if annotation is None:
        return "str", None, None
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            return _kind(ast.parse(annotation.value, mode="eval").body)
        except SyntaxError:
            return "str", None, None
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return _of_union([part for part in _union(annotation)
                          if not (isinstance(part, ast.Constant) and part.value is None)])
    if isinstance(annotation, ast.Subscript):
        origin = _name(annotation.value)
        args = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        if origin == "Optional":
            return _kind(args[0])
        if origin == "Union":
            return _of_union([p for p in args if not (isinstance(p, ast.Constant) and p.value is None)
                              and _name(p) != "None"])
        if origin == "Literal":
            values = [a.value for a in args if isinstance(a, ast.Constant)]
            kind = "int" if all(isinstance(v, int) and not isinstance(v, bool) for v in values) else "str"
            return kind, [str(v) for v in values], None
        if origin in ("list", "List", "tuple", "Tuple", "set", "Sequence"):
            kind = _kind(args[0])[0] if args else "str"
            return kind, None, "+"
        if origin in ("dict", "Dict"):
            return "json", None, None
        if origin == "Annotated":
            return _kind(args[0])
    name = _name(annotation)
    return KINDS.get(name, "json" if name.endswith("Config") else "str"), None, None


def _of_union(parts: list[ast.expr]) -> tuple[str, list | None, str | None]:
    """A union: a list member makes it ``nargs="+"``; a single member is itself."""
    if len(parts) == 1:
        return _kind(parts[0])
    listed = [p for p in parts if _name(p) in ("list", "List")]
    if listed:
        return _kind(listed[0])
    return "str", None, None


def _union(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union(node.left) + _union(node.right)
    return [node]


def _fields(tree: ast.Module, wanted: tuple[str, ...] | None,
            configs: dict | None = None) -> dict[str, dict[str, dict]]:
    """The dataclasses ``wanted`` (None: all): field → {kind, choices, nargs, default}, bases first.
    A default written as ``SomeConfig.field`` is that config's field's (``configs``)."""
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    found: dict[str, dict[str, dict]] = {}

    def of(name: str, seen=()) -> dict[str, dict]:
        if name in found:
            return found[name]
        node = classes[name]
        fields: dict[str, dict] = {}
        for base in node.bases:
            if _name(base) in classes and _name(base) not in seen:
                fields.update(of(_name(base), (*seen, name)))
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) \
                    and not item.target.id.startswith("_") and _name(item.annotation) != "ClassVar":
                kind, choices, nargs = _kind(item.annotation)
                default = None
                if isinstance(item.value, ast.Attribute) and isinstance(item.value.value, ast.Name) \
                        and configs and item.value.value.id in configs:
                    default = configs[item.value.value.id].get(item.value.attr, {}).get("default")
                elif isinstance(item.value, ast.Call) and _name(item.value.func) in ("field", "Field"):
                    default = next((_literal(k.value) for k in item.value.keywords
                                    if k.arg == "default"), None)
                elif item.value is not None:
                    default = _literal(item.value)
                if not isinstance(default, (str, int, float, bool, type(None))):
                    default = None
                fields[item.target.id] = {"kind": kind, "choices": choices, "nargs": nargs,
                                          "default": default}
        found[name] = fields
        return fields

    for name in (classes if wanted is None else wanted):
        if name in classes:
            of(name)
    return found


def _literal(node: ast.expr):
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return None
    return list(value) if isinstance(value, (tuple, set)) else value


def extract(texts: dict[str, str | None], parsers: tuple[str, ...], dataclasses: tuple[str, ...],
            configs: str, loop_class: str) -> dict:
    """The options table from source texts (path → text; None: absent). ``parsers``: the files whose
    ``add_argument`` calls make the parser, in order; ``dataclasses``: the classes typing them (a
    field of an earlier class wins); ``configs``: the path prefix of
    the config modules defaults point into; ``loop_class``: the dataclass whose every field is added
    as ``--field-name``."""
    trees = {path: ast.parse(text, filename=path) for path, text in texts.items() if text is not None}
    known: dict[str, dict] = {}
    for path, tree in trees.items():
        if path.startswith(configs):
            known.update(_fields(tree, None))
    fields: dict[str, dict] = {}
    for path, tree in trees.items():
        if not path.startswith(configs):
            for name, table in _fields(tree, dataclasses, known).items():
                fields.setdefault(name, table)
    typed: dict[str, dict] = {}
    for name in dataclasses:
        for field_name, field in fields.get(name, {}).items():
            typed.setdefault(field_name, field)
    options: dict[str, dict] = {}
    positionals: list[str] = []
    for path in parsers:
        tree = trees.get(path)
        if tree is None:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func) == "add_argument":
                _add(node, options, positionals, typed)
    for name, field in fields.get(loop_class, {}).items():   # the loop: one --field-name per field
        flag = f"--{name.replace('_', '-')}"
        if not any(flag in option["flags"] for option in options.values()):
            options[name] = _option([flag], field, {})
    return {"sources": sorted(trees), "positionals": positionals, "options": dict(sorted(options.items()))}


def _option(flags: list[str], field: dict, given: dict) -> dict:
    kind, choices, nargs = field.get("kind", "str"), field.get("choices"), field.get("nargs")
    action = given.get("action")
    if kind == "bool" and action is None:
        action = "boolean_optional"
    if "type" in given:
        kind = given["type"]
    if "choices" in given:
        choices = given["choices"]
    if "nargs" in given:
        nargs = given["nargs"]
    if action in ("store_true", "store_false", "boolean_optional", "version", "help", "count"):
        kind, nargs = "bool", None
    default = given["default"] if "default" in given else field.get("default")
    flags = list(flags)
    if action == "boolean_optional":
        flags += [f"--no-{flag[2:]}" for flag in flags if flag.startswith("--")]
    return {"flags": flags, "kind": kind, "choices": [str(c) for c in choices] if choices else None,
            "nargs": nargs, "action": action or "store", "default": default}


def _add(node: ast.Call, options: dict, positionals: list, typed: dict) -> None:
    names = [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
    if not names:
        return
    if not names[0].startswith("-"):
        positionals.append(names[0])
        return
    given: dict = {}
    field_name = None
    for keyword in node.keywords:
        if keyword.arg is None:   # **group_kwargs["name"]
            value = keyword.value
            if isinstance(value, ast.Subscript) and isinstance(value.slice, ast.Constant):
                field_name = value.slice.value
        elif keyword.arg == "type":
            type_name = _name(keyword.value)
            if isinstance(keyword.value, ast.Call) and keyword.value.args:   # optional_type(int)
                type_name = _name(keyword.value.args[0])
            given["type"] = KINDS.get(type_name, "str")
        elif keyword.arg == "action":
            value = keyword.value
            action = _literal(value) if isinstance(value, ast.Constant) else _name(value)
            given["action"] = {"BooleanOptionalAction": "boolean_optional", "StoreBoolean": "store"}.get(
                action, action)
        elif keyword.arg in ("choices", "default", "nargs", "dest"):
            value = _literal(keyword.value)
            if value is not None or keyword.arg == "default":
                given[keyword.arg] = value
    long = next((name for name in names if name.startswith("--")), names[0])
    dest = given.pop("dest", None) or field_name or long.lstrip("-").replace("-", "_")
    field = typed.get(field_name or dest) or {}
    options[dest] = _option(names, field, given)


class ArgsTable:
    """An options table (what :func:`extract` makes) as argparse options."""

    def __init__(self, data: dict):
        self.data = data
        self.version = str(data.get("version", ""))
        self.options: dict[str, dict] = data.get("options", {})

    @classmethod
    def load(cls, path: Path) -> ArgsTable:
        try:
            return cls(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: cannot read the options table ({error})") from None

    def flags(self) -> set[str]:
        return {flag for option in self.options.values() for flag in option["flags"]}

    def add_to(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Every option (and the first positional, optional) on ``parser``, with their defaults."""
        parser.add_argument(*(self.data.get("positionals") or ["model_tag"])[:1], nargs="?")
        types = {"int": int, "float": float}
        for dest, option in self.options.items():
            flags = [flag for flag in option["flags"]   # argparse adds --no-x itself
                     if not flag.startswith("--no-") or option["action"] != "boolean_optional"]
            kwargs: dict = {"dest": dest, "default": option.get("default")}
            action = option["action"]
            if action == "boolean_optional":
                kwargs["action"] = argparse.BooleanOptionalAction
            elif action in ("store_true", "store_false"):
                kwargs["action"] = action
            elif action in ("version", "help", "count"):
                continue
            else:
                if action == "append":
                    kwargs["action"] = "append"
                kwargs["type"] = types.get(option["kind"], str)
                if option.get("choices"):
                    kwargs["choices"] = [kwargs["type"](c) for c in option["choices"]]
                if option.get("nargs"):
                    kwargs["nargs"] = option["nargs"]
            try:
                parser.add_argument(*flags, **kwargs)
            except (argparse.ArgumentError, ValueError, TypeError):
                continue   # a spelling two options share: the first keeps it, as argparse's conflict rule
        return parser


def underscores_to_dashes(arg: str) -> str:
    """FlexibleArgumentParser's ``--a_b`` → ``--a-b`` (the value after ``=`` kept as it is)."""
    if not arg.startswith("--"):
        return arg
    name, equals, value = arg.partition("=")
    return name.replace("_", "-") + equals + value


def write(path: Path, data: dict, sources_md: Path, title: str) -> None:
    """The table as JSON at ``path`` and a SOURCES.md beside it listing where it was read; each file
    written beside its place and renamed over it."""
    lines = ["# Where these files come from", "", f"`{path.name}`: {title}, extracted by",
             "trtllm_deploy.runtimes.interface.argsource (ast over the source text, never imported)",
             "from:", ""]
    lines += [f"- {source}" for source in data["sources"]]
    for target, text in ((path, json.dumps(data, indent=1) + "\n"), (sources_md, "\n".join(lines) + "\n")):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, target)
