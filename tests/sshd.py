"""A real OpenSSH ``sshd`` run as a child process, for tests and benchmarks.

Nothing here imports pytest: the benchmark scripts start servers with the same code.

    server = start_sshd(Path("/tmp/somewhere"))
    try:
        write_hosts(Path("/tmp/somewhere/hosts.toml"), [server])
        ...
    finally:
        server.stop()

Every file the server needs (host key, client key, authorized_keys, known_hosts, config, log,
pid file, and the session's home directory) lives in ``workdir``. The server listens on
``127.0.0.1`` by default and accepts only the generated client key, as the current user.
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from trtllm_deploy.hosts.sshkeys import fingerprint, keygen, known_hosts_line, public_key  # noqa: F401 - re-exported for tests

# sshd refuses to re-exec itself unless started by absolute path. TRTLLM_DEPLOY_TEST_SSHD points
# at another build (the benchmark carries one to machines that have none).
SSHD = os.environ.get("TRTLLM_DEPLOY_TEST_SSHD", "/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT = 10.0


class SSHDError(RuntimeError):
    """The test sshd could not be started; the message carries sshd's own log."""


def _toml_string(value: object) -> str:
    """A TOML basic string. Not JSON's escaping: it writes a character beyond the Basic Multilingual
    Plane as a surrogate pair (\\ud83d\\udc1b), which TOML refuses."""
    import tomlkit

    return tomlkit.string(str(value)).as_string()


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


@dataclass
class SSHServer:
    """A running sshd and the files to reach it with."""

    workdir: Path
    address: str
    port: int
    host_key_path: Path
    client_key: Path
    known_hosts: Path
    authorized_keys: Path
    config_path: Path
    log_path: Path
    home: Path | None
    user: str = field(default_factory=getpass.getuser)
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def host_public_key(self) -> Path:
        return self.host_key_path.with_name(self.host_key_path.name + ".pub")

    @property
    def host_fingerprint(self) -> str:
        return fingerprint(self.host_public_key)

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def node_toml(self, name: str, role: str | None = "head", **extra: object) -> str:
        """A ``[[nodes]]`` table for hosts.toml that reaches this server.

        ``extra`` adds or overrides keys (strings quoted, numbers as they are), e.g.
        ``connect_timeout=1`` or ``known_hosts="/elsewhere"``.
        """
        keys: dict[str, object] = {
            "name": name,
            "connection": "ssh",
            "address": self.address,
            "port": self.port,
            "user": self.user,
            "identity_file": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "connect_timeout": 5,
        }
        if role:
            keys["role"] = role
        keys.update(extra)
        lines = ["[[nodes]]"]
        for key, value in keys.items():
            if value is None:
                continue
            rendered = (str(value).lower() if isinstance(value, bool)
                        else str(value) if isinstance(value, (int, float))
                        else _toml_string(value))
            lines.append(f"{key} = {rendered}")
        return "\n".join(lines) + "\n"

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate sshd (and wait for it); kill it if it does not go."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


