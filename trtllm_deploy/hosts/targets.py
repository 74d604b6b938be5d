"""One way to act on any host: run an argument list, put a file or tree, get a file.

Three targets share the interface: this machine (:class:`Local`), a node over SSH with its host
key checked (:class:`SSH`, through Fabric), and a container on either (:class:`InContainer`).
Phases take a :class:`Target` and never care which one it is.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import posixpath
import secrets as _random
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts import shell
from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.secrets import redact, register_all

# Paramiko logs a failed handshake from its own thread, traceback and all, which Python prints to
# stderr when nothing else handles it. The failure reaches the user as one clear message from the
# connect call instead; set up logging yourself to see Paramiko's detail.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


@dataclass(frozen=True)
class Result:
    """What a command did on a target."""

    target: str
    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class TargetError(CheckFailed):
    """A target could not do what was asked; the message says which host and why."""

    def __init__(self, target: str, message: str):
        self.target = target
        super().__init__(redact(f"{target}: {message}"))


class Unreachable(TargetError):
    pass


class HostKeyRejected(TargetError):
    pass


class CommandTimedOut(TargetError):
    pass


class CommandFailed(TargetError):
    def __init__(self, result: Result):
        self.result = result
        tail = (result.stderr or result.stdout).strip().splitlines()[-8:]
        detail = ("\n    " + "\n    ".join(tail)) if tail else ""
        super().__init__(
            result.target,
            f"`{shell.join(result.argv)}` exited with {result.exit_code}{detail}",
        )


class Target(Protocol):
    name: str

    def run(
        self,
        argv: Sequence[object],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        secrets: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> Result: ...

    def put(self, local: str | os.PathLike, remote: str) -> None: ...

    def stream(self, local: str | os.PathLike, argv: Sequence[object], *,
               timeout: float | None = None, check: bool = True) -> Result:
        """Run ``argv`` with a local file's bytes as its standard input (bulk data: an image)."""
        ...

    def get(self, remote: str, local: str | os.PathLike) -> None: ...

    def home(self) -> str: ...

    def close(self) -> None: ...


def expand(path: str, home: str) -> str:
    """A node path with ``~`` replaced by that node's home directory."""
    if path == "~":
        return home
    if path.startswith("~/"):
        return posixpath.join(home, path[2:])
    return path


def _timed_out(target: str, argv: Sequence[str], timeout: float) -> CommandTimedOut:
    return CommandTimedOut(target, f"`{shell.join(argv)}` ran past {timeout:g} s and was stopped")


def _finish(result: Result, check: bool) -> Result:
    result = Result(result.target, result.argv, result.exit_code, redact(result.stdout),
                    redact(result.stderr), result.seconds)
    if check and not result.ok:
        raise CommandFailed(result)
    return result


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
            return _finish(Result(self.name, argv, 2 if missing else 127, "", message,
                                  time.monotonic() - started), check)
        with self._lock:
            self._running.add(proc)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            raise _timed_out(self.name, argv, timeout) from None
        except BaseException:  # Ctrl-C: take the whole process group down with us
            self._kill(proc)
            raise
        finally:
            with self._lock:
                self._running.discard(proc)
        return _finish(Result(self.name, argv, proc.returncode, out, err,
                              time.monotonic() - started), check)

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        """SIGKILL the command's whole process group (it runs in a session of its own)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _kill(self, proc: subprocess.Popen) -> None:
        _kill_group(proc)

    def put(self, local, remote: str) -> None:
        _copy_atomically(Path(local), Path(expand(remote, self.home())))

    def stream(self, local, argv, *, timeout=None, check=True) -> Result:
        return _run_with_file(self.name, local, tuple(str(word) for word in argv),
                              timeout or self.default_timeout, check, self._running, self._lock)

    def get(self, remote: str, local) -> None:
        source = Path(expand(remote, self.home()))
        if not source.exists():
            raise TargetError(self.name, f"no such file: {remote}")
        _copy_atomically(source, Path(local))

    def home(self) -> str:
        return str(Path.home())

    def close(self) -> None:
        """Stop whatever this target still runs (another thread may be waiting on it)."""
        with self._lock:
            running = list(self._running)
        for proc in running:
            self._stop(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session`` and its whole group, then reap it."""
    Local._stop(proc)
    proc.communicate()


