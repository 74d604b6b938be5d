"""Runs on a node (standard library only, with the node's python3): what the node already has of an
artifact, and receiving the rest into a staging directory that becomes the artifact in one rename.

``python3 agent.py survey MANIFEST_PY ARTIFACTS NAME`` reads the wanted manifest on stdin and prints
what the node has, changing nothing but the manifest stat caches. ``python3 agent.py receive
MANIFEST_PY ARTIFACTS NAME`` reads a header line (the manifest, the files to take from the current
version), then records (a JSON line ``{"path", "offset", "length"}`` and that many bytes) up to
``{"end": true}``; it verifies the staging directory against the manifest here, on the node, and
only then exchanges it with the current version. Partly received files stay in staging, so an
interrupted push resumes where it stopped.

With ``--listen ADDRESS`` (the fast transport over a private fabric link) the records come over a
plain TCP connection to ADDRESS instead: the port is told and a one-time token is taken over the
SSH channel, and only a connection that presents that token is read. Nothing is trusted for being
on that connection: every byte is checked against the manifest hashes before it becomes current.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import hmac
import importlib.util
import json
import os
import shutil
import socket
import sys
import time

BLOCK = 4 << 20
RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100
LOCK_WAIT = 30.0
ACCEPT_TIMEOUT = 30.0  # for the pusher to connect to the fabric port
IDLE_TIMEOUT = 300.0  # a fabric connection that stalls this long ends the push, never hangs it


class Refused(Exception):
    """Something the controller must be told; printed as ``{"ok": false, "error": ...}``."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


def load_manifest_module(path: str):
    spec = importlib.util.spec_from_file_location("trtllm_deploy_manifest", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def staging_of(artifacts: str, name: str) -> str:
    return os.path.join(artifacts, f".{name}.push")


def checked_paths(wanted: dict, mf) -> dict:
    """The manifest's files; a path that could leave the directory is refused before anything."""
    files = wanted.get("files")
    if not isinstance(files, dict):
        raise Refused("manifest", "the manifest has no file list")
    for path in files:
        parts = path.split("/")
        if (not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts)
                or path in mf.OWN_FILES):
            raise Refused("manifest", f"refusing the manifest path {path!r}")
    return files


def free_bytes(path: str) -> int:
    while not os.path.isdir(path):
        path = os.path.dirname(path) or "/"
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def good_files(mf, root: str, wanted: dict) -> set:
    """The wanted files present under ``root`` with the manifest's size and hash (stat cache used)."""
    if not os.path.isdir(root):
        return set()
    report = mf.check(root, wanted)
    bad = {problem["path"] for problem in report.problems}
    if any(problem["path"] == "" for problem in report.problems):
        return set()  # an unreadable file somewhere: trust nothing
    return {path for path in wanted["files"]
            if path not in bad and os.path.isfile(os.path.join(root, path))}


def survey(mf, artifacts: str, name: str, wanted: dict) -> dict:
    files = checked_paths(wanted, mf)
    current = os.path.join(artifacts, name)
    staging = staging_of(artifacts, name)
    same_manifest = False
    try:
        same_manifest = mf.dumps(mf.load(current)) == mf.dumps(wanted)
    except mf.ManifestError:
        pass
    in_current = good_files(mf, current, wanted)
    in_staging = good_files(mf, staging, wanted)
    state = {}
    for path, entry in files.items():
        partial = 0
        if path not in in_staging:
            try:
                st = os.stat(os.path.join(staging, path))
                # A linked file shares its bytes with the current version: never appended to.
                partial = st.st_size if st.st_size < entry["size"] and st.st_nlink == 1 else 0
            except OSError:
                pass
        state[path] = {"current": path in in_current, "staged": path in in_staging,
                       "partial": partial}
    return {"ok": True, "free": free_bytes(artifacts), "exists": os.path.isdir(current),
            "same_manifest": same_manifest,
            "up_to_date": same_manifest and len(in_current) == len(files), "files": state}


def _read_line(stream) -> dict:
    line = stream.readline(1 << 26)
    if not line.endswith(b"\n"):
        raise Refused("truncated", "the stream ended before its next header")
    return json.loads(line)


