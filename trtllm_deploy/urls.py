"""Host and port as URLs and messages write them: an IPv6 literal goes in brackets (RFC 3986 §3.2.2).

``http://fd00::1:8000`` is no URL at all (urllib reads port ``:1:8000``); every place that builds a
URL or names an address with its port goes through :func:`host_port` or :func:`http_url`, and
:func:`same_address` says when two spellings are one machine.
"""

from __future__ import annotations

import ipaddress


def is_ipv6(host: str) -> bool:
    """Whether ``host`` is an IPv6 literal (scoped ``fe80::1%eth0`` too), not a name or IPv4."""
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def bracketed(host: str) -> str:
    """``host`` as the authority part of a URL takes it: ``[fd00::1]``, ``10.0.0.1``, ``spark-1``.

    A zone stays as written (``[fe80::1%eth0]``): Python's urllib and http.client, which read these
    URLs, pass it to the resolver as is (RFC 6874's ``%25`` they would not decode)."""
    if host.startswith("[") or not is_ipv6(host):
        return host
    return f"[{host}]"


def host_port(host: str, port: int) -> str:
    """``host:port``, the host bracketed where it is an IPv6 literal."""
    return f"{bracketed(host)}:{port}"


def http_url(host: str, port: int, path: str = "") -> str:
    """``http://host:port/path``, the host bracketed where it is an IPv6 literal."""
    return f"http://{host_port(host, port)}{path}"


def same_address(host: str) -> str:
    """``host`` as two spellings of one machine compare equal (``fd00::1``, ``FD00:0::1``; any case)."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host.lower().rstrip(".")
