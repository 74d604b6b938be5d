"""Injected faults: the grammar of STANDIN_FAULT, and the real failure lines each fault prints.

``KIND[:TOKEN][@RANK]``, comma-separated; see the package docstring for what each kind does.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass

from .log import Log

# Each line below was copied from a public report of the real failure, so that log classifiers are
# tested against what the real runtime prints. Only the port in BIND_LINE is filled in.

# PyTorch's allocator message, as TensorRT-LLM printed it when a model did not fit:
# https://github.com/NVIDIA/TensorRT-LLM/issues/2398
OOM_LINE = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 MiB. GPU 0 has a total capacity "
    "of 22.19 GiB of which 1.50 MiB is free. Process 885415 has 22.18 GiB memory in use. Of the allocated "
    "memory 0 bytes is allocated by PyTorch, and 0 bytes is reserved by PyTorch but unallocated. If reserved "
    "but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
    "fragmentation.  See documentation for Memory Management  "
    "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)

# TensorRT-LLM's PyTorch backend when a peer's NCCL connection fails (multi-node, 1.0.0rc2):
# https://github.com/NVIDIA/TensorRT-LLM/issues/6366
NCCL_LINE = (
    "RuntimeError: Failed, NCCL error /src/tensorrt_llm/cpp/tensorrt_llm/common/opUtils.cpp:125 "
    "'unhandled system error (run with NCCL_DEBUG=INFO for details)'"
)

# PyTorch's CUDA error when the GPU stops answering its driver mid-run (the GPU then shows ERR! in
# nvidia-smi until the node reboots), as PyTorch programs print it:
# https://github.com/pytorch/pytorch/issues/74235 (the runtime modules say where a server printed it)
DRIVER_LINE = "RuntimeError: CUDA error: unspecified launch failure"

# glibc aborting a multi-node TensorRT-LLM run (trtllm-bench and trtllm-serve on H20/H100):
# https://github.com/NVIDIA/TensorRT-LLM/issues/2953
DOUBLE_FREE_LINE = "free(): double free detected in tcache 2"

# uvicorn's bind failure, as trtllm-serve users reported it (port 8000 taken):
# https://github.com/NVIDIA/TensorRT-LLM/issues/784 (the other runtimes' modules say where they print it)
BIND_LINE = "[Errno {errno}] error while attempting to bind on address ('{host}', {port}): {reason}"

KINDS = ("exit", "hang", "nccl", "double-free", "oom", "bind", "driver")
SPEC = re.compile(r"(?P<kind>[a-z-]+)(?::(?P<token>\d+))?(?:@(?P<rank>\d+))?")


@dataclass(frozen=True)
class Fault:
    kind: str
    token: int | None = None  # the 1-based token it fires at; None: during start-up
    rank: int = 0

    def __str__(self) -> str:
        return self.kind + (f":{self.token}" if self.token else "") + (f"@{self.rank}" if self.rank else "")

    def fire(self, log: Log, where: str) -> None:
        """Do what the fault says; returns only for no kind at all (exits, aborts or hangs)."""
        log.warning(f"STANDIN_FAULT {self}: injecting '{self.kind}' {where}")
        if self.kind == "exit":
            os._exit(1)
        if self.kind == "hang":
            hang()
        line = {"oom": OOM_LINE, "nccl": NCCL_LINE, "double-free": DOUBLE_FREE_LINE,
                "driver": DRIVER_LINE}[self.kind]
        log.error(line)
        if self.kind == "double-free":
            os.abort()
        os._exit(1)


def parse(text: str) -> tuple[Fault, ...]:
    """Parse STANDIN_FAULT; raise ValueError with a sentence that names the bad part."""
    faults = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = SPEC.fullmatch(part)
        if not match or match["kind"] not in KINDS:
            raise ValueError(f"STANDIN_FAULT: {part!r} is not KIND[:TOKEN][@RANK] with KIND one of "
                             f"{', '.join(KINDS)}")
        kind, token, rank = match["kind"], match["token"], match["rank"]
        if token is not None and (int(token) < 1 or kind in ("oom", "bind")):
            raise ValueError(f"STANDIN_FAULT: {part!r}: " + (
                "tokens count from 1" if int(token) < 1 else f"'{kind}' happens before any token"))
        if token is None and kind == "driver":
            raise ValueError(f"STANDIN_FAULT: {part!r}: 'driver' happens at a token (driver:K)")
        if rank is not None and kind == "bind":
            raise ValueError(f"STANDIN_FAULT: {part!r}: only rank 0 binds a port")
        faults.append(Fault(kind, int(token) if token else None, int(rank or 0)))
    return tuple(faults)


def at_token(faults: tuple[Fault, ...], ranks: range | list[int], done: int, count: int) -> Fault | None:
    """The fault of one of ``ranks`` that fires among tokens ``done+1 .. done+count``, if any."""
    for fault in faults:
        if fault.token is not None and fault.rank in ranks and done < fault.token <= done + count:
            return fault
    return None


def at_startup(faults: tuple[Fault, ...], ranks: range | list[int], kinds: tuple[str, ...]) -> Fault | None:
    """The start-up fault (no token) of one of ``kinds`` for one of ``ranks``, if any."""
    for fault in faults:
        if fault.token is None and fault.kind in kinds and fault.rank in ranks:
            return fault
    return None


def hang() -> None:
    """Stop taking part, stay alive; a stuck rank still dies of SIGTERM as one stuck in NCCL does."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    while True:
        time.sleep(3600)
