"""The public interface of the pinned TensorRT-LLM, as data: ``trtllm-serve``'s options and the
LLM-API's arguments, taken from TensorRT-LLM's own tree at the locked commit.

``requirements/interface/tensorrt-llm/`` holds upstream's api_stability references verbatim
(``trtllm_serve_cli.yaml``, ``llm.yaml``, ``llm_committed.yaml``), ``llm_args_models.json`` read from
``tensorrt_llm/llmapi/llm_args.py`` by :mod:`.extract`, and ``sources.json`` / ``SOURCES.md`` saying
which commit and version they come from. :func:`load` reads that folder; :func:`from_sources` makes
the same from file texts at a commit (what ``source.update`` has from the build node's checkout) and
:func:`write` records them. :func:`gaps` says which flags and keys of a :class:`Usage` a pin lacks
or renamed; trtllm_deploy/cli/usage.py's ``used()`` fills one by calling the project's generators
(it sits in the top layer, as they live in every layer).

The stand-in imports this package inside its image (cli, args): keep those modules' imports to the
standard library and PyYAML.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from trtllm_deploy.runtimes.interface import extract
from trtllm_deploy.runtimes.interface.args import ArgsReference, Problem, report
from trtllm_deploy.runtimes.interface.cli import CliOption, CliReference, UsageError
from trtllm_deploy.runtimes.interface.gaps import Gap, Usage, gaps
from trtllm_deploy.runtimes.interface.pinned import Interface

__all__ = ["REFERENCE_PATHS", "MODEL_BASES", "UPSTREAM_PATHS", "DEFAULT_DIR", "ROOT", "Interface", "load",
           "from_sources", "write", "Usage", "Gap", "gaps", "CliReference",
           "CliOption", "ArgsReference", "Problem", "UsageError", "report", "InterfaceDataError"]

# The data file → where it comes from in the TensorRT-LLM tree.
REFERENCE_PATHS: dict[str, str] = {
    "trtllm_serve_cli.yaml": "tests/unittest/api_stability/references/trtllm_serve_cli.yaml",
    "llm.yaml": "tests/unittest/api_stability/references/llm.yaml",
    "llm_committed.yaml": "tests/unittest/api_stability/references_committed/llm.yaml",
    "llm_args_models.json": "tensorrt_llm/llmapi/llm_args.py",
}
# Read beside llm_args.py: where StrictBaseModel (extra="forbid") is defined.
MODEL_BASES = "tensorrt_llm/llmapi/utils.py"
# Every upstream file from_sources and write want the text of.
UPSTREAM_PATHS: tuple[str, ...] = (*REFERENCE_PATHS.values(), MODEL_BASES)
ROOT = Path(__file__).resolve().parents[3]   # the checkout (in the stand-in's image: /opt/standin)
DEFAULT_DIR = Path("requirements/interface/tensorrt-llm")
SOURCES_JSON = "sources.json"
VERBATIM = ("trtllm_serve_cli.yaml", "llm.yaml", "llm_committed.yaml")
MODELS_JSON = "llm_args_models.json"


class InterfaceDataError(ValueError):
    """The interface data (a folder, or upstream texts) is missing or unreadable; says which file."""


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise InterfaceDataError(f"{path}: cannot read it: {error.strerror}") from None


def _cli(text: str | None) -> CliReference | None:
    return CliReference.from_text(text) if text else None


def load(directory: Path | str = DEFAULT_DIR) -> Interface:
    """The interface recorded in ``directory`` (relative paths are the checkout's)."""
    folder = Path(directory)
    folder = folder if folder.is_absolute() else ROOT / folder
    sources_text = _read_optional(folder / SOURCES_JSON)
    if sources_text is None:
        raise InterfaceDataError(f"{folder / SOURCES_JSON}: missing; the interface data of the pinned "
                                 "TensorRT-LLM is incomplete (run `invoke source.update` to write it)")
    try:
        sources = json.loads(sources_text)
    except json.JSONDecodeError as error:
        raise InterfaceDataError(f"{folder / SOURCES_JSON}: not JSON ({error})") from None
    files = {name: _read_optional(folder / name) for name in REFERENCE_PATHS}
    try:
        cli = _cli(files["trtllm_serve_cli.yaml"])
        args = ArgsReference.from_files(files["llm.yaml"], files["llm_committed.yaml"], files[MODELS_JSON])
    except ValueError as error:
        raise InterfaceDataError(f"{folder}: {error}") from None
    return Interface(str(sources.get("version", "")), str(sources.get("commit", "")), cli, args,
                     str(sources.get("repository", "")), files)


def from_sources(texts: dict[str, str | None], version: str, commit: str) -> Interface:
    """The interface from upstream file texts (path in the TensorRT-LLM tree → text at ``commit``, None
    where the file does not exist there). llm_args.py must be there; the references may be missing."""
    main = REFERENCE_PATHS[MODELS_JSON]
    if texts.get(main) is None:
        raise InterfaceDataError(f"{main} is missing at {commit[:12] or 'the commit'}: the LLM-API arguments "
                                 "cannot be read")
    try:
        models = extract.models({main: texts[main], MODEL_BASES: texts.get(MODEL_BASES)}, main)
    except extract.ExtractError as error:
        raise InterfaceDataError(str(error)) from None
    files: dict[str, str | None] = {name: texts.get(path) for name, path in REFERENCE_PATHS.items()
                                    if name in VERBATIM}
    files[MODELS_JSON] = json.dumps(models, indent=1, sort_keys=True) + "\n"
    try:
        cli = _cli(files["trtllm_serve_cli.yaml"])
        args = ArgsReference(files["llm.yaml"], files["llm_committed.yaml"], models)
    except ValueError as error:
        raise InterfaceDataError(f"TensorRT-LLM at {commit[:12]}: {error}") from None
    return Interface(version, commit, cli, args, "", files)


def sources_markdown(interface: Interface, read_at: dict[str, str] | None = None, notes: str = "") -> str:
    read_at = read_at or {}
    lines = ["# Where these files come from", "",
             f"The interface of TensorRT-LLM {interface.version} (commit `{interface.commit}`) of "
             f"{interface.repository}.",
             "Written by trtllm_deploy.runtimes.interface.write (`invoke source.update` on the build node "
             "refreshes them from its checkout at the locked commit); do not edit by hand.", "",
             "| file | upstream path | read at commit | how |", "| --- | --- | --- | --- |"]
    for name, path in REFERENCE_PATHS.items():
        if name == MODELS_JSON:
            how = f"extracted (ast, never imported) from {path} and {MODEL_BASES}"
        elif interface.files.get(name) is None:
            how = "absent at this commit"
        else:
            how = "verbatim"
        lines.append(f"| {name} | {path} | `{read_at.get(name, interface.commit)}` | {how} |")
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def write(directory: Path | str, texts: dict[str, str | None], version: str, commit: str,
          repository: str, *, read_at: dict[str, str] | None = None, notes: str = "") -> None:
    """Record the interface at ``commit`` in ``directory``: the data files, sources.json and
    SOURCES.md, all replacing the folder's old content at once (a new folder renamed into place).
    ``read_at``: data file → the commit its text was read at, where that is not ``commit`` (data
    recorded without a checkout); ``notes``: said at the end of SOURCES.md."""
    interface = from_sources(texts, version, commit)
    interface.repository = repository
    folder = Path(directory)
    folder = folder if folder.is_absolute() else ROOT / folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    fresh = folder.with_name(f".{folder.name}.new-{secrets.token_hex(4)}")
    old = folder.with_name(f".{folder.name}.old-{secrets.token_hex(4)}")
    fresh.mkdir()
    try:
        for name, text in interface.files.items():
            if text is not None:
                (fresh / name).write_text(text, encoding="utf-8")
        (fresh / SOURCES_JSON).write_text(json.dumps(
            {"repository": repository, "commit": commit, "version": version,
             "files": {name: path for name, path in REFERENCE_PATHS.items()
                       if interface.files.get(name) is not None},
             "read_at": read_at or {}, "model_bases": MODEL_BASES}, indent=1) + "\n", encoding="utf-8")
        (fresh / "SOURCES.md").write_text(sources_markdown(interface, read_at, notes), encoding="utf-8")
        for path in fresh.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if folder.exists():
            os.rename(folder, old)
        os.rename(fresh, folder)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
