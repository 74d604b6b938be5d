"""Targets against the real thing: this machine, and a real OpenSSH sshd on 127.0.0.1.

No mocks: every SSH test connects to an sshd started by tests/sshd.py. sshd runs on this same
machine, so a test can look at what a remote command did (files, ``/proc``) directly. The
session's ``$HOME`` on that sshd is a scratch directory (``sshd.home``), not the real one.
InContainer needs Docker and is not tested here.
"""

from __future__ import annotations

import hashlib
import io
import os
import pwd
import re
import secrets as _random
import shutil
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from sshd import fingerprint, free_port, keygen, known_hosts_line, public_key, write_hosts
from trtllm_deploy import secrets as secrets_module
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts import inventory
from trtllm_deploy.hosts.connections import Connections, connect
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.hosts.ssh import SSH, _block_reading_remote
from trtllm_deploy.hosts.targets import (CommandFailed, CommandTimedOut, HostKeyRejected, Target, TargetError,
                                         Unreachable)
from waiting import gone, until

SECRET = "hf_secretvalue123"
SECRET_SHA256 = hashlib.sha256(SECRET.encode()).hexdigest()


# --------------------------------------------------------------------------- helpers & fixtures


@dataclass
class Side:
    """A target plus where its files are, seen from here (the same machine for both kinds)."""

    kind: str
    target: Target
    home: Path  # the target's ``~``
    scratch: Path  # a fresh directory the test may use on the target


@pytest.fixture(scope="module")
def shared_ssh(sshd, tmp_path_factory):
    """One SSH target to the session's sshd, reused by the tests of this module."""
    path = write_hosts(tmp_path_factory.mktemp("shared") / "hosts.toml", [sshd])
    target = SSH(inventory.load(path).head)
    yield target
    target.close()


@pytest.fixture(params=["local", "ssh"])
def side(request, tmp_path) -> Side:
    scratch = tmp_path / "on-target"
    scratch.mkdir()
    if request.param == "local":
        return Side("local", Local("local"), Path.home(), scratch)
    server = request.getfixturevalue("sshd")
    return Side("ssh", request.getfixturevalue("shared_ssh"), server.home, scratch)


@pytest.fixture
def clean_secret_registry(monkeypatch):
    """A private registry of secrets for the test, so registrations do not leak between tests."""
    monkeypatch.setattr(secrets_module, "_values", set())


@pytest.fixture
def silent_listener():
    """A TCP port that accepts connections and never says a word (no SSH banner)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()
    for conn in held:
        conn.close()


def processes() -> dict[int, tuple[bytes, bytes | None]]:
    """``pid -> (cmdline, environ)`` of every process on this machine (environ may be None)."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:
            environ = None
        found[int(entry.name)] = (cmdline, environ)
    return found


def pids_with(marker: str) -> list[int]:
    """Processes (other than this one) whose command line contains ``marker``."""
    needle = marker.encode()
    return [pid for pid, (cmdline, _) in processes().items()
            if needle in cmdline and pid != os.getpid()]


def unique_seconds(whole: int) -> str:
    """A sleep duration no other process uses, e.g. ``29.481516``, to find our sleeper by."""
    return f"{whole}.{_random.randbelow(10**6):06d}"


def kill_leftovers(marker: str) -> None:
    """Kill (by pid) the processes this test started that are still around."""
    for pid in pids_with(marker):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def part_files(*roots: Path) -> list[Path]:
    return [path for root in roots for path in root.rglob("*") if ".part-" in path.name]


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: relative path -> ("dir",) or (bytes, permission bits)."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = ("dir",) if path.is_dir() else (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
    return out


def paramiko_transports() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if isinstance(t, paramiko.Transport) and t.is_alive()}


# --------------------------------------------------------------------------- run: arguments


