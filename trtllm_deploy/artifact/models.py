"""The models that can be deployed: the shipped presets (``models.toml``) and the user's own entries.

A model has variants by precision; each names a Hugging Face repository, ideally at a pinned commit,
its size, the tensor-parallel size that suits a node count and the LLM-API settings for DGX Spark.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      StrictStr, ValidationError)

from trtllm_deploy.errors import InputError
from trtllm_deploy.tomlsource import Problem, TomlFileError, matching, merge, problems_from, read

PRESETS = Path(__file__).with_name("models.toml")
USER_FILE = "~/.config/trtllm-deploy/models.toml"

Precision = Literal["bf16", "fp16", "fp8", "nvfp4", "mxfp4"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
QUANTIZABLE = ("fp8", "nvfp4")          # what Model Optimizer's hf_ptq.py makes for serving here
UNQUANTIZED = ("bf16", "fp16")
# Effective bytes per parameter of a quantized checkpoint, per byte of its 16-bit source, when the
# models file gives none: the format's width plus scales, with a margin for layers left in 16 bits.
QUANTIZED_RATIO = {"fp8": 0.55, "nvfp4": 0.32}

UNPINNED = "unpinned: engine.build resolves and records it"

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _node_count(value: str) -> str:
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise ValueError("expected a node count from 1 to 64 as the key (e.g. { 1 = 1, 2 = 2 })")
    return value


ModelName = Annotated[StrictStr, matching(
    _NAME.pattern, "expected a model name: lower-case letters, digits, '.', '_' or '-' (e.g. llama-70b)")]
Repo = Annotated[StrictStr, matching(
    _REPO.pattern, "expected a Hugging Face repository as owner/name (e.g. nvidia/Qwen3-32B-FP4)")]
# A branch or tag moves; only a commit makes two nodes (or two builds) fetch the same files.
Commit = Annotated[StrictStr, matching(
    _COMMIT.pattern, "expected a full 40-hex commit of the repository, not a branch, tag or short hash")]
NodeCount = Annotated[StrictStr, AfterValidator(_node_count)]
Fraction = Annotated[StrictFloat | StrictInt, Field(gt=0, le=1)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KvCacheConfig(BaseModel):
    """Only the key the fit check reads is checked; TensorRT-LLM checks the rest when it serves."""

    model_config = ConfigDict(extra="allow", frozen=True)
    free_gpu_memory_fraction: Fraction | None = None


class LlmApi(BaseModel):
    """Settings for the LLM-API YAML; any key TensorRT-LLM takes may appear."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kv_cache_config: KvCacheConfig | None = None


class VariantEntry(_Table):
    repo: Repo | None = None
    revision: Commit | None = None
    # Instead of a repo: made by quantizing this model's variant of that precision with NVIDIA
    # Model Optimizer (engine.build, inside the runtime image). Only fp8 and nvfp4 are made so.
    quantize_from: Precision | None = None
    gated: StrictBool = False
    bytes_per_param: Annotated[StrictFloat | StrictInt, Field(gt=0, le=4)]
    tp_by_nodes: dict[NodeCount, Annotated[StrictInt, Field(ge=1, le=64)]]
    llm_api: LlmApi = LlmApi()
    note: StrictStr = ""


class ModelEntry(_Table):
    description: StrictStr = ""
    params_billion: Annotated[StrictFloat | StrictInt, Field(gt=0, le=10000)]
    default_precision: Precision
    moe: StrictBool = False
    llm_api: LlmApi = LlmApi()
    variants: Annotated[dict[Precision, VariantEntry], Field(min_length=1)]


class Defaults(_Table):
    llm_api: LlmApi = LlmApi()
    llm_api_one_node: LlmApi = LlmApi()


class _File(_Table):
    defaults: Defaults = Defaults()
    models: dict[ModelName, ModelEntry] = {}


class ModelsFileError(TomlFileError):
    """A models file is wrong; the message lists every problem with its line."""


_EXAMPLES = {
    "repo": 'repo = "nvidia/Llama-3.3-70B-Instruct-FP4"',
    "revision": ('revision = "<the 40-hex commit from the repository\'s history on the Hub>",'
                 " or remove it and engine.build resolves and records one"),
    "bytes_per_param": "bytes_per_param = 0.61",
    "params_billion": "params_billion = 70.55",
    "default_precision": 'default_precision = "nvfp4"',
    "tp_by_nodes": "tp_by_nodes = { 1 = 1, 2 = 2 }",
    "free_gpu_memory_fraction": "kv_cache_config = { free_gpu_memory_fraction = 0.9 }",
    "variants": "[models.<name>.variants.<precision>] tables, one per precision",
    "gated": "gated = true",
    "quantize_from": 'quantize_from = "bf16"',
    "moe": "moe = true",
}


