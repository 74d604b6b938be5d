"""``trtllm-serve``'s options as TensorRT-LLM's own reference records them
(``tests/unittest/api_stability/references/trtllm_serve_cli.yaml``), and a parser with click's rules.

Each option of a subcommand has its Click parameter name (the key), its ``flags`` (primary and
aliases, sorted), ``type`` (``int``, ``float``, ``str``, ``bool``, ``Path`` or ``Choice([...])``),
``default``, ``is_flag``, ``multiple`` and ``required``. A boolean flag pair (``--telemetry`` /
``--no-telemetry``) is one option whose ``--no-`` spelling turns it off.

This module is read by the stand-in inside its image as well: it needs only PyYAML.
"""

from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass

import yaml

# click's BOOL type: the words it takes for true and for false.
TRUE_WORDS = ("1", "true", "t", "yes", "y", "on")
FALSE_WORDS = ("0", "false", "f", "no", "n", "off")


class UsageError(Exception):
    """A command line click refuses; click prints it after the usage line and exits with status 2."""


class ReferenceError(ValueError):
    """The reference file is not what TensorRT-LLM's api_stability references look like."""


@dataclass(frozen=True)
class CliOption:
    name: str                      # click's parameter name: the key of the values
    flags: tuple[str, ...]         # every spelling, as the reference lists them
    type: str                      # the reference's type text
    default: object = None
    is_flag: bool = False
    multiple: bool = False
    required: bool = False
    status: str | None = None

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The values a ``Choice([...])`` takes; None for any other type."""
        if not self.type.startswith("Choice(") or not self.type.endswith(")"):
            return None
        try:
            values = ast.literal_eval(self.type[len("Choice("):-1])
        except (ValueError, SyntaxError):
            raise ReferenceError(f"option {self.name}: cannot read the choices of {self.type!r}") from None
        return tuple(str(value) for value in values)

    @property
    def off_flags(self) -> tuple[str, ...]:
        """The spellings that turn a boolean flag pair off (``--no-x`` beside ``--x``)."""
        if not self.is_flag:
            return ()
        return tuple(flag for flag in self.flags
                     if flag.startswith("--no-") and f"--{flag[len('--no-'):]}" in self.flags)

    @property
    def hint(self) -> str:
        return " / ".join(f"'{flag}'" for flag in self.flags)

    def convert(self, value: str):
        """The value as click's type for this option makes it, or UsageError as click words it."""
        choices = self.choices
        if choices is not None:
            if value not in choices:
                listed = ", ".join(repr(choice) for choice in choices)
                raise UsageError(f"Invalid value for {self.hint}: {value!r} is not one of {listed}.")
            return value
        if self.type in ("int", "float"):
            kind = {"int": "integer", "float": "float"}[self.type]
            try:
                return int(value) if self.type == "int" else float(value)
            except ValueError:
                raise UsageError(f"Invalid value for {self.hint}: {value!r} is not a valid {kind}.") from None
        if self.type == "bool":
            word = value.strip().lower()
            if word in TRUE_WORDS or word in FALSE_WORDS:
                return word in TRUE_WORDS
            raise UsageError(f"Invalid value for {self.hint}: {value!r} is not a valid boolean.")
        return value  # str, Path and anything else click passes through as text

    @property
    def initial(self):
        """The value when the option is not given (click: an empty tuple for ``multiple``)."""
        if self.multiple:
            return tuple(self.default or ())
        return self.default


class CliReference:
    """The options of each ``trtllm-serve`` subcommand at one TensorRT-LLM commit."""

    def __init__(self, commands: dict[str, dict[str, CliOption]]):
        self.commands = commands

    @classmethod
    def from_text(cls, text: str, source: str = "trtllm_serve_cli.yaml") -> CliReference:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ReferenceError(f"{source} is not valid YAML: {error}") from None
        if not isinstance(data, dict) or not isinstance(data.get("commands"), dict):
            raise ReferenceError(f"{source}: expected a 'commands' mapping of subcommands")
        commands = {}
        for command, body in data["commands"].items():
            options = {}
            for name, spec in ((body or {}).get("options") or {}).items():
                if not isinstance(spec, dict) or not spec.get("flags"):
                    raise ReferenceError(f"{source}: commands.{command}.options.{name} has no flags")
                options[name] = CliOption(
                    name=name, flags=tuple(str(flag) for flag in spec["flags"]),
                    type=str(spec.get("type", "str")), default=spec.get("default"),
                    is_flag=bool(spec.get("is_flag")), multiple=bool(spec.get("multiple")),
                    required=bool(spec.get("required")), status=spec.get("status"))
            commands[str(command)] = options
        return cls(commands)

    def options(self, command: str = "serve") -> dict[str, CliOption]:
        return self.commands.get(command, {})

    def by_flag(self, command: str = "serve") -> dict[str, CliOption]:
        return {flag: option for option in self.options(command).values() for flag in option.flags}

    def flags(self, command: str = "serve") -> tuple[str, ...]:
        return tuple(sorted(self.by_flag(command)))

    def defaults(self, command: str = "serve") -> dict[str, object]:
        return {name: option.initial for name, option in self.options(command).items()}

    def parse(self, argv: list[str] | tuple[str, ...], command: str = "serve") -> tuple[dict, list[str]]:
        """``argv`` (after the subcommand) into option values by parameter name and positionals,
        with click's rules; UsageError with click's message for what click refuses."""
        by_flag = self.by_flag(command)
        values = self.defaults(command)
        given: set[str] = set()
        collected: dict[str, list] = {}
        positionals: list[str] = []
        args = list(argv)
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
            name, has_value, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
            if not arg.startswith("--") and len(arg) > 2 and arg[:2] in by_flag:
                name, has_value, value = arg[:2], "=", arg[2:]   # -cVALUE
            option = by_flag.get(name)
            if option is None:
                raise UsageError(no_such_option(name, by_flag))
            given.add(option.name)
            if option.is_flag:
                if has_value:
                    raise UsageError(f"Option '{name}' does not take a value.")
                values[option.name] = name not in option.off_flags
                continue
            if not has_value:
                if index >= len(args):
                    raise UsageError(f"Option '{name}' requires an argument.")
                value, index = args[index], index + 1
            converted = option.convert(value)
            if option.multiple:
                collected.setdefault(option.name, []).append(converted)
                values[option.name] = tuple(collected[option.name])
            else:
                values[option.name] = converted
        for option in self.options(command).values():
            if option.required and option.name not in given:
                raise UsageError(f"Missing option '{option.flags[0]}'.")
        return values, positionals


def no_such_option(name: str, by_flag: dict) -> str:
    """click's words for an unknown option, with its suggestions."""
    close = difflib.get_close_matches(name, list(by_flag))
    if len(close) == 1:
        return f"No such option: {name} Did you mean {close[0]}?"
    if close:
        return f"No such option: {name} (Possible options: {', '.join(sorted(close))})"
    return f"No such option: {name}"
