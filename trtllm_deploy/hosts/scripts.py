"""Shell scripts run on a node: one way to write them, to mark their output, and to report them.

A :class:`Script` is a named step. Its text is POSIX ``sh`` whose arguments arrive as ``"$1"``,
``"$2"``…, never pasted into the text; ``mark NAME`` starts a section of its output, read back as
``Ran.sections[NAME]``. A script that fails is reported by the node, the step and what the script
itself said on standard error, never by printing the script.
"""

from __future__ import annotations

import secrets as _random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from trtllm_deploy.hosts import shell
from trtllm_deploy.hosts.targets import CommandTimedOut, Result, Target, TargetError

# Every script starts with this: HOME set where the environment left it unset, and `mark`.
# The marker carries a nonce made per run, so nothing a command prints can pass for one.
_PREAMBLE = shell.ENSURE_HOME + "mark() { printf '\\n%s %s\\n' \"$TRTLLM_DEPLOY_MARK\" \"$1\"; }\n"
LAST_LINES = 8  # of a failed step's own message


@dataclass(frozen=True)
class Script:
    """A step done on a node by a shell script."""

    step: str       # what it does, in the user's words ("create the job's folders")
    text: str       # POSIX sh: arguments are "$1".."$N"; `mark NAME` starts a section
    timeout: float = 60

    def argv(self, args: Sequence[object] = (), nonce: str = "") -> list[str]:
        """The argument list that runs the script (``$0`` is the step, for ``ps``)."""
        text = f"TRTLLM_DEPLOY_MARK=@@{nonce}\n" + _PREAMBLE + self.text
        return ["sh", "-c", text, "trtllm-deploy", *(str(arg) for arg in args)]


# The account's home directory (the preamble has made sure HOME is set): how targets learn it.
HOME = Script("find the home directory", 'printf %s "$HOME"')


class AsksForHome:
    """A target that learns its home directory from the host itself, once (SSH, a container)."""

    _home: str | None = None

    def home(self) -> str:
        if self._home is None:
            self._home = run(self, HOME).stdout
        return self._home


@dataclass(frozen=True)
class Ran:
    """What a script did: its result and its output split at each ``mark``."""

    result: Result
    sections: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    @property
    def stdout(self) -> str:
        """The output before the first mark (all of it for a script that marks nothing)."""
        return self.sections.get("", "")

    @property
    def stderr(self) -> str:
        return self.result.stderr

    def lines(self, section: str = "") -> list[str]:
        return self.sections.get(section, "").splitlines()


class StepFailed(TargetError):
    """A step failed on a node: the node, the step and what the step itself said."""

    def __init__(self, target: str, step: str, result: Result | None, said: str = ""):
        self.step, self.result = step, result
        if result is not None:
            tail = (result.stderr or "").strip().splitlines()[-LAST_LINES:]
            said = said or ("\n    " + "\n    ".join(tail) if tail else "")
            message = f"{step} failed (exit {result.exit_code}){said}"
        else:
            message = f"{step} failed{said}"
        super().__init__(target, message)


class StepTimedOut(StepFailed, CommandTimedOut):
    """A step ran past its time limit and was stopped (a :class:`CommandTimedOut` too)."""


def split(text: str, nonce: str) -> dict[str, str]:
    """The output of a run split at its marks: section name → text (``""``: before the first).

    Every section is given without its final line break, so ``printf x`` and ``echo x`` read the
    same; a reader that needs exact bytes ends its output with a sentinel character."""
    marker = f"@@{nonce} "
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.split("\n"):
        if line.startswith(marker):
            current = line[len(marker):]
            sections[current] = []
            # `mark` prints a line break first, so a section's text never loses its last line;
            # drop that extra line from the section it closes.
            continue
        sections[current].append(line)
    out = {}
    for name, lines in sections.items():
        body = "\n".join(lines)
        out[name] = body[:-1] if body.endswith("\n") else body
    return out


def run(target: Target, script: Script, *args: object, check: bool = True,
        timeout: float | None = None, env: Mapping[str, str] | None = None,
        stdin: str | None = None, secrets: Mapping[str, str] | None = None,
        prefix: Sequence[str] = ()) -> Ran:
    """Run ``script`` on ``target`` with ``args``; ``prefix`` runs it inside something (a container:
    ``("docker", "exec", NAME)``). With ``check``, a failure raises :class:`StepFailed`."""
    nonce = _random.token_hex(8)
    limit = timeout if timeout is not None else script.timeout
    try:
        result = target.run([*prefix, *script.argv(args, nonce)], timeout=limit, env=env, stdin=stdin,
                            secrets=secrets, check=False)
    except CommandTimedOut as error:
        raise StepTimedOut(error.target, script.step, None,
                           f": still running after {limit:g} s, stopped") from None
    if check and not result.ok:
        raise StepFailed(result.target, script.step, result)
    return Ran(result, split(result.stdout, nonce))
