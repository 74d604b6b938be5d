"""The LLM-API options (the YAML ``trtllm-serve --config`` reads) checked as TensorRT-LLM checks them.

The top-level keys are ``LLM.__init__``'s parameters in TensorRT-LLM's api_stability references
(``references/llm.yaml`` and ``references_committed/llm.yaml``) together with the fields of the
backend's arguments model (``TorchLlmArgs``, ``TrtLlmArgs``) in ``llm_args_models.json``; nested
configurations are that file's models. Problems are reported in pydantic's words and locations.
Only what the annotation says is checked (types, Literal values, enum values, bounds written in
``Field(...)``, unknown keys where the model forbids them); validators are not run.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass

import yaml

ARGS_MODELS = {"pytorch": "TorchLlmArgs", "tensorrt": "TrtLlmArgs", "_autodeploy": "TorchLlmArgs"}
NOT_KEYS = {"kwargs", "self"}
INTS = {"int": None, "StrictInt": None, "PositiveInt": ("gt", 0), "NonNegativeInt": ("ge", 0),
        "conint": None}
FLOATS = {"float": None, "StrictFloat": None, "PositiveFloat": ("gt", 0), "NonNegativeFloat": ("ge", 0)}
BOOLS = {"bool", "StrictBool"}
STRINGS = {"str", "StrictStr", "Path", "PathLike", "os.PathLike"}
LISTS = {"List", "list", "Tuple", "tuple", "Set", "set", "Sequence", "FrozenSet", "frozenset"}
DICTS = {"Dict", "dict", "Mapping"}
ANY = {"Any", "object"}
NONE = {"None", "NoneType"}
TRUE_WORDS = {"1", "on", "t", "true", "y", "yes"}
FALSE_WORDS = {"0", "off", "f", "false", "n", "no"}


@dataclass(frozen=True)
class Problem:
    """One validation error, as pydantic reports it."""

    location: tuple[str, ...]
    message: str
    type: str
    input: object = None

    @property
    def where(self) -> str:
        return ".".join(str(part) for part in self.location)

    def __str__(self) -> str:
        return (f"{self.where}\n  {self.message} [type={self.type}, input_value={self.input!r}, "
                f"input_type={type(self.input).__name__}]")


def report(problems: list[Problem], model: str) -> str:
    """pydantic's ValidationError text for ``problems``."""
    count = f"{len(problems)} validation error{'s' if len(problems) != 1 else ''}"
    return "\n".join([f"{count} for {model}", *(str(problem) for problem in problems)])


def _parameters(text: str | None, source: str) -> dict[str, str]:
    """``methods.__init__.parameters`` of an api_stability reference: name → annotation."""
    if text is None:
        return {}
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{source} is not valid YAML: {error}") from None
    try:
        parameters = data["methods"]["__init__"]["parameters"] or {}
    except (KeyError, TypeError):
        raise ValueError(f"{source}: no methods.__init__.parameters") from None
    return {str(name): str((spec or {}).get("annotation", "Any")) for name, spec in parameters.items()
            if name not in NOT_KEYS}


