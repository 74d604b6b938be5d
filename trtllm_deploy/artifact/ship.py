"""Standalone files run on a node (manifest.py, the head agent): sent into the account's private
folder under a name made from their content, so each is sent once and again only when it changed."""

from __future__ import annotations

import hashlib
import posixpath
from pathlib import Path

from trtllm_deploy.artifact.verify import HAS_CHECKER, STAGING
from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.targets import Target, expand


def remote_name(local: Path, stem: str) -> str:
    return f"{stem}-{hashlib.sha256(local.read_bytes()).hexdigest()[:16]}.py"


def ensure(target: Target, local: Path, stem: str) -> str:
    """The node's copy of ``local`` (its path there), put there first if it is missing."""
    directory = expand(STAGING, target.home())
    remote = posixpath.join(directory, remote_name(local, stem))
    if not scripts.run(target, HAS_CHECKER, directory, remote, check=False).ok:
        target.put(local, remote)
    return remote
