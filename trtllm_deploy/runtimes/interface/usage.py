"""What the project itself passes to TensorRT-LLM and vLLM, collected by calling its own generators,
and what a pinned TensorRT-LLM lacks of it.

:func:`used` runs the code that builds command lines and LLM-API YAML (runtimes/trtllm.py's
``program()`` and ``options()``, serving/smoke.py's container command, engine.build's ``llm_api()`` for
every model of the catalog × precision × node count, the testbed artifact's YAML, runtimes/vllm.py's
``program()`` through a real ``sh``) and records every flag and key with where it comes from.
:func:`gaps` checks that usage against an :class:`~trtllm_deploy.runtimes.interface.Interface`.
"""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from trtllm_deploy.runtimes.interface.cli import UsageError

if TYPE_CHECKING:
    from trtllm_deploy.runtimes.interface import Interface

SHAPES = ((1, 1), (2, 1), (1, 2), (2, 2))   # (tp, pp) the command lines are built for
INSIDE = "/model"                            # an artifact's folder inside the container
PRINT_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"


@dataclass
class Usage:
    """Every ``trtllm-serve`` flag and LLM-API key the project generates, with where."""

    flags: dict[str, list[str]] = field(default_factory=dict)     # "--tp_size" → where
    keys: dict[str, list[str]] = field(default_factory=dict)      # "kv_cache_config.x" → where
    commands: list[tuple[str, list[str]]] = field(default_factory=list)   # trtllm-serve argv (no program)
    files: list[tuple[str, str, dict]] = field(default_factory=list)      # (where, backend, YAML mapping)
    vllm: list[tuple[str, list[str]]] = field(default_factory=list)       # vllm argv (no program)
    vllm_flags: dict[str, list[str]] = field(default_factory=dict)

    def add_command(self, where: str, argv: list[str]) -> None:
        """trtllm-serve's arguments (everything after ``trtllm-serve``)."""
        self.commands.append((where, list(argv)))
        for flag in _flags(argv):
            _note(self.flags, flag, where)

    def add_file(self, where: str, backend: str, mapping: dict) -> None:
        self.files.append((where, backend, mapping))
        for key in _keys(mapping):
            _note(self.keys, key, where)

    def add_vllm(self, where: str, argv: list[str]) -> None:
        self.vllm.append((where, list(argv)))
        for flag in _flags(argv):
            _note(self.vllm_flags, flag, where)


def _note(table: dict[str, list[str]], name: str, where: str) -> None:
    places = table.setdefault(name, [])
    if where not in places:
        places.append(where)


def _flags(argv: list[str]) -> list[str]:
    return [arg.partition("=")[0] for arg in argv if arg.startswith("-") and arg not in ("-", "--")]


