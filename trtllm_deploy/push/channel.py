"""A command on a node whose standard input this process writes: the bulk-data path of a push.

Over SSH it is OpenSSH's client (a process of its own, host key checked against the node's pinned
known_hosts, as ``Target.stream`` does); bytes come from files through ``sendfile``, so this process
copies nothing itself. Every byte written is counted, which is what the summary reports as sent.

The fast transport keeps the SSH command as the control channel and moves the bytes over plain TCP
connections to the node's fabric address (:meth:`Channel.connect`): the node listens there, tells
its port over SSH, and reads only connections that present the one-time token sent to it over SSH.
No encryption is paid for on the data; the node checks every byte against the manifest hashes.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence

from trtllm_deploy.hosts import shell
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.hosts.targets import Target, TargetError, Unreachable

BLOCK = 4 << 20
# Bulk data prefers AES-GCM: hardware AES on x86_64 and aarch64 makes it about 1.7x the default
# chacha20-poly1305 here (414 against 244 MB/s through one sshd on 2 cores); both are AEAD ciphers.
BULK_CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"

_open: set[subprocess.Popen] = set()  # every channel still running, so Ctrl-C can stop them all
_lock = threading.Lock()


class Meter:
    """Bytes written, counted from every stream of one transfer at once."""

    def __init__(self, progress: Callable[[int], None] | None = None):
        self.sent = 0
        self._progress = progress or (lambda _: None)
        self._lock = threading.Lock()

    def __call__(self, count: int) -> None:
        with self._lock:
            self.sent += count
        self._progress(count)


class Sink:
    """Where one stream's bytes go (a pipe to a command, or a socket), every byte counted."""

    def __init__(self, fd: int, meter: Meter, name: str):
        self.fd, self.meter, self.name = fd, meter, name

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.write(self.fd, view[:BLOCK])
            view = view[done:]
            self.meter(done)

    def send_file(self, path: str | os.PathLike, offset: int, length: int) -> None:
        with open(path, "rb") as source:
            end = offset + length
            while offset < end:
                done = os.sendfile(self.fd, source.fileno(), offset, min(BLOCK, end - offset))
                if done == 0:
                    raise TargetError(self.name, f"{path} is shorter than its manifest says")
                offset += done
                self.meter(done)


class Channel:
    """``argv`` running on ``target`` with a pipe to its standard input (:attr:`stdin`), and for
    the fast transport any number of fabric connections to what it listens on (:meth:`connect`)."""

    def __init__(self, target: Target, argv: Sequence[str], progress: Callable[[int], None] | None = None,
                 meter: Meter | None = None):
        self.target = target
        self.argv = tuple(argv)
        if isinstance(target, SSH):
            ssh = target.openssh_argv()
            command = [*ssh[:-1], "-o", f"Ciphers={BULK_CIPHERS}", ssh[-1], "--", shell.join(self.argv)]
        elif isinstance(target, Local):
            command = list(self.argv)
        else:
            raise TargetError(target.name, "push reaches a node over SSH or on this machine only")
        self.meter = meter or Meter(progress)
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        with _lock:
            _open.add(self.proc)
        self.stdin = Sink(self.proc.stdin.fileno(), self.meter, target.name)
        self._sockets: list[socket.socket] = []
        self.output: tuple[int, str, str] | None = None  # what finish() got, even where it raised

    @property
    def sent(self) -> int:
        return self.meter.sent

    def write(self, data: bytes) -> None:
        self.stdin.write(data)

    def send_file(self, path: str | os.PathLike, offset: int, length: int) -> None:
        self.stdin.send_file(path, offset, length)

    def tell(self, line: bytes) -> bool:
        """A control line to the command, from any thread, unless its input has ended (False).
        Through the pipe's file object, never its bare descriptor: once :meth:`finish` has closed
        it, the number may already belong to another process's pipe."""
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
            return True
        except (ValueError, OSError):
            return False

    def answer(self) -> dict:
        """The command's next line on its standard output, as JSON; {} if it ended or said other."""
        try:
            answer = json.loads(self.proc.stdout.readline() or "{}")
        except ValueError:
            return {}
        return answer if isinstance(answer, dict) else {}

    def connect(self, address: str, port: int, token: bytes, timeout: float = 30.0) -> Sink:
        """A fabric connection to what the command listens on, presenting the token it was given
        over SSH; its bytes are counted like the channel's own."""
        try:
            sock = socket.create_connection((address, int(port)), timeout=timeout)
        except OSError as exc:
            self.kill()
            raise TargetError(self.target.name, f"cannot reach the fabric address {address} port "
                              f"{port}: {exc.strerror or exc}; check the fabric link, or push over "
                              "SSH (--transport ssh)") from None
        self._sockets.append(sock)
        sock.settimeout(None)
        sock.sendall(token + b"\n")
        return Sink(sock.fileno(), self.meter, self.target.name)

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """End every stream and wait for the command; (exit code, stdout, stderr)."""
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_WR)  # the end of the data: the node verifies now
            except OSError:
                pass
        try:
            out, err = self.proc.communicate(timeout=timeout)  # closes standard input first
        except subprocess.TimeoutExpired:
            self.kill()
            raise TargetError(self.target.name, f"`{shell.join(self.argv)}` did not finish within "
                              f"{timeout:g} s after its input ended; stopped") from None
        finally:
            with _lock:
                _open.discard(self.proc)
            for sock in self._sockets:
                sock.close()
        code = self.proc.returncode
        self.output = (code, out.decode(errors="replace"), err.decode(errors="replace"))
        if code == 255 and isinstance(self.target, SSH):
            raise Unreachable(self.target.name, f"ssh to {self.target.node.login} failed: "
                              f"{err.decode(errors='replace').strip()[-500:]}")
        return self.output

    def kill(self) -> None:
        for sock in self._sockets:
            sock.close()
        _stop(self.proc)


def token() -> bytes:
    """A one-time secret for the fabric connections, sent to the node over SSH only."""
    return secrets.token_hex(32).encode()


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    try:
        # wait, not communicate: the thread that runs the transfer may be in communicate() on the
        # same process (Ctrl-C stops every channel from the main thread), and two communicate()
        # calls race inside Popen. Killed, it writes nothing more; its reader sees the pipes end.
        proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, OSError):
        pass
    with _lock:
        _open.discard(proc)


def stop_all() -> None:
    """Stop every channel still open (Ctrl-C): the nodes keep what they received, for resuming."""
    with _lock:
        running = list(_open)
    for proc in running:
        _stop(proc)
