"""hosts.toml: every bad input gets one clear message (file, line, key, expectation, remedy)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from trtllm_deploy.errors import InputError
from trtllm_deploy.hosts import inventory

ROOT = Path(__file__).resolve().parent.parent

HEAD = """\
[[nodes]]
name = "spark-1"
address = "192.0.2.1"
role = "head"
"""
WORKER = """\
[[nodes]]
name = "spark-2"
address = "192.0.2.2"
role = "worker"
"""


def write(tmp_path: Path, text: str | bytes, name: str = "hosts.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# (id, file text, line the message must point at or None, fragments the message must contain)
BAD = [
    ("unknown-top-level-key", "nodez = 1\n" + HEAD, 1, ["nodez", "did you mean 'nodes'"]),
    ("unknown-node-key", HEAD + 'adress = "x"\n', 5, ["nodes[0].adress", "did you mean 'address'"]),
    ("unknown-defaults-key", "[defaults]\nprot = 22\n" + HEAD, 2, ["defaults.prot", "'port'"]),
    ("unknown-fabric-key", HEAD + '[nodes.fabric]\ninterface = ["enp1s0f1np1"]\n', 6,
     ["nodes[0].fabric.interface", "did you mean 'interfaces'"]),
    ("port-as-string", HEAD + 'port = "22"\n', 5, ["nodes[0].port", "expected an integer", "a string"]),
    ("port-too-high", HEAD + "port = 70000\n", 5, ["nodes[0].port", "65535"]),
    ("port-zero", HEAD + "port = 0\n", 5, ["nodes[0].port", "greater than or equal to 1"]),
    ("gpus-zero", HEAD + "gpus = 0\n", 5, ["nodes[0].gpus", "greater than or equal to 1"]),
    ("gpus-as-word", HEAD + 'gpus = "one"\n', 5, ["nodes[0].gpus", "expected an integer"]),
    ("role-unknown", HEAD.replace('"head"', '"master"'), 4, ["nodes[0].role", "'head'", "'master'"]),
    ("connection-typo", HEAD + 'connection = "sshh"\n', 5, ["nodes[0].connection", "did you mean 'ssh'"]),
    ("duplicate-name", HEAD + WORKER.replace("spark-2", "spark-1"), 6,
     ["nodes[1].name", "duplicate node name 'spark-1'"]),
    ("duplicate-address", HEAD + WORKER.replace("192.0.2.2", "192.0.2.1"), 7,
     ["nodes[1].address", "duplicate address 192.0.2.1:22"]),
    ("no-head", HEAD.replace('"head"', '"worker"') + WORKER, None, ["no node has role = \"head\""]),
    ("two-heads", HEAD + WORKER.replace('"worker"', '"head"'), 8, ["nodes[1].role", "a second head"]),
    ("missing-identity-file", HEAD + 'identity_file = "/nonexistent/id_ed25519"\n', 5,
     ["nodes[0].identity_file", "no such private key file", "ssh-keygen"]),
    ("missing-identity-in-defaults", '[defaults]\nidentity_file = "/nonexistent/key"\n' + HEAD, 2,
     ["defaults.identity_file", "no such private key file"]),
    ("empty-cluster", '[cluster]\nname = "lab"\n', None, ["no nodes", "[[nodes]]"]),
    ("nodes-not-tables", 'nodes = "spark-1"\n', 1, ["nodes", "expected an array"]),
    ("interface-with-slash", HEAD + '[nodes.fabric]\ninterfaces = ["enp1s0/1"]\n', 6,
     ["nodes[0].fabric.interfaces[0]", "network interface name", "'enp1s0/1'"]),
    ("interface-too-long", HEAD + '[nodes.fabric]\ninterfaces = ["averyveryverylongname0"]\n', 6,
     ["fabric.interfaces[0]", "1-15 characters"]),
    ("interfaces-not-list", HEAD + '[nodes.fabric]\ninterfaces = "enp1s0f1np1"\n', 6,
     ["fabric.interfaces", "expected an array"]),
    ("rdma-device-with-space", HEAD + '[nodes.fabric]\nrdma_devices = ["roce p1"]\n', 6,
     ["fabric.rdma_devices[0]", "RDMA device name"]),
    ("name-with-space", HEAD.replace('"spark-1"', '"spark 1"'), 2, ["nodes[0].name", "a node name"]),
    ("name-missing", '[[nodes]]\naddress = "192.0.2.1"\n', 1, ["nodes[0].name", "required key is missing"]),
    ("ssh-node-without-address", '[[nodes]]\nname = "spark-1"\n', 2, ["an ssh node needs an address"]),
    ("address-malformed", HEAD.replace('"192.0.2.1"', '"spark_1!"'), 3,
     ["nodes[0].address", "an IP address or a host name"]),
    ("address-bad-ipv4", HEAD.replace('"192.0.2.1"', '"192.0.2.300"'), 3,
     ["nodes[0].address", "an IP address or a host name"]),
    ("relative-path", HEAD + '[nodes.paths]\nartifacts = "engines"\n', 6,
     ["nodes[0].paths.artifacts", "an absolute path"]),
    ("timeout-zero", "[defaults]\nconnect_timeout = 0\n" + HEAD, 2,
     ["defaults.connect_timeout", "greater than 0"]),
    ("timeout-with-unit", HEAD + 'connect_timeout = "10s"\n', 5, ["nodes[0].connect_timeout", "a string"]),
    ("not-toml", HEAD + "port = = 22\n", 5, ["not valid TOML"]),
    ("local-node-with-port", '[[nodes]]\nname = "me"\nconnection = "local"\nport = 2222\n', 4,
     ["nodes[0].port", "a local node is not reached over SSH"]),
    ("two-local-nodes", '[[nodes]]\nname = "a"\nconnection = "local"\nrole = "head"\n'
     '[[nodes]]\nname = "b"\nconnection = "local"\n', 5, ["a second local node"]),
    ("build-node-unknown", '[cluster]\nbuild_node = "spark-3"\n' + HEAD + WORKER, 2,
     ["cluster.build_node", "no node named 'spark-3'"]),
    ("secret-in-container-env", HEAD + '[nodes.container.env]\nHF_TOKEN = "hf_x"\n', 6,
     ["container.env.HF_TOKEN", "a secret", "export it"]),
    ("version-not-a-number", '[preflight]\nmin_cuda = "thirteen"\n' + HEAD, 2,
     ["preflight.min_cuda", "dotted numbers"]),
    ("unknown-preflight-key", "[preflight]\nmin_cudaa = \"13.0\"\n" + HEAD, 2,
     ["preflight.min_cudaa", "did you mean 'min_cuda'"]),
    ("defaults-wrong-type", "[defaults]\ngpus = 1.5\n" + HEAD, 2, ["defaults.gpus", "expected an integer"]),
    ("bool-as-string", '[preflight]\nrequire_nvidia_runtime = "yes"\n' + HEAD, 2,
     ["preflight.require_nvidia_runtime", "a boolean"]),
    ("cluster-not-table", 'cluster = "lab"\n' + HEAD, 1, ["cluster", "expected a table"]),
    ("duplicate-fabric-address", HEAD + '[nodes.fabric]\naddress = "10.0.0.1"\n'
     + WORKER + '[nodes.fabric]\naddress = "10.0.0.1"\n', 12,
     ["nodes[1].fabric.address", "duplicate fabric address 10.0.0.1", "'spark-1'", "its own fabric link"]),
    ("duplicate-fabric-address-ipv6-spellings", HEAD + '[nodes.fabric]\naddress = "fd00::1"\n'
     + WORKER + '[nodes.fabric]\naddress = "FD00:0::1"\n', 12,
     ["nodes[1].fabric.address", "duplicate fabric address FD00:0::1"]),
    ("duplicate-address-ipv6-spellings", HEAD.replace('"192.0.2.1"', '"::1"')
     + WORKER.replace('"192.0.2.2"', '"0:0::1"'), 7, ["nodes[1].address", "duplicate address [0:0::1]:22"]),
    ("address-ipv6-bracketed", HEAD.replace('"192.0.2.1"', '"[fd00::1]"'), 3,
     ["nodes[0].address", "IPv6 address goes without brackets", "'[fd00::1]'"]),
    ("address-ipv6-with-port", HEAD.replace('"192.0.2.1"', '"[fd00::1]:22"'), 3,
     ["nodes[0].address", "IPv6 address goes without brackets"]),
    ("user-empty", HEAD + 'user = ""\n', 5, ["nodes[0].user", "a login name", "leave `user` out"]),
    ("user-empty-in-defaults", '[defaults]\nuser = ""\n' + HEAD, 2, ["defaults.user", "a login name"]),
    ("user-with-host", HEAD + 'user = "nvidia@spark-1"\n', 5,
     ["nodes[0].user", "a login name", "'nvidia@spark-1'", "`address`"]),
    ("user-with-space", HEAD + 'user = "nv idia"\n', 5, ["nodes[0].user", "a login name"]),
    ("user-starting-with-dash", HEAD + 'user = "-oProxyCommand=x"\n', 5, ["nodes[0].user", "a login name"]),
    ("user-too-long", HEAD + f'user = "{"u" * 33}"\n', 5, ["nodes[0].user", "1-32"]),
    ("user-not-a-string", HEAD + "user = 1000\n", 5, ["nodes[0].user", "a string"]),
]


@pytest.mark.parametrize("text,line,fragments", [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_inventory_is_explained(tmp_path, text, line, fragments):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as caught:
        inventory.load(path)
    message = str(caught.value)
    assert caught.value.exit_code == 2
    where = f"{path}:{line}:" if line else f"{path}"
    assert where in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert "what to do:" in message


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, HEAD + "port = 0\ngpus = 0\n")
    with pytest.raises(InputError) as caught:
        inventory.load(path)
    assert "nodes[0].port" in str(caught.value) and "nodes[0].gpus" in str(caught.value)


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_unreadable_files(tmp_path, kind):
    if kind == "missing":
        path = tmp_path / "nope.toml"
    elif kind == "directory":
        path = tmp_path / "dir.toml"
        path.mkdir()
    else:
        path = write(tmp_path, b'[cluster]\nname = "\xff\xfe"\n')
    with pytest.raises(InputError) as caught:
        inventory.load(path)
    message = str(caught.value)
    assert str(path) in message and "what to do:" in message
    assert {"missing": "file not found", "directory": "cannot read",
            "not-utf8": "cannot read"}[kind] in message


def test_defaults_apply_and_nodes_override(tmp_path):
    key = tmp_path / "id"
    key.write_text("key")
    path = write(tmp_path, f"""
