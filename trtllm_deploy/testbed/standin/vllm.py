"""``vllm serve MODEL [--tensor-parallel-size N --distributed-executor-backend {ray,mp} ...]``:
the same stand-in runtime behind vLLM's command line, refusing bad usage through argparse as vLLM
does (exit status 2). It is an MPI program only when started by ``mpirun`` with more than one rank
(vLLM's own multi-node mode: one process per node, node 0 serves HTTP, the others ``--headless``);
otherwise one process stands in for all ranks.

The options are those of ``vllm serve`` at the pinned vLLM (requirements/interface/vllm/
serve_options.json, read from vLLM's source by runtimes/vllm.py with runtimes/interface/argsource.py);
the stand-in uses the ones that shape serving and accepts the rest.

uvicorn's bind failure (faults.BIND_LINE) reads the same in vLLM: vllm-project/vllm#7514. So does
PyTorch's CUDA error of a GPU lost to its driver (faults.DRIVER_LINE): vllm-project/vllm#27430 (TP=8,
the GPU in nvidia-smi's ERR! state after).
"""

from __future__ import annotations

import argparse
import functools
import json

from trtllm_deploy.runtimes.interface import ROOT
from trtllm_deploy.runtimes.interface.argsource import ArgsTable, underscores_to_dashes

from . import openai_api
from .log import Log
from .serve import ServeConfig
from .start import start, version_line
from .world import launched_rank

PROGRAM = "vllm"
PRODUCT = "vLLM"
# vLLM's scheduler default for --max-num-seqs depends on the hardware; the stand-in's batch size.
MAX_NUM_SEQS = 256
SERVE_OPTIONS = "requirements/interface/vllm/serve_options.json"   # as runtimes/vllm.py's
# vLLM's Prometheus metrics at the pinned vLLM (as runtimes/vllm.py's METRICS): GET /metrics answers
# the generated-token counter under its real name and labels, as prometheus_client writes it.
METRICS = "requirements/interface/vllm/metrics.json"
GENERATED = "vllm:generation_tokens"
EXPOSITION = "text/plain; version=0.0.4; charset=utf-8"   # prometheus_client's CONTENT_TYPE_LATEST


@functools.cache
def generated_counter() -> tuple[str, tuple[str, ...]]:
    """The generated-token counter's sample name (a counter's gets ``_total``) and label names."""
    declared = json.loads((ROOT / METRICS).read_text(encoding="utf-8"))["metrics"][GENERATED]
    assert declared["kind"] == "counter", declared
    return f"{GENERATED}_total", tuple(declared["labels"])


def metrics_text(engine, model) -> tuple[str, bytes]:
    """``GET /metrics`` as vLLM answers it (the counter stand-in knows: tokens generated so far)."""
    sample, names = generated_counter()
    values = {"model_name": model.name, "engine": "0"}
    labels = ",".join(f'{name}="{values.get(name, "")}"' for name in names)
    text = f"# TYPE {sample} counter\n{sample}{{{labels}}} {float(engine.tokens_done)}\n"
    return EXPOSITION, text.encode()


openai_api.METRICS[PROGRAM] = metrics_text


@functools.cache
def reference() -> ArgsTable:
    """`vllm serve`'s options at the pinned vLLM."""
    return ArgsTable.load(ROOT / SERVE_OPTIONS)


def main(args: list[str]) -> int:
    """``vllm serve MODEL [OPTIONS]`` and ``vllm --version``."""
    try:
        config = serve_config(args)
    except SystemExit as stop:  # argparse's usage errors (2), --help and --version (0)
        return stop.code or 0
    return start(config, Log(PRODUCT, launched_rank(), config.log_level))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=PROGRAM, allow_abbrev=False,
                                  description="vLLM STAND-IN (no GPU, no inference)")
    top.add_argument("-v", "--version", action="version", version=version_line(PROGRAM, PRODUCT))
    commands = top.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", allow_abbrev=False, help="Start an OpenAI-compatible server.")
    reference().add_to(serve)
    return top


def serve_config(args: list[str]) -> ServeConfig:
    """The configuration ``vllm ARGS`` asks for; argparse exits (SystemExit) on a usage error."""
    top = parser()
    ns = top.parse_args([underscores_to_dashes(arg) for arg in args])
    if ns.model_tag is None:
        top.error("the stand-in needs the model as `vllm serve MODEL`")
    if ns.nnodes > 1:
        rank = launched_rank()
        if ns.node_rank != rank:
            top.error(f"--node-rank {ns.node_rank} on the process the launcher made rank {rank}")
        if (ns.node_rank > 0) != ns.headless:
            top.error("--headless is for every node but node 0 (which serves the API), and only them")
        if ns.distributed_executor_backend != "mp":
            top.error("--nnodes needs --distributed-executor-backend mp")
    level = {"critical": "error", "trace": "debug"}.get(ns.uvicorn_log_level, ns.uvicorn_log_level)
    return ServeConfig(
        runtime=PROGRAM, product=PRODUCT, model=ns.model_tag,
        served_name=(ns.served_model_name or [ns.model_tag])[0], host=ns.host or "0.0.0.0",
        port=ns.port, backend="pytorch", tp_size=ns.tensor_parallel_size, pp_size=ns.pipeline_parallel_size,
        max_batch_size=ns.max_num_seqs or MAX_NUM_SEQS, max_seq_len=ns.max_model_len, log_level=level)