def _run_with_file(name: str, local, argv: tuple[str, ...], timeout: float | None, check: bool,
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
            _kill_group(proc)
            raise _timed_out(name, shown or argv, timeout) from None
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            if running is not None:
                with lock:
                    running.discard(proc)
    return _finish(Result(name, shown or argv, proc.returncode, out.decode(errors="replace"),
                          err.decode(errors="replace"), time.monotonic() - started), check)


def _copy_atomically(source: Path, dest: Path) -> None:
    """Copy a file or tree so that ``dest`` appears whole or not at all."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    temporary = dest.with_name(f".{dest.name}.part-{_random.token_hex(4)}")
    try:
        if source.is_dir():
            shutil.copytree(source, temporary, symlinks=True)
            if dest.is_dir():
                shutil.rmtree(dest)
        else:
            shutil.copy2(source, temporary)
        os.replace(temporary, dest)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()


def fingerprint(key) -> str:
    """An SSH host key's fingerprint as OpenSSH prints it (``SHA256:...``)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def changed_key_message(name: str, known_hosts, pinned: str, offered: str,
                        refused: str = "The connection was refused") -> str:
    """What a user reads when a host key differs from the pinned one (``pinned``/``offered``:
    ``type SHA256:...``); every place that finds a changed key says it the same way."""
    return (
        f"HOST KEY CHANGED for {name}: {known_hosts} pins {pinned} but the node offered {offered}."
        f" {refused}: this is what a man-in-the-middle looks like. If the"
        f" node was reinstalled, remove the old key (ssh-keygen -R '{name}' -f"
        f" {known_hosts}) and trust the new one after checking its fingerprint."
    )


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _key_type(key) -> str:
    name = key.get_name()
    return {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}.get(
        name, "ecdsa" if name.startswith("ecdsa") else name)


def _block_reading_remote():
    from fabric.runners import Remote

    class BlockReadingRemote(Remote):
        """Fabric's remote runner, reading our standard input in blocks: the stock one reads a
        non-terminal stream a byte per 10 ms loop, which made a 256-byte secret cost 2.7 s."""

        def read_our_stdin(self, input_):
            # At the end, None rather than "": invoke then leaves the remote stdin open, which
            # the command line's watchdog reads to learn that the connection is gone.
            return input_.read(65536) or None

    return BlockReadingRemote


class _HomeFromShell:
    """``home()`` for targets that must ask a shell there (asked once, then remembered)."""

    _home: str | None = None

    def home(self) -> str:
        if self._home is None:
            self._home = self.run(["sh", "-c", shell.PRINT_HOME]).stdout
        return self._home