[defaults]
user = "nvidia"
identity_file = "{key}"
gpus = 1
[defaults.paths]
artifacts = "/data/engines"
[defaults.fabric]
rdma_devices = ["rocep1s0f1"]

{HEAD}
[nodes.fabric]
interfaces = ["enp1s0f1np1", "enP2p1s0f1np1"]

{WORKER}
user = "other"
port = 2222
[nodes.paths]
model_cache = "/data/hf"
""")
    cluster = inventory.load(path)
    head, worker = cluster.nodes
    assert cluster.head is head and cluster.build_node is head
    assert head.user == "nvidia" and worker.user == "other"
    assert worker.port == 2222 and head.port == 22
    assert head.fabric.interfaces == ["enp1s0f1np1", "enP2p1s0f1np1"]
    assert head.fabric.rdma_devices == worker.fabric.rdma_devices == ["rocep1s0f1"]
    assert worker.paths.artifacts == "/data/engines" and worker.paths.model_cache == "/data/hf"
    assert head.paths.model_cache == "~/.cache/huggingface"
    assert worker.login == "other@192.0.2.2:2222"


def test_single_node_without_role_is_the_head(tmp_path):
    cluster = inventory.load(write(tmp_path, '[[nodes]]\nname = "solo"\nconnection = "local"\n'))
    assert cluster.head.name == "solo"


def test_shipped_hosts_toml_is_one_local_head():
    cluster = inventory.load(ROOT / "hosts.toml")
    assert [(n.connection, n.role) for n in cluster.nodes] == [("local", "head")]


def test_readme_two_spark_example_is_valid(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- two-spark example -->", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    key = Path(os.path.expanduser("~/.ssh/id_ed25519"))
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("placeholder")
    cluster = inventory.load(write(tmp_path, block))
    assert len(cluster.nodes) == 2
    assert cluster.nodes[0].fabric.interfaces != [] and cluster.nodes[1].fabric.rdma_devices != []


def test_select_unknown_node_is_input_error(tmp_path):
    cluster = inventory.load(write(tmp_path, HEAD + WORKER))
    assert [n.name for n in cluster.select("spark-2")] == ["spark-2"]
    with pytest.raises(InputError, match="no node named 'spark-9'"):
        cluster.select("spark-9")


# --- through the CLI: exit code 2, no traceback, nothing run on any host --------------------

def invoke(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


class _Listener:
    """A TCP port that counts connections: proof that nothing tried to reach a node."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