TRICKY_ARGS = [
    pytest.param("two words", id="space"),
    pytest.param("  padded  ", id="leading-trailing-spaces"),
    pytest.param("it's", id="single-quote"),
    pytest.param('say "hi"', id="double-quotes"),
    pytest.param("$HOME", id="dollar-var"),
    pytest.param("${PATH:-x}", id="dollar-brace"),
    pytest.param("a; touch /tmp/trtllm-pwned", id="semicolon"),
    pytest.param("x && y || z", id="and-or"),
    pytest.param("`id`", id="backticks"),
    pytest.param("$(id)", id="command-substitution"),
    pytest.param("*", id="glob-star"),
    pytest.param("~", id="tilde"),
    pytest.param("a|b>c<d", id="pipe-redirects"),
    pytest.param("back\\slash", id="backslash"),
    pytest.param("line1\nline2", id="newline"),
    pytest.param("tab\there", id="tab"),
    pytest.param("-n", id="leading-dash"),
    pytest.param("", id="empty"),
    pytest.param("héllo ✓", id="unicode"),
    pytest.param("#not-a-comment", id="hash"),
]


@pytest.mark.parametrize("word", TRICKY_ARGS)
def test_each_argument_arrives_literally(side, word):
    result = side.target.run(["printf", "[%s]\n", word])
    assert result.stdout == f"[{word}]\n"
    assert result.ok and result.exit_code == 0


def test_all_tricky_arguments_together_arrive_in_order(side):
    words = [param.values[0] for param in TRICKY_ARGS]
    result = side.target.run(["printf", "[%s]\n", *words])
    assert result.stdout == "".join(f"[{word}]\n" for word in words)
    assert not Path("/tmp/trtllm-pwned").exists()


def test_non_string_arguments_are_converted(side):
    result = side.target.run(["printf", "%s %s %s", 1, 2.5, Path("/a b")])
    assert result.stdout == "1 2.5 /a b"
    assert result.argv == ("printf", "%s %s %s", "1", "2.5", "/a b")


# --------------------------------------------------------------------------- run: env, cwd, stdin


def test_env_is_passed_verbatim(side):
    env = {"GREETING": "hello world; $HOME 'single' \"double\" `id`", "EMPTY": ""}
    result = side.target.run(
        ["sh", "-c", 'printf "%s|%s" "$GREETING" "${EMPTY-unset}"'], env=env)
    assert result.stdout == f"{env['GREETING']}|"


@pytest.mark.parametrize("cwd_kind", ["absolute-with-space", "tilde-sub", "tilde"])
def test_cwd_is_honoured(side, cwd_kind):
    if cwd_kind == "absolute-with-space":
        expected = side.scratch / "work dir"
        cwd = str(expected)
    elif cwd_kind == "tilde-sub":
        expected = side.home / "sub"
        cwd = "~/sub"
    else:
        expected = side.home
        cwd = "~"
    expected.mkdir(exist_ok=True)
    result = side.target.run(["pwd", "-P"], cwd=cwd)
    assert result.stdout.strip() == os.path.realpath(expected)


def test_missing_cwd_fails_without_running_and_names_the_directory(side):
    missing = side.scratch / "no-such-dir"
    marker = side.scratch / "ran"
    with pytest.raises(CommandFailed) as caught:
        side.target.run(["touch", str(marker)], cwd=str(missing))
    assert not marker.exists()
    assert str(missing) in str(caught.value)


@pytest.mark.parametrize("data", [
    pytest.param("line one\nline two\n", id="lines"),
    pytest.param("no newline at the end", id="no-final-newline"),
    pytest.param("$HOME ; 'x' `id` \\ \t\n", id="shell-characters"),
    pytest.param("".join(f"{i:07d}\n" for i in range(6000)), id="48KB"),
])
def test_stdin_is_delivered(side, data):
    result = side.target.run(["cat"], stdin=data, timeout=3)
    assert result.stdout == data
    # A slow stdin path shows up as CommandTimedOut (timeout=3), not as a timing assertion.


def test_stdin_leaves_no_copy_behind_on_the_target(side):
    """However stdin travels, nothing holding it is left on the node after the command."""
    payload = f"stdin-payload-{_random.token_hex(8)}\n".encode()

    def copies() -> list[Path]:
        account_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
        candidates = [*Path("/tmp").iterdir(), *Path("/var/tmp").iterdir(), *side.home.rglob("*"),
                      *(account_home / ".cache" / "trtllm-deploy").glob("*")]
        found = []
        for path in candidates:
            try:
                if (path.is_file() and not path.is_symlink() and path.stat().st_size < 4096
                        and payload in path.read_bytes()):
                    found.append(path)
            except OSError:
                continue
        return found

    staging = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "trtllm-deploy"
    if staging.is_dir():
        staging.chmod(0o755)  # as another tool might have left it: a new connection closes it again
    side.target.close()  # the directory is checked once per connection
    try:
        assert side.target.run(["cat"], stdin=payload.decode()).stdout == payload.decode()
        assert copies() == []
        if side.kind == "ssh":  # where staged input lives must be closed to other users
            assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    finally:
        for path in copies():  # only files holding this test's own payload
            path.unlink(missing_ok=True)


