"""The checkpoint check each rank makes before "loading": what a real loader would trip over, by name."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MANIFEST = "trtllm-deploy-manifest.json"
SHA256 = re.compile(r"[0-9a-f]{64}")


class ArtifactError(Exception):
    """The model directory cannot be served; ``problems`` holds one sentence per file at fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Artifact:
    path: Path
    model_type: str | None
    architectures: tuple[str, ...]
    weight_files: tuple[str, ...]
    manifest_files: int  # files verified against the manifest; 0 when there is none

    def summary(self) -> str:
        checked = (f"{self.manifest_files} files match {MANIFEST}" if self.manifest_files
                   else f"no {MANIFEST}")
        return (f"{self.path}: model_type={self.model_type}, architectures={list(self.architectures)}, "
                f"{len(self.weight_files)} weight files, {checked}")


def check(path: str | Path, backend: str = "pytorch") -> Artifact:
    """Check ``path`` as the served MODEL; raise ArtifactError naming every file at fault."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError([f"{root}: model directory does not exist"])
    if not root.is_dir():
        raise ArtifactError([f"{root}: not a directory (the stand-in serves local checkpoints only)"])
    problems: list[str] = []
    config = _read_config(root / "config.json", problems)
    pattern = "rank*.engine" if backend == "tensorrt" else "*.safetensors"
    weights = tuple(sorted(p.name for p in root.glob(pattern) if p.is_file()))
    if not weights:
        problems.append(f"{root}: no {pattern} weight files")
    verified = _check_manifest(root, problems) if (root / MANIFEST).exists() else 0
    if problems:
        raise ArtifactError(problems)
    architectures = config.get("architectures") or []
    return Artifact(root, config.get("model_type"),
                    tuple(str(a) for a in architectures) if isinstance(architectures, list) else (),
                    weights, verified)


def _read_config(path: Path, problems: list[str]) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        problems.append(f"{path}: missing (a Hugging Face checkpoint needs config.json)")
        return {}
    except (OSError, ValueError) as error:
        problems.append(f"{path}: cannot be parsed ({error})")
        return {}
    if not isinstance(config, dict):
        problems.append(f"{path}: is not a JSON object")
        return {}
    return config


def _check_manifest(root: Path, problems: list[str]) -> int:
    manifest = root / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as error:
        problems.append(f"{manifest}: cannot be parsed ({error!s})")
        return 0
    before = len(problems)
    for name, expected in sorted(files.items()):
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            problems.append(f"{manifest}: entry {name!r} is not a path inside the model directory")
            continue
        if not (isinstance(expected, dict) and isinstance(expected.get("size"), int)
                and isinstance(expected.get("sha256"), str) and SHA256.fullmatch(expected["sha256"])):
            problems.append(f"{manifest}: entry {name!r} needs an integer 'size' and a hex 'sha256'")
            continue
        _check_file(root / relative, expected["size"], expected["sha256"], problems)
    return len(files) if len(problems) == before else 0


def _check_file(path: Path, size: int, sha256: str, problems: list[str]) -> None:
    if not path.is_file():
        problems.append(f"{path}: missing (listed in {MANIFEST})")
        return
    actual = path.stat().st_size
    if actual != size:
        problems.append(f"{path}: incomplete or wrong size: {actual} bytes, {MANIFEST} says {size}")
        return
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        problems.append(f"{path}: tampered: sha256 {digest.hexdigest()} differs from {MANIFEST}'s {sha256}")