class SSH(_HomeFromShell):
    """A node over SSH (Fabric/Paramiko), refusing any host key not pinned in known_hosts."""

    def __init__(self, node: Node):
        self.node = node
        self.name = node.name
        self._conn = None
        self._staging: str | None = None  # the private directory staged stdin goes to
        self._lock = threading.Lock()
        self._kept = False  # shared by reuse(): close() leaves it open until reuse() ends

    @property
    def known_hosts(self) -> Path:
        return Path(os.path.expanduser(self.node.known_hosts))

    def _connection(self):
        with self._lock:
            if self._conn is None:
                self._conn = self._open()
            return self._conn

    def _open(self):
        import fabric
        import paramiko

        node = self.node
        known_hosts = self.known_hosts
        target = self

        class _Refuse(paramiko.MissingHostKeyPolicy):
            def missing_host_key(self, client, hostname, key):
                raise HostKeyRejected(target.name, target._unknown_key_message(key))

        connect_kwargs: dict = {  # the TCP connect timeout is Connection's connect_timeout
            "banner_timeout": node.connect_timeout,
            "auth_timeout": node.connect_timeout,
            "channel_timeout": node.connect_timeout,
        }
        if node.identity_file:
            connect_kwargs.update(key_filename=[os.path.expanduser(node.identity_file)],
                                  allow_agent=False, look_for_keys=False)
        config = fabric.Config(ssh_config=paramiko.SSHConfig(), lazy=True)
        config.runners.remote = _block_reading_remote()
        conn = fabric.Connection(node.host, user=node.user, port=node.port, config=config,
                                 connect_timeout=node.connect_timeout,
                                 connect_kwargs=connect_kwargs, inline_ssh_env=True)
        # Fabric accepts any key by default; we load the pinned keys and refuse everything else.
        conn.client.set_missing_host_key_policy(_Refuse())
        if known_hosts.is_file():
            conn.client.load_system_host_keys(str(known_hosts))
        try:
            self._connect(conn)
        except BaseException:
            conn.client.close()  # a refused or failed connection leaves nothing open
            raise
        return conn

    def _connect(self, conn) -> None:
        """Open ``conn``, turning every way it can fail into a message about this node."""
        import paramiko

        node = self.node
        where = node.login
        silent = (f"no SSH answer from {where} within {node.connect_timeout:g} s (connect_timeout);"
                  " is the node up, the address right, and sshd listening on that port?")
        try:
            conn.open()
        except HostKeyRejected:
            raise
        except paramiko.BadHostKeyException as exc:
            raise HostKeyRejected(self.name, self._changed_key_message(exc.key, exc.expected_key)) from None
        except paramiko.AuthenticationException as exc:
            identity = node.identity_file or "your default keys and agent"
            raise Unreachable(
                self.name,
                f"SSH authentication failed at {where} with {identity} ({exc}); install the"
                f" public key on the node: ssh-copy-id -p {node.port}"
                + (f" -i {node.identity_file}" if node.identity_file else "")
                + f" {(node.user + '@') if node.user else ''}{node.host}",
            ) from None
        except (socket.timeout, TimeoutError):
            raise Unreachable(self.name, silent) from None
        except paramiko.ssh_exception.NoValidConnectionsError as exc:
            reason = "; ".join(sorted({e.strerror or str(e) for e in exc.errors.values()}))
            raise Unreachable(self.name, f"cannot connect to {where}: {reason}; is sshd running"
                              " there and the port right?") from None
        except socket.gaierror as exc:
            raise Unreachable(self.name, f"cannot resolve {node.host!r}: {exc.strerror}") from None
        except paramiko.SSHException as exc:
            # A server that accepts TCP but never speaks SSH surfaces as a banner timeout or,
            # one step later, as "No existing session".
            text = str(exc)
            if "banner" in text or "No existing session" in text or "timed out" in text:
                raise Unreachable(self.name, silent) from None
            raise Unreachable(self.name, f"SSH to {where} failed: {text or type(exc).__name__}") from None
        except (OSError, EOFError) as exc:
            raise Unreachable(self.name, f"SSH to {where} failed: {exc or type(exc).__name__}") from None

    def _unknown_key_message(self, key) -> str:
        node = self.node
        name = _known_hosts_name(node.host, node.port)
        return (
            f"host key of {name} is not in {self.known_hosts}: {key.get_name()} {fingerprint(key)}."
            " It was refused. Compare it with the node's own fingerprint"
            f" (on the node: ssh-keygen -lf /etc/ssh/ssh_host_{_key_type(key)}_key.pub);"
            f" if they match, trust it with: ssh-keyscan -p {node.port} -t {_key_type(key)}"
            f" {node.host} >> {self.known_hosts}"
        )

    def _changed_key_message(self, got, expected) -> str:
        node = self.node
        return changed_key_message(_known_hosts_name(node.host, node.port), self.known_hosts,
                                   f"{expected.get_name()} {fingerprint(expected)}",
                                   f"{got.get_name()} {fingerprint(got)}")

    def run(self, argv, *, env=None, cwd=None, timeout=None, stdin=None, secrets=None,
            check=True) -> Result:
        from invoke.exceptions import CommandTimedOut as _Timeout

        argv = tuple(str(word) for word in argv)
        secrets = register_all(secrets)
        timeout = timeout or self.node.command_timeout
        conn = self._connection()
        stdin_path = self._stage_stdin(stdin) if stdin is not None else None
        line = shell.command_line(argv, timeout, env=env, cwd=cwd, secret_names=tuple(secrets),
                                  stdin_path=stdin_path)
        feed = shell.secret_preamble(secrets)
        started = time.monotonic()
        try:
            # The node enforces the timeout itself; ours is the backstop for a node gone silent.
            done = conn.run(line, hide=True, warn=True, pty=False, timeout=timeout + 10,
                            in_stream=io.StringIO(feed) if feed else False)
        except _Timeout:
            raise _timed_out(self.name, argv, timeout) from None
        except (OSError, EOFError) as exc:
            raise Unreachable(self.name, f"the SSH connection broke: {exc}") from None
        if done.exited in (124, 137) and time.monotonic() - started >= timeout:
            raise _timed_out(self.name, argv, timeout)
        return _finish(Result(self.name, argv, done.exited, done.stdout, done.stderr,
                              time.monotonic() - started), check)

    def _stage_stdin(self, data: str) -> str:
        """Standard input goes to the node as a file (SFTP) that the command line opens and
        deletes before the command starts. Through Fabric's stdin pump instead, a command that
        exits without reading everything breaks the pump mid-write.

        The file lives in the account's ``~/.cache/trtllm-deploy``, kept at mode 0700, so no
        other user can open it in the moment between its creation and its mode being set."""
        sftp = self._connection().sftp()
        path = posixpath.join(self._staging_dir(), f"stdin-{_random.token_hex(8)}")
        with sftp.open(path, "w") as handle:
            handle.chmod(0o600)
            handle.write(data.encode())
        return path

    def _staging_dir(self) -> str:
        """The account's private ``~/.cache/trtllm-deploy`` (0700), made on first use."""
        if self._staging is None:
            sftp = self._connection().sftp()
            directory = posixpath.join(sftp.normalize("."), ".cache", "trtllm-deploy")
            self._mkdirs(sftp, directory)
            sftp.chmod(directory, 0o700)
            self._staging = directory
        return self._staging

    def put(self, local, remote: str) -> None:
        """Copy a file or a tree to the node; each file appears under its name only when whole."""
        source = Path(local)
        dest = expand(remote, self.home())
        sftp = self._connection().sftp()
        if source.is_dir():
            for root, _dirs, files in os.walk(source):
                relative = os.path.relpath(root, source)
                base = posixpath.normpath(posixpath.join(dest, relative))
                self._mkdirs(sftp, base)
                for filename in files:
                    self._put_file(sftp, Path(root) / filename, posixpath.join(base, filename))
        else:
            self._mkdirs(sftp, posixpath.dirname(dest))
            self._put_file(sftp, source, dest)

    def stream(self, local, argv, *, timeout=None, check=True) -> Result:
        """Bulk data goes through OpenSSH's client where this machine has one: a process of its
        own, several times faster than Paramiko's channel and in parallel across nodes. The
        Paramiko connection is opened first, so the host key is checked (and refused) exactly as
        for every other command; OpenSSH then checks the same known_hosts strictly."""
        argv = tuple(str(word) for word in argv)
        timeout = timeout or self.node.command_timeout
        self._connection()
        if shutil.which("ssh") is None:
            staged = posixpath.join(self._staging_dir(), f"stream-{_random.token_hex(8)}")
            try:
                self._put_file(self._connection().sftp(), Path(local), staged)
                result = self.run(["sh", "-c", 'f=$1; shift; exec "$@" <"$f"', "sh", staged, *argv],
                                  timeout=timeout, check=False)
            finally:
                self.run(["rm", "-f", staged], check=False, timeout=60)
            return _finish(Result(self.name, argv, result.exit_code, result.stdout, result.stderr,
                                  result.seconds), check)
        result = _run_with_file(self.name, local, (*self.openssh_argv(), "--",
                                shell.join(["timeout", "-k", "5", f"{timeout:g}", *argv])),
                                timeout + 10, False, shown=argv)
        if result.exit_code == 255:
            raise Unreachable(self.name, f"ssh to {self.node.login} failed: "
                              f"{result.stderr.strip()[-500:]}")
        if result.exit_code in (124, 137) and result.seconds >= timeout:
            raise _timed_out(self.name, argv, timeout)
        return _finish(result, check)

    def openssh_argv(self) -> list[str]:
        """``ssh`` with this node's settings: no config files, pinned known_hosts, batch mode."""
        node = self.node
        argv = ["ssh", "-F", "none", "-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=none",
                "-o", f"ConnectTimeout={int(node.connect_timeout)}", "-o", "ServerAliveInterval=15",
                "-p", str(node.port)]
        if node.identity_file:
            argv += ["-i", os.path.expanduser(node.identity_file), "-o", "IdentitiesOnly=yes"]
        if node.user:
            argv += ["-l", node.user]
        return [*argv, node.host]

    def _put_file(self, sftp, source: Path, dest: str) -> None:
        temporary = posixpath.join(posixpath.dirname(dest),
                                   f".{posixpath.basename(dest)}.part-{_random.token_hex(4)}")
        try:
            sftp.put(str(source), temporary)
            sftp.chmod(temporary, source.stat().st_mode & 0o7777)
            sftp.posix_rename(temporary, dest)
        except BaseException:
            try:
                sftp.remove(temporary)
            except OSError:
                pass
            raise

    @staticmethod
    def _mkdirs(sftp, path: str) -> None:
        missing = []
        while path not in ("", "/"):
            try:
                sftp.stat(path)
                break
            except FileNotFoundError:
                missing.append(path)
                path = posixpath.dirname(path)
        for directory in reversed(missing):
            sftp.mkdir(directory)

    def get(self, remote: str, local) -> None:
        dest = Path(local)
        dest.parent.mkdir(parents=True, exist_ok=True)
        temporary = dest.with_name(f".{dest.name}.part-{_random.token_hex(4)}")
        try:
            sftp = self._connection().sftp()
            source = expand(remote, self.home())
            sftp.get(source, str(temporary))
            os.chmod(temporary, sftp.stat(source).st_mode & 0o7777)
            os.replace(temporary, dest)
        except FileNotFoundError:
            raise TargetError(self.name, f"no such file on the node: {remote}") from None
        finally:
            if temporary.exists():
                temporary.unlink()

    def close(self) -> None:
        if not self._kept:
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
                self._staging = None  # checked again on the next connection