def _keys(mapping: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        found.append(name)
        if isinstance(value, dict):
            found += _keys(value, f"{name}.")
    return found


def served_formats(trtllm_build: bool | None) -> tuple[str, ...]:
    """The artifact formats launch serves at a pin: TensorRT engines only where the lock does not
    say trtllm-build is gone (``trtllm_build = false``)."""
    from trtllm_deploy.runtimes import trtllm

    return tuple(f for f in trtllm.RUNTIME.formats if f != "tensorrt" or trtllm_build is not False)


def used(catalog=None, formats: tuple[str, ...] | None = None) -> Usage:
    """Every flag and key the project's generators emit. ``catalog``: the models (default: the
    presets with the user's models file); ``formats``: the artifact formats to build command lines
    and YAML for (default: those the shipped lock's pin serves, see :func:`served_formats`; a caller
    checking another pin passes that pin's)."""
    from trtllm_deploy.artifact import models
    from trtllm_deploy.source import lock

    catalog = catalog if catalog is not None else models.load()
    if formats is None:
        formats = served_formats(lock.load().lock.source.trtllm_build)
    usage = Usage()
    _launch(usage, formats)
    _smoke(usage, formats)
    _artifacts(usage, catalog, formats)
    _testbed(usage)
    _rollback(usage)
    return usage


def _launch(usage: Usage, formats: tuple[str, ...]) -> None:
    from trtllm_deploy.runtimes import trtllm
    from trtllm_deploy.runtimes.runtime import Serve

    for format in formats:
        for tp, pp in SHAPES:
            serve = Serve(model=INSIDE, tp=tp, pp=pp, port=8000, head="10.0.0.1",
                          options=trtllm.options(format, INSIDE))
            argv = trtllm.program(serve)
            server = argv.index(trtllm.RUNTIME.server)
            usage.add_command(f"runtimes/trtllm.py program() for a {format} artifact", argv[server + 1:])


class _Recorder:
    """A target that runs nothing and remembers every command it was given."""

    name = "recorder"

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def run(self, argv, **_options):
        from trtllm_deploy.hosts.targets import Result

        self.commands.append(list(argv))
        return Result(self.name, tuple(argv), 1, "", "", 0.0)


def _smoke(usage: Usage, formats: tuple[str, ...]) -> None:
    from trtllm_deploy.runtimes import trtllm
    from trtllm_deploy.serving import smoke

    for format in formats:
        target = _Recorder()
        node = SimpleNamespace(name="head", container=SimpleNamespace(ulimits={}, env={}))
        report = SimpleNamespace(add=lambda *args, **kwargs: None)
        image = "runtime-image"
        smoke._start(report, node, target, image, "/artifacts/a", 8355, True,
                     list(trtllm.options(format, INSIDE)))
        for argv in target.commands:
            if argv[:2] == ["docker", "run"] and image in argv:
                rest = argv[argv.index(image) + 1:]
                usage.add_command(f"serving/smoke.py for a {format} artifact", rest[1:])


def _artifacts(usage: Usage, catalog, formats: tuple[str, ...]) -> None:
    from trtllm_deploy.artifact import build

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
    import yaml

    from trtllm_deploy.testbed import artifact

    with tempfile.TemporaryDirectory() as folder:
        made = artifact.make(Path(folder) / "tiny")
        usage.add_file("testbed/artifact.py's llm-api.yaml", "pytorch",
                       yaml.safe_load((made / "llm-api.yaml").read_text()) or {})


def _rollback(usage: Usage) -> None:
    """vllm's arguments as each node's process gets them: the program's ``sh`` run for real, with
    a command that prints its arguments in place of vllm."""
    from trtllm_deploy.runtimes import vllm
    from trtllm_deploy.runtimes.runtime import Serve

    for tp, pp in SHAPES:
        argv = vllm.program(Serve(model=INSIDE, tp=tp, pp=pp, port=8000, head="10.0.0.1"))
        program = argv.index("vllm")
        for rank in sorted({0, tp * pp - 1}):
            shown = subprocess.run([*argv[:program], sys.executable, "-c", PRINT_ARGV, *argv[program + 1:]],
                                   env={"OMPI_COMM_WORLD_RANK": str(rank), "PATH": "/usr/bin:/bin"},
                                   capture_output=True, text=True, check=True, timeout=60)
            usage.add_vllm(f"runtimes/vllm.py program() (rollback), rank {rank}", json.loads(shown.stdout))


@dataclass(frozen=True)
class Gap:
    """A flag or key the project uses that the pin lacks, renamed, or takes differently."""

    kind: str              # "flag" | "key"
    name: str
    problem: str           # "missing", "renamed to X", or what the pin says about the value
    where: tuple[str, ...]
    pin: str = ""

    def __str__(self) -> str:
        more = len(self.where) - 3
        places = "; ".join(self.where[:3]) + (f"; and {more} more" if more > 0 else "")
        what = "trtllm-serve flag" if self.kind == "flag" else "LLM-API key"
        return f"{what} {self.name}: {self.problem} in the pinned {self.pin} (used by {places})"


def _renamed_flag(flag: str, by_flag: dict) -> str | None:
    dest = flag.lstrip("-").replace("-", "_")
    for option in {id(o): o for o in by_flag.values()}.values():
        if option.name == dest:
            return option.flags[0]
    close = difflib.get_close_matches(flag, list(by_flag), n=1, cutoff=0.8)
    return close[0] if close else None


def gaps(usage: Usage, interface: Interface) -> list[Gap]:
    """Every flag and key of ``usage`` the pinned interface refuses, each with where it is used."""
    found: list[Gap] = []
    if interface.cli is not None:
        by_flag = interface.cli.by_flag("serve")
        for flag, where in sorted(usage.flags.items()):
            if flag not in by_flag:
                renamed = _renamed_flag(flag, by_flag)
                problem = f"renamed to {renamed}" if renamed else "missing"
                found.append(Gap("flag", flag, problem, tuple(where), interface.name))
        values: dict[tuple[str, str], list[str]] = {}
        for where, argv in usage.commands:
            for flag, value, problem in _bad_values(argv, by_flag):
                values.setdefault((f"{flag} {value}", problem), []).append(where)
        for (name, problem), where in sorted(values.items()):
            found.append(Gap("flag", name, problem, tuple(dict.fromkeys(where)), interface.name))
    keys: dict[tuple[str, str], list[str]] = {}
    for where, backend, mapping in usage.files:
        allowed = interface.args.keys(backend)
        for problem in interface.args.validate(mapping, backend):
            text = problem.message
            if problem.type == "extra_forbidden":
                close = difflib.get_close_matches(problem.location[-1], list(allowed), n=1, cutoff=0.8) \
                    if len(problem.location) == 1 else []
                text = f"renamed to {close[0]}" if close else "missing"
            keys.setdefault((problem.where, text), []).append(where)
    for (name, problem), where in sorted(keys.items()):
        found.append(Gap("key", name, problem, tuple(dict.fromkeys(where)), interface.name))
    return found


def _bad_values(argv: list[str], by_flag: dict):
    """(flag, value, click's complaint) for each value the pinned option refuses."""
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        name, has_value, value = arg.partition("=")
        option = by_flag.get(name)
        if option is None or option.is_flag:
            continue
        if not has_value:
            if index >= len(argv):
                continue
            value, index = argv[index], index + 1
        try:
            option.convert(value)
        except UsageError as error:
            yield name, value, str(error)
