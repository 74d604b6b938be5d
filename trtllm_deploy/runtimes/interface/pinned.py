"""One TensorRT-LLM commit's interface: its trtllm-serve options and its LLM-API arguments."""

from __future__ import annotations

from dataclasses import dataclass, field

from trtllm_deploy.runtimes.interface.args import ArgsReference
from trtllm_deploy.runtimes.interface.cli import CliReference, UsageError


@dataclass
class Interface:
    """TensorRT-LLM's interface at one commit."""

    version: str
    commit: str
    cli: CliReference | None            # None: that commit has no trtllm_serve_cli.yaml
    args: ArgsReference
    repository: str = ""
    files: dict[str, str | None] = field(default_factory=dict, repr=False)   # data file → its text

    @property
    def name(self) -> str:
        """How messages name the pin: ``TensorRT-LLM 1.3.0rc13 (commit 0123456789ab)``."""
        commit = f" (commit {self.commit[:12]})" if self.commit else ""
        return f"TensorRT-LLM {self.version or 'of unknown version'}{commit}"

    def backends(self) -> tuple[str, ...]:
        """``trtllm-serve --backend``'s choices at this pin (empty: no reference to say)."""
        if self.cli is None:
            return ()
        option = self.cli.options("serve").get("backend")
        return option.choices or () if option else ()

    def check_options(self, mapping: dict, where: str, backend: str = "pytorch") -> list[str]:
        """``mapping``'s problems as LLM-API options, each naming the key, ``where`` and the pin."""
        return [f"{where}: LLM-API key {problem.where!r}: {problem.message} [type={problem.type}] "
                f"at the pinned {self.name}" for problem in self.args.validate(mapping, backend)]

    def check_command(self, argv: list[str], where: str, command: str = "serve") -> list[str]:
        """``trtllm-serve`` arguments (after the subcommand) refused by the pinned parser."""
        if self.cli is None:
            return []
        try:
            self.cli.parse(argv, command)
        except UsageError as error:
            return [f"{where}: trtllm-serve {command}: {error} (the pinned {self.name})"]
        return []
