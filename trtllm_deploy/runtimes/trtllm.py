"""TensorRT-LLM: ``trtllm-serve`` under ``trtllm-llmapi-launch``, one MPI rank per GPU.

Launch's default runtime. Its image is the one the lock builds (or names); its options file is the
LLM-API YAML that engine.build leaves beside the weights.
"""

from __future__ import annotations

import json

from trtllm_deploy.runtimes.runtime import Runtime, Serve
from trtllm_deploy.source.lock import LockFile
from trtllm_deploy.source.plan import image_ref

CONFIG = "llm-api.yaml"


def program(serve: Serve) -> list[str]:
    """Every rank runs the launcher; rank 0 serves HTTP, the others join it as workers."""
    return ["trtllm-llmapi-launch", "trtllm-serve", serve.model, *serve.options,
            "--tp_size", str(serve.tp), "--pp_size", str(serve.pp),
            "--host", serve.listen, "--port", str(serve.port), "--config", f"{serve.model}/{CONFIG}"]


def options(format: str, inside: str) -> tuple[str, ...]:
    """trtllm-serve's backend options for an artifact (its folder ``inside`` the container): TensorRT
    engines take the tokenizer kept beside them; anything else is a checkpoint for the PyTorch backend."""
    if format == "tensorrt":
        return ("--backend", "tensorrt", "--tokenizer", f"{inside}/tokenizer")
    return ("--backend", "pytorch")


def format_of(served: tuple[str, ...]) -> str:
    """The artifact format a deployment's options serve."""
    return "tensorrt" if "tensorrt" in served else "pytorch"


def iterations(body: bytes) -> int | None:
    """The highest iteration counter in what ``GET /metrics`` answers: the iteration stats recorded
    since the previous call, a JSON list of IterationStats (docs/SOURCES.md#iteration-stats); None
    when it holds none."""
    try:
        stats = json.loads(body)
    except ValueError:
        return None
    found = [s["iter"] for s in stats if isinstance(s, dict) and isinstance(s.get("iter"), int)] \
        if isinstance(stats, list) else []
    return max(found, default=None)


def image(lockfile: LockFile) -> str:
    """The image the lock builds, or the release image it names."""
    return image_ref(lockfile)


RUNTIME = Runtime(
    name="trtllm", product="TensorRT-LLM", server="trtllm-serve", program=program, image=image,
    role="default", config=CONFIG, formats=("pytorch", "tensorrt"), options=options, format_of=format_of,
    says=("tensorrt", "trtllm"), progress=iterations)
