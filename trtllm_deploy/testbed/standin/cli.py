"""The command lines, chosen by program name: ``trtllm-serve``, ``trtllm-llmapi-launch``, the
artifact-making tools, and the other runtimes' programs (each in its own module of this package).

``trtllm-serve`` takes exactly the options of the pinned TensorRT-LLM's own reference
(requirements/interface/tensorrt-llm/trtllm_serve_cli.yaml, through trtllm_deploy.runtimes.interface)
and refuses others the way click does (usage line, ``Error: ...``, exit status 2).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import shlex
import sys
from trtllm_deploy.runtimes import interface

from . import llmapi
from .log import TRTLLM_LEVELS, Log
from .serve import ServeConfig
from .start import LAUNCH_MARK, start, version_line, worker
from .world import launched_rank, launched_size

PRODUCT = "TensorRT-LLM"   # what trtllm-serve stands in for
OTHER_TRTLLM_COMMANDS = ("grpc", "disaggregated", "disaggregated_mpi_worker", "mm_embedding_serve")


def reference() -> interface.CliReference:
    """trtllm-serve's options at the pinned TensorRT-LLM (requirements/interface/, in the image too)."""
    pinned = llmapi.pinned()
    if pinned.cli is None:
        raise SystemExit(f"the stand-in needs trtllm_serve_cli.yaml of the pinned {pinned.name}")
    return pinned.cli


def parse_serve(args: list[str]) -> tuple[dict, list[str]]:
    """``trtllm-serve serve`` arguments into option values and positionals, with click's rules and
    the pinned reference's options: every one is accepted, those that shape serving are used."""
    return reference().parse(args, "serve")


def serve_help() -> str:
    lines = ["Usage: trtllm-serve serve [OPTIONS] MODEL", "",
             "  Running an OpenAI API compatible server -- a STAND-IN: no GPU, no inference.", "",
             "  MODEL: a local Hugging Face checkpoint directory", "", "Options:"]
    for option in reference().options("serve").values():
        metavar = "" if option.is_flag else " [" + "|".join(option.choices) + "]" if option.choices \
            else {"int": " INTEGER", "float": " FLOAT", "Path": " PATH"}.get(option.type, " TEXT")
        lines.append(f"  {' / '.join(option.flags)}{metavar}")
        if option.default not in (None, False, ()):
            lines.append(f"      [default: {option.default}]")
    lines.append("  --help  Show this message and exit.")
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
    except interface.UsageError as error:
        return _usage_error(str(error))
    except llmapi.OptionsError as error:
        log.error(str(error))
        return 1
    return start(config, Log(PRODUCT, launched_rank(), config.log_level))


def trtllm_serve_config(args: list[str]) -> ServeConfig:
    """The configuration ``trtllm-serve serve ARGS`` asks for; the options file wins over flags."""
    values, positionals = parse_serve(args)
    if not positionals:
        raise interface.UsageError("Missing argument 'MODEL'.")
    if len(positionals) > 1:
        extra = positionals[1:]
        plural = "s" if len(extra) > 1 else ""
        raise interface.UsageError(f"Got unexpected extra argument{plural} ({' '.join(extra)})")
    options = llmapi.load(values["extra_llm_api_options"], values["backend"]) \
        if values["extra_llm_api_options"] else {}

    def setting(key: str):
        return options.get(key, values[key])  # as TensorRT-LLM's update_llm_args_with_extra_dict

    return ServeConfig(
        runtime="trtllm-serve", product=PRODUCT, model=positionals[0], served_name=positionals[0],
        host=values["host"], port=values["port"], backend=setting("backend"),
        tp_size=setting("tensor_parallel_size"),
        pp_size=setting("pipeline_parallel_size"), max_batch_size=setting("max_batch_size"),
        max_seq_len=setting("max_seq_len"), log_level=TRTLLM_LEVELS.get(values["log_level"], "info"),
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
