"""The one place where an argument list becomes a shell command line.

Everything that runs on a host is built as a list of arguments; a remote shell sees it only
through :func:`command_line`, which quotes every argument. Secrets never appear here: the line
reads them from standard input (see :func:`secret_preamble`)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# Some environments (containers, batch systems) start commands with HOME unset; every script that
# expands "~" starts with this so it falls back to the account's home from the user database.
ENSURE_HOME = ': "${HOME:=$(getent passwd "$(id -u)" | cut -d: -f6)}"; '

# Inside a `for p do ... done` loop: q is p with a leading "~" expanded.
EXPAND_P_TO_Q = 'q=$p; case $q in "~") q=$HOME;; "~/"*) q=$HOME/${q#"~/"};; esac; '


def quote(word: object) -> str:
    return shlex.quote(str(word))


def join(argv: Sequence[object]) -> str:
    """An argument list as one shell-safe line (for running and for showing)."""
    return " ".join(quote(word) for word in argv)


_SHELLS = {"sh", "bash", "dash", "ash", "ksh", "zsh", "busybox"}
_INLINE = re.compile(r"^-[a-zA-Z]*c$")  # -c, -ec, -lc: the next word is a script


def show(argv: Sequence[object]) -> str:
    """An argument list as a user should read it in a message: like :func:`join`, except that a
    script given inline to a shell or Python (``sh -c '…'``) shows as ``<script>``. What failed is
    named by the command and what it said; the script's text helps nobody reading an error."""
    words = [str(word) for word in argv]
    shown = []
    inline = False
    for index, word in enumerate(words):
        if inline:
            shown.append("<script>")
            inline = False
            continue
        shown.append(quote(word))
        if _INLINE.match(word):
            before = [w for w in words[:index] if not w.startswith("-")]  # sh -e -c: the program
            program = before[-1].rsplit("/", 1)[-1] if before else ""
            inline = program in _SHELLS or program.startswith("python")
    return " ".join(shown)


def path_word(path: str) -> str:
    """A path for a remote shell, with a leading ``~`` left for the remote side to expand."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + quote(path[2:])
    return quote(path)


def _check_names(names: Sequence[str]) -> None:
    for name in names:
        if not _ENV_NAME.match(name):
            raise ValueError(f"not an environment variable name: {name!r}")


def command_line(
    argv: Sequence[object],
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    secret_names: Sequence[str] = (),
    stdin_path: str | None = None,
) -> str:
    """The remote shell script that runs ``argv`` with ``env`` in ``cwd`` on a node.

    - Each name in ``secret_names`` is read from the first lines of standard input and
      exported, so its value travels inside the encrypted channel and never through ``ps``.
    - The command's own standard input is ``stdin_path`` (opened, then deleted at once, so
      nothing stays behind) or empty: a remote command never waits on a terminal.
    - GNU ``timeout`` runs the command in a process group of its own and stops that whole group
      when the time is up, or when told to.
    - A watchdog holds the channel's standard input (fd 3): when the connection goes away
      (Ctrl-C, a crash, a network cut) it reads end-of-file and tells ``timeout`` to stop the
      command. Without it, a command started without a terminal would run on, orphaned.
    """
    if not argv:
        raise ValueError("empty command")
    env = dict(env or {})
    _check_names([*env, *secret_names])
    setup = [f"IFS= read -r {name} && export {name}" for name in secret_names]
    # fd 3 keeps the channel for the watchdog; fd 4 holds the staged input, because a command
    # started with `&` gets /dev/null as its stdin unless told otherwise.
    if stdin_path:
        setup.append(f"exec 3<&0 4<{path_word(stdin_path)} && rm -f -- {path_word(stdin_path)}")
        source = "<&4 4<&-"
    else:
        setup.append("exec 3<&0")
        source = "</dev/null"
    if cwd:
        setup.append(f"cd -- {path_word(cwd)}")
    prefix = ["env", *(f"{key}={value}" for key, value in env.items())] if env else []
    command = join(["timeout", "-k", "5", f"{timeout:g}", *prefix, *argv])
    return "\n".join([
        " && ".join(setup) + " || exit $?",
        f"{command} {source} 3<&- &",
        "p=$!",
        '{ cat <&3; kill -TERM "$p"; } >/dev/null 2>&1 &',
        "w=$!",
        'wait "$p"; s=$?',
        'kill "$w" 2>/dev/null',
        'exit "$s"',
    ])


def secret_preamble(secrets: Mapping[str, str]) -> str:
    """The standard input that :func:`command_line` expects: one line per secret (a secret
    cannot hold a line break; ``secrets.register`` refuses one)."""
    return "".join(f"{value}\n" for value in secrets.values())