@pytest.mark.parametrize("task", ["hosts.show", "preflight", "dirs"])
def test_cli_bad_input_exits_2_without_touching_hosts(tmp_path, task):
    listener = _Listener()
    path = write(tmp_path, f"""
[[nodes]]
name = "spark-1"
address = "127.0.0.1"
port = {listener.port}
role = "head"
[[nodes]]
name = "spark-2"
address = "127.0.0.1"
port = {listener.port}
gpus = "two"
""")
    done = invoke(task, "--hosts", str(path))
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr + done.stdout
    assert f"{path}:11: nodes[1].gpus: expected an integer" in done.stderr
    assert listener.accepted == 0
    listener.sock.close()


def test_cli_hosts_show_table_and_json(tmp_path):
    path = write(tmp_path, HEAD + WORKER)
    table = invoke("hosts.show", "--hosts", str(path))
    assert table.returncode == 0, table.stderr
    assert "spark-1" in table.stdout and "spark-2" in table.stdout and "head" in table.stdout
    data = json.loads(invoke("hosts.show", "--hosts", str(path), "--json").stdout)
    assert data["head"] == "spark-1"
    assert [n["address"] for n in data["nodes"]] == ["192.0.2.1", "192.0.2.2"]


def test_a_local_node_may_say_where_the_other_nodes_reach_it(tmp_path):
    """Invoke on the head: the others pull the images it holds through this address."""
    path = tmp_path / "hosts.toml"
    path.write_text('[[nodes]]\nname = "spark-1"\nconnection = "local"\naddress = "192.0.2.9"\n'
                    'role = "head"\n'
                    '[[nodes]]\nname = "spark-2"\naddress = "192.0.2.10"\n')
    head = inventory.load(path).head
    assert head.connection == "local" and head.host == "192.0.2.9" and head.login == "local"


def test_ipv6_addresses_and_plain_login_names_are_accepted(tmp_path):
    text = (HEAD.replace('"192.0.2.1"', '"fd00::1"') + 'user = "nvidia"\n'
            + '[nodes.fabric]\naddress = "fd01::1"\n'
            + WORKER.replace('"192.0.2.2"', '"fd00::2"') + 'user = "_svc.deploy-1"\n'
            + '[nodes.fabric]\naddress = "fe80::2%enp1s0f1np1"\n')
    cluster = inventory.load(write(tmp_path, text))
    assert [n.host for n in cluster.nodes] == ["fd00::1", "fd00::2"]
    assert [n.fabric.address for n in cluster.nodes] == ["fd01::1", "fe80::2%enp1s0f1np1"]
    assert [n.user for n in cluster.nodes] == ["nvidia", "_svc.deploy-1"]
