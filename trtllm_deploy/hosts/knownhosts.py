"""Reading ``known_hosts`` and judging a host key by it: the one set of rules for every use.

The SSH target checks the key a node offers with :func:`judge`, ``ssh.setup`` plans what to pin
with :func:`pins` and :func:`judge`, and the containers' rsh agent gets the lines that pin each
node from :func:`pins`. The rules are OpenSSH's: hashed names (``|1|salt|hmac``), ``[host]:port``
off port 22, patterns with ``*``, ``?`` and ``!``, several keys per host, ``@revoked`` keys refused,
``@cert-authority`` lines pinning no key of their own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_KEY_FIELDS = re.compile(r"(?:^|\s)((?:ssh|ecdsa-sha2|sk)-[A-Za-z0-9@._-]+)\s+([A-Za-z0-9+/]+=*)(?=\s|$)")

# What judge() finds of an offered key.
PINNED, REVOKED, CHANGED, UNKNOWN = "pinned", "revoked", "changed", "unknown"


@dataclass(frozen=True)
class PublicKey:
    """An SSH public key: its type (``ssh-ed25519``) and base64 body; comments and options aside."""

    type: str
    body: str

    @classmethod
    def of(cls, key) -> PublicKey:
        """The key Paramiko holds (anything with ``get_name()`` and ``asbytes()``)."""
        return cls(key.get_name(), base64.b64encode(key.asbytes()).decode())

    @property
    def line(self) -> str:
        return f"{self.type} {self.body}"

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(base64.b64decode(self.body)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    @property
    def shown(self) -> str:
        return f"{self.type} {self.fingerprint}"

    @property
    def short_type(self) -> str:
        """The type as ssh-keygen and sshd's file names spell it (``ed25519``, ``rsa``, ``ecdsa``)."""
        return {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}.get(
            self.type, "ecdsa" if self.type.startswith("ecdsa") else self.type)


def find_key(line: str) -> PublicKey | None:
    """The key in an authorized_keys, known_hosts or .pub line (after any options), or None."""
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    match = _KEY_FIELDS.search(line)
    return PublicKey(match.group(1), match.group(2)) if match else None


def keys_in(text: str) -> list[PublicKey]:
    found = [find_key(line) for line in text.splitlines()]
    return list(dict.fromkeys(key for key in found if key))


def host_name(host: str, port: int) -> str:
    """How OpenSSH names a host in known_hosts: ``host``, or ``[host]:port`` off port 22."""
    return host if port == 22 else f"[{host}]:{port}"


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):  # HashKnownHosts: |1|salt|HMAC-SHA1(salt, name)
        try:
            _, _, salt, digest = pattern.split("|", 3)
            mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
            return hmac.compare_digest(mac, base64.b64decode(digest))
        except (ValueError, TypeError, binascii.Error):
            return False
    # OpenSSH's patterns know only * and ?; "[" is a literal bracket of "[host]:port"
    glob = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(glob, name) is not None


@dataclass(frozen=True)
class Pins:
    """What a known_hosts text says about one host name."""

    keys: list[PublicKey] = field(default_factory=list)      # pinned
    revoked: list[PublicKey] = field(default_factory=list)   # @revoked (for any name they match)
    authorities: list[PublicKey] = field(default_factory=list)  # @cert-authority
    lines: list[str] = field(default_factory=list)           # the matching lines, as written


def pins(text: str, name: str) -> Pins:
    """The keys a known_hosts text pins for ``name``, those it revokes, and the lines that say so.

    ``@cert-authority`` lines pin no key of their own (their lines are kept, for an OpenSSH that
    reads them); a negated pattern (``!host``) excludes the line."""
    found = Pins()
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        marker = words.pop(0) if words[0].startswith("@") else ""
        if not words:
            continue
        patterns = words[0].split(",")
        if any(p.startswith("!") and _pattern_matches(p[1:], name) for p in patterns):
            continue
        if not any(_pattern_matches(p, name) for p in patterns if not p.startswith("!")):
            continue
        key = find_key(" ".join(words[1:]))
        if key is None:
            continue
        found.lines.append(line.strip())
        if marker == "@revoked":
            found.revoked.append(key)
        elif marker == "@cert-authority":
            found.authorities.append(key)
        else:
            found.keys.append(key)
    return found


def read(path: str | os.PathLike) -> str:
    """A known_hosts file's text; a file that is not there pins nothing."""
    file = Path(path).expanduser()
    return file.read_text() if file.is_file() else ""


def rivals(found: Pins, offered: PublicKey) -> list[PublicKey]:
    """Other keys of the offered key's type pinned for the same name."""
    return [key for key in found.keys if key.type == offered.type and key != offered]


def judge(found: Pins, offered: PublicKey) -> str:
    """What a known_hosts entry makes of a key a host offers, as OpenSSH does: :data:`REVOKED`,
    :data:`PINNED` (trust it), :data:`CHANGED` (another key of its type is pinned) or
    :data:`UNKNOWN` (nothing of its type is)."""
    if offered in found.revoked:
        return REVOKED
    if offered in found.keys:
        return PINNED
    return CHANGED if rivals(found, offered) else UNKNOWN


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
