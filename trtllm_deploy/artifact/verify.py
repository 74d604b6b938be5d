"""Artifacts on the nodes: checking each node's copy against its manifest, on the node itself.

The node runs ``manifest.py`` (standard library only) with its own python3, so file contents never
cross the network; only a small JSON report comes back.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

from trtllm_deploy.artifact import manifest
from trtllm_deploy.errors import InputError
from trtllm_deploy.hosts import scripts, shell
from trtllm_deploy.hosts.fanout import GroupResult, fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.targets import Target, TargetError, expand

STAGING = "~/.cache/trtllm-deploy"  # the account's private directory (0700), as hosts/ssh.py uses
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
VERIFY_TIMEOUT = 3600.0  # a cold 100+ GB checkpoint on a slow disk; a warm one takes a second
# $1 the private folder the checker lives in (made here if missing), $2 the checker: is it there?
HAS_CHECKER = Script("look for the manifest checker", 'mkdir -p -m 700 -- "$1" && test -f "$2"')


@dataclass(frozen=True)
class Verified:
    """One node's verification of one artifact."""

    path: str
    ok: bool
    files: int
    bytes: int
    hashed: int
    cached: int
    seconds: float
    problems: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"path": self.path, "ok": self.ok, "files": self.files, "bytes": self.bytes,
                "hashed": self.hashed, "cached": self.cached, "seconds": self.seconds,
                "problems": self.problems}


def check_name(name: str) -> str:
    """An artifact name is one directory name in the artifact store, nothing that walks out of it."""
    if not NAME.match(name or "") or name in (".", ".."):
        raise InputError(f"artifact name {name!r} is not valid: use one directory name of letters,"
                         " digits, '.', '_', '+' and '-' (as `invoke engine.build` names them)")
    return name


def _script() -> tuple[Path, str]:
    local = Path(manifest.__file__)
    digest = hashlib.sha256(local.read_bytes()).hexdigest()[:16]
    return local, f"manifest-{digest}.py"


def ensure_script(target: Target, home: str) -> str:
    """The node's copy of manifest.py, named by its content so it is sent only when it changed."""
    local, filename = _script()
    directory = expand(STAGING, home)
    remote = posixpath.join(directory, filename)
    probe = scripts.run(target, HAS_CHECKER, directory, remote, check=False)
    if not probe.ok:
        target.put(local, remote)
    return remote


def parse_report(path: str, text: str) -> Verified:
    data = json.loads(text)
    return Verified(path, bool(data["ok"]), int(data.get("files", 0)), int(data.get("bytes", 0)),
                    int(data.get("hashed", 0)), int(data.get("cached", 0)),
                    float(data.get("seconds", 0.0)), list(data.get("problems", [])))


def verify_on(node: Node, target: Target, name: str) -> Verified:
    home = target.home()
    script = ensure_script(target, home)
    path = posixpath.join(expand(node.paths.artifacts, home), name)
    result = target.run(["python3", script, "verify", path], timeout=VERIFY_TIMEOUT, check=False)
    if result.exit_code not in (0, 1):
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise TargetError(target.name, f"`{shell.join(['python3', script, 'verify', path])}` "
                          f"exited with {result.exit_code}: {' '.join(detail)}")
    try:
        return parse_report(path, result.stdout)
    except (ValueError, KeyError, TypeError):
        raise TargetError(target.name, f"verification printed no report: {result.stdout[:200]!r}"
                          ) from None


def verify(cluster: Cluster, nodes: tuple[Node, ...], artifact_name: str) -> GroupResult[Verified]:
    """Check the named artifact against its manifest on every node at once, each on the node."""
    check_name(artifact_name)
    return fan_out(nodes, lambda node, target: verify_on(node, target, artifact_name))