@dataclass
class InContainer(_HomeFromShell):
    """A running container on another target, entered with ``docker exec``."""

    parent: Target
    container: str
    docker: Sequence[str] = ("docker",)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = f"{self.parent.name}/{self.container}"

    def run(self, argv, *, env=None, cwd=None, timeout=None, stdin=None, secrets=None,
            check=True) -> Result:
        argv = tuple(str(word) for word in argv)
        exec_argv = [*self.docker, "exec"]
        if stdin is not None:
            exec_argv.append("-i")
        for key, value in (env or {}).items():
            exec_argv += ["-e", f"{key}={value}"]
        for key in secrets or {}:
            exec_argv += ["-e", key]  # the value comes from docker's own environment, not argv
        if cwd:
            exec_argv += ["-w", cwd]
        exec_argv += [self.container, *argv]
        result = self.parent.run(exec_argv, timeout=timeout, stdin=stdin, secrets=secrets,
                                 check=False)
        return _finish(Result(self.name, argv, result.exit_code, result.stdout, result.stderr,
                              result.seconds), check)

    def stream(self, local, argv, *, timeout=None, check=True) -> Result:
        argv = tuple(str(word) for word in argv)
        result = self.parent.stream(local, [*self.docker, "exec", "-i", self.container, *argv],
                                    timeout=timeout, check=False)
        return _finish(Result(self.name, argv, result.exit_code, result.stdout, result.stderr,
                              result.seconds), check)

    def _staging(self) -> str:
        return expand(f"~/.cache/trtllm-deploy/transfer-{_random.token_hex(6)}",
                      self.parent.home())

    def put(self, local, remote: str) -> None:
        staging = self._staging()
        dest = expand(remote, self.home())
        try:
            self.parent.put(local, staging)
            self.run(["mkdir", "-p", posixpath.dirname(dest)])
            self.parent.run([*self.docker, "cp", staging, f"{self.container}:{dest}"])
        finally:
            self.parent.run(["rm", "-rf", staging], check=False)

    def get(self, remote: str, local) -> None:
        staging = self._staging()
        try:
            self.parent.run(["mkdir", "-p", posixpath.dirname(staging)])
            self.parent.run([*self.docker, "cp", f"{self.container}:{expand(remote, self.home())}",
                             staging])
            self.parent.get(staging, local)
        finally:
            self.parent.run(["rm", "-rf", staging], check=False)

    def close(self) -> None:
        self.parent.close()


_shared: dict[tuple, SSH] | None = None
_shared_lock = threading.Lock()


@contextlib.contextmanager
def reuse():
    """Within it, ``connect`` hands every caller the same SSH connection per node (one handshake
    per node for a whole pipeline of phases instead of one per phase); all close when it ends,
    Ctrl-C included. Nested uses share the outermost one."""
    global _shared
    with _shared_lock:
        outer = _shared is not None
        if not outer:
            _shared = {}
    try:
        yield
    finally:
        if not outer:
            with _shared_lock:
                kept, _shared = list((_shared or {}).values()), None
            for target in kept:
                target._kept = False
                target._close()


def connect(node: Node) -> Target:
    """The target that reaches ``node`` as its inventory entry says (no connection made yet)."""
    if node.connection == "local":
        return Local(node.name, default_timeout=node.command_timeout)
    with _shared_lock:
        if _shared is None:
            return SSH(node)
        key = (node.name, node.host, node.port, node.user, node.identity_file, node.known_hosts)
        target = _shared.get(key)
        if target is None:
            target = _shared[key] = SSH(node)
            target._kept = True
        return target