def _clear_extras(staging: str, files: dict, mf) -> None:
    """Whatever staging holds that the manifest does not list goes (an older version's files)."""
    for directory, dirnames, filenames in os.walk(staging, topdown=False):
        for filename in filenames:
            full = os.path.join(directory, filename)
            relative = os.path.relpath(full, staging).replace(os.sep, "/")
            if relative not in files and relative not in mf.OWN_FILES:
                os.unlink(full)
        for dirname in dirnames:
            full = os.path.join(directory, dirname)
            if os.path.islink(full):
                os.unlink(full)
            elif not os.listdir(full):
                os.rmdir(full)


def _link(source: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.lexists(dest):
        os.unlink(dest)
    try:
        os.link(source, dest)  # the same bytes on the same disk: no copy, no transfer
    except OSError:
        shutil.copy2(source, dest)


class _ChunkHash:
    """The manifest's chunked SHA-256 of bytes as they arrive, so a file received whole is hashed
    here on the node without being read back."""

    def __init__(self, chunk_bytes: int):
        self.chunk_bytes = chunk_bytes
        self.digests: list = []
        self.current = hashlib.sha256()
        self.filled = 0

    def update(self, data) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.chunk_bytes - self.filled)
            self.current.update(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == self.chunk_bytes:
                self.digests.append(self.current.digest())
                self.current, self.filled = hashlib.sha256(), 0

    def hexdigest(self) -> str:
        digests = self.digests + ([self.current.digest()] if self.filled or not self.digests else [])
        return hashlib.sha256(b"".join(digests)).hexdigest()


def _receive_file(stream, staging: str, record: dict, files: dict, chunk_bytes: int) -> str | None:
    """Write one record's bytes into staging; the file's hash when it was received whole."""
    path, offset, length = record["path"], int(record["offset"]), int(record["length"])
    if path not in files or offset < 0 or offset + length != files[path]["size"]:
        raise Refused("protocol", f"unexpected record for {path!r}")
    full = os.path.join(staging, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    if offset:
        st = os.stat(full) if os.path.isfile(full) else None
        if st is None or st.st_size < offset or st.st_nlink != 1:
            raise Refused("protocol", f"{path}: cannot continue at {offset} in staging")
    elif os.path.lexists(full):
        os.unlink(full)  # it may be a link to the current version's bytes: write a new file
    hasher = None if offset else _ChunkHash(chunk_bytes)  # a continued file is hashed from disk
    buffer = memoryview(bytearray(BLOCK))
    with open(full, "r+b" if offset else "wb", buffering=0) as out:
        out.truncate(offset)
        out.seek(offset)
        left = length
        while left:
            got = stream.readinto(buffer[:min(BLOCK, left)])
            if not got:
                raise Refused("truncated", f"the stream ended inside {path}, "
                                           f"{length - left} of {length} bytes received")
            view = buffer[:got]
            while view:  # unbuffered: a full disk raises here, not later at close
                view = view[out.write(view):]
            if hasher:
                hasher.update(buffer[:got])
            left -= got
    return hasher.hexdigest() if hasher else None


def _sync(staging: str, paths) -> None:
    """On disk before the rename that makes them current (after the stream, so that flushing one
    file never holds up receiving the next)."""
    for path in paths:
        handle = os.open(os.path.join(staging, path), os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def exchange(staging: str, current: str) -> bool:
    """Make ``staging`` the current version in one step; True when it was atomic."""
    if not os.path.lexists(current):
        os.rename(staging, current)
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done = libc.renameat2(AT_FDCWD, os.fsencode(staging), AT_FDCWD, os.fsencode(current),
                              RENAME_EXCHANGE)
        if done == 0:
            return True
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), current)
    except AttributeError:
        pass  # a libc without renameat2
    # A file system without RENAME_EXCHANGE: the name is missing for the moment between two renames.
    aside = current + ".old"
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(current, aside)
    os.rename(staging, current)
    os.rename(aside, staging)
    return False


def receive(mf, artifacts: str, name: str, stream) -> dict:
    header = _read_line(stream)
    wanted = header["manifest"]
    files = checked_paths(wanted, mf)
    current = os.path.join(artifacts, name)
    staging = staging_of(artifacts, name)
    os.makedirs(artifacts, exist_ok=True)
    lock = open(os.path.join(artifacts, f".{name}.push.lock"), "w")
    # An interrupted push's receiver may still be finishing its last block: wait for it a while.
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise Refused("busy", f"another push of {name} is writing to this node") from None
            time.sleep(0.2)
    os.makedirs(staging, exist_ok=True)
    _clear_extras(staging, files, mf)
    links = header.get("link", [])
    if any(path not in files for path in links):
        raise Refused("protocol", "a link to a file the manifest does not list")
    # The current version's files as checked now (its stat cache makes this milliseconds when
    # nothing changed since the survey): those are linked with their hash known, the rest are
    # linked and hashed again below like any received file.
    good = good_files(mf, current, wanted) if links else set()
    for path in links:
        _link(os.path.join(current, path), os.path.join(staging, path))
    mf.remember(staging, {path: files[path]["hash"] for path in links if path in good})
    received = 0
    written: list = []
    hashed: dict = {}
    while True:
        record = _read_line(stream)
        if record.get("end"):
            break
        digest = _receive_file(stream, staging, record, files, mf.CHUNK_BYTES)
        written.append(record["path"])
        if digest:
            hashed[record["path"]] = digest
        received += int(record["length"])
    _sync(staging, written)
    mf.remember(staging, hashed)  # hashed on arrival: check() below need not read them again
    mf.write(staging, wanted)
    report = mf.check(staging, wanted)
    if not report.ok:
        for problem in report.problems:
            if problem["kind"] in ("size", "hash"):
                os.unlink(os.path.join(staging, problem["path"]))  # sent again from the start
        return {"ok": False, "error": "verification failed in staging", "kind": "verify",
                "verify": report.as_json()}
    atomic = exchange(staging, current)
    shutil.rmtree(staging, ignore_errors=True)  # the previous version, no longer served
    return {"ok": True, "received": received, "atomic": atomic, "verify": report.as_json()}


def fabric_stream(address: str):
    """The fast transport's data connection: the first one to ``address`` that presents the token
    this process was given over SSH (its standard input)."""
    token = sys.stdin.buffer.readline().strip()
    if len(token) < 32:
        raise Refused("protocol", "no token on the SSH channel")
    server = socket.create_server((address, 0))
    port = server.getsockname()[1]
    print(json.dumps({"port": port}), flush=True)
    deadline = time.monotonic() + ACCEPT_TIMEOUT
    with server:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Refused("transport", f"no connection with the token reached {address}:{port} "
                                           f"within {ACCEPT_TIMEOUT:g} s; is a firewall in the way?")
            server.settimeout(left)
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            conn.settimeout(ACCEPT_TIMEOUT)
            stream = conn.makefile("rb", buffering=BLOCK)
            try:
                offered = stream.readline(256).strip()
            except OSError:
                offered = b""
            if hmac.compare_digest(offered, token):
                conn.settimeout(IDLE_TIMEOUT)
                return conn, stream
            conn.close()


def main(argv: list) -> int:
    listen = None
    if len(argv) == 6 and argv[4] == "--listen":
        listen, argv = argv[5], argv[:4]
    if len(argv) != 4 or argv[0] not in ("survey", "receive"):
        print("usage: agent.py survey|receive MANIFEST_PY ARTIFACTS NAME [--listen ADDRESS]",
              file=sys.stderr)
        return 2
    command, manifest_py, artifacts, name = argv
    artifacts = os.path.expanduser(artifacts)
    mf = load_manifest_module(manifest_py)
    try:
        if command == "survey":
            result = survey(mf, artifacts, name, json.load(sys.stdin))
        elif listen:
            conn, stream = fabric_stream(listen)
            with conn:
                result = receive(mf, artifacts, name, stream)
        else:
            result = receive(mf, artifacts, name, sys.stdin.buffer)
    except Refused as exc:
        result = {"ok": False, "kind": exc.kind, "error": str(exc)}
    except OSError as exc:
        kind = "full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "os"
        where = exc.filename or artifacts
        result = {"ok": False, "kind": kind, "error": f"{where}: {exc.strerror or exc}"}
    print(json.dumps(result, sort_keys=True))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
