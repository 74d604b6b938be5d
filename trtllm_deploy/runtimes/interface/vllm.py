"""``vllm serve``'s options at the pinned vLLM, read from vLLM's source text, and a parser for them.

vLLM builds the serve parser in ``vllm/entrypoints/openai/cli_args.py`` (``make_arg_parser``: the
positional ``model_tag``, a few literal ``add_argument`` calls, and one ``--field-name`` per field
of the ``FrontendArgs`` dataclass) and ``vllm/engine/arg_utils.py`` (``EngineArgs.add_cli_args``:
``add_argument("--name", "-alias", **group_kwargs["name"])``, typed by ``EngineArgs``' fields).
:func:`extract` reads those files with :mod:`ast` (never importing vLLM) into ``serve_options.json``:
each option's flags, kind (int, float, str, bool, json), choices, nargs and action. Booleans are
``--x`` / ``--no-x`` (argparse's BooleanOptionalAction, as vLLM's ``get_kwargs`` makes them), and
vLLM's FlexibleArgumentParser takes ``--a_b`` for ``--a-b``.

The stand-in builds its argparse parser from this file inside its image: standard library only.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

SOURCES = ("vllm/entrypoints/openai/cli_args.py", "vllm/engine/arg_utils.py", "vllm/entrypoints/cli/serve.py")
CONFIGS = "vllm/config/"   # the config dataclasses EngineArgs' defaults point into
DATACLASSES = ("FrontendArgs", "BaseFrontendArgs", "EngineArgs", "AsyncEngineArgs")
DEFAULT_DIR = Path("requirements/interface/vllm")
DATA = "serve_options.json"
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
    """(kind, choices, nargs) for a dataclass field's annotation, as vLLM's get_kwargs turns it."""
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
    """vLLM's get_kwargs on a union: a list member makes it ``nargs="+"``; one member is itself."""
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


def _fields(tree: ast.Module, wanted=DATACLASSES, configs: dict | None = None) -> dict[str, dict[str, dict]]:
    """The dataclasses ``wanted``: field → {kind, choices, nargs, default}, bases first. A default
    written as ``SomeConfig.field`` is that config's (``configs``: fields of vllm/config/)."""
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


def extract(texts: dict[str, str | None]) -> dict:
    """serve_options.json's content from vLLM's source texts (path → text; None: absent)."""
    trees = {path: ast.parse(text, filename=path) for path, text in texts.items() if text is not None}
    configs: dict[str, dict] = {}
    for path, tree in trees.items():
        if path.startswith(CONFIGS):
            configs.update(_fields(tree, None))
    fields: dict[str, dict] = {}
    for path, tree in trees.items():
        if not path.startswith(CONFIGS):
            for name, table in _fields(tree, DATACLASSES, configs).items():
                fields.setdefault(name, table)
    engine = fields.get("AsyncEngineArgs") or fields.get("EngineArgs", {})
    frontend = fields.get("FrontendArgs", {})
    options: dict[str, dict] = {}
    positionals: list[str] = []
    for path in SOURCES:
        tree = trees.get(path)
        if tree is None:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func) == "add_argument":
                _add(node, options, positionals, engine, frontend)
    for name, field in frontend.items():   # make_arg_parser's loop: one --field-name per field
        flag = f"--{name.replace('_', '-')}"
        if not any(flag in option["flags"] for option in options.values()):
            options[name] = _option([flag], field, {})
    return {"sources": sorted(trees), "positionals": positionals,
            "options": dict(sorted(options.items()))}


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


def _add(node: ast.Call, options: dict, positionals: list, engine: dict, frontend: dict) -> None:
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
    field = engine.get(field_name or dest) or frontend.get(field_name or dest) or {}
    options[dest] = _option(names, field, given)


class VllmReference:
    """The ``vllm serve`` options of serve_options.json, as an argparse parser."""

    def __init__(self, data: dict, version: str = ""):
        self.data = data
        self.version = version
        self.options: dict[str, dict] = data.get("options", {})

    @classmethod
    def load(cls, directory: Path | str = DEFAULT_DIR) -> VllmReference:
        from trtllm_deploy.runtimes.interface import ROOT, InterfaceDataError

        folder = Path(directory)
        folder = folder if folder.is_absolute() else ROOT / folder
        try:
            data = json.loads((folder / DATA).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise InterfaceDataError(f"{folder / DATA}: cannot read it ({error})") from None
        return cls(data, str(data.get("version", "")))

    def flags(self) -> set[str]:
        return {flag for option in self.options.values() for flag in option["flags"]}

    def add_to(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Every option (and the positional) on ``parser``, defaults as vLLM's."""
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


def write(directory: Path | str, texts: dict[str, str | None], version: str, repository: str,
          where: str) -> None:
    """serve_options.json (with the version) and SOURCES.md in ``directory``; ``where`` says where the
    texts were read (a tag, a commit, a source distribution)."""
    from trtllm_deploy.atomic import write_text
    from trtllm_deploy.runtimes.interface import ROOT

    folder = Path(directory)
    folder = folder if folder.is_absolute() else ROOT / folder
    data = {"version": version, **extract(texts)}
    write_text(folder / DATA, json.dumps(data, indent=1) + "\n")
    lines = ["# Where these files come from", "",
             f"`{DATA}`: the options of `vllm serve` in vLLM {version} ({repository}, {where}),",
             "extracted by trtllm_deploy.runtimes.interface.vllm (ast over the source text, vLLM is never",
             "imported) from:", ""]
    lines += [f"- {path}" for path in data["sources"]]
    write_text(folder / "SOURCES.md", "\n".join(lines) + "\n")
