"""Reading ``known_hosts`` and judging a host key by it: the one set of rules for every use.

The SSH target checks the key a node offers with :func:`judge`, ``ssh.setup`` plans what to pin
with :func:`pins` and :func:`judge`, and the containers' rsh agent gets the lines that pin each
node from :func:`pins`. The rules are OpenSSH's: hashed names (``|1|salt|hmac``), ``[host]:port``
off port 22, patterns with ``*``, ``?`` and ``!``, several keys per host, ``@revoked`` keys refused,
``@cert-authority`` lines trusting the host certificates their CA signed (:func:`judge_certificate`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

_KEY_FIELDS = re.compile(r"(?:^|\s)((?:ssh|ecdsa-sha2|sk)-[A-Za-z0-9@._-]+)\s+([A-Za-z0-9+/]+=*)(?=\s|$)")

# What judge() finds of an offered key.
PINNED, REVOKED, CHANGED, UNKNOWN = "pinned", "revoked", "changed", "unknown"
# What judge_certificate() finds of an offered host certificate besides REVOKED and UNKNOWN.
CERTIFIED, INVALID = "certified", "invalid"
CERT_SUFFIX = "-cert-v01@openssh.com"


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


@dataclass(frozen=True)
class Certificate:
    """The fields of an OpenSSH certificate (PROTOCOL.certkeys) that decide whether to trust it."""

    type: str              # ssh-ed25519-cert-v01@openssh.com
    key: PublicKey         # the certified key
    kind: int              # 1 user, 2 host
    key_id: str
    principals: list[str]
    valid_after: int
    valid_before: int
    critical: bytes        # packed critical options; none are defined for host certificates
    authority: PublicKey   # the CA key that signed it
    signed: bytes          # what the signature covers
    signature: bytes


def _read(blob: bytes, at: int) -> tuple[bytes, int]:
    (size,) = struct.unpack_from(">I", blob, at)
    end = at + 4 + size
    if end > len(blob):
        raise ValueError("a field runs past the end of the certificate")
    return blob[at + 4:end], end


def parse_certificate(blob: bytes) -> Certificate:
    """An OpenSSH certificate from its wire form; ValueError where it is not one."""
    try:
        raw_type, at = _read(blob, 0)
        cert_type = raw_type.decode()
        if not cert_type.endswith(CERT_SUFFIX):
            raise ValueError(f"{cert_type} is not a certificate type")
        key_type = cert_type[: -len(CERT_SUFFIX)]
        _, at = _read(blob, at)  # nonce
        # The certified key's own fields: one string for ed25519, e and n for RSA, curve and point
        # for ECDSA; re-encoded as the plain public key they make.
        count = {"ssh-ed25519": 1, "ssh-rsa": 2}.get(key_type, 2 if key_type.startswith("ecdsa-") else 0)
        if not count:
            raise ValueError(f"certificates of {key_type} keys are not understood here")
        start = at
        for _ in range(count):
            _, at = _read(blob, at)
        plain = struct.pack(">I", len(raw_type) - len(CERT_SUFFIX)) + key_type.encode() + blob[start:at]
        _serial, kind = struct.unpack_from(">QI", blob, at)
        at += 12
        key_id, at = _read(blob, at)
        packed, at = _read(blob, at)
        principals, inner = [], 0
        while inner < len(packed):
            name, inner = _read(packed, inner)
            principals.append(name.decode())
        valid_after, valid_before = struct.unpack_from(">QQ", blob, at)
        at += 16
        critical, at = _read(blob, at)
        _, at = _read(blob, at)  # extensions
        _, at = _read(blob, at)  # reserved
        authority, at = _read(blob, at)
        signed = blob[:at]
        signature, at = _read(blob, at)
        ca_type, _ = _read(authority, 0)
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"not a readable certificate ({exc})") from None
    return Certificate(cert_type, PublicKey(key_type, base64.b64encode(plain).decode()), kind,
                       key_id.decode(errors="replace"), principals, valid_after, valid_before, critical,
                       PublicKey(ca_type.decode(), base64.b64encode(authority).decode()), signed, signature)


def _signature_holds(cert: Certificate) -> bool:
    import paramiko
    from paramiko.message import Message

    try:
        ca = paramiko.PKey.from_type_string(cert.authority.type, base64.b64decode(cert.authority.body))
        return bool(ca.verify_ssh_sig(cert.signed, Message(cert.signature)))
    except Exception:  # an unknown CA key type or a malformed signature verifies nothing
        return False


def judge_certificate(found: Pins, blob: bytes, host: str, now: float | None = None) -> tuple[str, str]:
    """What known_hosts makes of a host certificate a node offers, as OpenSSH does: the verdict
    (:data:`CERTIFIED`, :data:`REVOKED`, :data:`INVALID`, or :data:`UNKNOWN` where no
    ``@cert-authority`` line for this host names its CA) and, unless certified, why.

    ``host`` is the address the certificate's principals must name (no port)."""
    try:
        cert = parse_certificate(blob)
    except ValueError as exc:
        return INVALID, str(exc)
    if cert.key in found.revoked:
        return REVOKED, f"its key {cert.key.shown} is marked @revoked"
    if cert.authority in found.revoked:
        return REVOKED, f"its CA {cert.authority.shown} is marked @revoked"
    if cert.authority not in found.authorities:
        return UNKNOWN, f"it is signed by {cert.authority.shown}, which no @cert-authority line names"
    if cert.kind != 2:
        return INVALID, f"certificate {cert.key_id!r} is a user certificate, not a host certificate"
    if not _signature_holds(cert):
        return INVALID, f"the CA's signature on certificate {cert.key_id!r} does not verify"
    now = time.time() if now is None else now
    if not cert.valid_after <= now < cert.valid_before:
        when = "not yet valid" if now < cert.valid_after else "expired"
        return INVALID, (f"certificate {cert.key_id!r} is {when} (valid "
                         f"{_when(cert.valid_after)} to {_when(cert.valid_before)})")
    if cert.principals and host not in cert.principals:
        return INVALID, (f"certificate {cert.key_id!r} names {', '.join(cert.principals)}, not {host}")
    if cert.critical:
        return INVALID, f"certificate {cert.key_id!r} has critical options, which no host certificate may"
    return CERTIFIED, ""


def _when(seconds: int) -> str:
    if seconds >= 2**63:
        return "forever"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
