"""What the project passes to TensorRT-LLM (:class:`Usage`, filled by trtllm_deploy/cli/usage.py from
the project's own generators) and what a pinned TensorRT-LLM lacks of it (:func:`gaps`)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from trtllm_deploy.runtimes.interface.cli import UsageError
from trtllm_deploy.runtimes.interface.pinned import Interface


@dataclass
class Usage:
    """Every ``trtllm-serve`` flag and LLM-API key the project generates, with where; the other
    runtimes' command lines too."""

    flags: dict[str, list[str]] = field(default_factory=dict)     # "--tp_size" → where
    keys: dict[str, list[str]] = field(default_factory=dict)      # "kv_cache_config.x" → where
    commands: list[tuple[str, list[str]]] = field(default_factory=list)   # (where, trtllm-serve serve argv)
    files: list[tuple[str, str, dict]] = field(default_factory=list)      # (where, backend, YAML mapping)
    others: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)   # runtime → (where, argv)

    def add_command(self, where: str, argv: list[str]) -> None:
        """``trtllm-serve serve``'s arguments (the model and the options)."""
        self.commands.append((where, list(argv)))
        for flag in flags_in(argv):
            _note(self.flags, flag, where)

    def add_file(self, where: str, backend: str, mapping: dict) -> None:
        self.files.append((where, backend, mapping))
        for key in _keys(mapping):
            _note(self.keys, key, where)

    def add_other(self, runtime: str, where: str, argv: list[str]) -> None:
        self.others.setdefault(runtime, []).append((where, list(argv)))


def _note(table: dict[str, list[str]], name: str, where: str) -> None:
    places = table.setdefault(name, [])
    if where not in places:
        places.append(where)


def flags_in(argv: list[str]) -> list[str]:
    """The options of a command line (``--name=value`` as ``--name``)."""
    return [arg.partition("=")[0] for arg in argv if arg.startswith("-") and arg not in ("-", "--")]


def _keys(mapping: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        found.append(name)
        if isinstance(value, dict):
            found += _keys(value, f"{name}.")
    return found


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
        return f"{what} {self.name}: {self.problem.rstrip('.')} in the pinned {self.pin} (used by {places})"


def _renamed_flag(flag: str, by_flag: dict) -> str | None:
    """The spelling of the option with the same parameter name, else a close one."""
    dest = flag.lstrip("-").replace("-", "_")
    for option in by_flag.values():
        if option.name == dest:
            return option.flags[0]
    close = difflib.get_close_matches(flag, list(by_flag), n=1, cutoff=0.8)
    return close[0] if close else None


def gaps(usage: Usage, interface: Interface) -> list[Gap]:
    """Every flag and key of ``usage`` the pinned interface refuses, each with where it is used.
    A pin without trtllm_serve_cli.yaml has no flags to check them against: only keys are."""
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
