"""SSH key files made with OpenSSH's own ssh-keygen: key pairs, fingerprints, known_hosts lines."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from trtllm_deploy.errors import DeployError


def _ssh_keygen(*args: str) -> str:
    if shutil.which("ssh-keygen") is None:
        raise DeployError("ssh-keygen is not installed on this machine (apt-get install openssh-client)")
    done = subprocess.run(["ssh-keygen", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise DeployError(f"ssh-keygen {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done.stdout


def keygen(path: Path, comment: str = "trtllm-deploy") -> Path:
    """A fresh ed25519 key pair at ``path`` / ``path.pub``, no passphrase, mode 0600; returns ``path``."""
    for old in (path, path.with_name(path.name + ".pub")):
        if old.exists():
            old.unlink()
    _ssh_keygen("-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
    return path


def public_key(private_key: Path) -> str:
    """``ssh-ed25519 AAAA...`` (type and base64 only, no comment) of a generated key."""
    words = private_key.with_name(private_key.name + ".pub").read_text().split()
    return f"{words[0]} {words[1]}"


def fingerprint(public_key_path: Path) -> str:
    """``SHA256:...`` of a public key file, as ``ssh-keygen -lf`` prints it."""
    return _ssh_keygen("-lf", str(public_key_path)).split()[1]


def known_hosts_line(address: str, port: int, key: str) -> str:
    """One known_hosts line; OpenSSH writes ``[host]:port`` for any port but 22."""
    name = address if port == 22 else f"[{address}]:{port}"
    return f"{name} {key}\n"
