"""Facts about a host: a command to run and, elsewhere, a pure function that reads its output.

:func:`gather` runs any number of fact commands in one round trip, so looking at a node costs
one SSH command however many facts a phase needs. It is a script like any other (hosts/scripts):
each fact's command arrives as arguments, and its output, error and exit status come back as
marked sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.targets import Target


@dataclass(frozen=True)
class Fact:
    name: str
    argv: tuple[str, ...]
    timeout: float = 30

    @classmethod
    def of(cls, name: str, script: Script, *args: object) -> Fact:
        """A fact read by a script (run with ``args``) rather than by one program."""
        return cls(name, tuple(script.argv(args)), script.timeout)


@dataclass(frozen=True)
class Output:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def missing(self) -> bool:
        """The command itself does not exist on the host."""
        return self.exit_code == 127

    @property
    def timed_out(self) -> bool:
        return self.exit_code in (124, 137)


def script(facts: Sequence[Fact], step: str = "look at the node") -> Script:
    """The script that runs every fact, each under its own time limit, and marks for fact ``i``
    its output (``out i``), its standard error (``err i``) and its exit status (``rc i``).

    A fact's words are the script's arguments, referred to by position ("${7}"): the text holds
    only positions and time limits, never a value."""
    lines = ['t=$(mktemp) || exit 97', 'trap \'rm -f "$t"\' EXIT']
    position = 1
    for index, fact in enumerate(facts):
        words = " ".join(f'"${{{position + n}}}"' for n in range(len(fact.argv)))
        position += len(fact.argv)
        lines += [
            f"mark 'out {index}'",
            # --foreground keeps the fact in the caller's process group, so stopping the whole
            # gather (Ctrl-C, the run's own timeout) stops a hung fact too.
            f"if command -v timeout >/dev/null 2>&1; then timeout --foreground -k 2 {fact.timeout:g}"
            f" {words}; else {words}; fi </dev/null 2>\"$t\"",
            # Each section gets one more line break than its text had, which the reading drops.
            f"rc=$?; echo; mark 'err {index}'; cat \"$t\"; echo; mark 'rc {index}'; echo \"$rc\"",
        ]
    return Script(step, "\n".join(lines) + "\n", timeout=sum(fact.timeout + 3 for fact in facts))


def parse(sections: dict[str, str], facts: Sequence[Fact]) -> dict[str, Output]:
    """The marked sections of a gather, back into one :class:`Output` per fact."""
    outputs: dict[str, Output] = {}
    for index, fact in enumerate(facts):
        code = sections.get(f"rc {index}", "").strip()
        if not code.lstrip("-").isdigit():  # the script never got there (killed, connection lost)
            outputs[fact.name] = Output(-1, "", "no output: the fact script stopped early")
            continue
        outputs[fact.name] = Output(int(code), sections[f"out {index}"],
                                    sections[f"err {index}"].strip("\n"))
    return outputs


def gather(target: Target, facts: Sequence[Fact], step: str = "look at the node") -> dict[str, Output]:
    """Run every fact on ``target`` in one command; a failing fact never stops the others."""
    if not facts:
        return {}
    ran = scripts.run(target, script(facts, step), *(word for fact in facts for word in fact.argv),
                      check=False)
    return parse(ran.sections, facts)
