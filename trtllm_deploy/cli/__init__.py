"""The invoke collections: thin tasks that read the inventory and call into the package.

Every task takes ``--hosts``; every failure a user can act on leaves as a message and an exit code
(1: a check or action failed, 2: bad input), never a traceback.
"""

from __future__ import annotations

import functools
from typing import Callable

from invoke.exceptions import Exit

from trtllm_deploy.dryrun import Plan
from trtllm_deploy.errors import DeployError, InputError
from trtllm_deploy.secrets import looks_secret

HOSTS_HELP = "the inventory file (default: hosts.toml)"
NODES_HELP = "comma-separated node names to act on (default: every node)"
JSON_HELP = "print JSON for machines instead of tables"
DRY_RUN_HELP = "show what would change on each node, change nothing"
# The serving tasks' gate (launch, rollback, deploy): the same words and the same defaults.
STALL_HELP = "give up a start when no rank's log has moved for this long (default: 120)"
MIN_RATE_HELP = "the least tokens/s the gate prompt must come at (default: 1)"
ENV_HELP = "NAME=value for every rank (repeatable; never a per-node fabric variable)"


def env_pairs(pairs: list[str] | None) -> tuple[tuple[str, str], ...]:
    """``--env NAME=value`` options as pairs; anything else is bad input (exit 2). A secret's name
    is refused: ``--env`` values go onto ``docker run``'s command line and into the deployment's state
    file on the head, the two places a secret must never be (the rule hosts.toml's ``env`` follows)."""
    env = []
    for pair in pairs or ():
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise InputError(f"--env {pair!r}: expected NAME=value")
        if looks_secret(key):
            raise InputError(
                f"--env {key}=…: {key} is a secret, and --env would write it into `docker run`'s command line"
                " and the deployment's state file on the head; nothing was run. Export it in your shell"
                f" instead (export {key}=…, or `hf auth login` for the Hub token): trtllm-deploy sends the"
                " secrets it needs to a node on the SSH channel's standard input, never on a command line")
        env.append((key, value))
    return tuple(env)


def show_plan(plan: Plan, json: bool = False) -> None:
    """Print a ``--dry-run`` plan (as data with ``--json``), and say that nothing changed."""
    from trtllm_deploy import console

    if json:
        console.print_json(plan.as_json())
        return
    console.out.print(console.table(f"{plan.task} (dry run: nothing changed)", ["node", "would"],
                                    [[node, what] for node, what in plan.steps]))
    for note in plan.notes:
        console.out.print(note, highlight=False, markup=False, soft_wrap=True)


def user_errors(body: Callable) -> Callable:
    """Turn the package's errors and Ctrl-C into clean exits with the right code."""

    @functools.wraps(body)
    def wrapper(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        except DeployError as exc:
            raise Exit(str(exc), code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted; nothing was left running", code=130) from None

    return wrapper
