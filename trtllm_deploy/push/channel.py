"""A command on a node whose standard input this process writes: the bulk-data path of a push.

Over SSH it is OpenSSH's client (a process of its own, host key checked against the node's pinned
known_hosts, as ``Target.stream`` does); bytes come from files through ``sendfile``, so this process
copies nothing itself. Every byte written is counted, which is what the summary reports as sent.

The fast transport (``fabric=ADDRESS``) keeps the SSH command as the control channel and moves the
bytes over a plain TCP connection to the node's fabric address: the node listens there, tells its
port over SSH, and reads only a connection that presents the one-time token sent to it over SSH.
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

from trtllm_deploy import shell
from trtllm_deploy.targets import SSH, Local, Target, TargetError, Unreachable

BLOCK = 4 << 20
# Bulk data prefers AES-GCM: hardware AES on x86_64 and aarch64 makes it about 1.7x the default
# chacha20-poly1305 here (414 against 244 MB/s through one sshd on 2 cores); both are AEAD ciphers.
BULK_CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"

_open: set[subprocess.Popen] = set()  # every channel still running, so Ctrl-C can stop them all
_lock = threading.Lock()


class Channel:
    """``argv`` running on ``target`` with a pipe to its standard input."""

    def __init__(self, target: Target, argv: Sequence[str], progress: Callable[[int], None] | None,
                 fabric: str | None = None, connect_timeout: float = 30.0):
        self.target = target
        self.argv = tuple(argv)
        if isinstance(target, SSH):
            ssh = target.openssh_argv()
            command = [*ssh[:-1], "-o", f"Ciphers={BULK_CIPHERS}", ssh[-1], "--", shell.join(self.argv)]
        elif isinstance(target, Local):
            command = list(self.argv)
        else:
            raise TargetError(target.name, "push reaches a node over SSH or on this machine only")
        self.progress = progress or (lambda _: None)
        self.sent = 0
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        with _lock:
            _open.add(self.proc)
        self._fd = self.proc.stdin.fileno()
        self._socket: socket.socket | None = None
        if fabric:
            self._open_fabric(fabric, connect_timeout)

    def _open_fabric(self, address: str, timeout: float) -> None:
        token = secrets.token_hex(32).encode()
        try:
            os.write(self._fd, token + b"\n")
            answer = json.loads(self.proc.stdout.readline() or "{}")
        except (BrokenPipeError, ValueError):
            answer = {}
        if "port" not in answer:
            return  # the node refused before listening: finish() brings its report
        try:
            self._socket = socket.create_connection((address, int(answer["port"])), timeout=timeout)
        except OSError as exc:
            self.kill()
            raise TargetError(self.target.name, f"cannot reach the fabric address {address} port "
                              f"{answer['port']}: {exc.strerror or exc}; check the fabric link, or "
                              "push over SSH (--transport ssh)") from None
        self._socket.settimeout(None)
        self._socket.sendall(token + b"\n")
        self._fd = self._socket.fileno()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.write(self._fd, view[:BLOCK])
            view = view[done:]
            self._count(done)

    def send_file(self, path: str | os.PathLike, offset: int, length: int) -> None:
        with open(path, "rb") as source:
            end = offset + length
            while offset < end:
                done = os.sendfile(self._fd, source.fileno(), offset, min(BLOCK, end - offset))
                if done == 0:
                    raise TargetError(self.target.name, f"{path} is shorter than its manifest says")
                offset += done
                self._count(done)

    def _count(self, count: int) -> None:
        self.sent += count
        self.progress(count)

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Close the pipe and wait for the command; (exit code, stdout, stderr)."""
        if self._socket is not None:
            try:
                self._socket.shutdown(socket.SHUT_WR)  # the end of the data: the node verifies now
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
            if self._socket is not None:
                self._socket.close()
        code = self.proc.returncode
        if code == 255 and isinstance(self.target, SSH):
            raise Unreachable(self.target.name, f"ssh to {self.target.node.login} failed: "
                              f"{err.decode(errors='replace').strip()[-500:]}")
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    def kill(self) -> None:
        if self._socket is not None:
            self._socket.close()
        _stop(self.proc)


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
