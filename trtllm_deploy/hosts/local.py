"""This machine as a target: commands run through ``subprocess`` with no shell in between."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from trtllm_deploy import atomic
from trtllm_deploy.hosts.targets import Result, TargetError, expand, finish, timed_out
from trtllm_deploy.secrets import register_all


class Local:
    """This machine, through ``subprocess`` with no shell in between."""

    def __init__(self, name: str = "local", default_timeout: float | None = None):
        self.name = name
        self.default_timeout = default_timeout
        self._running: set[subprocess.Popen] = set()  # what close() must stop
        self._lock = threading.Lock()

    def run(self, argv, *, env=None, cwd=None, timeout=None, stdin=None, secrets=None,
            check=True) -> Result:
        argv = tuple(str(word) for word in argv)
        environment = {**os.environ, **(env or {}), **register_all(secrets)}
        timeout = timeout or self.default_timeout
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv, cwd=os.path.expanduser(cwd) if cwd else None, env=environment,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True,
            )
        except (FileNotFoundError, NotADirectoryError) as exc:
            # Popen names the missing thing: the program, or the working directory.
            missing = exc.filename if exc.filename not in (None, argv[0]) else None
            message = (f"cd: {missing}: {exc.strerror}" if missing
                       else f"{argv[0]}: command not found")
            return finish(Result(self.name, argv, 2 if missing else 127, "", message,
                                  time.monotonic() - started), check)
        with self._lock:
            self._running.add(proc)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise timed_out(self.name, argv, timeout) from None
        except BaseException:  # Ctrl-C: take the whole process group down with us
            kill_group(proc)
            raise
        finally:
            with self._lock:
                self._running.discard(proc)
        return finish(Result(self.name, argv, proc.returncode, out, err,
                              time.monotonic() - started), check)

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        """SIGKILL the command's whole process group (it runs in a session of its own)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def put(self, local, remote: str) -> None:
        atomic.copy(Path(local), Path(expand(remote, self.home())))

    def stream(self, local, argv, *, timeout=None, check=True) -> Result:
        return run_with_file(self.name, local, tuple(str(word) for word in argv),
                              timeout or self.default_timeout, check, self._running, self._lock)

    def get(self, remote: str, local) -> None:
        source = Path(expand(remote, self.home()))
        if not source.exists():
            raise TargetError(self.name, f"no such file: {remote}")
        atomic.copy(source, Path(local))

    def home(self) -> str:
        return str(Path.home())

    def close(self) -> None:
        """Stop whatever this target still runs (another thread may be waiting on it)."""
        with self._lock:
            running = list(self._running)
        for proc in running:
            self._stop(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session`` and its whole group, then reap it."""
    Local._stop(proc)
    proc.communicate()


def run_with_file(name: str, local, argv: tuple[str, ...], timeout: float | None, check: bool,
                   running: set | None = None, lock: threading.Lock | None = None,
                   shown: tuple[str, ...] | None = None) -> Result:
    """A local process reading a file on its standard input; stopped (whole group) on timeout or
    Ctrl-C. ``shown`` is the command the Result names (the node's, not the ssh wrapper)."""
    started = time.monotonic()
    with open(local, "rb") as source:
        proc = subprocess.Popen(argv, stdin=source, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        if running is not None:
            with lock:
                running.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise timed_out(name, shown or argv, timeout) from None
        except BaseException:
            kill_group(proc)
            raise
        finally:
            if running is not None:
                with lock:
                    running.discard(proc)
    return finish(Result(name, shown or argv, proc.returncode, out.decode(errors="replace"),
                          err.decode(errors="replace"), time.monotonic() - started), check)
