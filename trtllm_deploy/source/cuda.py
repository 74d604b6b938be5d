"""CUDA_ARCHS from compute capabilities, and whether a CUDA_ARCHS value covers a GPU.

TensorRT-LLM's CMake takes ``NN``, ``NNa``, ``NNf``, ``NN-real``, ``native`` (docs/SOURCES.md). Code built
as ``NN-real`` (machine code only) runs on GPUs of the same major version whose minor is at least
NN's; ``NNa`` only on exactly that GPU; ``NNf`` on its family (same major); plain ``NN`` also embeds
PTX, which the driver compiles for any newer GPU.
"""

from __future__ import annotations

import re

_ENTRY = re.compile(r"^(\d{2,3})([af]?)(-real)?$")


def archs_for(capabilities: list[str] | tuple[str, ...]) -> str:
    """``["12.1"]`` → ``"121-real"``: one machine-code target per distinct compute capability."""
    wanted = sorted({capability.replace(".", "") for capability in capabilities},
                    key=lambda text: (len(text), text))
    return ";".join(f"{arch}-real" for arch in wanted)


def _split(capability: str) -> tuple[int, int]:
    major, minor = capability.split(".")
    return int(major), int(minor)


def covers(archs: str, capability: str) -> tuple[bool, str]:
    """Whether code built for ``archs`` runs on a GPU of ``capability``, and how."""
    major, minor = _split(capability)
    best = ""
    for entry in archs.split(";"):
        if entry == "native":
            return True, "native: whatever the build node's GPU is"
        match = _ENTRY.match(entry)
        if not match:
            continue
        digits, suffix, real = match.groups()
        e_major, e_minor = int(digits[:-1]), int(digits[-1])
        if suffix == "a":
            if (e_major, e_minor) == (major, minor):
                return True, f"{entry}: built for exactly this GPU"
        elif suffix == "f":
            if e_major == major and e_minor <= minor:
                return True, f"{entry}: the {e_major}.x family"
        elif (e_major, e_minor) == (major, minor):
            return True, f"{entry}: built for exactly this GPU"
        elif e_major == major and e_minor < minor:
            best = best or (f"{entry}: runs on {capability} (same major) but without its "
                            "architecture-specific kernels")
        elif not real and (e_major, e_minor) < (major, minor):
            best = best or f"{entry}: PTX, compiled by the driver at first start (slow)"
    return (True, best) if best else (False, f"nothing in {archs!r} runs on compute capability "
                                             f"{capability}")
