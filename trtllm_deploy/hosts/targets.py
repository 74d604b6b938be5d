"""One way to act on any host: run an argument list, put a file or tree, get a file.

This is the interface every phase codes against: :class:`Target`, the :class:`Result` of a
command and the errors a target raises. Each way of reaching a host is a module of its own:
``local`` (this machine), ``ssh`` (a node, its host key checked) and ``container`` (a container
on either); ``connections`` picks one for a node. Phases take a :class:`Target` and never care
which one it is.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts import shell
from trtllm_deploy.secrets import redact


@dataclass(frozen=True)
class Result:
    """What a command did on a target."""

    target: str
    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class TargetError(CheckFailed):
    """A target could not do what was asked; the message says which host and why."""

    def __init__(self, target: str, message: str):
        self.target = target
        super().__init__(redact(f"{target}: {message}"))


class Unreachable(TargetError):
    pass


class HostKeyRejected(TargetError):
    pass


class CommandTimedOut(TargetError):
    pass


class CommandFailed(TargetError):
    def __init__(self, result: Result):
        self.result = result
        tail = (result.stderr or result.stdout).strip().splitlines()[-8:]
        detail = ("\n    " + "\n    ".join(tail)) if tail else ""
        super().__init__(result.target, f"`{shell.show(result.argv)}` exited with {result.exit_code}{detail}")


class Target(Protocol):
    name: str

    def run(
        self,
        argv: Sequence[object],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        secrets: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> Result: ...

    def put(self, local: str | os.PathLike, remote: str) -> None: ...

    def stream(self, local: str | os.PathLike, argv: Sequence[object], *,
               timeout: float | None = None, check: bool = True) -> Result:
        """Run ``argv`` with a local file's bytes as its standard input (bulk data: an image)."""
        ...

    def get(self, remote: str, local: str | os.PathLike) -> None: ...

    def home(self) -> str: ...

    def close(self) -> None: ...


def expand(path: str, home: str) -> str:
    """A node path with ``~`` replaced by that node's home directory."""
    if path == "~":
        return home
    if path.startswith("~/"):
        return posixpath.join(home, path[2:])
    return path


def timed_out(target: str, argv: Sequence[str], timeout: float) -> CommandTimedOut:
    """The error for a command stopped at its time limit (every target words it the same)."""
    return CommandTimedOut(target, f"`{shell.show(argv)}` ran past {timeout:g} s and was stopped")


def finish(result: Result, check: bool) -> Result:
    """``result`` with secrets redacted; with ``check``, a failure raises :class:`CommandFailed`."""
    result = Result(result.target, result.argv, result.exit_code, redact(result.stdout),
                    redact(result.stderr), result.seconds)
    if check and not result.ok:
        raise CommandFailed(result)
    return result
