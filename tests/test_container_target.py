"""The third target: a command inside a running container, reached locally or over SSH."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import docker_unusable
from trtllm_deploy import secrets
from trtllm_deploy.hosts.container import InContainer
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.hosts.targets import CommandFailed

BUSYBOX = Path("/bin/busybox")
APPLETS = ["sh", "cat", "echo", "printf", "pwd", "mkdir", "rm", "sleep", "ls", "env", "stat", "tar"]


def docker_ready() -> str | None:
    """Why Docker cannot be used here, or None (probed once, in conftest)."""
    if not BUSYBOX.exists():
        return "no static busybox (apt-get install busybox-static)"
    return docker_unusable()


requires_docker = pytest.mark.skipif(docker_ready() is not None, reason=str(docker_ready()))


def busybox_image() -> str:
    """A tiny image built here from the static busybox (no registry is reachable)."""
    name = "trtllm-deploy-test/busybox:1"
    if subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0:
        return name
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "tmp", "root"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(BUSYBOX), arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    subprocess.run(["docker", "import", "-c", "ENV PATH=/bin", "-c", "ENV HOME=/root", "-", name],
                   input=buffer.getvalue(), check=True, capture_output=True)
    return name


@pytest.fixture(scope="module")
def container():
    reason = docker_ready()
    if reason:
        pytest.skip(reason)
    name = f"trtllm-deploy-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "-d", "--rm", "--network", "none", "--name", name,
                    "--label", "trtllm-deploy-test=1",
                    busybox_image(), "sleep", "3600"],  # keeps the container up to exec into
                   check=True, capture_output=True)
    yield name
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)


@pytest.fixture(params=["local", "ssh"])
def inside(request, container, sshd_node):
    parent = Local() if request.param == "local" else SSH(sshd_node)
    target = InContainer(parent, container)
    yield target
    target.close()


@requires_docker
def test_run_env_cwd_and_literal_arguments(inside):
    result = inside.run(["sh", "-c", 'printf "%s|%s|%s" "$GREETING" "$(pwd)" "$1"', "sh", "a b; $HOME"],
                        env={"GREETING": "hello there"}, cwd="/tmp")
    assert result.stdout == "hello there|/tmp|a b; $HOME"
    assert inside.name.endswith("/" + inside.container)


@requires_docker
def test_failure_is_reported_with_the_container_name(inside):
    with pytest.raises(CommandFailed) as caught:
        inside.run(["sh", "-c", "echo broken >&2; exit 4"])
    assert inside.container in str(caught.value) and "exited with 4" in str(caught.value)


@requires_docker
def test_stdin_reaches_the_container(inside):
    assert inside.run(["cat"], stdin="through docker exec -i\n").stdout == "through docker exec -i\n"


@requires_docker
def test_a_streamed_file_reaches_a_command_in_the_container(inside, tmp_path):
    source = tmp_path / "payload"
    source.write_bytes(bytes(range(256)) * 4096)
    result = inside.stream(source, ["sh", "-c", "cat > /tmp/streamed && echo stored"])
    assert result.stdout.strip() == "stored" and result.target == inside.name
    back = tmp_path / "back"
    inside.get("/tmp/streamed", back)
    assert back.read_bytes() == source.read_bytes()


@requires_docker
def test_put_and_get_through_the_container(inside, tmp_path):
    source = tmp_path / "tree"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "file.txt").write_text("inside\n")
    inside.put(source / "sub" / "file.txt", "/root/deep/file.txt")
    assert inside.run(["cat", "/root/deep/file.txt"]).stdout == "inside\n"
    inside.get("/root/deep/file.txt", tmp_path / "back.txt")
    assert (tmp_path / "back.txt").read_text() == "inside\n"
    leftovers = Path(os.path.expanduser("~/.cache/trtllm-deploy"))
    assert not leftovers.exists() or not any(leftovers.iterdir())


@requires_docker
def test_secret_reaches_the_container_but_no_command_line(container):
    token = "hf_containersecret_" + uuid.uuid4().hex
    secrets.register(token)
    target = InContainer(Local(), container)
    assert target.run(["sh", "-c", 'printf %s "$HF_TOKEN"'], secrets={"HF_TOKEN": token}).stdout == "***"
    import threading

    done = threading.Event()

    def slow():
        target.run(["sleep", "2"], secrets={"HF_TOKEN": token})  # runs a while, to be looked at
        done.set()

    worker = threading.Thread(target=slow, daemon=True)
    worker.start()
    seen = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and not done.is_set():
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    seen.append(Path(f"/proc/{pid}/cmdline").read_bytes())
                except OSError:
                    pass
        done.wait(0.1)  # the next look, unless the command has ended meanwhile
    worker.join(timeout=10)
    assert done.is_set()
    assert any(b"docker\x00exec" in line for line in seen), "the docker exec was not observed"
    assert not any(token.encode() in line for line in seen)