@dataclass(frozen=True)
class Variant:
    """One checkpoint of a model at one precision, with everything the fit check and serving need."""

    model: str
    precision: str
    repo: str
    revision: str | None
    gated: bool
    params_billion: float
    bytes_per_param: float
    tp_by_nodes: dict[int, int]
    settings: dict[str, Any]
    settings_one_node: dict[str, Any]
    note: str = ""
    # Set when this variant is made by quantizing: the precision of the variant it is made from
    # (``repo`` and ``revision`` are then that variant's, the checkpoint that is downloaded).
    quantize_from: str | None = None

    @property
    def name(self) -> str:
        return f"{self.model} {self.precision}"

    @property
    def pinned(self) -> bool:
        return self.revision is not None

    @property
    def revision_text(self) -> str:
        return self.revision or UNPINNED

    @property
    def weights_gb(self) -> float:
        """Weights as the checkpoint stores them, in GB (1e9 bytes)."""
        return self.params_billion * self.bytes_per_param

    @property
    def kv_fraction(self) -> float | None:
        return (self.settings.get("kv_cache_config") or {}).get("free_gpu_memory_fraction")

    def recommended_tp(self, nodes: int) -> int | None:
        """The tp for the largest node count listed that is at most ``nodes``; None if none is."""
        counts = [count for count in self.tp_by_nodes if count <= nodes]
        return self.tp_by_nodes[max(counts)] if counts else None

    def llm_api(self, nodes: int) -> dict[str, Any]:
        """The LLM-API settings for a deployment on ``nodes`` nodes, ready to write as YAML."""
        return merge(self.settings, self.settings_one_node) if nodes == 1 else dict(self.settings)


