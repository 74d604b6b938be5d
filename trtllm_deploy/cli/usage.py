"""Every flag and LLM-API key the project passes to its runtimes, collected by calling the project's
own generators (never a hand-kept list), for runtimes/interface's gaps() and the interface tests.

The generators live in every layer (runtimes' ``program()`` and ``options()``, engine.build's
``llm_api()``, serving/smoke.py's container command, the testbed's artifact), so this sits at the top.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import yaml

from trtllm_deploy.artifact import build, models
from trtllm_deploy.hosts.targets import Result
from trtllm_deploy.runtimes import runtime
from trtllm_deploy.runtimes.interface import Usage
from trtllm_deploy.runtimes.runtime import Serve
from trtllm_deploy.serving import smoke
from trtllm_deploy.source import lock
from trtllm_deploy.testbed import artifact

SHAPES = ((1, 1), (2, 1), (1, 2), (2, 2))   # (tp, pp) the command lines are built for
INSIDE = "/model"                            # an artifact's folder inside the container
SHELLS = ("sh", "bash")
# Stands in for each program a runtime's command line starts: prints its own argv as JSON.
SHOW_ARGV = "import json, os, sys\nprint(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]))\n"


def served_formats(trtllm_build: bool | None) -> tuple[str, ...]:
    """The artifact formats launch serves at a pin: TensorRT engines only where the lock does not
    say trtllm-build is gone (``trtllm_build = false``)."""
    return tuple(f for f in runtime.default().formats if f != "tensorrt" or trtllm_build is not False)


def used(catalog: models.Catalog | None = None, formats: tuple[str, ...] | None = None) -> Usage:
    """Every flag and key the project's generators emit. ``catalog``: the models (default: the
    presets with the user's models file); ``formats``: the artifact formats to build command lines
    and YAML for (default: those the shipped lock's pin serves; a caller checking another pin
    passes ``served_formats(that lock's trtllm_build)``)."""
    catalog = catalog if catalog is not None else models.load()
    formats = formats if formats is not None else served_formats(lock.load().lock.source.trtllm_build)
    usage = Usage()
    _launch(usage, formats)
    _smoke(usage, formats)
    _artifacts(usage, catalog, formats)
    _testbed(usage)
    return usage


def run_program(argv: list[str], model: str, rank: int) -> tuple[list[str], list[str]]:
    """What a runtime's command line starts, as that rank's process gets it: the command is run for
    real (its shell wrapper included, with the MPI rank in the environment) with every program it
    names replaced by one that prints its argv. Returns (program words, arguments from the model on)."""
    with tempfile.TemporaryDirectory(prefix="trtllm-deploy-argv-") as folder:
        for word in argv[:argv.index(model)]:
            if word and word not in SHELLS and not word.startswith("-") and not set(word) & set("/ "):
                fake = Path(folder) / word
                fake.write_text(f"#!{sys.executable}\n{SHOW_ARGV}")
                fake.chmod(0o755)
        env = {"PATH": f"{folder}{os.pathsep}/usr/bin:/bin", "OMPI_COMM_WORLD_RANK": str(rank)}
        shown = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=60)
    started = json.loads(shown.stdout.splitlines()[0])
    at = started.index(model)
    return started[:at], started[at:]


def _launch(usage: Usage, formats: tuple[str, ...]) -> None:
    default = runtime.default()
    for record in runtime.known():
        for tp, pp in SHAPES:
            for format in formats if record is default else ("pytorch",):
                serve = Serve(model=INSIDE, tp=tp, pp=pp, port=8000, head="10.0.0.1",
                              options=record.options(format, INSIDE))
                for rank in sorted({0, tp * pp - 1}):
                    words, args = run_program(record.program(serve), INSIDE, rank)
                    where = f"runtimes/{record.name}.py program() ({record.role or record.name}), rank {rank}"
                    if record is default:
                        usage.add_command(f"{where}, a {format} artifact", args)
                    else:
                        usage.add_other(record.name, where, [*words[1:], *args])


class _Recorder:
    """A target that runs nothing and remembers every command it was given."""

    name = "recorder"

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def run(self, argv, **_options) -> Result:
        self.commands.append(list(argv))
        return Result(self.name, tuple(argv), 1, "", "", 0.0)


def _smoke(usage: Usage, formats: tuple[str, ...]) -> None:
    """serving/smoke.py's container command (trtllm-serve without the launcher)."""
    for format in formats:
        target = _Recorder()
        node = SimpleNamespace(name="head", host="127.0.0.1",
                               container=SimpleNamespace(ulimits={}, env={}))
        report = SimpleNamespace(add=lambda *args, **kwargs: None)
        image = "runtime-image"
        smoke._start(report, node, target, image, "/artifacts/a", 8355, True,
                     list(runtime.default().options(format, INSIDE)))
        for argv in target.commands:
            if argv[:2] == ["docker", "run"] and image in argv:
                started = argv[argv.index(image) + 1:]
                usage.add_command(f"serving/smoke.py, a {format} artifact", started[started.index(INSIDE):])


def _artifacts(usage: Usage, catalog: models.Catalog, formats: tuple[str, ...]) -> None:
    """engine.build's LLM-API YAML for every model × precision × node count (its tp) × format."""
    for model in catalog.models.values():
        for precision, variant in model.variants.items():
            for nodes, tp in sorted(variant.tp_by_nodes.items()):
                for backend in formats:
                    planned = build.Planned(variant=variant, tp=tp, fit=None, name="", nodes=nodes,
                                            backend=backend)
                    where = (f"engine.build's {build.LLM_API_FILE} for {model.name} {precision} tp{tp} on "
                             f"{nodes} node{'s' if nodes > 1 else ''} ({backend})")
                    usage.add_file(where, backend, build.llm_api(planned))


def _testbed(usage: Usage) -> None:
    with tempfile.TemporaryDirectory() as folder:
        made = artifact.make(Path(folder) / "tiny")
        usage.add_file("testbed/artifact.py's llm-api.yaml", "pytorch",
                       yaml.safe_load((made / build.LLM_API_FILE).read_text()) or {})
