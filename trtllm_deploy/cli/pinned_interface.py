"""The upgrade safety net ``source.update`` runs on a new commit: the flags and keys the project's
own generators emit, checked against that commit's interface (its api_stability references and
llm_args.py, read from the build node's checkout), and the commit's interface recorded as the
project's data once the lock is written."""

from __future__ import annotations

from pathlib import Path

from trtllm_deploy.runtimes import interface
from trtllm_deploy.cli.usage import served_formats, used


class ProjectInterface:
    """:class:`trtllm_deploy.source.pin.InterfaceCheck` for this project."""

    paths = interface.UPSTREAM_PATHS

    def gaps(self, texts: dict[str, str | None], version: str, commit: str,
             trtllm_build: bool | None) -> tuple[list[str], list[str]]:
        try:
            pinned = interface.from_sources(texts, version, commit)
        except interface.InterfaceDataError as error:
            return [], [f"the interface of {commit[:12]} was not checked: {error}"]
        unchecked = ([] if pinned.cli is not None else
                     [f"trtllm-serve's flags were not checked: {commit[:12]} has no "
                      f"{interface.REFERENCE_PATHS['trtllm_serve_cli.yaml']}"])
        # The formats launch serves at that pin: no TensorRT engines where trtllm-build is gone.
        usage = used(formats=served_formats(trtllm_build))
        return [str(gap) for gap in interface.gaps(usage, pinned)], unchecked

    def record(self, directory: Path, texts: dict[str, str | None], version: str, commit: str,
               repository: str) -> bool:
        try:
            interface.write(directory, texts, version, commit, repository)
        except interface.InterfaceDataError:
            return False   # no llm_args.py at that commit: nothing to record (said as a warning)
        return True

    def recorded_commit(self, directory: Path) -> str | None:
        try:
            return interface.load(directory).commit or None
        except interface.InterfaceDataError:
            return None
