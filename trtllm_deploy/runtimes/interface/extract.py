"""The LLM-API's pydantic models, read from ``tensorrt_llm/llmapi/llm_args.py`` as source text.

Never imported (it needs torch and TensorRT-LLM's bindings): the module is parsed with :mod:`ast`
and every class is recorded with its fields (annotation as written, default, aliases), whether it
forbids unknown keys (``model_config = ConfigDict(extra=...)``, inherited from its bases, among them
``StrictBaseModel`` of ``tensorrt_llm/llmapi/utils.py``), and its members if it is an enum; module
level type aliases (``CudaGraphConfig = ...``) are kept too. The result is ``llm_args_models.json``.
"""

from __future__ import annotations

import ast

ENUM_BASES = {"Enum", "StrEnum", "IntEnum", "Flag", "IntFlag"}
NOT_FIELDS = {"ClassVar"}
PRIVATE_DEFAULTS = {"PrivateAttr"}
FIELD_CALLS = {"Field", "PydanticField"}


class ExtractError(ValueError):
    """The source text cannot be parsed."""


def _last(node: ast.expr) -> str:
    """``a.b.C`` or ``C`` or ``C[...]`` → ``C``."""
    if isinstance(node, ast.Subscript):
        return _last(node.value)
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ast.unparse(node)


def _literal(node: ast.expr | None):
    """A default as JSON can hold it; what is not a literal is kept as its source text."""
    if node is None:
        return None
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return {"expr": ast.unparse(node)}
    if isinstance(value, (tuple, set, frozenset)):
        value = list(value)
    return value if isinstance(value, (str, int, float, bool, list, dict, type(None))) else {
        "expr": ast.unparse(node)}


def _extra(call: ast.expr) -> str | None:
    """``ConfigDict(extra="forbid")`` / ``dict(extra=...)`` / ``{"extra": ...}`` → its extra."""
    if isinstance(call, ast.Call):
        for keyword in call.keywords:
            if keyword.arg == "extra":
                value = keyword.value
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    return value.value
                if isinstance(value, ast.Attribute):
                    return value.attr   # Extra.forbid
    if isinstance(call, ast.Dict):
        for key, value in zip(call.keys, call.values, strict=True):
            if isinstance(key, ast.Constant) and key.value == "extra" and isinstance(value, ast.Constant):
                return str(value.value)
    return None


def _field(annotation: ast.expr, value: ast.expr | None) -> dict | None:
    if _last(annotation) in NOT_FIELDS:
        return None
    field = {"annotation": ast.unparse(annotation), "default": None, "required": value is None}
    aliases: list[str] = []
    if isinstance(value, ast.Call) and _last(value.func) in PRIVATE_DEFAULTS:
        return None
    if isinstance(value, ast.Call) and _last(value.func) in FIELD_CALLS:
        default = value.args[0] if value.args else None
        required = isinstance(default, ast.Constant) and default.value is Ellipsis
        for keyword in value.keywords:
            if keyword.arg == "default":
                default = keyword.value
                required = isinstance(default, ast.Constant) and default.value is Ellipsis
            elif keyword.arg == "default_factory":
                field["default_factory"] = ast.unparse(keyword.value)
            elif keyword.arg in ("alias", "validation_alias"):
                aliases += _alias_names(keyword.value)
            elif keyword.arg in ("gt", "ge", "lt", "le") and isinstance(keyword.value, ast.Constant):
                field[keyword.arg] = keyword.value.value
            elif keyword.arg == "status" and isinstance(keyword.value, ast.Constant):
                field["status"] = keyword.value.value
        field["required"] = required or (default is None and "default_factory" not in field)
        field["default"] = None if required or default is None else _literal(default)
    elif value is not None:
        field["default"] = _literal(value)
    if aliases:
        field["aliases"] = aliases
    return field


