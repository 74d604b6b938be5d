"""A node over SSH (Fabric/Paramiko), its host key checked against the pinned ones.

Commands run through Fabric with the node enforcing their time limit; files go by SFTP; bulk
streams go through OpenSSH's client where this machine has one.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import secrets as _random
import shutil
import socket
import threading
import time
from pathlib import Path

from trtllm_deploy import atomic
from trtllm_deploy.hosts import knownhosts, scripts, shell
from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.hosts.local import run_with_file
from trtllm_deploy.hosts.targets import (CommandTimedOut, HostKeyRejected, Result, TargetError,
                                         Unreachable, expand, finish, timed_out)
from trtllm_deploy.secrets import register_all

# Paramiko logs a failed handshake from its own thread, traceback and all, which Python prints to
# stderr when nothing else handles it. The failure reaches the user as one clear message from the
# connect call instead; set up logging yourself to see Paramiko's detail.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

# Where the node has no OpenSSH client to stream with: the file was staged by SFTP, and is fed here.
_FEED = scripts.Script("feed the staged file to the command", 'f=$1; shift; exec "$@" <"$f"')


def _unpinned_algorithms(pinned: knownhosts.Pins) -> list[str]:
    """The host key algorithms to leave out so that the node presents a key of a pinned type (as
    OpenSSH prefers the types it knows); none where nothing Paramiko speaks is pinned."""
    import paramiko

    types = {key.type for key in pinned.keys}
    offered = paramiko.Transport._preferred_keys
    unpinned = [name for name in offered
                if ("ssh-rsa" if name.startswith("rsa-sha2-") else name) not in types]
    return unpinned if len(unpinned) < len(offered) else []


def _certificate_transport(sock, **kwargs):
    """A Paramiko transport that asks for host certificates first (their types ahead of the plain
    ones, as OpenSSH does where known_hosts has an ``@cert-authority`` line for the host)."""
    import paramiko

    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    plain = list(options.key_types)
    certs = [name + knownhosts.CERT_SUFFIX for name in plain
             if name + knownhosts.CERT_SUFFIX in transport._key_info]
    options.key_types = certs + plain
    return transport


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


class SSH(scripts.AsksForHome):
    """A node over SSH (Fabric/Paramiko), refusing any host key not pinned in known_hosts."""

    def __init__(self, node: Node):
        self.node = node
        self.name = node.name
        self._conn = None
        self._staging: str | None = None  # the private directory staged stdin goes to
        self._lock = threading.Lock()
        self.shared = False  # handed out by a Connections: close() leaves it to that

    @property
    def host_name(self) -> str:
        """The node as known_hosts names it."""
        return knownhosts.host_name(self.node.host, self.node.port)

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
        target = self
        pinned = knownhosts.pins(knownhosts.read(self.known_hosts), self.host_name)

        class _Check(paramiko.MissingHostKeyPolicy):
            # Paramiko is given no keys of its own, so every offered key comes here and is judged
            # by the same rules as everywhere else (knownhosts).
            def missing_host_key(self, client, hostname, key):
                blob = getattr(key, "public_blob", None)
                if blob is not None and blob.key_type.endswith(knownhosts.CERT_SUFFIX):
                    target._check_certificate(pinned, key, blob.key_blob)
                else:
                    target._check_host_key(pinned, knownhosts.PublicKey.of(key))

        connect_kwargs: dict = {  # the TCP connect timeout is Connection's connect_timeout
            "banner_timeout": node.connect_timeout,
            "auth_timeout": node.connect_timeout,
            "channel_timeout": node.connect_timeout,
            "disabled_algorithms": {"keys": _unpinned_algorithms(pinned)},
        }
        if pinned.authorities:  # a host certificate signed by a pinned CA is trusted: ask for one
            connect_kwargs["transport_factory"] = _certificate_transport
        if node.identity_file:
            connect_kwargs.update(key_filename=[os.path.expanduser(node.identity_file)],
                                  allow_agent=False, look_for_keys=False)
        config = fabric.Config(ssh_config=paramiko.SSHConfig(), lazy=True)
        config.runners.remote = _block_reading_remote()
        conn = fabric.Connection(node.host, user=node.user, port=node.port, config=config,
                                 connect_timeout=node.connect_timeout,
                                 connect_kwargs=connect_kwargs, inline_ssh_env=True)
        # Fabric accepts any key by default; _Check refuses every key not pinned.
        conn.client.set_missing_host_key_policy(_Check())
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

    def _check_host_key(self, pinned: knownhosts.Pins, offered: knownhosts.PublicKey) -> None:
        """Return if known_hosts pins ``offered`` for this node; otherwise refuse it, saying why."""
        verdict = knownhosts.judge(pinned, offered)
        if verdict == knownhosts.PINNED:
            return
        node, name = self.node, self.host_name
        if verdict == knownhosts.REVOKED:
            raise HostKeyRejected(self.name, f"host key of {name} is marked @revoked in"
                                  f" {self.known_hosts}: {offered.shown}. It was refused.")
        if verdict == knownhosts.CHANGED:
            raise HostKeyRejected(self.name, knownhosts.changed_key_message(
                name, self.known_hosts, knownhosts.rivals(pinned, offered)[0].shown, offered.shown))
        kind = offered.short_type
        authorities = (
            f" {self.known_hosts} trusts host certificates signed by"
            f" {', '.join(ca.shown for ca in pinned.authorities)} for {name}, but the node offered"
            " no certificate of that CA (is HostCertificate set in its sshd_config?)."
        ) if pinned.authorities else ""
        raise HostKeyRejected(self.name, (
            f"host key of {name} is not in {self.known_hosts}: {offered.shown}.{authorities}"
            " It was refused. Compare it with the node's own fingerprint"
            f" (on the node: ssh-keygen -lf /etc/ssh/ssh_host_{kind}_key.pub);"
            f" if they match, trust it with: ssh-keyscan -p {node.port} -t {kind}"
            f" {node.host} >> {self.known_hosts}"
        ))

    def _check_certificate(self, pinned: knownhosts.Pins, key, blob: bytes) -> None:
        """Return if a pinned ``@cert-authority`` signed the host certificate the node offered, for
        this address and now; refuse it otherwise, saying why. A certificate of no pinned CA leaves
        its key to be judged as a plain key (OpenSSH does the same)."""
        verdict, why = knownhosts.judge_certificate(pinned, blob, self.node.host)
        if verdict == knownhosts.CERTIFIED:
            return
        if verdict == knownhosts.UNKNOWN:
            return self._check_host_key(pinned, knownhosts.PublicKey.of(key))
        what = "marked @revoked" if verdict == knownhosts.REVOKED else "not valid"
        raise HostKeyRejected(self.name, (
            f"the host certificate of {self.host_name} is {what}: {why} ({self.known_hosts})."
            " It was refused. Have the node's host key signed again for this address"
            f" (ssh-keygen -s CA_KEY -h -I {self.node.name} -n {self.node.host}"
            " /etc/ssh/ssh_host_ed25519_key.pub) or pin its plain key instead."))

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
            raise timed_out(self.name, argv, timeout) from None
        except (OSError, EOFError) as exc:
            raise Unreachable(self.name, f"the SSH connection broke: {exc}") from None
        if done.exited in (124, 137) and time.monotonic() - started >= timeout:
            raise timed_out(self.name, argv, timeout)
        return finish(Result(self.name, argv, done.exited, done.stdout, done.stderr,
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
                try:
                    result = scripts.run(self, _FEED, staged, *argv, timeout=timeout, check=False).result
                except CommandTimedOut:
                    raise timed_out(self.name, argv, timeout) from None
            finally:
                self.run(["rm", "-f", staged], check=False, timeout=60)
            return finish(Result(self.name, argv, result.exit_code, result.stdout, result.stderr,
                                  result.seconds), check)
        result = run_with_file(self.name, local, (*self.openssh_argv(), "--",
                                shell.join(["timeout", "-k", "5", f"{timeout:g}", *argv])),
                                timeout + 10, False, shown=argv)
        if result.exit_code == 255:
            raise Unreachable(self.name, f"ssh to {self.node.login} failed: "
                              f"{result.stderr.strip()[-500:]}")
        if result.exit_code in (124, 137) and result.seconds >= timeout:
            raise timed_out(self.name, argv, timeout)
        return finish(result, check)

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
        try:
            with atomic.replacing(local) as temporary:
                sftp = self._connection().sftp()
                source = expand(remote, self.home())
                sftp.get(source, str(temporary))
                os.chmod(temporary, sftp.stat(source).st_mode & 0o7777)
        except FileNotFoundError:
            raise TargetError(self.name, f"no such file on the node: {remote}") from None

    def close(self) -> None:
        if not self.shared:
            self.disconnect()

    def disconnect(self) -> None:
        """Close the connection, shared or not (the next command opens a new one)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
                self._staging = None  # checked again on the next connection


