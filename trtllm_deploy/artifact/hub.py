"""Checkpoints from the Hugging Face Hub, at a pinned revision, downloaded on the head.

Only the files serving needs are fetched (weights as safetensors, configs, tokenizer); PyTorch
``.bin`` duplicates and ``original/`` folders are not. This machine lists the files with
``huggingface_hub`` (metadata: sizes, hashes, URLs, ``HF_ENDPOINT`` honoured); the head downloads
them into its own Hugging Face cache with headagent.py (so a checkpoint already there is reused,
and this machine needs no disk for it), resuming where they stopped with HTTP Range
(huggingface_hub 2.4 restarts an interrupted file from its first byte, measured). The token comes
from ``HF_TOKEN`` or the token file ``hf auth login`` writes; it reaches the head through the
target's secret channel, never a command line, and is masked in every message.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from pathlib import Path

from trtllm_deploy import secrets
from trtllm_deploy.artifact import ship
from trtllm_deploy.errors import DeployError, InputError
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.hosts.targets import Target, expand

SERVING_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja",
                 "merges.txt", "vocab.txt", "*.model")
NOT_FOR_SERVING = ("original/*", "*.bin", "*.pt", "*.pth", "*.gguf", "*.onnx", "*.h5", "*.msgpack",
                   "*.ot")
_SHA = re.compile(r"^[0-9a-f]{40}$")
GATED = ("{repo} is gated or private: accept its terms on the Hub with your account, then export "
         "HF_TOKEN (or run `hf auth login`) and try again")
FETCH_TIMEOUT = 24 * 3600.0  # a 100+ GB checkpoint over a slow link; the agent resumes if stopped


def token() -> str | None:
    """The Hub token: ``HF_TOKEN`` (or its old name), else the token file; registered as a secret."""
    value = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not value:
        from huggingface_hub import get_token

        value = get_token()
    if value:
        secrets.register(value.strip())
    return value.strip() if value else None


def _explain(exc: Exception, repo: str, revision: str) -> DeployError:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError) or getattr(getattr(exc, "response", None),
                                                          "status_code", None) == 401:
        return DeployError(GATED.format(repo=repo))
    if isinstance(exc, errors.RevisionNotFoundError):
        return InputError(f"{repo} has no revision {revision}; check the model's pinned revision")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return InputError(f"no repository {repo} on the Hub (or it is private: set HF_TOKEN)")
    return DeployError(f"downloading {repo}@{revision[:12]} failed: {secrets.redact(str(exc))}")


def resolve(repo: str, revision: str | None) -> str:
    """A branch or tag of ``repo`` as the commit SHA the Hub serves for it now."""
    if revision and _SHA.match(revision):
        return revision
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(repo, revision=revision or "main", token=token()).sha
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one message
        raise _explain(exc, repo, revision or "main") from None


def listing(repo: str, revision: str) -> list[dict]:
    """What the Hub lists of ``repo`` at commit ``revision`` for serving: each file's path, size,
    LFS sha256 or git blob id, and its URL (``HF_ENDPOINT`` honoured). Metadata only: nothing is
    downloaded here."""
    if not _SHA.match(revision):
        raise InputError(f"{repo}: revision {revision!r} is not a commit SHA; pin one (resolve it "
                         "with trtllm_deploy.artifact.hub.resolve) so the download is reproducible")
    from huggingface_hub import HfApi, hf_hub_url

    try:
        entries = [entry for entry in HfApi().list_repo_tree(repo, revision=revision, recursive=True,
                                                             token=token())
                   if hasattr(entry, "size") and _wanted(entry.path)]
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one message
        raise _explain(exc, repo, revision) from None
    if not any(entry.path.endswith(".safetensors") for entry in entries):
        raise DeployError(f"{repo}@{revision[:12]} has no .safetensors weights; serving needs them")
    return [{"path": entry.path, "size": entry.size, "sha256": entry.lfs.sha256 if entry.lfs else None,
             "blob_id": entry.blob_id, "url": hf_hub_url(repo, entry.path, revision=revision)}
            for entry in entries]


def repo_folder(cache: str, repo: str) -> str:
    """The repository's folder in a Hub cache (``HF_HUB_CACHE``: a node's ``model_cache``/hub)."""
    return posixpath.join(cache, f"models--{repo.replace('/', '--')}")


def fetch_on(target: Target, cache: str, repo: str, revision: str, progress=None) -> str:
    """The snapshot folder of ``repo`` at commit ``revision`` in the Hub cache ``cache`` of the host
    ``target`` reaches (its path there), with the files serving needs, downloaded there.

    This machine only lists the files; the host's agent (headagent.py) downloads them, the token
    reaching it through the target's secret channel, never its command line. ``progress(path,
    done_bytes, total_bytes)`` hears of each file done."""
    entries = listing(repo, revision)
    root = repo_folder(expand(cache, target.home()), repo)
    secret = token()
    answer, lines = ship.HeadAgent(target).run(
        "fetch", order={"root": root, "revision": revision, "files": entries}, timeout=FETCH_TIMEOUT,
        secrets={"HF_TOKEN": secret} if secret else None)
    for seen in lines:
        if progress and "file" in seen:
            progress(seen["file"], seen["done"], seen["total"])
    if not answer.get("ok"):
        if answer.get("kind") == "auth":
            raise DeployError(GATED.format(repo=repo))
        raise DeployError(f"downloading {repo}@{revision[:12]} on {target.name} failed: "
                          f"{secrets.redact(str(answer.get('error')))}")
    return answer["snapshot"]


def fetch(repo: str, revision: str, cache_dir: Path | None = None, progress=None) -> Path:
    """:func:`fetch_on` this machine, into its own Hugging Face cache (or ``cache_dir``)."""
    from huggingface_hub import constants

    return Path(fetch_on(Local(), str(cache_dir or constants.HF_HUB_CACHE), repo, revision, progress))


def _wanted(path: str) -> bool:
    return (any(fnmatch.fnmatch(path, pattern) for pattern in SERVING_FILES)
            and not any(fnmatch.fnmatch(path, pattern) for pattern in NOT_FOR_SERVING))