def test_without_stdin_the_command_reads_end_of_file(side):
    """stdin=None: a command reading stdin sees EOF at once, rather than waiting forever."""
    result = side.target.run(["cat"], timeout=2)  # a wait for input ends as CommandTimedOut
    assert result.stdout == ""


# --------------------------------------------------------------------------- run: exit codes


def test_non_zero_exit_with_check_false_returns_the_result(side):
    result = side.target.run(["sh", "-c", "echo out; echo oops >&2; exit 3"], check=False)
    assert (result.exit_code, result.ok) == (3, False)
    assert (result.stdout, result.stderr) == ("out\n", "oops\n")
    assert result.target == side.target.name
    assert result.seconds >= 0


def test_non_zero_exit_with_check_raises_command_failed(side):
    with pytest.raises(CommandFailed) as caught:
        side.target.run(["sh", "-c", "echo out; echo oops >&2; exit 3"])
    error = caught.value
    assert error.result.exit_code == 3
    assert error.target == side.target.name
    message = str(error)
    assert message.startswith(f"{side.target.name}: ")
    assert "exited with 3" in message and "oops" in message


def test_missing_program_exits_127(side):
    result = side.target.run(["trtllm-no-such-program"], check=False)
    assert result.exit_code == 127
    assert "trtllm-no-such-program" in result.stderr


# --------------------------------------------------------------------------- run: timeouts


def test_timeout_raises_command_timed_out_quickly(side):
    seconds = unique_seconds(30)
    started = time.monotonic()
    try:
        with pytest.raises(CommandTimedOut) as caught:
            side.target.run(["sleep", seconds], timeout=1)  # the sleep is what times out
        assert time.monotonic() - started < 5
        assert "ran past 1 s" in str(caught.value)
        # the target is still usable afterwards
        assert side.target.run(["echo", "still here"]).stdout == "still here\n"
    finally:
        kill_leftovers(seconds)


def test_timeout_stops_the_command_and_its_children(side):
    """What timed out is gone: the command and whatever it started (its process group)."""
    seconds = unique_seconds(29)
    try:
        with pytest.raises(CommandTimedOut):
            side.target.run(["sh", "-c", f"sleep {seconds} & sleep {seconds}; wait"], timeout=1)
        gone(pids_with(seconds), 3, f"`sleep {seconds}` to end after the timeout")
        assert pids_with(seconds) == [], f"`sleep {seconds}` still running after the timeout"
    finally:
        kill_leftovers(seconds)


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_closing_a_target_stops_the_command_it_runs(kind, sshd_node):
    """What Ctrl-C does through fan_out: the connection goes, and so does the command (with its
    children) on the node, instead of running on orphaned until its timeout."""
    target = Local() if kind == "local" else SSH(sshd_node)
    seconds = unique_seconds(29)
    outcome: dict = {}

    def run() -> None:
        try:
            # two sleepers: the command and a child of it, both to be stopped by close()
            outcome["result"] = target.run(["sh", "-c", f"sleep {seconds} & sleep {seconds}; wait"],
                                           timeout=60, check=False)
        except Exception as exc:  # noqa: BLE001 - whatever the broken run raises is fine here
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        until(lambda: pids_with(seconds), 5, f"both `sleep {seconds}` to start",
              done=lambda pids: len(pids) >= 2)
        target.close()
        gone(pids_with(seconds), 5, f"`sleep {seconds}` to end with its connection")
        assert pids_with(seconds) == [], "the command outlived its connection"
        thread.join(5)
        assert not thread.is_alive() and outcome, "run() did not return after close()"
    finally:
        kill_leftovers(seconds)


