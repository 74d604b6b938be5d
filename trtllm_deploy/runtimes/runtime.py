"""What a serving runtime is, as data: a :class:`Runtime` record, one per module of this package.

Each runtime module (``trtllm.py``, ...) defines ``RUNTIME``; :func:`known` finds them, so a third
runtime is one more module. Launch, supervise, rollback, advise and bench read these records and
never a runtime's name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache

from trtllm_deploy.errors import InputError
from trtllm_deploy.runtimes import failures
from trtllm_deploy.source.lock import LockFile

# What a CUDA runtime on a DGX Spark needs whatever the node (docs/SOURCES.md#serving-on-sparks).
SPARK_ENV = {"CPATH": "/usr/local/cuda/include", "TRITON_PTXAS_PATH": "/usr/local/cuda/bin/ptxas",
             "NCCL_CUMEM_ENABLE": "0"}
# An artifact's format (its manifest's provenance backend), in the user's words.
FORMATS = {"pytorch": "a checkpoint", "tensorrt": "TensorRT engines"}


@dataclass(frozen=True)
class Serve:
    """What a deployment asks of its runtime: the command line's inputs."""

    model: str                          # the artifact's folder inside the container
    tp: int
    pp: int
    port: int
    head: str = "127.0.0.1"             # where the ranks meet (the head's fabric address)
    options: tuple[str, ...] = ()       # from :attr:`Runtime.options` for the artifact
    listen: str = "0.0.0.0"             # where HTTP listens: "::" (both families) for an IPv6 head

    @property
    def ranks(self) -> int:
        return self.tp * self.pp


def _no_options(format: str, inside: str) -> tuple[str, ...]:
    return ()


def _checkpoint(options: tuple[str, ...]) -> str:
    return "pytorch"


def _no_node_env(address: str) -> dict[str, str]:
    return {}


def _no_progress(body: bytes) -> int | None:
    return None


@dataclass(frozen=True)
class Runtime:
    """One serving runtime: how it is started, from which image, and how it is seen to work."""

    name: str                                   # --runtime, the state file, the rollback job's suffix
    product: str                                # what a user reads
    server: str                                 # its HTTP server, as users call it
    program: Callable[[Serve], list[str]]       # what every rank runs inside its container
    image: Callable[[LockFile], str]            # its pinned image
    role: str = ""                              # "default" (launch), "rollback" (invoke rollback)
    env: Mapping[str, str] = field(default_factory=lambda: dict(SPARK_ENV))
    # Variables that differ per node, from the node's announced address (never forwarded by mpirun).
    node_env: Callable[[str], dict[str, str]] = _no_node_env
    node_vars: tuple[str, ...] = ()
    config: str | None = None                   # its options file beside the artifact's weights
    formats: tuple[str, ...] = ("pytorch",)     # the artifact formats it serves
    options: Callable[[str, str], tuple[str, ...]] = _no_options   # (format, folder inside) → argv
    format_of: Callable[[tuple[str, ...]], str] = _checkpoint       # options → the format served
    health: str = "/health"                     # answers 200 once it serves
    ready: str = "/v1/models"                   # lists the served model
    says: tuple[str, ...] = ()                  # words its endpoint uses about itself (lower case)
    # Its progress, for telling busy from stuck: a number that grows while it generates, read from
    # what ``GET metrics`` answers (None: the answer shows none).
    metrics: str | None = "/metrics"
    progress: Callable[[bytes], int | None] = _no_progress

    @property
    def known_failures(self) -> tuple[failures.Known, ...]:
        """The log signatures it fails with (runtimes/failures.toml)."""
        return failures.table_for(self.name)


@cache
def known() -> tuple[Runtime, ...]:
    """Every runtime: the default first, then by name."""
    import trtllm_deploy.runtimes as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if isinstance(getattr(module, "RUNTIME", None), Runtime):
            found.append(module.RUNTIME)
    return tuple(sorted(found, key=lambda runtime: (runtime.role != "default", runtime.name)))


def names() -> tuple[str, ...]:
    return tuple(runtime.name for runtime in known())


def get(name: str) -> Runtime:
    for runtime in known():
        if runtime.name == name:
            return runtime
    raise InputError(f"--runtime {name!r}: expected one of {', '.join(names())}")


def _with_role(role: str) -> Runtime:
    return next(runtime for runtime in known() if runtime.role == role)


def default() -> Runtime:
    """The runtime launch and deploy serve with."""
    return _with_role("default")


def rollback() -> Runtime:
    """The runtime ``invoke rollback`` serves the same checkpoint with."""
    return _with_role("rollback")


def choices() -> str:
    """The runtimes for a help text: ``a (default) or b``."""
    words = [f"{runtime.name} (default)" if runtime.role == "default" else runtime.name
             for runtime in known()]
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def node_vars() -> tuple[str, ...]:
    """Every runtime's per-node variables."""
    return tuple(dict.fromkeys(var for runtime in known() for var in runtime.node_vars))


def of_endpoint(*said: str) -> str:
    """The runtime's name from what an endpoint says about itself, most telling words first."""
    for words in said:
        words = words.lower()
        for runtime in known():
            if any(word in words for word in runtime.says):
                return runtime.name
    return "unknown"
