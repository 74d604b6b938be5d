"""``vllm serve MODEL [--tensor-parallel-size N --distributed-executor-backend {ray,mp} ...]``:
the same stand-in runtime behind vLLM's command line, refusing bad usage through argparse as vLLM
does (exit status 2). It is an MPI program only when started by ``mpirun`` with more than one rank
(vLLM's own multi-node mode: one process per node, node 0 serves HTTP, the others ``--headless``);
otherwise one process stands in for all ranks.

uvicorn's bind failure (faults.BIND_LINE) reads the same in vLLM: vllm-project/vllm#7514.
"""

from __future__ import annotations

import argparse

from .log import Log
from .serve import ServeConfig
from .start import start, version_line
from .world import launched_rank

PROGRAM = "vllm"
PRODUCT = "vLLM"


def main(args: list[str]) -> int:
    """``vllm serve MODEL [OPTIONS]`` and ``vllm --version``."""
    try:
        config = serve_config(args)
    except SystemExit as stop:  # argparse's usage errors (2), --help and --version (0)
        return stop.code or 0
    return start(config, Log(PRODUCT, launched_rank(), config.log_level))


def serve_config(args: list[str]) -> ServeConfig:
    """The configuration ``vllm ARGS`` asks for; argparse exits (SystemExit) on a usage error."""
    parser = argparse.ArgumentParser(prog=PROGRAM, allow_abbrev=False,
                                     description="vLLM STAND-IN (no GPU, no inference)")
    parser.add_argument("-v", "--version", action="version", version=version_line(PROGRAM, PRODUCT))
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", allow_abbrev=False, help="Start an OpenAI-compatible server.")
    serve.add_argument("model")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    serve.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    serve.add_argument("--distributed-executor-backend", choices=("ray", "mp", "uni", "external_launcher"))
    # vLLM's own multi-node mode (mp backend, no Ray): one process per node, node 0 serves HTTP.
    serve.add_argument("--nnodes", type=int, default=1)
    serve.add_argument("--node-rank", type=int, default=0)
    serve.add_argument("--master-addr", default="127.0.0.1")
    serve.add_argument("--master-port", type=int, default=29501)
    serve.add_argument("--headless", action="store_true")
    serve.add_argument("--served-model-name", nargs="+")
    serve.add_argument("--max-model-len", type=int)
    serve.add_argument("--max-num-seqs", type=int, default=256)
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("--trust-remote-code", action="store_true")
    serve.add_argument("--uvicorn-log-level", default="info",
                       choices=("critical", "error", "warning", "info", "debug", "trace"))
    # vLLM accepts --tensor_parallel_size as well as --tensor-parallel-size.
    ns = parser.parse_args([_dashes(arg) for arg in args])
    if ns.nnodes > 1:
        rank = launched_rank()
        if ns.node_rank != rank:
            parser.error(f"--node-rank {ns.node_rank} on the process the launcher made rank {rank}")
        if (ns.node_rank > 0) != ns.headless:
            parser.error("--headless is for every node but node 0 (which serves the API), and only them")
        if ns.distributed_executor_backend != "mp":
            parser.error("--nnodes needs --distributed-executor-backend mp")
    level = {"critical": "error", "trace": "debug"}.get(ns.uvicorn_log_level, ns.uvicorn_log_level)
    return ServeConfig(
        runtime=PROGRAM, product=PRODUCT, model=ns.model, served_name=(ns.served_model_name or [ns.model])[0],
        host=ns.host,
        port=ns.port, backend="pytorch", tp_size=ns.tensor_parallel_size, pp_size=ns.pipeline_parallel_size,
        max_batch_size=ns.max_num_seqs, max_seq_len=ns.max_model_len, log_level=level)


def _dashes(arg: str) -> str:
    if not arg.startswith("--"):
        return arg
    name, equals, value = arg.partition("=")
    return name.replace("_", "-") + equals + value
