"""Checkpoints from the Hugging Face Hub, at a pinned revision, through ``huggingface_hub``.

Only the files serving needs are fetched (weights as safetensors, configs, tokenizer); PyTorch
``.bin`` duplicates and ``original/`` folders are not. Downloads go to the Hugging Face cache (so a
checkpoint already there is reused) and resume where they stopped: huggingface_hub 2.4 restarts an
interrupted file from its first byte (measured), so the file transfer is ours, with HTTP Range,
while huggingface_hub lists the files, builds the URLs and the authentication headers.
``HF_ENDPOINT`` is honoured, as huggingface_hub does. The token comes from ``HF_TOKEN`` or the
token file ``hf auth login`` writes; it is passed in-process, never on a command line, and is
masked in every message.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from pathlib import Path

from trtllm_deploy import atomic, secrets
from trtllm_deploy.errors import DeployError, InputError

SERVING_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja",
                 "merges.txt", "vocab.txt", "*.model")
NOT_FOR_SERVING = ("original/*", "*.bin", "*.pt", "*.pth", "*.gguf", "*.onnx", "*.h5", "*.msgpack",
                   "*.ot")
_SHA = re.compile(r"^[0-9a-f]{40}$")


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
        return DeployError(f"{repo} is gated or private: accept its terms on the Hub with your "
                           "account, then export HF_TOKEN (or run `hf auth login`) and try again")
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


def fetch(repo: str, revision: str, cache_dir: Path | None = None, max_workers: int = 4,
          progress=None) -> Path:
    """The snapshot folder of ``repo`` at commit ``revision`` with the files serving needs.

    Files land in the Hugging Face cache layout (``blobs/<etag>``, ``snapshots/<sha>/<path>``), so
    other Hub tools reuse them and a file already there costs nothing. Each file downloads into
    ``blobs/<etag>.part`` and continues from there after an interruption (HTTP Range), is checked
    against its size and, for LFS files, its sha256, and only then takes its name.
    ``progress(path, done_bytes, total_bytes)`` follows each file.
    """
    if not _SHA.match(revision):
        raise InputError(f"{repo}: revision {revision!r} is not a commit SHA; pin one (resolve it "
                         "with trtllm_deploy.artifact.hub.resolve) so the download is reproducible")
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import HfApi, constants

    secret = token()
    try:
        entries = [entry for entry in HfApi().list_repo_tree(repo, revision=revision, recursive=True,
                                                             token=secret)
                   if hasattr(entry, "size") and _wanted(entry.path)]
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one message
        raise _explain(exc, repo, revision) from None
    if not any(entry.path.endswith(".safetensors") for entry in entries):
        raise DeployError(f"{repo}@{revision[:12]} has no .safetensors weights; serving needs them")
    root = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hub") as pool:
        futures = [pool.submit(_fetch_file, repo, revision, entry, root, snapshot, secret, progress)
                   for entry in entries]
        for future in futures:
            future.result()
    return snapshot


def _wanted(path: str) -> bool:
    return (any(fnmatch.fnmatch(path, pattern) for pattern in SERVING_FILES)
            and not any(fnmatch.fnmatch(path, pattern) for pattern in NOT_FOR_SERVING))


def _fetch_file(repo: str, revision: str, entry, root: Path, snapshot: Path, secret: str | None,
                progress) -> None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    sha256 = entry.lfs.sha256 if entry.lfs else None
    blob = root / "blobs" / (sha256 or entry.blob_id)
    if not (blob.exists() and blob.stat().st_size == entry.size):
        part = blob.with_name(blob.name + ".part")
        digest = hashlib.sha256()
        done = part.stat().st_size if part.exists() else 0
        if done > entry.size:
            part.unlink()
            done = 0
        if sha256 and done:
            with open(part, "rb") as existing:
                for chunk in iter(lambda: existing.read(1 << 20), b""):
                    digest.update(chunk)
        headers = build_hf_headers(token=secret)
        if done:
            headers["Range"] = f"bytes={done}-"
        url = hf_hub_url(repo, entry.path, revision=revision)
        try:
            with get_session().stream("GET", url, headers=headers, follow_redirects=True,
                                      timeout=60) as answer:
                if answer.status_code == 200 and done:  # the server ignored the Range: start over
                    done, digest = 0, hashlib.sha256()
                    mode = "wb"
                elif answer.status_code in (200, 206):
                    mode = "ab" if done else "wb"
                else:
                    answer.read()
                    answer.raise_for_status()
                with open(part, mode) as sink:
                    for chunk in answer.iter_bytes(1 << 20):
                        sink.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(entry.path, done, entry.size)
        except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one message
            raise _explain(exc, repo, revision) from None
        if done != entry.size:
            raise DeployError(f"{repo}: {entry.path} ended at {done} of {entry.size} bytes; run "
                              "again to continue the download")
        if sha256 and digest.hexdigest() != sha256:
            part.unlink()
            raise DeployError(f"{repo}: {entry.path} does not match the sha256 the Hub lists "
                              f"({sha256[:12]}…); it was removed, run again to fetch it anew")
        os.replace(part, blob)
    link = snapshot / entry.path
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(blob, link.parent)
    if not (link.is_symlink() and os.readlink(link) == target):
        with atomic.replacing(link) as temporary:
            temporary.symlink_to(target)
