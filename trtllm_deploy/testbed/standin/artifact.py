"""The checkpoint check each rank makes before "loading": what a real loader would trip over, by name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "trtllm-deploy-manifest.json"


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
    """Every file against trtllm-deploy's manifest, with its own verifier (the image carries
    ``trtllm_deploy/artifact/manifest.py``, standard library only), so there is one format and one check."""
    from trtllm_deploy.artifact import manifest as manifests

    report = manifests.check(root, cache=False)
    for problem in report.problems:
        where = root / problem["path"] if problem["path"] else root
        problems.append(f"{where}: {problem['kind']}: {problem['detail']}")
    return report.files if report.ok else 0
