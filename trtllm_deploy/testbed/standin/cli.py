"""The command lines, chosen by program name: ``trtllm-serve``, ``trtllm-llmapi-launch``, the
artifact-making tools, and the other runtimes' programs (each in its own module of this package).

``trtllm-serve`` takes TensorRT-LLM's own option names and refuses others the way click does
(usage line, ``Error: ...``, exit status 2).
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
import shlex
import sys
from dataclasses import dataclass

from . import llmapi
from .log import TRTLLM_LEVELS, Log
from .serve import ServeConfig
from .start import LAUNCH_MARK, start, version_line, worker
from .world import launched_rank, launched_size

PRODUCT = "TensorRT-LLM"   # what trtllm-serve stands in for
OTHER_TRTLLM_COMMANDS = ("grpc", "disaggregated", "disaggregated_mpi_worker", "mm_embedding_serve")


@dataclass(frozen=True)
class Option:
    names: tuple[str, ...]
    dest: str
    type: object = str  # str, int, float, "flag", or a tuple of choices
    default: object = None
    help: str = ""
    multiple: bool = False


# The options of `trtllm-serve serve` (tensorrt_llm/commands/serve.py). The stand-in uses the ones
# that shape serving and accepts the rest so that real command lines run unchanged.
SERVE_OPTIONS = (
    Option(("--tokenizer",), "tokenizer", help="Path | Name of the tokenizer (accepted, unused)."),
    Option(("--custom_tokenizer",), "custom_tokenizer", help="Custom tokenizer type (accepted, unused)."),
    Option(("--host",), "host", default="localhost", help="Hostname of the server."),
    Option(("--port",), "port", int, 8000, "Port of the server."),
    Option(("--backend",), "backend", ("pytorch", "tensorrt", "_autodeploy"), "pytorch",
           "The backend to use to serve the model ('trt' means 'tensorrt')."),
    Option(("--custom_module_dirs",), "custom_module_dirs", help="Accepted, unused.", multiple=True),
    Option(("--log_level",), "log_level", tuple(TRTLLM_LEVELS), "info", "The logging level."),
    Option(("--max_beam_width",), "max_beam_width", int, 1, "Maximum number of beams (accepted, unused)."),
    Option(("--max_batch_size",), "max_batch_size", int, 2048, "Requests one engine step serves at most."),
    Option(("--max_num_tokens",), "max_num_tokens", int, 8192, "Maximum batched input tokens (unused)."),
    Option(("--max_seq_len",), "max_seq_len", int, None, "Maximum prompt plus output tokens of a request."),
    Option(("--tensor_parallel_size", "--tp_size"), "tensor_parallel_size", int, 1,
           "Tensor parallelism size."),
    Option(("--pipeline_parallel_size", "--pp_size"), "pipeline_parallel_size", int, 1,
           "Pipeline parallelism size."),
    Option(("--context_parallel_size", "--cp_size"), "context_parallel_size", int, 1, "Accepted, unused."),
    Option(("--moe_expert_parallel_size", "--ep_size"), "moe_expert_parallel_size", int, None,
           "Expert parallelism size (accepted, unused)."),
    Option(("--moe_cluster_parallel_size", "--cluster_size"), "moe_cluster_parallel_size", int, None,
           "Accepted, unused."),
    Option(("--gpus_per_node",), "gpus_per_node", int, None, "Number of GPUs per node (accepted, unused)."),
    Option(("--free_gpu_memory_fraction", "--kv_cache_free_gpu_memory_fraction"), "free_gpu_memory_fraction",
           float, 0.9, "Free GPU memory fraction for the KV cache (accepted, unused)."),
    Option(("--num_postprocess_workers",), "num_postprocess_workers", int, 0, "Accepted, unused."),
    Option(("--trust_remote_code",), "trust_remote_code", "flag", False, "Accepted, unused."),
    Option(("--revision",), "revision", help="Accepted, unused."),
    Option(("--config", "--extra_llm_api_options"), "extra_llm_api_options",
           help="YAML file of LLM-API options; unknown keys are refused."),
    Option(("--reasoning_parser",), "reasoning_parser", help="Accepted, unused."),
    Option(("--tool_parser",), "tool_parser", help="Accepted, unused."),
    Option(("--metadata_server_config_file",), "metadata_server_config_file", help="Accepted, unused."),
    Option(("--server_role",), "server_role", help="Accepted, unused."),
    Option(("--fail_fast_on_attention_window_too_large",), "fail_fast_on_attention_window_too_large",
           "flag", False, "Accepted, unused."),
    Option(("--otlp_traces_endpoint",), "otlp_traces_endpoint", help="Accepted, unused."),
    Option(("--disagg_cluster_uri",), "disagg_cluster_uri", help="Accepted, unused."),
    Option(("--enable_chunked_prefill",), "enable_chunked_prefill", "flag", False, "Accepted, unused."),
    Option(("--media_io_kwargs",), "media_io_kwargs", help="Accepted, unused."),
    Option(("--chat_template",), "chat_template", help="Accepted, unused."),
    Option(("--help",), "help", "flag", False, "Show this message and exit."),
)
BACKEND_ALIASES = {"trt": "tensorrt"}


class UsageError(Exception):
    """A command line the program refuses; printed click-style with exit status 2."""


def parse_serve(args: list[str]) -> tuple[dict, list[str]]:
    """``trtllm-serve serve`` arguments into option values and positionals (click's rules)."""
    by_name = {name: option for option in SERVE_OPTIONS for name in option.names}
    values = {o.dest: ([] if o.multiple else o.default) for o in SERVE_OPTIONS}
    positionals: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            positionals += args[index:]
            break
        if not arg.startswith("-") or arg == "-":
            positionals.append(arg)
            continue
        name, has_value, value = arg.partition("=")
        option = by_name.get(name)
        if option is None:
            raise UsageError(_no_such_option(name, by_name))
        if option.type == "flag":
            if has_value:
                raise UsageError(f"Option '{name}' does not take a value.")
            values[option.dest] = True
            continue
        if not has_value:
            if index >= len(args):
                raise UsageError(f"Option '{name}' requires an argument.")
            value, index = args[index], index + 1
        converted = _convert(option, value)
        if option.multiple:
            values[option.dest].append(converted)
        else:
            values[option.dest] = converted
    return values, positionals


def _no_such_option(name: str, by_name: dict) -> str:
    close = difflib.get_close_matches(name, list(by_name))
    if len(close) == 1:
        return f"No such option: {name} Did you mean {close[0]}?"
    if close:
        return f"No such option: {name} (Possible options: {', '.join(sorted(close))})"
    return f"No such option: {name}"


def _convert(option: Option, value: str):
    hint = " / ".join(f"'{name}'" for name in option.names)
    if option.type in (int, float):
        try:
            return option.type(value)
        except ValueError:
            kind = "integer" if option.type is int else "float"
            raise UsageError(f"Invalid value for {hint}: {value!r} is not a valid {kind}.") from None
    if isinstance(option.type, tuple):
        value = BACKEND_ALIASES.get(value, value) if option.dest == "backend" else value
        if value not in option.type:
            choices = ", ".join(repr(c) for c in option.type)
            raise UsageError(f"Invalid value for {hint}: {value!r} is not one of {choices}.")
    return value


def serve_help() -> str:
    lines = ["Usage: trtllm-serve serve [OPTIONS] MODEL", "",
             "  Running an OpenAI API compatible server -- a STAND-IN: no GPU, no inference.", "",
             "  MODEL: a local Hugging Face checkpoint directory", "", "Options:"]
    for option in SERVE_OPTIONS:
        metavar = {int: " INTEGER", float: " FLOAT", "flag": ""}.get(option.type, " TEXT")
        if isinstance(option.type, tuple):
            metavar = " [" + "|".join(option.type) + "]"
        lines.append(f"  {' / '.join(option.names)}{metavar}")
        lines.append(f"      {option.help}")
    return "\n".join(lines) + "\n"


def trtllm_serve(args: list[str]) -> int:
    """``trtllm-serve [serve] MODEL [OPTIONS]``; ``--version`` and ``--help`` at the top."""
    if args[:1] == ["--version"]:
        print(version_line("trtllm-serve", PRODUCT))
        return 0
    if args[:1] == ["--help"]:
        print("Usage: trtllm-serve [OPTIONS] COMMAND [ARGS]...\n\n  trtllm-serve STAND-IN (no GPU, no "
              "inference).\n\nOptions:\n  --version  Show the version and exit.\n  --help     Show this "
              "message and exit.\n\nCommands:\n  serve  Running an OpenAI API compatible server")
        return 0
    if args[:1] and args[0] in OTHER_TRTLLM_COMMANDS:
        return _usage_error(f"the stand-in implements only 'serve', not {args[0]!r}")
    if "--help" in args:
        print(serve_help(), end="")
        return 0
    log = Log(PRODUCT, launched_rank())
    try:
        config = trtllm_serve_config(args[1:] if args[:1] == ["serve"] else args)
    except UsageError as error:
        return _usage_error(str(error))
    except llmapi.OptionsError as error:
        log.error(str(error))
        return 1
    return start(config, Log(PRODUCT, launched_rank(), config.log_level))


def trtllm_serve_config(args: list[str]) -> ServeConfig:
    """The configuration ``trtllm-serve serve ARGS`` asks for; the options file wins over flags."""
    values, positionals = parse_serve(args)
    if not positionals:
        raise UsageError("Missing argument 'MODEL'.")
    if len(positionals) > 1:
        extra = positionals[1:]
        raise UsageError(f"Got unexpected extra argument{'s' if len(extra) > 1 else ''} ({' '.join(extra)})")
    options = llmapi.load(values["extra_llm_api_options"], values["backend"]) \
        if values["extra_llm_api_options"] else {}

    def setting(key: str):
        return options.get(key, values[key])  # as TensorRT-LLM's update_llm_args_with_extra_dict

    return ServeConfig(
        runtime="trtllm-serve", product=PRODUCT, model=positionals[0], served_name=positionals[0],
        host=values["host"],
        port=values["port"], backend=setting("backend"), tp_size=setting("tensor_parallel_size"),
        pp_size=setting("pipeline_parallel_size"), max_batch_size=setting("max_batch_size"),
        max_seq_len=setting("max_seq_len"), log_level=TRTLLM_LEVELS[values["log_level"]],
        option_keys=tuple(sorted(options)))


def _usage_error(message: str) -> int:
    sys.stderr.write("Usage: trtllm-serve serve [OPTIONS] MODEL\n"
                     "Try 'trtllm-serve serve --help' for help.\n\n"
                     f"Error: {message}\n")
    return 2


def llmapi_launch(args: list[str]) -> int:
    """``trtllm-llmapi-launch CMD ARGS...``: rank 0 runs CMD, every other rank becomes a worker."""
    if not args:
        sys.stderr.write("usage: trtllm-llmapi-launch COMMAND [ARGS...]  (under mpirun)\n")
        return 2
    rank, size = launched_rank(), launched_size() or 1
    log = Log(PRODUCT, rank)
    if rank != 0:
        log.info(f"trtllm-llmapi-launch: rank {rank} of {size} joins as a worker")
        return worker()
    os.environ[LAUNCH_MARK] = "1"
    log.info(f"trtllm-llmapi-launch: rank 0 of {size} runs {shlex.join(args)}")
    try:
        os.execvp(args[0], args)
    except OSError as error:
        log.error(f"trtllm-llmapi-launch: cannot run {args[0]}: {error.strerror}")
        return 127


def _build_tools() -> dict:
    from . import build  # the artifact-making stand-ins (trtllm-build, convert, hf_ptq)

    return {"trtllm-build": build.trtllm_build, "convert_checkpoint.py": build.convert_checkpoint,
            "quantize.py": lambda argv: build.convert_checkpoint(argv, quantize=True),
            "hf_ptq.py": build.hf_ptq}


def _runtime_programs() -> dict:
    """The other runtimes' programs: every module of this package that names a ``PROGRAM``."""
    package = __name__.rpartition(".")[0]
    found = {}
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name.startswith("_") or info.name == "cli":
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        if isinstance(getattr(module, "PROGRAM", None), str):
            found[module.PROGRAM] = module.main
    return found


PROGRAMS = {"trtllm-serve": trtllm_serve, "trtllm-llmapi-launch": llmapi_launch, **_runtime_programs(),
            **_build_tools()}


def main(argv: list[str] | None = None) -> int:
    """Dispatch on the program name (``argv[0]``), or on the first argument after it."""
    argv = list(sys.argv if argv is None else argv)
    name = os.path.basename(argv[0])
    if name in PROGRAMS:
        return PROGRAMS[name](argv[1:])
    if len(argv) > 1 and argv[1] in PROGRAMS:
        return PROGRAMS[argv[1]](argv[2:])
    sys.stderr.write(f"usage: python -m trtllm_deploy.testbed.standin {{{','.join(PROGRAMS)}}} ARGS...\n")
    return 2
