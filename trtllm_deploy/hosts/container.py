"""A running container as a target: entered with ``docker exec`` on another target."""

from __future__ import annotations

import posixpath
import secrets as _random
from dataclasses import dataclass, field
from typing import Sequence

from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.targets import Result, Target, expand, finish


@dataclass
class InContainer(scripts.AsksForHome):
    """A running container on another target, entered with ``docker exec``."""

    parent: Target
    container: str
    docker: Sequence[str] = ("docker",)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = f"{self.parent.name}/{self.container}"

    def run(self, argv, *, env=None, cwd=None, timeout=None, stdin=None, secrets=None,
            check=True) -> Result:
        argv = tuple(str(word) for word in argv)
        exec_argv = [*self.docker, "exec"]
        if stdin is not None:
            exec_argv.append("-i")
        for key, value in (env or {}).items():
            exec_argv += ["-e", f"{key}={value}"]
        for key in secrets or {}:
            exec_argv += ["-e", key]  # the value comes from docker's own environment, not argv
        if cwd:
            exec_argv += ["-w", cwd]
        exec_argv += [self.container, *argv]
        result = self.parent.run(exec_argv, timeout=timeout, stdin=stdin, secrets=secrets,
                                 check=False)
        return finish(Result(self.name, argv, result.exit_code, result.stdout, result.stderr,
                              result.seconds), check)

    def stream(self, local, argv, *, timeout=None, check=True) -> Result:
        argv = tuple(str(word) for word in argv)
        result = self.parent.stream(local, [*self.docker, "exec", "-i", self.container, *argv],
                                    timeout=timeout, check=False)
        return finish(Result(self.name, argv, result.exit_code, result.stdout, result.stderr,
                              result.seconds), check)

    def _staging(self) -> str:
        return expand(f"~/.cache/trtllm-deploy/transfer-{_random.token_hex(6)}",
                      self.parent.home())

    def put(self, local, remote: str) -> None:
        staging = self._staging()
        dest = expand(remote, self.home())
        try:
            self.parent.put(local, staging)
            self.run(["mkdir", "-p", posixpath.dirname(dest)])
            self.parent.run([*self.docker, "cp", staging, f"{self.container}:{dest}"])
        finally:
            self.parent.run(["rm", "-rf", staging], check=False)

    def get(self, remote: str, local) -> None:
        staging = self._staging()
        try:
            self.parent.run(["mkdir", "-p", posixpath.dirname(staging)])
            self.parent.run([*self.docker, "cp", f"{self.container}:{expand(remote, self.home())}",
                             staging])
            self.parent.get(staging, local)
        finally:
            self.parent.run(["rm", "-rf", staging], check=False)

    def close(self) -> None:
        self.parent.close()
