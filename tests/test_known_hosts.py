"""known_hosts with ``@cert-authority`` and ``@revoked`` lines, against a real sshd that presents a
host certificate made by OpenSSH's own ssh-keygen."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
from conftest import _require_sshd
from sshd import keygen, public_key, start_sshd

from trtllm_deploy.hosts import knownhosts
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.hosts.targets import HostKeyRejected


def sign(ca: Path, host_key: Path, *, principals: str = "127.0.0.1", validity: str | None = None,
         host: bool = True) -> Path:
    """``ssh-keygen -s``: a certificate of ``host_key`` signed by ``ca``; its path."""
    argv = ["ssh-keygen", "-q", "-s", str(ca), "-I", "test-host", "-n", principals]
    argv += ["-h"] if host else []
    argv += ["-V", validity] if validity else []
    subprocess.run(argv + [str(host_key.with_name(host_key.name + ".pub"))], check=True,
                   capture_output=True)
    return host_key.with_name(host_key.name + "-cert.pub")


@pytest.fixture
def certified(tmp_path_factory):
    """``certified(**sign_options)``: a real sshd presenting a host certificate signed by the
    returned CA (private key path), with the options of :func:`sign`."""
    _require_sshd()
    started = []

    def start(ca_name: str = "ca", **options):
        workdir = tmp_path_factory.mktemp("sshd-cert")
        host_key = keygen(workdir / "ssh_host_ed25519_key", "test-sshd-host")
        ca = tmp_path_factory.getbasetemp() / ca_name
        if not ca.exists():
            keygen(ca, "test-ca")
        cert = sign(ca, host_key, **options)
        server = start_sshd(workdir, extra_config=f"HostCertificate {cert}\n")
        started.append(server)
        return server, ca

    yield start
    for server in started:
        server.stop()


def run_with(server, make_node, known_hosts: Path, text: str) -> str:
    """``hostname`` on ``server`` with ``text`` as known_hosts: its output, or the refusal."""
    known_hosts.write_text(text)
    target = SSH(make_node(server, known_hosts=str(known_hosts)))
    try:
        return target.run(["echo", "ran"]).stdout.strip()
    except HostKeyRejected as exc:
        return f"refused: {exc}"
    finally:
        target.close()


def name(server) -> str:
    return knownhosts.host_name(server.address, server.port)


def test_a_host_certificate_of_a_pinned_ca_is_trusted(certified, make_node, tmp_path):
    server, ca = certified()
    other = keygen(tmp_path / "old-key", "old")
    text = (f"# managed by the lab\n@revoked * {public_key(other)}\n"
            f"@cert-authority [127.0.0.1]:* {public_key(ca)} lab CA\n")
    assert run_with(server, make_node, tmp_path / "known_hosts", text) == "ran"


def test_cert_authority_and_revoked_lines_do_not_stop_a_plain_pin(sshd, make_node, tmp_path):
    # The bug: Paramiko's own parser died on these lines ("Incorrect padding") for every host.
    ca, old = keygen(tmp_path / "ca", "ca"), keygen(tmp_path / "old", "old")
    text = (f"@cert-authority *.lab,10.* {public_key(ca)}\n@revoked * {public_key(old)}\n"
            + sshd.known_hosts.read_text())
    assert run_with(sshd, make_node, tmp_path / "known_hosts", text) == "ran"


@pytest.mark.parametrize("case,fragments", [
    ("other-ca", ["not in", "trusts host certificates signed by", "HostCertificate"]),
    ("ca-for-other-hosts", ["not in", "ssh-keyscan"]),
    ("revoked-ca", ["marked @revoked", "its CA"]),
    ("revoked-host-key", ["marked @revoked", "its key"]),
], ids=["other-ca", "ca-for-other-hosts", "revoked-ca", "revoked-host-key"])
def test_a_host_certificate_is_refused_unless_its_ca_is_pinned_and_not_revoked(
        certified, make_node, tmp_path, case, fragments):
    server, ca = certified()
    ca_line = f"@cert-authority {name(server)} {public_key(ca)}\n"
    text = {
        "other-ca": f"@cert-authority * {public_key(keygen(tmp_path / 'other', 'other'))}\n",
        "ca-for-other-hosts": f"@cert-authority 10.0.0.* {public_key(ca)}\n",
        "revoked-ca": ca_line + f"@revoked * {public_key(ca)}\n",
        "revoked-host-key": ca_line + f"@revoked * {public_key(server.host_key_path)}\n",
    }[case]
    said = run_with(server, make_node, tmp_path / "known_hosts", text)
    assert said.startswith("refused: "), said
    for fragment in fragments:
        assert fragment in said, said


@pytest.mark.parametrize("options,fragment", [
    ({"principals": "10.9.9.9"}, "names 10.9.9.9, not 127.0.0.1"),
    ({"validity": "20200101:20200102"}, "is expired"),
    ({"validity": "+3650d:+3651d"}, "is not yet valid"),
    ({"host": False}, "a user certificate"),
], ids=["other-principal", "expired", "not-yet-valid", "user-certificate"])
def test_an_invalid_host_certificate_of_a_pinned_ca_is_refused(certified, make_node, tmp_path,
                                                               options, fragment):
    server, ca = certified(**options)
    said = run_with(server, make_node, tmp_path / "known_hosts", f"@cert-authority * {public_key(ca)}\n")
    assert said.startswith("refused: node-0: the host certificate"), said
    assert fragment in said and "ssh-keygen -s" in said, said


def test_a_forged_signature_is_refused(tmp_path):
    ca, host_key = keygen(tmp_path / "ca", "ca"), keygen(tmp_path / "host", "host")
    cert = sign(ca, host_key)
    blob = bytearray(base64.b64decode(cert.read_text().split()[1]))
    blob[-1] ^= 1  # the last byte of the signature
    found = knownhosts.pins(f"@cert-authority * {public_key(ca)}\n", "127.0.0.1")
    assert knownhosts.judge_certificate(found, bytes(blob), "127.0.0.1")[0] == knownhosts.INVALID
    assert knownhosts.judge_certificate(found, bytes(blob)[:-2], "127.0.0.1")[0] == knownhosts.INVALID


@pytest.mark.parametrize("key_type", ["ed25519", "rsa", "ecdsa"])
@pytest.mark.parametrize("ca_type", ["ed25519", "rsa", "ecdsa"])
def test_certificates_of_every_key_type_are_read_and_verified(tmp_path, key_type, ca_type):
    def make(path: Path, kind: str) -> Path:
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "", "-f", str(path)], check=True)
        return path

    ca, host_key = make(tmp_path / "ca", ca_type), make(tmp_path / "host", key_type)
    cert_line = sign(ca, host_key, principals="spark-1,10.0.0.1").read_text().split()
    cert = knownhosts.parse_certificate(base64.b64decode(cert_line[1]))
    assert cert.type == cert_line[0] and cert.kind == 2 and cert.principals == ["spark-1", "10.0.0.1"]
    assert cert.key.line == public_key(host_key) and cert.authority.line == public_key(ca)
    found = knownhosts.pins(f"@cert-authority * {public_key(ca)}\n", "10.0.0.1")
    assert knownhosts.judge_certificate(found, base64.b64decode(cert_line[1]), "10.0.0.1") == (
        knownhosts.CERTIFIED, "")