def test_a_command_with_secrets_is_not_stopped_by_the_watchdog(sshd_node):
    """The secret lines end the stream we feed, but not the channel: the command runs to its end."""
    target = SSH(sshd_node)
    try:
        # the command takes a second, so that it is still running when the secret lines end
        result = target.run(["sh", "-c", 'sleep 1; printf %s "$HF_TOKEN" | wc -c'],
                            secrets={"HF_TOKEN": "hf_" + "x" * 40})
        assert result.stdout.strip() == "43"
    finally:
        target.close()


# --------------------------------------------------------------------------- put / get


def test_stream_feeds_a_file_to_a_command_on_the_target(side, tmp_path):
    source = tmp_path / "image.tar"
    source.write_bytes(os.urandom(3 * 1024 * 1024) + b"end")
    dest = side.scratch / "received"

    result = side.target.stream(source, ["sh", "-c", 'cat > "$1"; echo got', "sh", str(dest)])

    assert result.ok and result.stdout.strip() == "got"
    assert result.argv[0] == "sh"  # the node's command, not the ssh wrapper around it
    assert dest.read_bytes() == source.read_bytes()


def test_stream_reports_the_commands_failure(side, tmp_path):
    source = tmp_path / "data"
    source.write_text("not an image")
    with pytest.raises(CommandFailed) as caught:
        side.target.stream(source, ["sh", "-c", "cat >/dev/null; echo broken >&2; exit 3"])
    assert caught.value.result.exit_code == 3
    assert "broken" in caught.value.result.stderr


def test_stream_stops_a_command_that_runs_past_its_timeout(side, tmp_path):
    source = tmp_path / "data"
    source.write_text("x")
    started = time.monotonic()
    with pytest.raises(CommandTimedOut):
        side.target.stream(source, ["sleep", "30"], timeout=1)  # the sleep is what times out
    assert time.monotonic() - started < 20


def test_stream_over_ssh_refuses_an_unpinned_host_before_sending(sshd, make_node, tmp_path):
    (tmp_path / "empty").write_text("")
    source = tmp_path / "data"
    source.write_text("secret bytes")
    marker = tmp_path / "received"
    target = SSH(make_node(sshd, known_hosts=str(tmp_path / "empty")))
    try:
        with pytest.raises(HostKeyRejected):
            target.stream(source, ["sh", "-c", 'cat > "$1"', "sh", str(marker)])
    finally:
        target.close()
    assert not marker.exists()


def test_stream_over_ssh_without_an_openssh_client_goes_through_sftp(shared_ssh, tmp_path,
                                                                      monkeypatch):
    source = tmp_path / "data"
    source.write_bytes(b"through sftp\n" * 1000)
    dest = tmp_path / "received"
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kw: None if name == "ssh"
                        else which(name, *args, **kw))
    result = shared_ssh.stream(source, ["sh", "-c", 'cat > "$1"', "sh", str(dest)])
    assert result.ok
    assert dest.read_bytes() == source.read_bytes()
    leftovers = shared_ssh.run(["sh", "-c", "ls ~/.cache/trtllm-deploy | grep -c stream- || true"])
    assert leftovers.stdout.strip() == "0"


def test_put_file_keeps_content_and_mode(side, tmp_path):
    source = tmp_path / "payload.bin"
    source.write_bytes(b"\x00\xffbinary\r\n" * 1000)
    source.chmod(0o751)
    dest = side.scratch / "new" / "deep" / "payload.bin"

    side.target.put(source, str(dest))

    assert dest.read_bytes() == source.read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o751
    assert part_files(side.scratch) == []


def test_put_replaces_an_existing_file(side, tmp_path):
    source = tmp_path / "config.json"
    source.write_text('{"new": true}')
    dest = side.scratch / "config.json"
    dest.write_text('{"old": true, "and": "longer than the new one"}')

    side.target.put(source, str(dest))

    assert dest.read_text() == '{"new": true}'
    assert part_files(side.scratch) == []


def test_put_tree_copies_every_file_with_its_mode(side, tmp_path):
    source = tmp_path / "engine"
    (source / "bin").mkdir(parents=True)
    (source / "nested" / "deeper").mkdir(parents=True)
    (source / "empty").mkdir()
    (source / "config.json").write_text('{"tp": 2}')
    (source / "bin" / "run.sh").write_text("#!/bin/sh\necho run\n")
    (source / "bin" / "run.sh").chmod(0o755)
    (source / "nested" / "deeper" / "rank0.engine").write_bytes(os.urandom(100_000))
    (source / "nested" / "deeper" / "rank0.engine").chmod(0o600)
    (source / ".hidden").write_text("dotfile")
    dest = side.scratch / "engines" / "model"

    side.target.put(source, str(dest))

    assert tree(dest) == tree(source)
    assert part_files(side.scratch) == []


