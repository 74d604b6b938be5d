"""Starting a server from its parsed command line: check the MPI world against it, then run rank 0
(or this single process), or follow rank 0 as a worker. The same for every program the stand-in is.
"""

from __future__ import annotations

import os

from . import VERSION
from .log import Log
from .serve import ServeConfig, run
from .settings import Settings
from .world import LocalWorld, launched_rank, launched_size

# The real trtllm-llmapi-launch exports this on every rank; a multi-rank trtllm-serve needs it.
LAUNCH_MARK = "TLLM_SPAWN_PROXY_PROCESS"


def version_line(program: str, product: str) -> str:
    return f"{program} stand-in {VERSION} (trtllm-deploy test double, not {product}; no GPU, no inference)"


def start(config: ServeConfig, log: Log) -> int:
    """Check the world against the configuration, then run rank 0 (or this single process)."""
    try:
        settings = Settings.from_env(os.environ)
    except ValueError as error:
        log.error(str(error))
        return 2
    size, rank = launched_size(), launched_rank()
    if config.runtime == "trtllm-serve" and (size or 1) > 1 and os.environ.get(LAUNCH_MARK) != "1":
        log.error(f"trtllm-serve is MPI rank {rank} of {size} without trtllm-llmapi-launch: start "
                  "multi-rank serving as `mpirun ... trtllm-llmapi-launch trtllm-serve MODEL ...`")
        return 1
    if rank != 0:
        return worker()
    if size is not None and size != config.ranks:
        log.error(f"MPI world size {size} does not match tp_size {config.tp_size} x pp_size "
                  f"{config.pp_size} = {config.ranks}: start exactly {config.ranks} rank(s) "
                  f"(mpirun -np {config.ranks} ...)")
        return 1
    outside = [str(f) for f in settings.faults if f.rank >= config.ranks]
    if outside:
        log.error(f"STANDIN_FAULT {', '.join(outside)}: only ranks 0..{config.ranks - 1} exist")
        return 2
    if (size or 1) > 1:
        world = _mpi_world(log)
        if world is None:
            return 1
    else:
        world = LocalWorld(config.ranks)
    world.bcast_json({"config": config.to_dict(), "settings": settings.to_dict()})
    log.info(f"{version_line(config.runtime, config.product)}: serving {config.model} with tp_size "
             f"{config.tp_size} x pp_size {config.pp_size} on {world.size} process(es)"
             + ("" if world.size == config.ranks else f" (this one stands in for all {config.ranks} ranks)")
             + f", backend {config.backend}; {config.product} is not running here")
    if config.option_keys:
        log.info(f"LLM-API options: {', '.join(config.option_keys)}")
    return run(config, settings, world, log)


def worker() -> int:
    """A rank other than 0: take the configuration from rank 0, then follow it."""
    log = Log("TensorRT-LLM", launched_rank())
    world = _mpi_world(log)
    if world is None:
        return 1
    payload = world.bcast_json()
    config = ServeConfig.from_dict(payload["config"])
    log = Log(config.product, world.rank, config.log_level)
    log.info(f"worker rank {world.rank} of {world.size}: configuration received from rank 0")
    return run(config, Settings.from_dict(payload["settings"]), world, log)


def _mpi_world(log: Log):
    try:
        from .world import MPIWorld

        return MPIWorld()
    except ImportError:
        log.error("mpi4py is not installed: a stand-in world of more than one rank needs it "
                  "(pip install --require-hashes -r requirements/container.txt)")
        return None
