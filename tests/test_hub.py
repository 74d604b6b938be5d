"""Checkpoint downloads against a local server speaking the Hub's HTTP API (tests/fakehub.py).

Each download runs in its own process with ``HF_ENDPOINT`` pointing at the local server, as a user's
would (huggingface_hub reads its endpoint at import), and so that one can be killed half-way.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fakehub import FakeHub, Repo
from waiting import until

ROOT = Path(__file__).resolve().parents[1]
SHA = "3f4e2a1b" * 5
GATED_SHA = "9c8d7e6f" * 5
TOKEN = "hf_testtoken_5f3a9c1e77"
WEIGHTS = os.urandom(3 * 1024 * 1024)
FILES = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b'{"version": "1.0"}',
         "model.safetensors": WEIGHTS, "pytorch_model.bin": b"a duplicate serving never reads",
         "original/consolidated.00.pth": b"meta's own format"}


@pytest.fixture
def hub():
    server = FakeHub({"org/tiny": Repo("org/tiny", SHA, dict(FILES)),
                      "org/gated": Repo("org/gated", GATED_SHA, dict(FILES), token=TOKEN)})
    url = server.start()
    server.url = url
    yield server
    server.stop()


def download(hub, tmp_path, repo: str, revision: str | None, token: str | None = None,
             call: str = "fetch", wait: bool = True):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "PYTHONPATH": str(ROOT)}
    if token:
        env["HF_TOKEN"] = token
    code = ("import sys\nfrom trtllm_deploy.artifact import hub\n"
            "from trtllm_deploy.errors import DeployError\n"
            "try:\n"
            f"    print(hub.{call}({repo!r}, {revision!r}))\n"
            "except DeployError as exc:\n"
            "    print(exc, file=sys.stderr); sys.exit(exc.exit_code)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out.strip(), err


def test_a_pinned_snapshot_has_the_files_serving_needs_and_no_others(hub, tmp_path):
    code, out, err = download(hub, tmp_path, "org/tiny", SHA)
    assert code == 0, err
    folder = Path(out)
    assert folder.name == SHA
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    # Again: everything is in the cache, no file body is fetched a second time.
    bodies = len([s for s in hub.seen if s.method == "GET" and "/resolve/" in s.path])
    code, again, err = download(hub, tmp_path, "org/tiny", SHA)
    assert code == 0 and again == out, err
    assert len([s for s in hub.seen if s.method == "GET" and "/resolve/" in s.path]) == bodies


def test_a_branch_is_resolved_to_the_commit_it_points_at(hub, tmp_path):
    code, out, err = download(hub, tmp_path, "org/tiny", "main", call="resolve")
    assert (code, out) == (0, SHA), err


def test_an_unpinned_revision_is_refused_before_any_download(hub, tmp_path):
    code, _, err = download(hub, tmp_path, "org/tiny", "main")
    assert code == 2 and "is not a commit SHA" in err
    assert not [s for s in hub.seen if "/resolve/" in s.path]


def test_a_gated_repository_needs_the_token_which_never_shows(hub, tmp_path):
    code, _, err = download(hub, tmp_path, "org/gated", GATED_SHA)
    assert code == 1 and "gated or private" in err and "HF_TOKEN" in err
    code, _, err = download(hub, tmp_path, "org/gated", GATED_SHA, token="hf_wrong_token_0000")
    assert code == 1 and "hf_wrong_token_0000" not in err
    before = len(hub.seen)
    code, out, err = download(hub, tmp_path, "org/gated", GATED_SHA, token=TOKEN)
    assert code == 0, err
    assert TOKEN not in out + err
    sent = [s for s in hub.seen[before:] if s.path.startswith(("/org/gated/", "/api/models/org/gated"))]
    assert sent and all(s.headers.get("authorization") == f"Bearer {TOKEN}" for s in sent)
    assert not any(TOKEN in s.path for s in hub.seen)  # in the header only, never in a URL


def test_an_interrupted_download_resumes_where_it_stopped(hub, tmp_path):
    hub.bytes_per_second = 1024 * 1024          # 3 MiB of weights: about 3 s, to stop it half-way
    proc = download(hub, tmp_path, "org/tiny", SHA, wait=False)
    blobs = tmp_path / "hf-home" / "hub" / "models--org--tiny" / "blobs"

    def partial() -> dict[str, int]:
        assert proc.poll() is None, proc.communicate()
        return {p.name: p.stat().st_size for p in blobs.glob("*.part") if p.stat().st_size > 256 * 1024}

    until(partial, 30, "the download to write 256 KiB of a .part file", retry_on=(FileNotFoundError,))
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the download stops with the command that started it
    proc.communicate(timeout=60)
    hub.bytes_per_second = None
    code, out, err = download(hub, tmp_path, "org/tiny", SHA)
    assert code == 0, err
    ranged = [s for s in hub.seen if s.method == "GET" and "model.safetensors" in s.path
              and s.headers.get("range", "").startswith("bytes=")]
    assert ranged and int(ranged[-1].headers["range"][6:-1]) > 256 * 1024  # went on, not over
    weights = (Path(out) / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).digest() == hashlib.sha256(WEIGHTS).digest()


def test_the_token_follows_no_redirect_to_another_host(hub, tmp_path):
    """The Hub sends LFS files to its CDN with a signed URL: the token stays with the Hub."""
    cdn = FakeHub({"org/gated": Repo("org/gated", GATED_SHA, dict(FILES))})
    hub.lfs_at = cdn.start()
    try:
        code, out, err = download(hub, tmp_path, "org/gated", GATED_SHA, token=TOKEN)
    finally:
        cdn.stop()
    assert code == 0, err
    assert (Path(out) / "model.safetensors").read_bytes() == WEIGHTS
    moved = [s for s in cdn.seen if s.path.endswith("/model.safetensors")]
    assert moved and not any("authorization" in s.headers for s in moved)
    kept = [s for s in hub.seen if s.path.endswith("/config.json")]
    assert kept and all(s.headers.get("authorization") == f"Bearer {TOKEN}" for s in kept)
