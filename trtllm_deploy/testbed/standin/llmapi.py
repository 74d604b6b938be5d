"""The LLM-API options file (``--config`` / ``--extra_llm_api_options``), refused as TensorRT-LLM refuses it.

TensorRT-LLM validates the YAML with pydantic models that forbid unknown keys, so a misspelt key
stops the server. The stand-in checks the file against the pinned TensorRT-LLM's own argument
schema (requirements/interface/tensorrt-llm/, through trtllm_deploy.runtimes.interface: the
api_stability references and the models of llm_args.py) and reports problems in pydantic's layout.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from trtllm_deploy.runtimes import interface


class OptionsError(ValueError):
    """The file cannot be used; the message is what the real server would print for it."""


@functools.cache
def pinned() -> interface.Interface:
    """The pinned TensorRT-LLM's interface, read once per process."""
    return interface.load()


def load(path: str | Path, backend: str = "pytorch") -> dict:
    """Read and check the options file; return its top-level mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise OptionsError(f"cannot read the LLM-API options file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise OptionsError(f"{path} is not valid YAML: {error}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise OptionsError(f"{path} must hold a mapping of LLM-API options, not {type(data).__name__}")
    args = pinned().args
    problems = args.validate(data, backend)
    if problems:
        raise OptionsError(interface.report(problems, args.model_name(backend)))
    return data
