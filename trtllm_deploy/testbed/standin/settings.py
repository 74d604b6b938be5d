"""The knobs a test turns through the environment, read on rank 0 and sent to every other rank."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from . import faults as faults_module
from .faults import Fault


@dataclass(frozen=True)
class Settings:
    tokens_per_s: float = 100.0
    load_seconds: float = 2.0
    load_steps: int = 4
    faults: tuple[Fault, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read STANDIN_*; raise ValueError naming the variable that is wrong."""
        return cls(
            tokens_per_s=_number(environ, "STANDIN_TOKENS_PER_S", cls.tokens_per_s, float, minimum=1e-3),
            load_seconds=_number(environ, "STANDIN_LOAD_SECONDS", cls.load_seconds, float, minimum=0),
            load_steps=_number(environ, "STANDIN_LOAD_STEPS", cls.load_steps, int, minimum=1),
            faults=faults_module.parse(environ.get("STANDIN_FAULT", "")),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        return cls(**{**data, "faults": tuple(Fault(**fault) for fault in data["faults"])})


def _number(environ: Mapping[str, str], name: str, default, kind: type, minimum: float):
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if value < minimum:
        raise ValueError(f"{name}={text!r} must be at least {minimum}")
    return value