def _alias_names(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Call) and _last(node.func) == "AliasChoices":
        return [arg.value for arg in node.args
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
    return []


def classes(text: str, source: str) -> tuple[dict[str, dict], dict[str, str]]:
    """The module's classes as written (own fields, bases, own extra) and its type aliases."""
    try:
        tree = ast.parse(text, filename=source)
    except SyntaxError as error:
        raise ExtractError(f"{source}: not Python source (line {error.lineno}: {error.msg})") from None
    found: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            found[node.name] = _class(node)
        elif _simple_assign(node):
            name = node.targets[0].id
            if name[:1].isupper() and _looks_like_type(node.value):
                aliases[name] = ast.unparse(node.value)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and node.value is not None and _last(node.annotation) == "TypeAlias":
            aliases[node.target.id] = ast.unparse(node.value)
    return found, aliases


def _simple_assign(node: ast.stmt) -> bool:
    """``name = value``: one plain name assigned."""
    return isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)


def _looks_like_type(node: ast.expr) -> bool:
    if isinstance(node, (ast.Name, ast.Attribute)):
        return True
    if isinstance(node, ast.Subscript):
        return _last(node.value) in {"Union", "Optional", "Annotated", "Literal", "List", "Dict", "list",
                                     "dict", "Tuple", "tuple", "Type"}
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _looks_like_type(node.left) and _looks_like_type(node.right)
    return False


def _class(node: ast.ClassDef) -> dict:
    entry: dict = {"bases": [_last(base) for base in node.bases], "fields": {}}
    members: list = []
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            name = item.target.id
            if name == "model_config":
                extra = _extra(item.value) if item.value is not None else None
                if extra:
                    entry["extra"] = extra
                continue
            if name.startswith("_"):
                continue
            field = _field(item.annotation, item.value)
            if field is not None:
                entry["fields"][name] = field
        elif _simple_assign(item):
            name = item.targets[0].id
            if name == "model_config":
                extra = _extra(item.value)
                if extra:
                    entry["extra"] = extra
            elif not name.startswith("_"):
                value = _literal(item.value)
                if not isinstance(value, dict) or "expr" not in value:
                    members.append([name, value])
                elif isinstance(item.value, ast.Call) and _last(item.value.func) == "auto":
                    members.append([name, name.lower()])
        elif isinstance(item, ast.ClassDef) and item.name == "Config":
            for inner in item.body:
                if isinstance(inner, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "extra"
                                                         for t in inner.targets):
                    value = inner.value
                    entry["extra"] = value.value if isinstance(value, ast.Constant) else _last(value)
    entry["members"] = members
    return entry


def _resolve(name: str, found: dict[str, dict], seen: tuple[str, ...] = ()) -> dict:
    """Fields (bases first, the class's own winning) and extra, through bases in ``found``."""
    entry = found[name]
    fields: dict[str, dict] = {}
    extra = None
    enum = False
    for base in entry["bases"]:
        if base in ENUM_BASES:
            enum = True
        if base in found and base not in seen and base != name:
            resolved = _resolve(base, found, (*seen, name))
            fields.update(resolved["fields"])
            extra = resolved["extra"] if resolved["extra"] is not None else extra
            enum = enum or resolved["enum"]
    fields.update(entry["fields"])
    extra = entry.get("extra", extra)
    return {"fields": fields, "extra": extra, "enum": enum, "bases": entry["bases"],
            "members": entry["members"]}


def models(texts: dict[str, str | None], main: str) -> dict:
    """``llm_args_models.json``'s content from the source texts (``main``: llm_args.py's path; the
    other texts are modules its classes inherit from, such as llmapi/utils.py)."""
    text = texts.get(main)
    if text is None:
        raise ExtractError(f"{main}: not in the sources given")
    found: dict[str, dict] = {}
    for path, other in texts.items():
        if path != main and other is not None:
            found.update(classes(other, path)[0])
    own, aliases = classes(text, main)
    found.update(own)
    result: dict = {"source": main, "models": {}, "enums": {}, "aliases": dict(sorted(aliases.items()))}
    for name in own:
        resolved = _resolve(name, found)
        if resolved["enum"]:
            result["enums"][name] = [value for _, value in resolved["members"]]
        elif resolved["fields"] or resolved["extra"] is not None:
            result["models"][name] = {"bases": resolved["bases"], "extra": resolved["extra"] or "ignore",
                                      "fields": resolved["fields"]}
    return result
