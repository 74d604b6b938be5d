"""The data ceilings are computed from, validated: ``hardware.toml`` (what the accelerators and links
do) and ``architectures.toml`` (the shape of each model), each with the user's own file merged over
it, and ``claims.toml`` (what the plan claimed and others measured). A wrong file is reported with
the line of every problem.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError)

from trtllm_deploy.artifact import models
from trtllm_deploy.tomlsource import Problem, TomlFileError, merge, problems_from, read

HERE = Path(__file__).parent
HARDWARE = HERE / "hardware.toml"
ARCHITECTURES = HERE / "architectures.toml"
CLAIMS = HERE / "claims.toml"
USER_HARDWARE = "~/.config/trtllm-deploy/hardware.toml"
USER_ARCHITECTURES = "~/.config/trtllm-deploy/architectures.toml"

Number = Annotated[StrictFloat | StrictInt, Field(gt=0)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Link(_Table):
    name: StrictStr
    gbps: Number
    latency_us: Annotated[StrictFloat | StrictInt, Field(ge=0)]


class Tflops(_Table):
    bf16: Number | None = None
    fp8: Number | None = None
    fp4: Number | None = None


class Hardware(_Table):
    description: StrictStr = ""
    memory_gb: Number
    memory_bandwidth_gbs: Number
    os_reserve_gb: Annotated[StrictFloat | StrictInt, Field(ge=0)] = 0
    gpus_per_node: Annotated[StrictInt, Field(ge=1, le=64)] = 1
    tflops: Tflops
    link: Link | None = None
    fabric: Link | None = None


class Architecture(_Table):
    description: StrictStr = ""
    layers: Annotated[StrictInt, Field(ge=1, le=1000)]
    hidden_size: Annotated[StrictInt, Field(ge=1)]
    vocab_size: Annotated[StrictInt, Field(ge=1)]
    tied_embeddings: StrictBool = False
    active_params_billion: Number | None = None
    params_billion: Number | None = None
    bytes_per_param: dict[models.Precision, Annotated[StrictFloat | StrictInt, Field(gt=0, le=4)]] = {}


class _HardwareFile(_Table):
    hardware: dict[StrictStr, Hardware] = {}


class _ArchitecturesFile(_Table):
    architectures: dict[StrictStr, Architecture] = {}


class _Configuration(_Table):
    """What a speed figure was claimed or measured on."""

    configuration: StrictStr
    model: StrictStr
    precision: models.Precision
    tp: Annotated[StrictInt, Field(ge=1)]
    nodes: Annotated[StrictInt, Field(ge=1)]
    hardware: StrictStr = "gb10"
    batch: Annotated[StrictInt, Field(ge=1)] = 1


class PlanClaim(_Configuration):
    section: StrictStr
    tokens_per_s: list[Number] | Number
    versus: dict[StrictStr, StrictStr] = {}   # the plan's word against another runtime, by its name


class Published(_Configuration):
    engine: StrictStr
    tokens_per_s: Number
    source: StrictStr


class ClaimsFile(_Table):
    plan: list[PlanClaim] = []
    published: list[Published] = []


class HardwareFileError(TomlFileError):
    """A hardware, architectures or claims file is wrong; every problem with its line."""


_EXAMPLES = {
    "memory_gb": "memory_gb = 128", "memory_bandwidth_gbs": "memory_bandwidth_gbs = 273",
    "tflops": "tflops = { fp4 = 500, fp8 = 250, bf16 = 125 }", "gbps": "gbps = 200",
    "latency_us": "latency_us = 2.0", "layers": "layers = 80", "hidden_size": "hidden_size = 8192",
    "vocab_size": "vocab_size = 128256", "gpus_per_node": "gpus_per_node = 1",
    "bytes_per_param": "bytes_per_param = { nvfp4 = 0.61 }", "tokens_per_s": "tokens_per_s = 38.65",
}


def _allowed_at(schema: type[BaseModel], path: tuple) -> list[str]:
    """The keys a table at ``path`` may hold, looking through name-keyed tables ([hardware.<name>])."""
    model: object = schema
    names_next = False
    for part in path:
        if names_next:              # a machine's or model's own name
            names_next = False
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        if get_origin(annotation) is dict:
            annotation, names_next = get_args(annotation)[1], True
        tables = [a for a in (annotation, *get_args(annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        model = tables[0] if tables else None
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _problems(error: ValidationError, schema: type[BaseModel]) -> list[Problem]:
    problems = []
    for problem in problems_from(error, schema, (), _EXAMPLES):
        if problem.message.endswith("allowed here: "):
            allowed = _allowed_at(schema, problem.path[:-1])
            close = difflib.get_close_matches(str(problem.path[-1]), allowed, n=1)
            problem = Problem(problem.path, f"unknown key; {f'did you mean {close[0]!r}? ' if close else ''}"
                              f"allowed here: {', '.join(allowed)}", problem.remedy)
        problems.append(problem)
    return problems


def _load(presets: Path, user_default: str, user_path: Path | str | None, schema: type[BaseModel]):
    """The presets with the user's file merged over them, validated as ``schema``."""
    text, data = read(presets, HardwareFileError, "reinstall trtllm-deploy: a file it ships is missing")
    try:
        schema.model_validate(data)
    except ValidationError as exc:
        raise HardwareFileError(presets, text, _problems(exc, schema)) from None
    if user_path is None:
        default = Path(os.path.expanduser(user_default))
        if not default.is_file():
            return schema.model_validate(data)
        user_path = default
    source = Path(user_path)
    user_text, user_data = read(source, HardwareFileError,
                                f"create it in the format of trtllm_deploy/{presets.name}, or fix the path")
    try:
        # The presets are valid on their own, so whatever is wrong with the merge is the user's.
        return schema.model_validate(merge(data, user_data))
    except ValidationError as exc:
        raise HardwareFileError(source, user_text, _problems(exc, schema)) from None


def load_hardware(user_path: Path | str | None = None) -> dict[str, Hardware]:
    """``hardware.toml`` with ``~/.config/trtllm-deploy/hardware.toml`` (or ``user_path``) over it."""
    return dict(_load(HARDWARE, USER_HARDWARE, user_path, _HardwareFile).hardware)


def load_architectures(user_path: Path | str | None = None) -> dict[str, Architecture]:
    return dict(_load(ARCHITECTURES, USER_ARCHITECTURES, user_path, _ArchitecturesFile).architectures)


def load_claims(path: Path = CLAIMS) -> ClaimsFile:
    """The plan's claims and the published measurements (shipped data; not merged with a user file)."""
    text, data = read(path, HardwareFileError, "reinstall trtllm-deploy: its claims.toml is missing")
    try:
        return ClaimsFile.model_validate(data)
    except ValidationError as exc:
        raise HardwareFileError(path, text, _problems(exc, ClaimsFile)) from None