def test_get_file_keeps_content_and_mode(side, tmp_path):
    remote = side.scratch / "result.txt"
    remote.write_bytes(b"measured\x00\xfe\n" * 500)
    remote.chmod(0o750)
    local = tmp_path / "fetched" / "deep" / "result.txt"

    side.target.get(str(remote), local)

    assert local.read_bytes() == remote.read_bytes()
    assert stat.S_IMODE(local.stat().st_mode) == 0o750
    assert part_files(tmp_path) == []


def test_put_to_a_tilde_path_lands_in_the_targets_home(side, tmp_path):
    source = tmp_path / "hello.txt"
    source.write_text("hello home")
    leaf = f"trtllm-test-{_random.token_hex(4)}"

    assert side.target.home() == str(side.home)
    side.target.put(source, f"~/{leaf}/hello.txt")

    assert (side.home / leaf / "hello.txt").read_text() == "hello home"
    assert part_files(side.home / leaf) == []


def test_get_from_a_tilde_path_reads_the_targets_home(side, tmp_path):
    leaf = f"trtllm-test-{_random.token_hex(4)}.txt"
    (side.home / leaf).write_text("from home")

    side.target.get(f"~/{leaf}", tmp_path / "got.txt")

    assert (tmp_path / "got.txt").read_text() == "from home"


def test_get_of_a_missing_file_raises_target_error_naming_it(side, tmp_path):
    missing = side.scratch / "not-there.txt"
    with pytest.raises(TargetError) as caught:
        side.target.get(str(missing), tmp_path / "x.txt")
    assert str(missing) in str(caught.value)
    assert not (tmp_path / "x.txt").exists()
    assert part_files(tmp_path) == []


# --------------------------------------------------------------------------- secrets


def test_secret_value_arrives_in_the_environment(side):
    result = side.target.run(["sh", "-c", 'printf %s "$HF_TOKEN" | sha256sum'],
                             secrets={"HF_TOKEN": SECRET})
    assert result.stdout.split()[0] == SECRET_SHA256


def test_secrets_and_stdin_together(side):
    result = side.target.run(
        ["sh", "-c", 'printf %s "$HF_TOKEN" | sha256sum | cut -c1-64; cat'],
        stdin="payload line\n", secrets={"HF_TOKEN": SECRET})
    assert result.stdout == f"{SECRET_SHA256}\npayload line\n"


def test_a_long_secret_does_not_slow_the_command_down(side):
    """A 256-character key (NGC keys, JWTs) reaches the command at once, not byte by byte."""
    secret = "nvapi-" + _random.token_hex(125)
    result = side.target.run(["sh", "-c", 'printf %s "$NGC_API_KEY" | wc -c'],
                             secrets={"NGC_API_KEY": secret})
    assert int(result.stdout) == len(secret)


def test_the_ssh_runner_feeds_stdin_in_blocks():
    """Fabric's stock runner reads a non-terminal stream one byte per 10 ms loop (2.7 s for a
    256-byte secret); ours hands over the whole block, then None: the remote stdin stays open
    for the watchdog that stops the command if the connection goes away."""
    runner = _block_reading_remote()
    stream = io.StringIO("x" * 300)
    reader = runner.__new__(runner)  # read_our_stdin needs no runner state
    assert reader.read_our_stdin(stream) == "x" * 300
    assert reader.read_our_stdin(stream) is None


