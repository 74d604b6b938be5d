"""What every rank does from start to stop: check its artifact, "load", join the others, then serve.

Rank 0 binds the HTTP port only once every rank has loaded (as the real server listens only after
the model is up) and runs the engine; the other ranks follow its steps.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from dataclasses import dataclass

from . import VERSION, artifact, faults
from .engine import Engine, follow
from .log import Log
from .openai_api import ServedModel, make_server
from .settings import Settings
from .world import Stopped

@dataclass(frozen=True)
class ServeConfig:
    """What rank 0 parsed from its command line; sent to every other rank as JSON."""

    runtime: str  # the program that parsed it ("trtllm-serve", ...)
    product: str  # what it stands in for ("TensorRT-LLM", ...)
    model: str
    served_name: str
    host: str
    port: int
    backend: str
    tp_size: int
    pp_size: int
    max_batch_size: int
    max_seq_len: int | None
    log_level: str  # one of log.LEVELS
    option_keys: tuple[str, ...] = ()  # keys of the LLM-API options file, for the start-up log

    @property
    def ranks(self) -> int:
        return self.tp_size * self.pp_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ServeConfig:
        return cls(**{**data, "option_keys": tuple(data["option_keys"])})


def run(config: ServeConfig, settings: Settings, world, log: Log) -> int:
    """Run this rank until shutdown; the exit status (faults leave without returning)."""
    try:
        checked = artifact.check(config.model, config.backend)
    except artifact.ArtifactError as error:
        for problem in error.problems:
            log.error(f"artifact check failed: {problem}")
        return 1
    log.info(f"artifact ok: {checked.summary()}")
    load(settings, world, log)
    fault = faults.at_startup(settings.faults, world.hosted_ranks, ("nccl", "double-free"))
    if fault:
        fault.fire(log, "while the communicator comes up")
    try:
        world.barrier()
        if world.rank != 0:
            log.info("communicator ready; following rank 0's steps")
            signal.signal(signal.SIGTERM, lambda *_: world.stop.set())
            follow(world, settings, log)
            return 0
        return _serve(config, settings, world, checked, log)
    except Stopped:
        log.warning("stopping while a collective was still pending; MPI is not finalized")
        return 0


def load(settings: Settings, world, log: Log) -> None:
    """Print weight-loading progress, so a supervisor can wait by progress rather than by the clock."""
    fault = faults.at_startup(settings.faults, world.hosted_ranks, ("exit", "hang", "oom"))
    steps = settings.load_steps
    for step in range(1, steps + 1):
        time.sleep(settings.load_seconds / steps)
        if fault and step == (steps + 1) // 2:
            fault.fire(log, f"while loading weights (shard {step}/{steps})")
        log.info(f"Loading weights: {step}/{steps} shards")
    log.info("model weights loaded")


def _serve(config: ServeConfig, settings: Settings, world, checked: artifact.Artifact, log: Log) -> int:
    engine = Engine(world, settings, config.max_batch_size, log)
    metadata = {"path": str(checked.path), "model_type": checked.model_type,
                "architectures": list(checked.architectures), "backend": config.backend,
                "tp_size": config.tp_size, "pp_size": config.pp_size, "world_size": world.size,
                "standin_version": VERSION}
    model = ServedModel(config.served_name, config.runtime, config.max_seq_len, metadata)
    bind = faults.at_startup(settings.faults, [0], ("bind",))
    try:
        if bind:
            log.warning(f"STANDIN_FAULT {bind}: failing to bind {config.host}:{config.port}")
            raise OSError(98, "Address already in use")
        server = make_server(config.host, config.port, model, engine, log)
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        log.error(faults.BIND_LINE.format(errno=error.errno, host=config.host, port=config.port,
                                          reason=reason))
        return 1
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: world.stop.set())
    log.info(f"Started server process [{os.getpid()}]")
    log.info("Application startup complete.")
    log.info(f"serving {config.served_name!r} on http://{config.host}:{config.port} "
             f"(stand-in, {world.size} MPI rank(s) for tp_size {config.tp_size} x pp_size {config.pp_size})")
    try:
        engine.run()
    finally:
        server.shutdown()
    log.info("shut down cleanly")
    return 0
