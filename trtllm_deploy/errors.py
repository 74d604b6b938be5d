"""The failures a user can be told about, each mapped to the tool's exit code."""

from __future__ import annotations


class DeployError(Exception):
    """A failure with a message meant for the user; ``exit_code`` says what kind."""

    exit_code = 1


class InputError(DeployError):
    """Bad input (a file, a flag): nothing was run on any host."""

    exit_code = 2


class CheckFailed(DeployError):
    """A check or an action failed on one or more nodes."""

    exit_code = 1