def test_secret_never_appears_on_any_command_line(side):
    """While the command runs, the secret is in its environment and in no process's argv."""
    seconds = unique_seconds(1)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = side.target.run(  # running for a second, to be looked at meanwhile
                ["sh", "-c", f'sleep {seconds}; printf %s "$HF_TOKEN" | sha256sum'],
                secrets={"HF_TOKEN": SECRET}, timeout=20)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    secret = SECRET.encode()
    seen_running = seen_in_environment = False
    on_command_line: list[tuple[int, bytes]] = []
    try:
        while thread.is_alive():
            for pid, (cmdline, environ) in processes().items():
                if secret in cmdline:
                    on_command_line.append((pid, cmdline))
                if seconds.encode() in cmdline and pid != os.getpid():
                    seen_running = True
                    if environ and b"HF_TOKEN=" + secret in environ.split(b"\0"):
                        seen_in_environment = True
            thread.join(0.02)  # the next look, unless the command has ended meanwhile
    finally:
        thread.join(30)
        kill_leftovers(seconds)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].stdout.split()[0] == SECRET_SHA256
    assert seen_running, "never saw the command running; the scan proves nothing"
    assert seen_in_environment, "the running command did not have HF_TOKEN in its environment"
    assert on_command_line == []


def test_a_secret_given_to_run_is_masked_in_command_failed(side, clean_secret_registry):
    with pytest.raises(CommandFailed) as caught:
        side.target.run(["sh", "-c", 'echo "the token is $HF_TOKEN" >&2; exit 4'],
                        secrets={"HF_TOKEN": SECRET})
    message = str(caught.value)
    assert SECRET not in message
    assert "the token is ***" in message
    assert SECRET not in caught.value.result.stderr
    assert caught.value.result.stderr == "the token is ***\n"


# --------------------------------------------------------------------------- SSH only: connection


def test_ssh_home_is_the_sessions_home(shared_ssh, sshd):
    assert shared_ssh.home() == str(sshd.home)


def test_ssh_reconnects_after_close(sshd_node):
    target = SSH(sshd_node)
    try:
        assert target.run(["echo", "one"]).stdout == "one\n"
        target.close()
        assert target.run(["echo", "two"]).stdout == "two\n"
    finally:
        target.close()


def test_ssh_runs_as_the_inventory_user(shared_ssh, sshd):
    assert shared_ssh.run(["id", "-un"]).stdout.strip() == sshd.user


def refused_message(sshd, make_node, known_hosts: Path, marker: Path) -> str:
    """Try to `touch marker` on ``sshd`` with ``known_hosts``; the HostKeyRejected message."""
    target = SSH(make_node(sshd, known_hosts=str(known_hosts)))
    try:
        with pytest.raises(HostKeyRejected) as caught:
            target.run(["touch", str(marker)])
    finally:
        target.close()
    return str(caught.value)


@pytest.mark.parametrize("pinned", ["empty-file", "missing-file", "other-port-only"])
def test_unknown_host_key_is_refused_before_anything_runs(sshd, make_node, tmp_path, pinned):
    known_hosts = tmp_path / "known_hosts"
    if pinned == "empty-file":
        known_hosts.write_text("")
    elif pinned == "other-port-only":
        known_hosts.write_text(known_hosts_line(sshd.address, free_port(), public_key(sshd.host_key_path)))
    before = known_hosts.read_text() if known_hosts.exists() else None
    marker = tmp_path / "ran"
    message = refused_message(sshd, make_node, known_hosts, marker)
    expected = fingerprint(sshd.host_public_key)  # independently, from ssh-keygen -lf
    assert expected.startswith("SHA256:")
    assert expected in message
    assert "ssh-keyscan" in message
    assert f"-p {sshd.port}" in message
    assert not marker.exists()
    # nothing was trusted on the user's behalf
    assert (known_hosts.read_text() if known_hosts.exists() else None) == before


def test_changed_host_key_is_refused_as_changed(sshd, make_node, tmp_path):
    impostor = keygen(tmp_path / "other_host_key")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(known_hosts_line(sshd.address, sshd.port, public_key(impostor)))
    marker = tmp_path / "ran"
    message = refused_message(sshd, make_node, known_hosts, marker)
    assert "CHANGED" in message
    assert fingerprint(sshd.host_public_key) in message  # what the node offered
    assert fingerprint(impostor.with_name(impostor.name + ".pub")) in message  # what was pinned
    assert not marker.exists()


def test_refused_host_key_leaves_no_connection_open(sshd, make_node, tmp_path):
    (tmp_path / "empty").write_text("")
    before = paramiko_transports()
    target = SSH(make_node(sshd, known_hosts=str(tmp_path / "empty")))
    with pytest.raises(HostKeyRejected):
        target.run(["true"])
    target.close()
    for transport in paramiko_transports() - before:
        transport.join(1)  # its thread ends with its connection
    assert paramiko_transports() - before == set()


