"""Runs on a node (standard library only, with the node's python3): what the node already has of an
artifact, and receiving the rest into a staging directory that becomes the artifact in one rename.

``python3 agent.py survey MANIFEST_PY ARTIFACTS NAME`` reads the wanted manifest on stdin and prints
what the node has, changing nothing but the manifest stat caches.

``python3 agent.py receive MANIFEST_PY ARTIFACTS NAME`` holds the node's lock on pushes of NAME
from start to end. It reads a header line (the manifest, the files to take from the current
version), prepares staging and says ``{"ready": true}``; then come records (a JSON line ``{"path",
"offset", "length"}`` and that many bytes) up to ``{"end": true, "parts": [...]}``. A push may use
more streams than this one: each other stream is ``python3 agent.py part ...`` on an SSH connection
of its own (a header line with the manifest, then records up to ``{"end": true}``), which writes
into the same staging only while a receive holds the lock, and prints what it wrote and the hashes
of what it received; the controller hands those reports over in the end record. The receive then
verifies staging against the manifest here, on the node, and only then exchanges it with the
current version. Each file is flushed to disk as soon as it is complete, while the next arrives.
Partly received files stay in staging, so an interrupted push resumes where it stopped.

With ``--listen ADDRESS`` (the fast transport over a private fabric link) a one-time token comes
before the header on the SSH channel, and the records come over ``streams`` plain TCP connections
to ADDRESS, one thread each: the port is told over SSH, and only a connection that presents the
token is read. Nothing is trusted for being on that connection: every byte is checked against the
manifest hashes before it becomes current.

Along a chain (push from the head to the workers node to node) every node but the last also passes
on each record it receives, the same bytes, to the next node while writing its own staging: its
header says ``"forward": true`` and, once every node of the chain listens, one more line on the SSH
channel says where the next one is (``{"to": {"address" | "tunnel", "port"}}``: plain TCP to a
fabric address, or through ``ssh -L`` to the next node's loopback). Stream i of a hop goes on as
stream i of the next. A ``{"stop": why}`` line while a node waits for its upstream's connections
ends the wait (the node before it could not reach it). The header's ``need`` (file → offset) says
what this node lacks: bytes before that offset and files it does not list are passed on, not
written. A next node that stops reading ends the forwarding only (reported as ``"forward"``);
this node goes on receiving for itself.

``python3 agent.py send MANIFEST_PY ROOT NAME`` is the chain's first sender, on the node (or this
machine) whose ``ROOT/NAME`` holds the artifact: the token and a header (the records to send, the
streams, where the first node is) on stdin, then the files with ``sendfile``, ``{"sent": N}`` lines
as it goes. ``python3 agent.py manifest MANIFEST_PY ROOT NAME`` prints that folder's manifest and
the files that do not match its sizes, so a push can start from a node's store.
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
import queue
import select
import shutil
import socket
import subprocess
import sys
import threading
import time

BLOCK = 4 << 20
RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100
LOCK_WAIT = 30.0
ACCEPT_TIMEOUT = 30.0  # for the pusher to connect to the fabric port
MAX_STREAMS = 64
IDLE_TIMEOUT = 300.0  # a fabric connection that stalls this long ends the push, never hangs it
CONNECT_TIMEOUT = 30.0  # for the next node of a chain (through a tunnel that is still starting)
FORWARD_TIMEOUT = 60.0  # a next node that takes nothing this long is left behind, not waited for
TICK = 1 << 20  # bytes between two progress lines
_said = threading.Lock()


def say(answer: dict) -> None:
    """One JSON line on stdout, whole, whichever thread says it."""
    with _said:
        print(json.dumps(answer, sort_keys=True), flush=True)


class Ticker:
    """Progress lines (``{KEY: bytes}``) at most every TICK bytes, from every stream at once."""

    def __init__(self, key: str):
        self.key, self.pending = key, 0
        self._lock = threading.Lock()

    def __call__(self, count: int) -> None:
        with self._lock:
            self.pending += count
            if self.pending < TICK:
                return
            count, self.pending = self.pending, 0
        say({self.key: count})

    def flush(self) -> None:
        with self._lock:
            count, self.pending = self.pending, 0
        if count:
            say({self.key: count})


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


WHOLE = object()  # no ``need`` in the header: write every record from where it starts


def _receive_file(stream, staging: str, record: dict, files: dict, chunk_bytes: int, own=WHOLE,
                  forward=None, tick=None) -> str | None:
    """One record's bytes into staging from ``own`` on (``None``: none of them, this node has the
    file), each passed on to ``forward`` first; the file's hash when it was written whole."""
    path, offset, length = record["path"], int(record["offset"]), int(record["length"])
    if path not in files or offset < 0 or offset + length != files[path]["size"]:
        raise Refused("protocol", f"unexpected record for {path!r}")
    own = offset if own is WHOLE else own
    if own is not None and own < offset:
        raise Refused("protocol", f"{path}: the stream starts at {offset}, this node has {own}")
    out = hasher = None
    if own is not None:
        full = os.path.join(staging, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if own:
            st = os.stat(full) if os.path.isfile(full) else None
            if st is None or st.st_size < own or st.st_nlink != 1:
                raise Refused("protocol", f"{path}: cannot continue at {own} in staging")
        elif os.path.lexists(full):
            os.unlink(full)  # it may be a link to the current version's bytes: write a new file
        hasher = None if own else _ChunkHash(chunk_bytes)  # a continued file is hashed from disk
        out = open(full, "r+b" if own else "wb", buffering=0)
        out.truncate(own)
        out.seek(own)
    skip = length if own is None else own - offset  # passed on, not written: this node has them
    buffer = memoryview(bytearray(BLOCK))
    try:
        left = length
        while left:
            got = stream.readinto(buffer[:min(BLOCK, left)])
            if not got:
                raise Refused("truncated", f"the stream ended inside {path}, "
                                           f"{length - left} of {length} bytes received")
            if forward:
                forward.send(buffer[:got])
            view = buffer[:got]
            if skip:
                dropped = min(skip, got)
                view, skip = view[dropped:], skip - dropped
            if out:
                if hasher:
                    hasher.update(view)
                while view:  # unbuffered: a full disk raises here, not later at close
                    view = view[out.write(view):]
            left -= got
            if tick:
                tick(got)
    finally:
        if out:
            out.close()
    return hasher.hexdigest() if hasher else None


class Forward:
    """One stream's copy to the next node of a chain. Its failure ends this copy only: the node
    goes on receiving for itself, and the stream's report says the forwarding failed."""

    def __init__(self, sock, timeout: float = FORWARD_TIMEOUT):
        self.sock, self.timeout, self.error, self.sent = sock, timeout, None, 0
        sock.settimeout(timeout)

    def __bool__(self) -> bool:
        return self.sock is not None

    def send(self, data) -> None:
        try:
            self.sock.sendall(data)
            self.sent += len(data)
        except OSError as exc:
            self.fail(exc)

    def fail(self, exc) -> None:
        self.error = self.error or f"forward failed after {self.sent} bytes: {_why(exc)}"
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def finish(self) -> None:
        """The end of this stream downstream: wait until the next node has read all of it (then
        it closes), so that a tunnel is not taken down with bytes still in it."""
        if self.sock is None:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while self.sock.recv(1 << 16):
                pass
            self.sock.close()
            self.sock = None
        except OSError as exc:
            self.fail(exc)


def _why(exc) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class Receiver:
    """One stream's records written into staging. Each file is flushed to disk by a thread of its
    own as soon as it is complete, while the next one arrives, so that at the end of the stream
    little is left to wait for before the swap."""

    def __init__(self, staging: str, files: dict, chunk_bytes: int, need: dict | None = None,
                 forward: Forward | None = None, tick=None):
        self.staging, self.files, self.chunk_bytes = staging, files, chunk_bytes
        self.need, self.forward, self.tick = need, forward, tick
        self.written: list = []
        self.hashed: dict = {}
        self.received = 0
        self._pending: queue.Queue = queue.Queue()
        self._failed: list = []
        self._syncer = threading.Thread(target=self._sync_each, daemon=True)
        self._syncer.start()

    def _sync_each(self) -> None:
        while True:
            path = self._pending.get()
            if path is None:
                return
            if self._failed:
                continue
            try:
                handle = os.open(os.path.join(self.staging, path), os.O_RDONLY)
                try:
                    os.fsync(handle)
                finally:
                    os.close(handle)
            except OSError as exc:
                self._failed.append(exc)

    def take(self, stream) -> dict:
        """Records up to the stream's end record, which is returned; the files are synced."""
        try:
            while True:
                line = stream.readline(1 << 26)
                if not line.endswith(b"\n"):
                    raise Refused("truncated", "the stream ended before its next header")
                record = json.loads(line)
                if self.forward:
                    self.forward.send(line)
                if record.get("end"):
                    if self.forward:
                        self.forward.finish()
                    return record
                own = WHOLE if self.need is None else self.need.get(record["path"])
                digest = _receive_file(stream, self.staging, record, self.files, self.chunk_bytes,
                                       own, self.forward, self.tick)
                if own is not None:
                    self.written.append(record["path"])
                    self._pending.put(record["path"])
                if digest:
                    self.hashed[record["path"]] = digest
                self.received += int(record["length"])
        finally:
            self._pending.put(None)
            self._syncer.join()
            if self._failed:
                raise self._failed[0]

    def as_json(self) -> dict:
        answer = {"ok": True, "written": self.written, "hashed": self.hashed, "received": self.received}
        if self.forward is not None:
            answer["forward_error"] = self.forward.error
        return answer


def _sync_dir(path: str) -> None:
    handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def exchange(staging: str, current: str) -> bool:
    """Make ``staging`` the current version in one step; True when it was atomic (an exchange of
    the two names, or the first version's rename). The new version's directories are synced before
    (its files were, as they arrived), the folder holding both names after: a power cut finds one
    version or the other whole under the name, never one whose entries were not yet on disk."""
    for folder, _, _ in os.walk(staging):
        _sync_dir(folder)
    parent = os.path.dirname(current) or "."
    if not os.path.lexists(current):
        os.rename(staging, current)
        _sync_dir(parent)
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done = libc.renameat2(AT_FDCWD, os.fsencode(staging), AT_FDCWD, os.fsencode(current),
                              RENAME_EXCHANGE)
        if done == 0:
            _sync_dir(parent)
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
    _sync_dir(parent)
    return False


def _lock_path(artifacts: str, name: str) -> str:
    return os.path.join(artifacts, f".{name}.push.lock")


def _hold(artifacts: str, name: str):
    """The node's lock on pushes of ``name``, held by the receive that owns staging until it ends."""
    lock = open(_lock_path(artifacts, name), "w")
    # An interrupted push's receiver may still be finishing its last block: wait for it a while.
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except OSError:
            if time.monotonic() > deadline:
                raise Refused("busy", f"another push of {name} is writing to this node") from None
            time.sleep(0.2)


def _prepare(mf, artifacts: str, name: str, header: dict) -> tuple[dict, str]:
    """Staging holds the manifest's files only, with the current version's unchanged ones linked."""
    wanted = header["manifest"]
    files = checked_paths(wanted, mf)
    current = os.path.join(artifacts, name)
    staging = staging_of(artifacts, name)
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
    return files, staging


def _commit(mf, artifacts: str, name: str, wanted: dict, parts: list) -> dict:
    """Every stream's report → staging checked against the manifest here, then made current."""
    failed = [part for part in parts if part is not None and not part.get("ok")]
    if failed:
        # One stream's failure (a full disk) ends the others mid-stream: report its reason, not
        # theirs. What was received stays in staging, for the next push to continue.
        chosen = min(failed, key=lambda part: part.get("kind") == "truncated")
        if chosen.get("kind") == "truncated":
            # Every stream says only that it was cut: the one that hit the full disk may have had
            # its report lost on the way back (its SSH channel torn down with it), so this node
            # looks at its own disk before blaming the link.
            return _no_room(artifacts, name, wanted) or chosen
        return chosen
    if any(part is None for part in parts):
        return {"ok": False, "kind": "protocol", "error": "a stream ended without a report"}
    staging = staging_of(artifacts, name)
    hashed: dict = {}
    for part in parts:
        hashed.update(part["hashed"])
    mf.remember(staging, hashed)  # hashed on arrival: check() below need not read them again
    mf.write(staging, wanted)
    report = mf.check(staging, wanted)
    if not report.ok:
        for problem in report.problems:
            if problem["kind"] in ("size", "hash"):
                os.unlink(os.path.join(staging, problem["path"]))  # sent again from the start
        return {"ok": False, "error": "verification failed in staging", "kind": "verify",
                "verify": report.as_json()}
    atomic = exchange(staging, os.path.join(artifacts, name))
    shutil.rmtree(staging, ignore_errors=True)  # the previous version, no longer served
    return {"ok": True, "received": sum(part["received"] for part in parts), "streams": len(parts),
            "written": sum(len(part["written"]) for part in parts), "atomic": atomic,
            "verify": report.as_json()}


def _no_room(artifacts: str, name: str, wanted: dict) -> dict | None:
    """A "full" report when the disk under staging cannot hold what staging still lacks of the
    manifest's files, else None."""
    staging = staging_of(artifacts, name)
    try:
        disk = os.statvfs(staging)
        missing = 0
        for path, entry in (wanted.get("files") or {}).items():
            try:
                have = os.stat(os.path.join(staging, path)).st_size
            except FileNotFoundError:
                have = 0
            missing += max(0, int(entry["size"]) - have)
    except (OSError, TypeError, ValueError, KeyError, AttributeError):
        return None
    free = disk.f_bavail * disk.f_frsize
    if missing == 0 or free >= missing:
        return None
    return {"ok": False, "kind": "full",
            "error": f"{staging}: {os.strerror(errno.ENOSPC)} ({free} bytes free, {missing} bytes of "
                     "the manifest's files still to receive)"}


def _failure(exc: BaseException, where: str) -> dict:
    """What stopped a receive, as its report says it."""
    if isinstance(exc, Refused):
        return {"ok": False, "kind": exc.kind, "error": str(exc)}
    if isinstance(exc, OSError):
        kind = "full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "os"
        return {"ok": False, "kind": kind, "error": f"{exc.filename or where}: {exc.strerror or exc}"}
    if isinstance(exc, (ValueError, KeyError, TypeError)):  # a header or record that is not JSON
        return {"ok": False, "kind": "protocol", "error": f"unreadable stream: {exc!r}"}
    raise exc


def receive(mf, artifacts: str, name: str, control, listen: str | None = None) -> dict:
    """The push's receiving side on this node, holding its lock from the header to the swap.

    Over SSH the records come on ``control`` (this process's standard input) after it says it is
    ready, and the end record brings the reports of the other streams (``part`` processes, each
    its own SSH connection). With ``listen`` they come on ``header["streams"]`` fabric connections,
    one thread each, and along a chain each is passed on to the next node (see the module's
    docstring)."""
    token = _token(control) if listen else None
    header = _read_line(control)
    os.makedirs(artifacts, exist_ok=True)
    lock = _hold(artifacts, name)
    try:
        files, staging = _prepare(mf, artifacts, name, header)
        if listen:
            result = _chained(mf, header, control, listen, token, staging, files)
            return _commit(mf, artifacts, name, header["manifest"], result[0]) | result[1]
        print(json.dumps({"ready": True}), flush=True)
        receiver = Receiver(staging, files, mf.CHUNK_BYTES)
        end = receiver.take(control)
        parts = [receiver.as_json(), *end.get("parts", [])]
        return _commit(mf, artifacts, name, header["manifest"], parts)
    finally:
        lock.close()


def _chained(mf, header: dict, control, listen: str, token: bytes, staging: str, files: dict):
    """The fabric streams of one hop, each passed on to the next node where the header says so;
    (every stream's report, what the forwarding did)."""
    count = int(header.get("streams", 1))
    if not 1 <= count <= MAX_STREAMS:
        raise Refused("protocol", f"{count} streams asked for; 1 to {MAX_STREAMS} are taken")
    need = header.get("need")
    if need is not None and any(path not in files for path in need):
        raise Refused("protocol", "a need for a file the manifest does not list")
    server = listener(listen)
    tunnel = None
    forwards: list = [None] * count
    forward = {}
    try:
        say({"port": server.getsockname()[1], "pid": os.getpid()})
        to = _read_line(control).get("to") if header.get("forward") else None
        if to:  # none where the nodes after this one did not start
            timeout = float(header.get("forward_timeout", FORWARD_TIMEOUT))
            try:
                sockets, tunnel = _downstream(to, token, count)
                forwards = [Forward(sock, timeout) for sock in sockets]
            except Refused as exc:
                forward = {"forward_error": str(exc)}  # this node still receives for itself
                say(forward)  # at once: the controller tells the next node to stop waiting
        tick = Ticker("got") if header.get("progress") else None
        connections = _accept(server, token, count, control)
        parts = _fabric_streams(connections, staging, files, mf.CHUNK_BYTES, need, forwards, tick)
        if tick:
            tick.flush()
    finally:
        server.close()
        for each in forwards:
            if each:
                each.fail("this node stopped receiving")
        _stop_tunnel(tunnel)
    errors = [part.get("forward_error") for part in parts if part and part.get("forward_error")]
    if header.get("forward"):
        error = forward.get("forward_error") or (errors[0] if errors else None)
        forward = {"forward": {"ok": error is None, "error": error,
                               "sent": sum(f.sent for f in forwards if f is not None)}}
    return parts, forward


def listener(address: str) -> socket.socket:
    """A socket listening on a free port of ``address`` in that address's own family, so that an
    IPv6 fabric or management address works as an IPv4 one does; the wildcard (``""``, ``::``) listens
    on both families where the system can."""
    try:
        if address in ("", "::") and socket.has_dualstack_ipv6():
            return socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
        family, _, _, _, where = socket.getaddrinfo(address or None, 0, type=socket.SOCK_STREAM,
                                                    flags=socket.AI_PASSIVE)[0]
        return socket.create_server(where, family=family)
    except OSError as exc:
        raise Refused("listen", f"cannot listen on {address}: {_why(exc)}; is it this node's own "
                                "fabric address (ip -br addr shows them)?") from None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tunnel(argv: list) -> tuple:
    """``ssh -L 127.0.0.1:0:…`` as the controller gave it, on a free port of this node's loopback
    instead of 0; (the process, the port)."""
    port = _free_port()
    given = [f"127.0.0.1:{port}:" + arg.removeprefix("127.0.0.1:0:")
             if before == "-L" else arg for before, arg in zip(["", *argv[:-1]], argv, strict=True)]
    return subprocess.Popen(given, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True), port


def _stop_tunnel(tunnel) -> None:
    if tunnel is None:
        return
    if tunnel.poll() is None:
        tunnel.kill()
    tunnel.wait()
    tunnel.stderr.close()


def _downstream(to: dict, token: bytes, count: int) -> tuple:
    """``count`` connections to the next node of a chain, each presenting the token; (the
    sockets, the tunnel process or None)."""
    tunnel = None
    if to.get("tunnel"):
        tunnel, port = _tunnel(list(to["tunnel"]))
        address = "127.0.0.1"
    else:
        address, port = str(to["address"]), int(to["port"])
    sockets: list = []
    deadline = time.monotonic() + CONNECT_TIMEOUT
    try:
        while len(sockets) < count:
            try:
                sock = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
            except OSError as exc:
                if tunnel is not None and tunnel.poll() is not None:
                    said = tunnel.stderr.read().decode(errors="replace").strip()[-300:]
                    raise Refused("forward", f"the tunnel to the next node exited: {said}") from None
                if time.monotonic() > deadline:
                    raise Refused("forward", f"cannot reach the next node at {address}:{port}: "
                                             f"{_why(exc)}") from None
                time.sleep(0.05)  # the tunnel is still starting: try again until the deadline
                continue
            sock.sendall(token + b"\n")
            sockets.append(sock)
    except BaseException:
        for sock in sockets:
            sock.close()
        _stop_tunnel(tunnel)
        raise
    return sockets, tunnel


def part(mf, artifacts: str, name: str, stream) -> dict:
    """One more SSH stream of a push whose ``receive`` holds the lock: files into staging only.
    Its header comes once that receive has said it is ready (the connection is made meanwhile)."""
    files = checked_paths(_read_line(stream)["manifest"], mf)
    try:
        lock = open(_lock_path(artifacts, name), "rb")
    except FileNotFoundError:
        raise Refused("protocol", f"no push of {name} is receiving on this node") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # held: the receive that owns staging is running, as it must be
        else:
            raise Refused("protocol", f"no push of {name} is receiving on this node")
        receiver = Receiver(staging_of(artifacts, name), files, mf.CHUNK_BYTES)
        receiver.take(stream)
        return receiver.as_json()
    finally:
        lock.close()


def _token(control) -> bytes:
    token = control.readline(256).strip()
    if len(token) < 32:
        raise Refused("protocol", "no token on the SSH channel")
    return token


def _fabric_streams(connections: list, staging: str, files: dict, chunk_bytes: int,
                    need: dict | None = None, forwards: list | None = None, tick=None) -> list:
    """The fast transport's data: each accepted connection read by its own thread into staging,
    and passed on by its ``forwards`` entry where there is one."""
    forwards = forwards or [None] * len(connections)
    reports: list = [None] * len(connections)

    def run(index: int, conn, stream) -> None:
        try:
            receiver = Receiver(staging, files, chunk_bytes, need, forwards[index], tick)
            receiver.take(stream)
            reports[index] = receiver.as_json()
        except (Refused, OSError, ValueError, KeyError, TypeError) as exc:
            reports[index] = _failure(exc, staging)
        finally:
            conn.close()
            if forwards[index]:
                forwards[index].fail("the stream from upstream stopped")  # the next node sees it end

    threads = [threading.Thread(target=run, args=(index, *pair), daemon=True)
               for index, pair in enumerate(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return reports


def _accept(server, token: bytes, count: int, control=None) -> list:
    """``count`` connections to ``server`` that each present ``token``; others are closed unread.
    A line on ``control`` meanwhile (``{"stop": why}``: the node before this one cannot reach it)
    ends the wait at once."""
    address, port = server.getsockname()[:2]
    deadline = time.monotonic() + ACCEPT_TIMEOUT
    accepted: list = []
    while len(accepted) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            for conn, _ in accepted:
                conn.close()
            raise Refused("transport", f"no connection with the token reached {address}:{port} "
                                       f"within {ACCEPT_TIMEOUT:g} s; is a firewall in the way?")
        ready = select.select([server, *([control] if control else [])], [], [], left)[0]
        if control is not None and control in ready:
            line = control.readline(1 << 16)
            if not line:
                control = None  # its input ended (as today's fabric push ends it): wait on
                continue
            why = json.loads(line).get("stop")
            for conn, _ in accepted:
                conn.close()
            raise Refused("transport", f"nothing will come to {address}:{port}: {why}")
        if server not in ready:
            continue
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
            accepted.append((conn, stream))
        else:
            conn.close()
    return accepted


def send(mf, root: str, name: str, control) -> dict:
    """The first sender of a chain: ``root/name``'s files as the header's records, over
    ``streams`` connections to the first node (each taking the next file when it is free)."""
    token = _token(control)
    header = _read_line(control)
    steps = list(header["steps"])
    checked_paths({"files": {step["path"]: {} for step in steps}}, mf)
    folder = os.path.join(root, name)
    count = int(header.get("streams", 1))
    if not 1 <= count <= MAX_STREAMS:
        raise Refused("protocol", f"{count} streams asked for; 1 to {MAX_STREAMS} are taken")
    sockets, tunnel = _downstream(header["to"], token, count)
    pending = iter(steps)
    lock = threading.Lock()
    failures: list = []
    tick = Ticker("sent")
    timeout = float(header.get("forward_timeout", FORWARD_TIMEOUT))

    def stream(sock) -> None:
        forward = Forward(sock, timeout)
        try:
            while not failures:
                with lock:
                    step = next(pending, None)
                if step is None:
                    break
                _send_file(forward, folder, step, tick)
            if not failures:
                forward.send(b'{"end": true}\n')
                forward.finish()
        except (OSError, Refused) as exc:
            forward.fail(exc)
        if forward.error:
            failures.append(forward.error)

    threads = [threading.Thread(target=stream, args=(sock,), daemon=True) for sock in sockets]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        _stop_tunnel(tunnel)
    tick.flush()
    if failures:
        return {"ok": False, "kind": "forward", "error": failures[0]}
    return {"ok": True, "sent": sum(int(step["length"]) for step in steps), "streams": count}


def _send_file(forward: Forward, folder: str, step: dict, tick) -> None:
    path, offset, length = step["path"], int(step["offset"]), int(step["length"])
    forward.send(json.dumps({"path": path, "offset": offset, "length": length}).encode() + b"\n")
    with open(os.path.join(folder, path), "rb") as source:
        end = offset + length
        while offset < end and forward:
            try:  # socket.sendfile: os.sendfile that keeps to the socket's timeout
                done = forward.sock.sendfile(source, offset, min(BLOCK, end - offset))
            except OSError as exc:
                forward.fail(exc)
                break
            if done == 0:
                raise Refused("source", f"{path} is shorter than its manifest says")
            offset += done
            forward.sent += done
            tick(done)


def source_manifest(mf, root: str, name: str) -> dict:
    """The manifest of ``root/name`` on this node, and its files that are missing or of another
    size (a push does not start from a damaged store)."""
    folder = os.path.join(root, name)
    try:
        wanted = mf.load(folder)
    except mf.ManifestError as exc:
        raise Refused("manifest", str(exc)) from None
    files = checked_paths(wanted, mf)
    damaged = []
    for path, entry in files.items():
        full = os.path.join(folder, path)
        if not os.path.isfile(full) or os.path.getsize(full) != entry["size"]:
            damaged.append(path)
    with open(os.path.join(folder, mf.MANIFEST), "rb") as handle:  # what launch records
        digest = hashlib.sha256(handle.read()).hexdigest()
    return {"ok": True, "manifest": wanted, "damaged": damaged, "sha256": digest}


VERBS = ("survey", "receive", "part", "send", "manifest")


def main(argv: list) -> int:
    listen = None
    if len(argv) == 6 and argv[4] == "--listen":
        listen, argv = argv[5], argv[:4]
    if len(argv) != 4 or argv[0] not in VERBS or (listen and argv[0] != "receive"):
        print(f"usage: agent.py {'|'.join(VERBS)} MANIFEST_PY ARTIFACTS NAME [--listen ADDRESS]",
              file=sys.stderr)
        return 2
    command, manifest_py, artifacts, name = argv
    artifacts = os.path.expanduser(artifacts)
    mf = load_manifest_module(manifest_py)
    try:
        if command == "survey":
            result = survey(mf, artifacts, name, json.load(sys.stdin))
        elif command == "part":
            result = part(mf, artifacts, name, sys.stdin.buffer)
        elif command == "send":
            result = send(mf, artifacts, name, sys.stdin.buffer)
        elif command == "manifest":
            result = source_manifest(mf, artifacts, name)
        else:
            result = receive(mf, artifacts, name, sys.stdin.buffer, listen)
    except (Refused, OSError, ValueError, KeyError, TypeError) as exc:
        result = _failure(exc, artifacts)
    say(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
