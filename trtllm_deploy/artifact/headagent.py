"""The head's side of ``engine.build``: download a checkpoint into the head's Hugging Face cache and
make the artifact in the head's store. Shipped to the head by content hash and run there with its
python3 and the standard library only (beside manifest.py, whose path it is given).

``python3 headagent.py fetch MANIFEST_PY`` reads on stdin what the controller listed from the Hub
(``{"root", "revision", "files": [{"path", "size", "sha256", "blob_id", "url"}]}``) and the token
from ``HF_TOKEN`` in its environment (sent over SSH's encrypted channel, never in argv). Every file
goes to ``blobs/<sha256 or blob id>`` through ``<blob>.part``, resumed with HTTP Range after an
interruption, under a lock per blob (where huggingface_hub keeps its own: ``.locks/``) so that two
builds at once download it once; it takes its name only once it matches what the Hub lists: the
sha256 for LFS files, the git blob id (sha1 of ``blob SIZE\\0`` and the content) for the others.
Then ``snapshots/<revision>/<path>`` links to it, the Hub cache layout other Hub tools read. Prints
one JSON line per file done, then the report.

``python3 headagent.py current MANIFEST_PY DIR`` prints the artifact's manifest and its problems.
``python3 headagent.py seal MANIFEST_PY`` reads ``{"scratch", "final", "snapshot", "link", "files",
"provenance"}``: hard-links the snapshot's files into scratch (``link``), writes ``files`` (the
LLM-API YAML), the manifest, and renames scratch into ``final`` whole, the old version moved aside.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import importlib.util
import json
import os
import secrets
import shutil
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

BLOCK = 1 << 20
ATTEMPTS = 3         # a connection that breaks mid-file is resumed this many times before giving up
TIMEOUT = 60.0
WORKERS = 4


class Failed(Exception):
    """What the controller is told: ``{"ok": false, "kind", "error", "file", "status"}``."""

    def __init__(self, kind: str, message: str, file: str | None = None, status: int | None = None):
        self.kind, self.file, self.status = kind, file, status
        super().__init__(message)


def load_manifest_module(path: str):
    spec = importlib.util.spec_from_file_location("trtllm_deploy_manifest", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


# --- downloading ---------------------------------------------------------------------------------

def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc.lower()


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """The token follows a redirect only to the same scheme and host: the Hub sends LFS files to a
    CDN with a signed URL, which must never see it. (An unredirected header is dropped by urllib on
    every redirect; this puts it back where that is safe.)"""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth and _origin(new.full_url) == _origin(req.full_url):
            new.add_unredirected_header("Authorization", auth)
        return new


_OPENER = urllib.request.build_opener(_SameHostAuth)


def _hasher(entry: dict):
    """The hash the Hub lists for the file: sha256 of LFS files, git's blob sha1 of the others."""
    if entry.get("sha256"):
        return hashlib.sha256()
    digest = hashlib.sha1()  # noqa: S324 - git's object id, not a security choice of ours
    digest.update(b"blob %d\0" % entry["size"])
    return digest


def _expected(entry: dict) -> str:
    return entry.get("sha256") or entry["blob_id"]


def _hash_existing(path: str, digest) -> int:
    done = 0
    with open(path, "rb") as existing:
        for chunk in iter(lambda: existing.read(BLOCK), b""):
            digest.update(chunk)
            done += len(chunk)
    return done