def test_unauthorized_client_key_is_unreachable_with_a_remedy(sshd, make_node, tmp_path):
    stranger = keygen(tmp_path / "id_stranger")
    target = SSH(make_node(sshd, identity_file=str(stranger)))
    try:
        with pytest.raises(Unreachable) as caught:
            target.run(["true"])
    finally:
        target.close()
    message = str(caught.value)
    assert "authentication failed" in message
    assert f"ssh-copy-id -p {sshd.port} -i {stranger}" in message


@pytest.mark.parametrize("name,bound,pattern", [
    ("dead", 3, r"refused"),  # nothing listens on the port
    ("silent", 5, r"time[ds]? ?out|within 1 s|connect_timeout"),  # accepts, never says a word
])
def test_an_unreachable_node_fails_within_its_bound(sshd, make_node, silent_listener, name, bound,
                                                    pattern):
    port = free_port() if name == "dead" else silent_listener
    target = SSH(make_node(sshd, name=name, port=port, connect_timeout=1))
    started = time.monotonic()
    with pytest.raises(Unreachable) as caught:
        target.run(["true"])
    assert time.monotonic() - started < bound
    message = str(caught.value)
    assert message.startswith(f"{name}: ") and f"127.0.0.1:{port}" in message
    assert re.search(pattern, message, re.IGNORECASE), message


# --------------------------------------------------------------------------- fan_out


def test_fan_out_keeps_good_results_when_one_node_is_down(sshd, sshd_factory, hosts_file):
    second = sshd_factory()
    dead = sshd.node_toml("node-dead", role="worker", port=free_port())
    cluster = inventory.load(hosts_file([sshd, second], extra=dead))

    result = fan_out(cluster.nodes, lambda node, target: target.run(["printf", "%s", node.name]).stdout)

    assert [outcome.node.name for outcome in result] == ["node-0", "node-1", "node-dead"]
    for name in ("node-0", "node-1"):
        assert result[name].ok and result[name].value == name
    bad = result["node-dead"]
    assert not bad.ok and isinstance(bad.error, Unreachable)
    assert [o.node.name for o in result.failed] == ["node-dead"]
    summary = result.summary()
    assert summary.startswith("1 of 3 node(s) failed")
    assert "node-dead: " in summary and "refused" in summary.lower()
    assert "node-0" not in summary and "node-1" not in summary
    with pytest.raises(CheckFailed, match="node-dead"):
        result.raise_for_failures()


def test_fan_out_all_good(sshd, sshd_factory, hosts_file):
    servers = [sshd, sshd_factory(), sshd_factory()]
    cluster = inventory.load(hosts_file(servers))
    result = fan_out(cluster.nodes, lambda node, target: target.home())
    assert result.failed == []
    assert [outcome.value for outcome in result] == [str(server.home) for server in servers]
    assert result.summary() == "all 3 node(s) succeeded"


def test_connections_share_one_connection_per_node_until_closed(sshd_node):
    with Connections() as shared:
        first = connect(sshd_node, shared)
        assert first.run(["true"]).ok
        first.close()  # a phase is done with it: it stays open for the next
        again = connect(sshd_node, shared)
        assert again is first and first._conn is not None
    assert first._conn is None  # closed when the run ends
    fresh = connect(sshd_node)
    assert fresh is not first
    fresh.close()


def test_a_shared_cluster_carries_its_connections_to_every_phase(sshd, hosts_file):
    cluster = inventory.load(hosts_file([sshd]))
    seen = []

    def phase(node, target):
        seen.append(target)
        return target.run(["true"]).ok

    with Connections() as shared:
        run = shared.share(cluster)
        assert run.head.model_dump() == cluster.head.model_dump()  # the same entries
        assert fan_out(run.nodes, phase).failed == []
        assert fan_out(run.nodes, phase).failed == []  # the next phase: the same connection
        assert seen[0] is seen[1] and seen[0]._conn is not None
        assert connect(run.head) is seen[0]
        assert connect(cluster.head) is not seen[0]  # the nodes as loaded share nothing
    assert seen[0]._conn is None
