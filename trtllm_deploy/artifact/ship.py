"""Standalone files run on a node (manifest.py, the head agent): sent into the account's private
folder under a name made from their content, so each is sent once and again only when it changed;
and :class:`HeadAgent`, headagent.py run that way."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping
from pathlib import Path

from trtllm_deploy.artifact import headagent, manifest
from trtllm_deploy.artifact.verify import HAS_CHECKER, STAGING
from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.targets import Result, Target, TargetError, expand


def remote_name(local: Path, stem: str) -> str:
    return f"{stem}-{hashlib.sha256(local.read_bytes()).hexdigest()[:16]}.py"


def ensure(target: Target, local: Path, stem: str) -> str:
    """The node's copy of ``local`` (its path there), put there first if it is missing."""
    directory = expand(STAGING, target.home())
    remote = posixpath.join(directory, remote_name(local, stem))
    if not scripts.run(target, HAS_CHECKER, directory, remote, check=False).ok:
        target.put(local, remote)
    return remote


class HeadAgent:
    """headagent.py on a node, beside the manifest.py it uses, each sent there once."""

    def __init__(self, target: Target):
        self.target = target
        self.path = ensure(target, Path(headagent.__file__), "headagent")
        self.manifest = ensure(target, Path(manifest.__file__), "manifest")

    def run(self, verb: str, *args: str, order: dict | None = None, timeout: float,
            secrets: Mapping[str, str] | None = None) -> tuple[dict, list[dict]]:
        """The agent's report (its last line) and the lines it printed before it."""
        done = self.target.run(["python3", self.path, verb, self.manifest, *args], timeout=timeout,
                               stdin=json.dumps(order) if order is not None else None, secrets=secrets,
                               check=False)
        lines = done.stdout.strip().splitlines()
        try:
            return json.loads(lines[-1]), [json.loads(line) for line in lines[:-1]]
        except (ValueError, IndexError):
            raise _no_report(self.target, done) from None


def _no_report(target: Target, done: Result) -> TargetError:
    detail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
    return TargetError(target.name, f"the head agent exited with {done.exit_code} and no report: "
                       f"{detail or 'no output'}")