def _request(entry: dict, token: str | None, offset: int):
    request = urllib.request.Request(entry["url"], headers={"User-Agent": "trtllm-deploy-headagent"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        return _OPENER.open(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        exc.close()
        kind = "auth" if exc.code in (401, 403) else "http"
        raise Failed(kind, f"{entry['path']}: the Hub answered {exc.code} {exc.reason}", entry["path"],
                     exc.code) from None


def _download(entry: dict, part: str, token: str | None, say) -> None:
    """``part`` made whole (appending to what an earlier try left), checked against the Hub's hash."""
    size, path = entry["size"], entry["path"]
    for attempt in range(1, ATTEMPTS + 1):
        digest = _hasher(entry)
        done = _hash_existing(part, digest) if os.path.exists(part) else 0
        if done > size:
            os.unlink(part)
            digest, done = _hasher(entry), 0
        if done < size:
            try:
                with _request(entry, token, done) as answer:
                    if answer.status == 200 and done:  # the server ignored the Range: start over
                        digest, done, mode = _hasher(entry), 0, "wb"
                    else:
                        mode = "ab" if done else "wb"
                    with open(part, mode) as sink:
                        for chunk in iter(lambda: answer.read(BLOCK), b""):
                            sink.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
            except (OSError, http.client.HTTPException) as exc:
                if attempt == ATTEMPTS:
                    raise Failed("truncated", f"{path}: the download broke off at {done} of {size} bytes "
                                 f"({exc}); run again to continue it", path) from None
                continue
        if done < size and attempt < ATTEMPTS:
            continue  # the connection ended early: resume from what arrived
        if done != size:
            raise Failed("truncated", f"{path}: ended at {done} of {size} bytes; run again to continue "
                         "the download", path)
        if digest.hexdigest() != _expected(entry):
            os.unlink(part)
            what = "sha256" if entry.get("sha256") else "git blob id"
            raise Failed("corrupt", f"{path} does not match the {what} the Hub lists "
                         f"({_expected(entry)[:12]}…); it was removed, run again to fetch it anew", path)
        say({"file": path, "done": size, "total": size})
        return


def fetch_file(entry: dict, root: str, snapshot: str, token: str | None, say) -> bool:
    """One file into the cache and its snapshot link; True when it had to be downloaded."""
    blob = os.path.join(root, "blobs", _expected(entry))
    # Where huggingface_hub keeps its lock on the same blob (``<cache>/.locks/<repo folder>/``), so a
    # download by the Hub's own tools on the head takes turns with this one too.
    locks = os.path.join(os.path.dirname(root), ".locks", os.path.basename(root))
    os.makedirs(locks, exist_ok=True)
    fetched = False
    with open(os.path.join(locks, _expected(entry) + ".lock"), "w") as lock:
        # One writer per blob: a second build of the same checkpoint waits here, then finds it done.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (os.path.isfile(blob) and os.path.getsize(blob) == entry["size"]):
            _download(entry, blob + ".part", token, say)
            os.replace(blob + ".part", blob)
            fetched = True
    link = os.path.join(snapshot, entry["path"])
    os.makedirs(os.path.dirname(link), exist_ok=True)
    target = os.path.relpath(blob, os.path.dirname(link))
    if not (os.path.islink(link) and os.readlink(link) == target):
        scratch = f"{link}.tmp-{secrets.token_hex(4)}"
        os.symlink(target, scratch)
        os.replace(scratch, link)
    return fetched


def _checked(entries: list) -> list:
    """Paths that stay inside the snapshot, ids that are hashes: refused before anything is written."""
    for entry in entries:
        path = entry.get("path", "")
        if (not path or path.startswith("/") or ".." in path.split("/")
                or not all(c in "0123456789abcdef" for c in _expected(entry))):
            raise Failed("listing", f"refusing the listed file {path!r}")
    return entries


def fetch(order: dict, token: str | None, say) -> dict:
    root, revision = order["root"], order["revision"]
    entries = _checked(order["files"])
    snapshot = os.path.join(root, "snapshots", revision)
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    lock = threading.Lock()

    def said(line: dict) -> None:
        with lock:
            say(line)

    with ThreadPoolExecutor(max_workers=order.get("workers", WORKERS)) as pool:
        futures = [pool.submit(fetch_file, entry, root, snapshot, token, said) for entry in entries]
        failures, fetched = [], 0
        for future in futures:
            try:
                fetched += future.result()
            except Failed as exc:
                failures.append(exc)
    if failures:
        raise failures[0]
    return {"ok": True, "snapshot": snapshot, "fetched": fetched, "files": len(entries)}


# --- the artifact --------------------------------------------------------------------------------

def current(mf, final: str) -> dict:
    """The artifact's manifest and what is wrong with it (nothing: it verifies); None: no artifact."""
    try:
        found = mf.load(final)
    except (mf.ManifestError, OSError):
        return {"ok": True, "manifest": None}
    return {"ok": True, "manifest": found, "problems": mf.verify(final, found)}


def _link_tree(snapshot: str, scratch: str) -> None:
    """The snapshot's files, hard-linked from the cache's blobs (no second copy), copied otherwise."""
    for folder, _, names in os.walk(snapshot):
        for name in sorted(names):
            source = os.path.join(folder, name)
            dest = os.path.join(scratch, os.path.relpath(source, snapshot))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            blob = os.path.realpath(source)
            try:
                os.link(blob, dest)
            except OSError:
                shutil.copy2(blob, dest)


def _swap(scratch: str, final: str) -> None:
    """The new artifact takes the name in one rename; an old one is moved aside first and removed
    after, so the name always holds a whole artifact or none."""
    old = None
    if os.path.lexists(final):
        old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.old-{secrets.token_hex(4)}")
        os.rename(final, old)
    try:
        os.rename(scratch, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def seal(mf, order: dict) -> dict:
    scratch, final = order["scratch"], order["final"]
    try:
        os.makedirs(scratch, exist_ok=True)
        if order.get("link"):
            _link_tree(order["snapshot"], scratch)
        for name, text in order.get("files", {}).items():
            with open(os.path.join(scratch, name), "w", encoding="utf-8") as out:
                out.write(text)
        made = mf.create(scratch, order["provenance"])
        mf.write(scratch, made)
        _swap(scratch, final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return {"ok": True, "files": len(made["files"]), "total_bytes": made["total_bytes"]}


def _say(line: dict) -> None:
    sys.stdout.write(json.dumps(line, sort_keys=True) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("fetch", "current", "seal"):
        print("usage: headagent.py fetch|seal MANIFEST_PY < ORDER | current MANIFEST_PY DIR", file=sys.stderr)
        return 2
    verb, mf = argv[0], load_manifest_module(argv[1])
    token = os.environ.pop("HF_TOKEN", None) or None
    try:
        if verb == "current":
            report = current(mf, argv[2])
        else:
            order = json.loads(sys.stdin.read())
            report = fetch(order, token, _say) if verb == "fetch" else seal(mf, order)
    except Failed as exc:
        report = {"ok": False, "kind": exc.kind, "error": str(exc), "file": exc.file, "status": exc.status}
    except (OSError, ValueError, mf.ManifestError) as exc:
        report = {"ok": False, "kind": "error", "error": f"{type(exc).__name__}: {exc}"}
    _say(report)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
