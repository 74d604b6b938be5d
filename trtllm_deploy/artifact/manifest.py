"""The artifact manifest: every file's size and content hash plus where the artifact came from.

Standard library only, so the same file is shipped to a node and run there with its own python3
(``python3 manifest.py verify DIR``); it imports nothing else from trtllm_deploy.

The hash is SHA-256 over fixed-size chunks (``sha256-chunked``): a file's hash is the SHA-256 of
the concatenated SHA-256 digests of its 64 MiB chunks. Chunks hash in parallel on every core, so
one large shard is not hashed by one core, and SHA-256 is hardware-accelerated on both x86_64
(SHA-NI) and aarch64 (ARMv8 SHA2) through the stdlib's OpenSSL, which releases the GIL. blake3 is
faster still but is not in a node's system Python, where verification has to run.

Re-verification keeps a stat cache (``.trtllm-deploy-verified.json`` in the artifact): a file
whose size, mtime_ns, ctime_ns, inode and device all match the last full verification is not
re-read. ctime cannot be set from user space, so rewriting a file and restoring its mtime is still
seen; the one change a stat cache cannot see is a write that bypasses the file system (the block
device, or a reset system clock). Entries whose ctime is not strictly older than the start of the
verification that recorded them are not trusted ("racy", as git's index does), because a write in
the same clock tick would leave ctime unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

MANIFEST = "trtllm-deploy-manifest.json"
CACHE = ".trtllm-deploy-verified.json"
FORMAT = 1
ALGORITHM = "sha256-chunked"
CHUNK_BYTES = 64 << 20
READ_BYTES = 8 << 20  # big reads: a syscall per 8 MiB, and hashlib drops the GIL for each
OWN_FILES = (MANIFEST, CACHE)


class ManifestError(Exception):
    """The manifest itself is missing, unreadable or not a manifest."""


@dataclass
class Report:
    """What a verification found, with how much it read."""

    problems: list[dict] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    hashed: int = 0
    hashed_bytes: int = 0
    cached: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict:
        return {"ok": self.ok, "files": self.files, "bytes": self.bytes, "hashed": self.hashed,
                "hashed_bytes": self.hashed_bytes, "cached": self.cached,
                "seconds": round(self.seconds, 3), "problems": self.problems}


def _problem(kind: str, path: str, detail: str) -> dict:
    return {"kind": kind, "path": path, "detail": detail}


def _hash_chunk(path: str, index: int, size: int) -> bytes:
    digest = hashlib.sha256()
    buffer = bytearray(min(READ_BYTES, max(size, 1)))
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(index * CHUNK_BYTES)
        left = min(CHUNK_BYTES, size - index * CHUNK_BYTES)
        while left > 0:
            got = handle.readinto(view[:min(left, len(buffer))])
            if not got:
                raise OSError(f"{path}: shorter than its size while being read")
            digest.update(view[:got])
            left -= got
    return digest.digest()


def hash_files(paths: dict[str, tuple[str, int]], workers: int | None = None) -> dict[str, str]:
    """``{name: (absolute path, size)}`` → ``{name: hex hash}``, every chunk of every file in parallel."""
    jobs = [(name, index) for name, (_, size) in sorted(paths.items())
            for index in range(max(1, -(-size // CHUNK_BYTES)))]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        digests = list(pool.map(lambda job: _hash_chunk(paths[job[0]][0], job[1], paths[job[0]][1]),
                                jobs))
    chunks: dict[str, list[bytes]] = {}
    for (name, _), digest in zip(jobs, digests, strict=True):
        chunks.setdefault(name, []).append(digest)
    return {name: hashlib.sha256(b"".join(parts)).hexdigest() for name, parts in chunks.items()}


def _walk(root: str) -> tuple[dict[str, os.stat_result], list[dict]]:
    """Every file under ``root`` (relative POSIX path → stat), and the links that are refused."""
    found: dict[str, os.stat_result] = {}
    refused = []
    real_root = os.path.realpath(root)
    for directory, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, root).replace(os.sep, "/")
            if relative in OWN_FILES or relative.startswith(CACHE + ".tmp"):
                continue
            if os.path.islink(full):
                resolved = os.path.realpath(full)
                if os.path.commonpath([real_root, resolved]) != real_root:
                    refused.append(_problem("symlink", relative,
                                            f"a link out of the artifact, to {resolved}"))
                    continue
                if name in dirnames:
                    refused.append(_problem("symlink", relative, "a link to a directory"))
                    continue
            if name in filenames:
                try:
                    found[relative] = os.stat(full)
                except OSError as exc:
                    refused.append(_problem("unreadable", relative, exc.strerror or str(exc)))
    return found, refused


def create(root: str | os.PathLike, provenance: dict, workers: int | None = None) -> dict:
    """The manifest of the tree under ``root`` (not written: see :func:`write`)."""
    root = os.fspath(root)
    found, refused = _walk(root)
    if refused:
        raise ManifestError("; ".join(f"{p['path']}: {p['detail']}" for p in refused))
    sizes = {name: (os.path.join(root, name), st.st_size) for name, st in found.items()}
    hashes = hash_files(sizes, workers)
    return {
        "format": FORMAT,
        "algorithm": ALGORITHM,
        "chunk_bytes": CHUNK_BYTES,
        "provenance": dict(provenance),
        "total_bytes": sum(size for _, size in sizes.values()),
        "files": {name: {"size": sizes[name][1], "hash": hashes[name]} for name in sorted(sizes)},
    }


def dumps(manifest: dict) -> str:
    """Deterministic JSON: sorted keys, fixed indentation, one trailing newline."""
    return json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def _write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(path) or "."
    handle, scratch = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(scratch, path)
    except BaseException:
        try:
            os.unlink(scratch)
        except OSError:
            pass
        raise


def write(root: str | os.PathLike, manifest: dict) -> str:
    path = os.path.join(os.fspath(root), MANIFEST)
    _write_atomically(path, dumps(manifest))
    return path


def load(root: str | os.PathLike) -> dict:
    """The manifest written in ``root``; :class:`ManifestError` says what is wrong with it."""
    path = os.path.join(os.fspath(root), MANIFEST)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        raise ManifestError(f"no manifest: {path} is missing") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path} is not readable JSON: {exc}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("format") != FORMAT
            or manifest.get("algorithm") != ALGORITHM
            or manifest.get("chunk_bytes") != CHUNK_BYTES
            or not all(isinstance(entry, dict) and isinstance(entry.get("size"), int)
                       and isinstance(entry.get("hash"), str) for entry in files.values())):
        raise ManifestError(f"{path} is not a format-{FORMAT} {ALGORITHM} manifest")
    return manifest


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _load_cache(root: str) -> dict:
    try:
        with open(os.path.join(root, CACHE), encoding="utf-8") as handle:
            cache = json.load(handle)
        return cache["files"] if cache.get("algorithm") == ALGORITHM else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # no cache, or a damaged one: hash everything, which is always correct


def _clock_now(root: str) -> int | None:
    """The file system's own clock now (what a write's ctime would read), or None if read-only."""
    try:
        handle, scratch = tempfile.mkstemp(prefix=CACHE + ".tmp", dir=root)
    except OSError:
        return None
    try:
        return os.fstat(handle).st_ctime_ns
    finally:
        os.close(handle)
        os.unlink(scratch)


def check(root: str | os.PathLike, manifest: dict | None = None, cache: bool = True,
          workers: int | None = None) -> Report:
    """Compare the tree under ``root`` with its manifest; every difference is one problem."""
    started = time.monotonic()
    root = os.fspath(root)
    report = Report()
    if manifest is None:
        try:
            manifest = load(root)
        except ManifestError as exc:
            report.problems.append(_problem("manifest", MANIFEST, str(exc)))
            report.seconds = time.monotonic() - started
            return report
    now = _clock_now(root) if cache else None
    known = _load_cache(root) if cache else {}
    found, refused = _walk(root)
    report.problems += refused
    expected = manifest["files"]
    to_hash: dict[str, tuple[str, int]] = {}
    actual: dict[str, str] = {}
    for name in sorted(expected):
        want = expected[name]
        st = found.get(name)
        if st is None:
            if not any(p["path"] == name for p in refused):
                report.problems.append(_problem("missing", name, "listed in the manifest, not on disk"))
            continue
        report.files += 1
        report.bytes += st.st_size
        if st.st_size != want["size"]:
            report.problems.append(_problem("size", name, f"{st.st_size} bytes, "
                                            f"the manifest says {want['size']}"))
            continue
        entry = known.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == _stamp(st):
            actual[name] = entry[1]
            report.cached += 1
        else:
            to_hash[name] = (os.path.join(root, name), st.st_size)
    try:
        actual.update(hash_files(to_hash, workers))
    except OSError as exc:
        report.problems.append(_problem("unreadable", "", str(exc)))
    report.hashed = len(to_hash)
    report.hashed_bytes = sum(size for _, size in to_hash.values())
    for name in sorted(actual):
        if actual[name] != expected[name]["hash"]:
            report.problems.append(_problem("hash", name, "content differs from the manifest"))
    for name in sorted(set(found) - set(expected)):
        report.problems.append(_problem("extra", name, "on disk, not in the manifest"))
    if now is not None:
        # Only what was hashed before this check started and has not changed since is reusable.
        fresh = {name: [_stamp(found[name]), digest] for name, digest in actual.items()
                 if found[name].st_ctime_ns < now}
        if fresh != known:
            try:
                _write_atomically(os.path.join(root, CACHE),
                                  json.dumps({"algorithm": ALGORITHM, "files": fresh},
                                             sort_keys=True))
            except OSError:
                pass  # a read-only artifact is verified in full every time; nothing is lost
    report.seconds = time.monotonic() - started
    return report


def remember(root: str | os.PathLike, hashes: dict[str, str]) -> None:
    """Add hashes computed while the files were being written (a push's receiver hashes the bytes
    as they arrive) to the stat cache, keyed by each file's state now: a later change misses it."""
    root = os.fspath(root)
    entries = _load_cache(root)
    for name, digest in hashes.items():
        entries[name] = [_stamp(os.stat(os.path.join(root, name))), digest]
    _write_atomically(os.path.join(root, CACHE),
                      json.dumps({"algorithm": ALGORITHM, "files": entries}, sort_keys=True))


def verify(root: str | os.PathLike, manifest: dict | None = None, cache: bool = True) -> list[dict]:
    """Every problem with the artifact under ``root``; an empty list means it matches."""
    return check(root, manifest, cache).problems


def main(argv: list[str]) -> int:
    usage = "usage: manifest.py verify DIR [--no-cache] | create DIR [PROVENANCE_JSON]"
    if len(argv) < 2 or argv[0] not in ("verify", "create"):
        print(usage, file=sys.stderr)
        return 2
    command, root, rest = argv[0], argv[1], argv[2:]
    if not os.path.isdir(root):
        print(json.dumps({"ok": False, "problems": [_problem("missing", root,
                                                             "no such artifact directory")]}))
        return 1
    if command == "verify":
        report = check(root, cache="--no-cache" not in rest)
        print(json.dumps(report.as_json(), sort_keys=True))
        return 0 if report.ok else 1
    try:
        provenance = json.loads(rest[0]) if rest else {}
        manifest = create(root, provenance)
    except (ValueError, ManifestError) as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 1
    write(root, manifest)
    print(dumps(manifest), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
