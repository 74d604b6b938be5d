"""A local server that speaks the part of the Hugging Face Hub HTTP API that huggingface_hub uses
to download a model snapshot, for tests (tests may not reach the internet; point HF_ENDPOINT here).

It serves repositories the test builds in memory, at fixed commit SHAs, honours ``Range`` (so an
interrupted download resumes), can demand a token (a gated repository), can slow its responses
down (so a download can be interrupted), can break a file off mid-way once (``cut_once``) or serve
other bytes than it lists (``corrupt``), and records every request it saw. ``host`` "0.0.0.0"
with ``address`` set lets testbed nodes reach it (their network's gateway is this machine).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    name: str                       # "org/model"
    sha: str                        # the commit every revision of it resolves to
    files: dict[str, bytes]
    token: str | None = None        # a gated repository: this bearer token is required
    branch: str = "main"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]    # names in lower case


@dataclass
class FakeHub:
    repos: dict[str, Repo]
    bytes_per_second: float | None = None      # slow the file bodies down
    seen: list[Seen] = field(default_factory=list)
    cut_once: set[str] = field(default_factory=set)   # files whose next body stops half-way
    corrupt: set[str] = field(default_factory=set)    # files served with one byte changed
    host: str = "127.0.0.1"                           # where it listens
    address: str = "127.0.0.1"                        # where clients reach it (its URL)
    lfs_at: str | None = None   # LFS files redirect there (as the Hub sends them to its CDN)

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return f"http://{self.address}:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- the API --------------------------------------------------------------------------

    def _repo(self, handler, name: str) -> Repo | None:
        repo = self.repos.get(name)
        if repo is None:
            self._json(handler, 404, {"error": "Repository not found"}, head=False)
            return None
        if repo.token and handler.headers.get("Authorization") != f"Bearer {repo.token}":
            self._json(handler, 401, {"error": "Access to model is restricted."}, head=False,
                       extra={"X-Error-Code": "GatedRepo"})
            return None
        return repo

    def _revision_ok(self, repo: Repo, revision: str) -> bool:
        return revision in (repo.sha, repo.branch)

    def _handle(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlparse(handler.path)
        path = unquote(url.path)
        self.seen.append(Seen(handler.command, handler.path,
                              {key.lower(): value for key, value in handler.headers.items()}))
        info = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?/?$", path)
        tree = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", path)
        resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if info:
            repo = self._repo(handler, info.group(1))
            if repo and self._revision_ok(repo, info.group(2) or repo.branch):
                self._json(handler, 200, {
                    "id": repo.name, "modelId": repo.name, "sha": repo.sha, "private": False,
                    "gated": bool(repo.token) and "auto", "disabled": False, "downloads": 0,
                    "likes": 0, "tags": [], "lastModified": "2026-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)]}, head)
            elif repo:
                self._json(handler, 404, {"error": "Revision not found"}, head,
                           extra={"X-Error-Code": "RevisionNotFound"})
        elif tree:
            repo = self._repo(handler, tree.group(1))
            if repo and self._revision_ok(repo, tree.group(2)):
                self._json(handler, 200, [
                    {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data),
                     **({"lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                 "pointerSize": 134}} if name.endswith(".safetensors") else {})}
                    for name, data in sorted(repo.files.items())], head)
            elif repo:
                self._json(handler, 404, {"error": "Revision not found"}, head)
        elif resolve:
            repo = self._repo(handler, resolve.group(1))
            if not repo:
                return
            if not self._revision_ok(repo, resolve.group(2)):
                self._json(handler, 404, {"error": "Revision not found"}, head,
                           extra={"X-Error-Code": "RevisionNotFound"})
                return
            data = repo.files.get(resolve.group(3))
            if data is None:
                self._json(handler, 404, {"error": "Entry not found"}, head,
                           extra={"X-Error-Code": "EntryNotFound"})
                return
            if self.lfs_at and resolve.group(3).endswith(".safetensors"):
                handler.send_response(302)
                handler.send_header("Location", f"{self.lfs_at}{url.path}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            self._file(handler, repo, resolve.group(3), data, head)
        else:
            self._json(handler, 404, {"error": "not served here"}, head)

    def _json(self, handler, status: int, body, head: bool, extra: dict | None = None) -> None:
        payload = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        for key, value in (extra or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if not head:
            handler.wfile.write(payload)

    def _file(self, handler, repo: Repo, name: str, data: bytes, head: bool) -> None:
        lfs = name.endswith(".safetensors")
        etag = hashlib.sha256(data).hexdigest() if lfs else _git_oid(data)
        start = 0
        match = re.match(r"bytes=(\d+)-", handler.headers.get("Range", ""))
        if match and not head:
            start = int(match.group(1))
        if name in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        body = data[start:]
        cut = not head and name in self.cut_once
        if cut:
            self.cut_once.discard(name)
        handler.send_response(206 if start else 200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("ETag", f'"{etag}"')
        handler.send_header("X-Repo-Commit", repo.sha)
        if lfs:
            handler.send_header("X-Linked-Etag", f'"{etag}"')
            handler.send_header("X-Linked-Size", str(len(data)))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if head:
            return
        if cut:  # the whole length announced, half of it sent, then the connection drops
            handler.wfile.write(body[:len(body) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            if not self.bytes_per_second:
                handler.wfile.write(body)
                return
            chunk = 64 * 1024
            for offset in range(0, len(body), chunk):
                handler.wfile.write(body[offset:offset + chunk])
                handler.wfile.flush()
                if self.bytes_per_second:  # the test may lift the limit mid-transfer
                    # pacing, the thing being tested (a slow hub), not a wait for something
                    time.sleep(chunk / self.bytes_per_second)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# --- what tests that build artifacts against this server write around it --------------------------

def model_entry(name: str, repo: str, revision: str, params_billion: float = 0.001,
                description: str = "") -> str:
    """A models-file entry: one bf16 variant of ``repo`` at ``revision``, on one node."""
    about = f'description = "{description}"\n' if description else ""
    return (f"[models.{name}]\n{about}params_billion = {params_billion}\ndefault_precision = \"bf16\"\n\n"
            f"[models.{name}.variants.bf16]\nrepo = \"{repo}\"\nrevision = \"{revision}\"\n"
            "bytes_per_param = 2.0\ntp_by_nodes = { 1 = 1 }\n\n")


def local_hosts(path, store, extra: str = "", model_cache=None):
    """A hosts.toml of this machine alone, its artifact store at ``store``, its Hugging Face cache
    at ``model_cache`` (default: ``hf`` beside the hosts file)."""
    cache = model_cache or path.parent / "hf"
    path.write_text(f'[[nodes]]\nname = "here"\nconnection = "local"\n\n[nodes.paths]\n'
                    f'artifacts = "{store}"\nmodel_cache = "{cache}"\n{extra}')
    return path


def hub_env(url: str, home, **extra: str) -> dict[str, str]:
    """This process's environment without any Hub settings of the machine's, pointed at ``url``."""
    import os

    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
    return env | {"HF_ENDPOINT": url, "HF_HOME": str(home / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
                  **extra}