@dataclass(frozen=True)
class Model:
    name: str
    description: str
    default_precision: str
    moe: bool
    variants: dict[str, Variant]

    def variant(self, precision: str | None = None, quantize: bool = False) -> Variant:
        """The variant at ``precision`` (case does not matter), or the model's default one.

        ``quantize``: make that precision from the model's 16-bit variant with Model Optimizer,
        even when a quantized checkpoint is published (or none is listed)."""
        wanted = (precision or self.default_precision).strip().lower()
        if quantize:
            return self._quantized(wanted)
        if wanted in self.variants:
            return self.variants[wanted]
        known = list(self.variants)
        close = difflib.get_close_matches(wanted, known, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        add = (f", or add [models.{self.name}.variants.{wanted}] to {USER_FILE}"
               if wanted in PRECISIONS else f" (precisions a variant may have: {', '.join(PRECISIONS)})")
        raise InputError(
            f"{self.name} has no {wanted!r} variant{hint}; its precisions are: {', '.join(known)}\n"
            f"  what to do: pick one of those{add}"
        )


    def _quantized(self, precision: str) -> Variant:
        if precision not in QUANTIZABLE:
            raise InputError(f"--quantize makes {' or '.join(QUANTIZABLE)} checkpoints; "
                             f"{precision!r} is not one of them\n  what to do: pass --precision "
                             f"{QUANTIZABLE[-1]} (or {QUANTIZABLE[0]}), or drop --quantize")
        listed = self.variants.get(precision)
        if listed is not None and listed.quantize_from:
            return listed
        source = next((self.variants[p] for p in UNQUANTIZED if p in self.variants), None)
        if source is None:
            raise InputError(f"{self.name} has no bf16 or fp16 variant to quantize from\n  what to "
                             f"do: add [models.{self.name}.variants.bf16] (the 16-bit checkpoint) to "
                             f"{USER_FILE}")
        bytes_per_param = (listed.bytes_per_param if listed is not None
                           else source.bytes_per_param * QUANTIZED_RATIO[precision])
        return replace(source, precision=precision, bytes_per_param=bytes_per_param,
                       tp_by_nodes=(listed or source).tp_by_nodes, quantize_from=source.precision,
                       settings=(listed or source).settings, note="")


@dataclass(frozen=True)
class Catalog:
    models: dict[str, Model]
    sources: tuple[Path, ...] = field(default=())

    def get(self, name: str) -> Model:
        if name in self.models:
            return self.models[name]
        close = difflib.get_close_matches(name.strip().lower(), list(self.models), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(
            f"no model named {name!r}{hint}; the models are: {', '.join(sorted(self.models))}\n"
            f"  what to do: pick one of those, or add [models.{name}] to {USER_FILE}"
            " (see trtllm_deploy/artifact/models.toml for the format)"
        )


def _dump(settings: LlmApi) -> dict[str, Any]:
    return settings.model_dump(exclude_none=True)


def _check(top: _File) -> list[Problem]:
    """What the schema cannot say: the default precision exists, tp fits the node count."""
    problems = []
    for name, entry in top.models.items():
        if entry.default_precision not in entry.variants:
            problems.append(Problem(
                ("models", name, "default_precision"),
                f"{entry.default_precision!r} is not one of this model's variants"
                f" ({', '.join(entry.variants)})",
                "name one of its variants, or add that variant"))
        for precision, variant in entry.variants.items():
            where = ("models", name, "variants", precision)
            if (variant.repo is None) == (variant.quantize_from is None):
                problems.append(Problem(
                    where, "a variant needs exactly one of repo (a published checkpoint) or "
                    "quantize_from (made by quantizing another variant)",
                    'write: repo = "owner/name", or: quantize_from = "bf16"'))
            elif variant.quantize_from is not None:
                source = entry.variants.get(variant.quantize_from)
                if precision not in QUANTIZABLE:
                    problems.append(Problem(where + ("quantize_from",),
                                            f"{precision} is not made by quantizing here",
                                            f"only {', '.join(QUANTIZABLE)} variants may have quantize_from"))
                elif source is None or source.repo is None or variant.quantize_from not in UNQUANTIZED:
                    sources = [p for p, v in entry.variants.items() if v.repo and p in UNQUANTIZED]
                    problems.append(Problem(
                        where + ("quantize_from",),
                        f"{variant.quantize_from!r} is not a published 16-bit variant of {name}",
                        f"name its bf16 or fp16 variant (one with a repo): {', '.join(sources) or 'none'}"))
            for nodes, tp in variant.tp_by_nodes.items():
                if tp > int(nodes):
                    problems.append(Problem(
                        ("models", name, "variants", precision, "tp_by_nodes"),
                        f"tp {tp} on {nodes} node(s): each node has one GPU,"
                        " so tp cannot exceed the node count",
                        f"use at most tp {nodes} for {nodes} node(s)"))
    return problems


def _allowed_at(path: tuple) -> list[str]:
    """The keys a table at ``path`` may hold, looking through the name-keyed tables (models, variants)."""
    model: Any = _File
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if annotation is None:  # a model's or a variant's name
            continue
        args = [arg for arg in get_args(annotation) if isinstance(arg, type)]
        model = annotation if isinstance(annotation, type) else (args[-1] if args else None)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _problems(error: ValidationError) -> list[Problem]:
    """tomlsource's Problems, with what it cannot see past the name-keyed tables filled in."""
    problems = []
    for problem in problems_from(error, _File, (), _EXAMPLES):
        message, remedy = problem.message, problem.remedy
        if message.endswith("allowed here: "):
            allowed = _allowed_at(problem.path[:-1])
            close = difflib.get_close_matches(str(problem.path[-1]), allowed, n=1)
            message = (f"unknown key; {f'did you mean {close[0]!r}? ' if close else ''}"
                       f"allowed here: {', '.join(allowed)}")
        # A key that is itself a name (a node count, a model) has no example: use its table's.
        if remedy == "correct the value":
            example = next((_EXAMPLES[part] for part in reversed(problem.path) if part in _EXAMPLES), None)
            remedy = f"write it like: {example}" if example else remedy
        problems.append(Problem(problem.path, message, remedy))
    return problems


def _validate(source: Path, text: str, data: dict) -> _File:
    try:
        top = _File.model_validate(data)
    except ValidationError as exc:
        raise ModelsFileError(source, text, _problems(exc)) from None
    problems = _check(top)
    if problems:
        raise ModelsFileError(source, text, problems)
    return top


def _catalog(top: _File, sources: tuple[Path, ...]) -> Catalog:
    base, one_node = _dump(top.defaults.llm_api), _dump(top.defaults.llm_api_one_node)
    models = {}
    for name, entry in top.models.items():
        model_settings = merge(base, _dump(entry.llm_api))
        variants = {}
        for precision, v in entry.variants.items():
            origin = entry.variants[v.quantize_from] if v.quantize_from else v
            variants[precision] = Variant(
                model=name, precision=precision, repo=origin.repo, revision=origin.revision,
                gated=origin.gated, params_billion=float(entry.params_billion),
                bytes_per_param=float(v.bytes_per_param),
                tp_by_nodes={int(nodes): tp for nodes, tp in v.tp_by_nodes.items()},
                settings=merge(model_settings, _dump(v.llm_api)), settings_one_node=one_node, note=v.note,
                quantize_from=v.quantize_from)
        models[name] = Model(name=name, description=entry.description,
                             default_precision=entry.default_precision, moe=entry.moe, variants=variants)
    return Catalog(models=models, sources=sources)


def load(user_path: Path | str | None = None, *, presets: Path = PRESETS) -> Catalog:
    """The presets with the user's file merged over them.

    ``user_path`` None means ~/.config/trtllm-deploy/models.toml if it exists; a path that is given
    must exist. Raises :class:`ModelsFileError` (exit 2) listing every problem with file:line.
    """
    text, data = read(presets, ModelsFileError, "reinstall trtllm-deploy: its models.toml is missing")
    top = _validate(presets, text, data)
    if user_path is None:
        default = Path(os.path.expanduser(USER_FILE))
        if not default.is_file():
            return _catalog(top, (presets,))
        user_path = default
    source = Path(user_path)
    user_text, user_data = read(
        source, ModelsFileError,
        "create it (the format is that of trtllm_deploy/artifact/models.toml) or fix --models")
    # The presets are valid on their own, so whatever is wrong with the merge is the user's file.
    merged = _validate(source, user_text, merge(data, user_data))
    return _catalog(merged, (presets, source))
