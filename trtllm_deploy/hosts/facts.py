"""Facts about a host: a command to run and, elsewhere, a pure function that reads its output.

:func:`gather` runs any number of fact commands in one round trip, so looking at a node costs
one SSH command however many facts a phase needs.
"""

from __future__ import annotations

import secrets as _random
from dataclasses import dataclass
from typing import Sequence

from trtllm_deploy.hosts import shell
from trtllm_deploy.hosts.targets import Target


@dataclass(frozen=True)
class Fact:
    name: str
    argv: tuple[str, ...]
    timeout: float = 30


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


def script(facts: Sequence[Fact], nonce: str) -> str:
    """A POSIX shell script printing each fact's output and exit code between marker lines."""
    lines = ['t=$(mktemp) || exit 97', 'trap \'rm -f "$t"\' EXIT']
    for index, fact in enumerate(facts):
        command = shell.join(fact.argv)
        lines += [
            f"printf '%s\\n' {shell.quote(f'@@{nonce} out {index}')}",
            # --foreground keeps the fact in the caller's process group, so stopping the whole
            # gather (Ctrl-C, the run's own timeout) stops a hung fact too.
            f"if command -v timeout >/dev/null 2>&1; then timeout --foreground -k 2"
            f" {fact.timeout:g} {command};"
            f" else {command}; fi </dev/null 2>\"$t\"",
            f"rc=$?; printf '\\n%s %s\\n' {shell.quote(f'@@{nonce} err {index}')} \"$rc\";"
            " cat \"$t\"; printf '\\n'",
        ]
    return "\n".join(lines)


def parse(text: str, facts: Sequence[Fact], nonce: str) -> dict[str, Output]:
    """Split the script's output back into one :class:`Output` per fact."""
    outputs: dict[str, Output] = {}
    out_marker, err_marker = f"@@{nonce} out ", f"@@{nonce} err "
    current, section = None, None
    buffers: dict[int, dict[str, list[str]]] = {}
    codes: dict[int, int] = {}
    for line in text.split("\n"):
        if line.startswith(out_marker):
            current, section = int(line[len(out_marker):]), "out"
            buffers[current] = {"out": [], "err": []}
        elif line.startswith(err_marker):
            index, code = line[len(err_marker):].split()
            current, section = int(index), "err"
            codes[current] = int(code)
        elif current is not None:
            buffers[current][section].append(line)
    for index, fact in enumerate(facts):
        if index not in codes:  # the script never got there (killed, connection lost)
            outputs[fact.name] = Output(-1, "", "no output: the fact script stopped early")
            continue
        out, err = buffers[index]["out"], buffers[index]["err"]
        # The script prints a newline before the err marker, so joining the lines between the
        # markers gives back the command's output exactly.
        outputs[fact.name] = Output(codes[index], "\n".join(out),
                                    "\n".join(err).strip("\n"))
    return outputs


def gather(target: Target, facts: Sequence[Fact]) -> dict[str, Output]:
    """Run every fact on ``target`` in one command; a failing fact never stops the others."""
    if not facts:
        return {}
    nonce = _random.token_hex(8)
    timeout = sum(fact.timeout + 3 for fact in facts)
    result = target.run(["sh", "-c", script(facts, nonce)], timeout=timeout, check=False)
    return parse(result.stdout, facts, nonce)