_CONFIG = """\
# written by tests/sshd.py
ListenAddress {listen}
Port {port}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
LogLevel VERBOSE
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
MaxStartups 100:30:200
MaxSessions 100
Subsystem sftp internal-sftp
"""


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the process that started us dies.

    Keeps a crashed or killed test run from leaving sshd listeners behind. Linux only; Linux
    sends it when the starting *thread* ends, so start servers from a long-lived thread.
    """
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _copy_log(output, log_path: Path, listening: threading.Event, ended: threading.Event) -> None:
    """Copy sshd's output into its log file line by line; set ``listening`` at its "Server listening
    on" line (written after listen(): connections are accepted from then on), ``ended`` at the end
    of its output (sshd, and every session it started, has exited)."""
    with output, open(log_path, "ab", buffering=0) as log:
        for line in output:
            log.write(line)
            if line.startswith(b"Server listening on "):
                listening.set()
    ended.set()
    listening.set()


def _wait_until_listening(server: SSHServer, listening: threading.Event, ended: threading.Event) -> None:
    """Return once sshd says it listens; raise with its log if it exits first or never does."""
    assert server.process is not None
    listening.wait(START_TIMEOUT)
    if ended.is_set():
        try:
            code = server.process.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        raise SSHDError(f"sshd exited with {code} before listening"
                        f" on {server.address}:{server.port}:\n{server.log}")
    if not listening.is_set():
        raise SSHDError(f"sshd did not say it listens on {server.address}:{server.port} within"
                        f" {START_TIMEOUT:g} s:\n{server.log}")


def start_sshd(
    workdir: Path,
    address: str = "127.0.0.1",
    port: int | None = None,
    *,
    home: Path | None | bool = True,
    extra_config: str = "",
    attempts: int = 3,
    die_with_parent: bool = True,
) -> SSHServer:
    """Start a real sshd serving ``address:port`` (a free port if none) from files in ``workdir``.

    ``home``: the session's ``$HOME``. ``True`` (the default) makes it ``workdir/home`` through
    sshd's ``SetEnv``, so tests that write under ``~`` stay out of the real home directory; a path
    uses that path; ``None``/``False`` keeps the account's own home from the password database.
    Note that sshd still starts sessions in the account's own home directory.
    ``extra_config`` is appended to sshd_config. ``die_with_parent``: sshd gets SIGTERM when
    this process dies, so an interrupted run leaves no listener behind (Linux).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)

    host_key = workdir / "ssh_host_ed25519_key"
    client_key = workdir / "id_ed25519"
    if not host_key.is_file():
        keygen(host_key, "test-sshd-host")
    if not client_key.is_file():
        keygen(client_key, "test-sshd-client")
    authorized_keys = workdir / "authorized_keys"
    authorized_keys.write_text(public_key(client_key) + "\n")
    authorized_keys.chmod(0o600)

    home_dir: Path | None
    if home is True:
        home_dir = workdir / "home"
    elif home:
        home_dir = Path(home)
    else:
        home_dir = None
    if home_dir is not None:
        home_dir.mkdir(parents=True, exist_ok=True)

    last: SSHDError | None = None
    for _ in range(max(1, attempts)):
        chosen = port or free_port(address)
        config = _CONFIG.format(
            listen=address if ":" not in address else f"[{address}]", port=chosen,
            host_key=host_key, pid_file=workdir / "sshd.pid",
            authorized_keys=authorized_keys,
        )
        if home_dir is not None:
            config += f"SetEnv HOME={home_dir}\n"
        config += extra_config
        config_path = workdir / "sshd_config"
        config_path.write_text(config)
        known_hosts = workdir / "known_hosts"
        known_hosts.write_text(known_hosts_line(address, chosen, public_key(host_key)))

        log_path = workdir / "sshd.log"
        server = SSHServer(
            workdir=workdir, address=address, port=chosen, host_key_path=host_key,
            client_key=client_key, known_hosts=known_hosts, authorized_keys=authorized_keys,
            config_path=config_path, log_path=log_path, home=home_dir,
        )
        # sshd's output goes through a pipe that a thread copies into its log file for as long as
        # sshd runs (a pipe nobody read would block sshd once it filled); the thread also tells
        # when sshd says it listens, so starting waits on that line instead of probing the port.
        server.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
            # prctl only, no locks taken: safe enough between fork and exec
            preexec_fn=_die_with_parent if die_with_parent else None,  # noqa: PLW1509
        )
        listening, ended = threading.Event(), threading.Event()
        threading.Thread(target=_copy_log, args=(server.process.stdout, log_path, listening, ended),
                         name=f"sshd-log-{chosen}", daemon=True).start()
        try:
            _wait_until_listening(server, listening, ended)
            return server
        except SSHDError as exc:
            server.stop()
            last = exc
            if port is not None or "Address already in use" not in exc.args[0]:
                break
    assert last is not None
    raise last


def write_hosts(path: Path, servers: Sequence[SSHServer], extra: str = "") -> Path:
    """A complete hosts.toml: the first server is the head, the others workers.

    Nodes are named ``node-0``, ``node-1``...; ``extra`` is appended verbatim (e.g. a
    ``[preflight]`` table or more ``[[nodes]]``).
    """
    path = Path(path)
    parts = ['[cluster]\nname = "test"\n']
    for index, server in enumerate(servers):
        parts.append(server.node_toml(f"node-{index}", role="head" if index == 0 else "worker"))
    if extra:
        parts.append(extra if extra.endswith("\n") else extra + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
