"""IPv6 literals in URLs: bracketed everywhere an address meets a port, and spoken to over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.measure.bench.client import Endpoint, new_loop, request_bytes, stream
from trtllm_deploy.serving import gate
from trtllm_deploy.urls import host_port, http_url

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("host,port,path,url", [
    ("::1", 8000, "/v1", "http://[::1]:8000/v1"),
    ("fd00:0::2", 80, "", "http://[fd00:0::2]:80"),
    ("fe80::1%enp1s0f1np1", 8000, "/health", "http://[fe80::1%enp1s0f1np1]:8000/health"),
    ("[::1]", 8000, "", "http://[::1]:8000"),  # already bracketed: left alone
    ("192.0.2.1", 8000, "/v1", "http://192.0.2.1:8000/v1"),
    ("spark-1.lan", 8000, "", "http://spark-1.lan:8000"),
    ("localhost", 1, "", "http://localhost:1"),
], ids=["loopback", "uncompressed", "scoped", "bracketed", "ipv4", "name", "localhost"])
def test_http_url_brackets_ipv6_literals_only(host, port, path, url):
    assert http_url(host, port, path) == url
    assert host_port(host, port) == url.removeprefix("http://").removesuffix(path)


class _OpenAI(BaseHTTPRequestHandler):
    """Just enough of an OpenAI-compatible server for the gate; it records the Host header it got."""

    hosts: list[str] = []

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.hosts.append(self.headers["Host"])
        if self.path == "/health":
            self._send(200, {})
        elif self.path == "/v1/models":
            self._send(200, {"data": [{"id": "tiny"}]})
        else:
            self._send(404, {"error": {"message": "no route"}})

    def do_POST(self):  # noqa: N802
        self.hosts.append(self.headers["Host"])
        asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._send(200, {"choices": [{"text": " Paris."}], "usage": {"completion_tokens": 2},
                         "model": asked["model"]})

    def log_message(self, *args):
        pass


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


@pytest.fixture
def server6():
    _OpenAI.hosts = []
    server = _Server6(("::1", 0), _OpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_the_gate_talks_to_a_head_at_an_ipv6_address(server6):
    head = Node.model_validate({"name": "spark-1", "address": "::1"})
    assert gate.healthy(head, server6)
    answer = gate.ask(head, server6, max_tokens=2)
    assert answer.text == "Paris." and answer.tokens == 2
    assert set(_OpenAI.hosts) == {f"[::1]:{server6}"}


def test_bench_streams_from_a_server_at_an_ipv6_address():
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "timed_server.py"), "--host", "::1",
                                "--ttft-ms", "1", "--itl-ms", "1", "--workers", "1"],
                               stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("PORT "), line
        port = int(line.split()[1])
        endpoint = Endpoint.parse(f"http://[::1]:{port}/v1")
        assert (endpoint.host, endpoint.port, endpoint.url) == ("::1", port, f"http://[::1]:{port}")
        assert f"Host: [::1]:{port}\r\n".encode() in request_bytes(endpoint, "/v1/completions", {})
        with asyncio.Runner(loop_factory=new_loop) as runner:
            sample = runner.run(stream(endpoint, "/v1/completions", {"stream": True, "max_tokens": 3}))
        assert sample.error is None, sample.detail
        assert sample.tokens == 3
    finally:
        process.terminate()
        process.wait(10)


def test_ssh_reaches_a_node_at_an_ipv6_address(tmp_path, make_node):
    # The management side of an IPv6 address: hosts.toml takes it, known_hosts names it
    # [::1]:port, and the SSH target connects and checks the key under that name.
    from conftest import _require_sshd
    from sshd import start_sshd

    from trtllm_deploy.hosts.ssh import SSH

    _require_sshd()
    server = start_sshd(tmp_path / "sshd6", address="::1")
    target = SSH(make_node(server))
    try:
        assert target.host_name == f"[::1]:{server.port}"
        assert target.run(["echo", "over", "ipv6"]).stdout.strip() == "over ipv6"
    finally:
        target.close()
        server.stop()
