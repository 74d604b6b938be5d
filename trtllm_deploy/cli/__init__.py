"""The invoke collections: thin tasks that read the inventory and call into the package.

Every task takes ``--hosts``; every failure a user can act on leaves as a message and an exit code
(1: a check or action failed, 2: bad input), never a traceback.
"""

from __future__ import annotations

import functools
from typing import Callable

from invoke.exceptions import Exit

from trtllm_deploy.errors import DeployError

HOSTS_HELP = "the inventory file (default: hosts.toml)"
NODES_HELP = "comma-separated node names to act on (default: every node)"
JSON_HELP = "print JSON for machines instead of tables"
DRY_RUN_HELP = "show what would change on each node, change nothing"


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