class ArgsReference:
    """What TensorRT-LLM at one commit takes in the LLM-API YAML."""

    def __init__(self, llm: str | None, committed: str | None, models: dict | None):
        self.reference = {**_parameters(committed, "llm_committed.yaml"), **_parameters(llm, "llm.yaml")}
        self.models = (models or {}).get("models", {})
        self.enums = (models or {}).get("enums", {})
        self.aliases = (models or {}).get("aliases", {})

    @classmethod
    def from_files(cls, llm: str | None, committed: str | None, models_json: str | None) -> ArgsReference:
        return cls(llm, committed, json.loads(models_json) if models_json else None)

    def model_name(self, backend: str = "pytorch") -> str:
        """The arguments model of ``backend`` (TorchLlmArgs where the pin has no model of its own)."""
        name = ARGS_MODELS.get(backend, "TorchLlmArgs")
        return name if name in self.models else "TorchLlmArgs"

    def keys(self, backend: str = "pytorch") -> dict[str, str]:
        """Every top-level key → its annotation (the model's where it has the field)."""
        fields = self.models.get(self.model_name(backend), {}).get("fields", {})
        keys = dict(self.reference)
        for name, field in fields.items():
            keys[name] = field["annotation"]
            for alias in field.get("aliases", ()):
                keys[alias] = field["annotation"]
        return keys

    def validate(self, mapping: dict, backend: str = "pytorch") -> list[Problem]:
        """Every problem with ``mapping`` as top-level LLM-API options for ``backend``."""
        if not isinstance(mapping, dict):
            return [Problem((), "Input should be a valid dictionary", "dict_type", mapping)]
        keys = self.keys(backend)
        model = self.models.get(self.model_name(backend), {})
        forbid = model.get("extra", "forbid") == "forbid"
        fields = model.get("fields", {})
        problems: list[Problem] = []
        for key, value in mapping.items():
            if key not in keys:
                if forbid:
                    problems.append(Problem((str(key),), "Extra inputs are not permitted", "extra_forbidden",
                                            value))
                continue
            problems += self._check(keys[key], value, (str(key),), fields.get(key, {}))
        return problems

    # -- annotations ---------------------------------------------------------------------------

    def _check(self, annotation: str, value, location: tuple[str, ...], field: dict | None = None,
               depth: int = 0) -> list[Problem]:
        try:
            node = ast.parse(annotation.strip(), mode="eval").body
        except SyntaxError:
            return []   # an annotation this checker cannot read is not checked
        problems = self._node(node, value, location, depth)
        if not problems and field:
            problems = _bounds(field, value, location)
        return problems

    def _node(self, node: ast.expr, value, location, depth: int) -> list[Problem]:
        if depth > 20:
            return []
        if isinstance(node, ast.Constant) and isinstance(node.value, str):   # a forward reference
            return self._check(node.value, value, location, depth=depth + 1)
        if isinstance(node, ast.Constant) and node.value is None:
            return _none(value, location)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self._union([node.left, node.right], value, location, depth)
        if isinstance(node, ast.Subscript):
            return self._subscript(node, value, location, depth)
        name = ast.unparse(node)
        short = name.rsplit(".", 1)[-1]
        return self._named(name, short, value, location, depth)

    def _subscript(self, node: ast.Subscript, value, location, depth: int) -> list[Problem]:
        origin = ast.unparse(node.value).rsplit(".", 1)[-1]
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if origin == "Optional":
            return [] if value is None else self._node(args[0], value, location, depth + 1)
        if origin == "Union":
            return self._union(args, value, location, depth)
        if origin == "Annotated":
            return self._node(args[0], value, location, depth + 1)
        if origin == "Literal":
            allowed = [ast.literal_eval(arg) for arg in args if isinstance(arg, ast.Constant)]
            if value in allowed and not (isinstance(value, bool) and not any(a is value for a in allowed)):
                return []
            return [Problem(location, f"Input should be {_either(allowed)}", "literal_error", value)]
        if origin in LISTS:
            if not isinstance(value, list):
                return [Problem(location, "Input should be a valid list", "list_type", value)]
            if origin in ("Tuple", "tuple") and len(args) != 1 and not (len(args) == 2 and
                                                                         ast.unparse(args[1]) == "..."):
                return []
            problems = []
            for index, item in enumerate(value):
                problems += self._node(args[0], item, (*location, str(index)), depth + 1)
            return problems
        if origin in DICTS:
            if not isinstance(value, dict):
                return [Problem(location, "Input should be a valid dictionary", "dict_type", value)]
            problems = []
            if len(args) == 2:
                for key, item in value.items():
                    problems += self._node(args[1], item, (*location, str(key)), depth + 1)
            return problems
        return self._named(origin, origin, value, location, depth)

    def _union(self, args: list[ast.expr], value, location, depth: int) -> list[Problem]:
        best: list[Problem] | None = None
        for arg in args:
            problems = self._node(arg, value, location, depth + 1)
            if not problems:
                return []
            if best is None or len(problems) < len(best):
                best = problems
        return best or []

    def _named(self, name: str, short: str, value, location, depth: int) -> list[Problem]:
        if short in ANY or name in ANY:
            return []
        if short in NONE:
            return _none(value, location)
        if short in INTS:
            if isinstance(value, bool) and short == "StrictInt":
                return [Problem(location, "Input should be a valid integer", "int_type", value)]
            if not _int_like(value):
                return [Problem(location, "Input should be a valid integer", "int_type", value)]
            return _constrained(INTS[short], value, location)
        if short in FLOATS:
            if not _number_like(value):
                return [Problem(location, "Input should be a valid number", "float_type", value)]
            return _constrained(FLOATS[short], value, location)
        if short in BOOLS:
            if isinstance(value, bool) or value in (0, 1) or (isinstance(value, str) and value.lower() in
                                                              TRUE_WORDS | FALSE_WORDS):
                return []
            return [Problem(location, "Input should be a valid boolean", "bool_type", value)]
        if short in STRINGS or name in STRINGS:
            return [] if isinstance(value, str) else [
                Problem(location, "Input should be a valid string", "string_type", value)]
        if short in LISTS:
            return [] if isinstance(value, list) else [
                Problem(location, "Input should be a valid list", "list_type", value)]
        if short in DICTS:
            return [] if isinstance(value, dict) else [
                Problem(location, "Input should be a valid dictionary", "dict_type", value)]
        if short in self.enums:
            members = self.enums[short]
            if value in members:
                return []
            return [Problem(location, f"Input should be {_either(members)}", "enum", value)]
        if short in self.models:
            return self._model(short, value, location, depth)
        if short in self.aliases and self.aliases[short] != short:
            return self._check(self.aliases[short], value, location, depth=depth + 1)
        return []   # a type from elsewhere (bindings, torch, other modules): not checked

    def _model(self, name: str, value, location, depth: int) -> list[Problem]:
        if not isinstance(value, dict):
            return [Problem(location, f"Input should be a valid dictionary or instance of {name}",
                            "model_type", value)]
        model = self.models[name]
        fields = model.get("fields", {})
        names = {alias: field for field in fields.values() for alias in field.get("aliases", ())}
        names.update(fields)
        problems = []
        for key, item in value.items():
            field = names.get(key)
            if field is None:
                if model.get("extra") == "forbid":
                    problems.append(Problem((*location, str(key)), "Extra inputs are not permitted",
                                            "extra_forbidden", item))
                continue
            problems += self._check(field["annotation"], item, (*location, str(key)), field, depth + 1)
        return problems


def _none(value, location) -> list[Problem]:
    return [] if value is None else [Problem(location, "Input should be None", "none_required", value)]


def _int_like(value) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, str):
        try:
            int(value.strip())
        except ValueError:
            return False
        return True
    return False


def _number_like(value) -> bool:
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            float(value.strip())
        except ValueError:
            return False
        return True
    return False


def _constrained(bound: tuple[str, float] | None, value, location) -> list[Problem]:
    if bound is None:
        return []
    return _bounds({bound[0]: bound[1]}, value, location)


BOUNDS = {"gt": ("greater_than", "greater than", lambda v, b: v > b),
          "ge": ("greater_than_equal", "greater than or equal to", lambda v, b: v >= b),
          "lt": ("less_than", "less than", lambda v, b: v < b),
          "le": ("less_than_equal", "less than or equal to", lambda v, b: v <= b)}


def _bounds(field: dict, value, location) -> list[Problem]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    for key, (kind, words, holds) in BOUNDS.items():
        bound = field.get(key)
        if isinstance(bound, (int, float)) and not holds(value, bound):
            return [Problem(location, f"Input should be {words} {bound}", kind, value)]
    return []


def _either(values: list) -> str:
    words = [repr(value) for value in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
