"""The cluster inventory: ``hosts.toml`` read, validated and given its defaults.

Every mistake in the file becomes one message naming the file, the line, the key, what was
expected and what to do; nothing is run on any host before the whole inventory is valid.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat,
                      StrictInt, StrictStr, ValidationError)

from trtllm_deploy.errors import InputError
from trtllm_deploy.secrets import looks_secret
from trtllm_deploy.tomlsource import Problem, TomlFileError, matching, merge, problems_from, read
from trtllm_deploy.urls import host_port, same_address

DEFAULT_PATH = "hosts.toml"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_IFACE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_RDMA = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VERSION = re.compile(r"^\d+(\.\d+){0,3}$")


def _node_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            "expected a node name: 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def _address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    host = value[:-1] if value.endswith(".") else value
    labels = host.split(".")
    # An all-digit last label is a mistyped IPv4 address (192.0.2.300), not a host name.
    if 0 < len(host) <= 253 and all(map(_LABEL.match, labels)) and not labels[-1].isdigit():
        return value
    raise ValueError("expected an IP address or a host name (letters, digits, '-' and '.');"
                     " an IPv6 address goes without brackets or port: fd00::1")


def _interface(value: str) -> str:
    if not _IFACE.match(value) or value in (".", ".."):
        raise ValueError(
            "expected a network interface name as `ip link` shows it: 1-15 characters, letters, digits,"
            " '.', '_' or '-' (e.g. enp1s0f1np1)"
        )
    return value


def _ulimit_name(value: str) -> str:
    if value not in ("memlock", "stack", "nofile", "core", "nproc"):
        raise ValueError("expected a docker --ulimit name: memlock, stack, nofile, core or nproc")
    return value


def _path(value: str) -> str:
    if not (value.startswith("/") or value == "~" or value.startswith("~/")):
        raise ValueError("expected an absolute path, or one starting with ~/ (the node user's home)")
    return value


def _env_name(value: str) -> str:
    if not _ENV.match(value):
        raise ValueError("expected an environment variable name: letters, digits and '_'")
    if looks_secret(value):
        raise ValueError(
            "this is a secret, and hosts.toml is not the place for it: export it in your shell"
            " and trtllm-deploy passes it on without writing it anywhere"
        )
    return value


NodeName = Annotated[StrictStr, AfterValidator(_node_name)]
Address = Annotated[StrictStr, AfterValidator(_address)]
# As useradd takes it: "nvidia@spark-1", "" or "-oX" would reach ssh as a user that cannot exist.
Login = Annotated[StrictStr, matching(
    r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$", "expected a login name: 1-32 letters, digits, '_', '-' or '.',"
    " starting with a letter or '_' (the address goes in `address`; leave `user` out to log in as you)")]
Interface = Annotated[StrictStr, AfterValidator(_interface)]
RdmaDevice = Annotated[StrictStr, matching(
    _RDMA.pattern, "expected an RDMA device name as `ibdev2netdev` shows it (e.g. rocep1s0f1)")]
NodePath = Annotated[StrictStr, AfterValidator(_path)]
VersionText = Annotated[StrictStr, matching(
    _VERSION.pattern, "expected a version of dotted numbers, e.g. \"13.0\"")]
EnvName = Annotated[StrictStr, AfterValidator(_env_name)]
Seconds = Annotated[StrictInt | StrictFloat, Field(gt=0, le=3600)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fabric(_Table):
    """The node's own links to the other nodes (ConnectX-7 on a Spark)."""

    interfaces: list[Interface] = []
    rdma_devices: list[RdmaDevice] = []
    address: Address | None = None


class Paths(_Table):
    """Where things live on the node; ``~`` is the node user's home."""

    model_cache: NodePath = "~/.cache/huggingface"
    artifacts: NodePath = "~/trtllm-deploy/engines"
    state: NodePath = "~/.local/state/trtllm-deploy"
    build: NodePath = "~/trtllm-deploy/build"


class Container(_Table):
    """How the runtime container is run on the node."""

    name: NodeName = "trtllm-deploy"
    image: StrictStr | None = None
    env: dict[EnvName, StrictStr] = {}
    # docker run --ulimit NAME=VALUE: what serving needs (docs/SOURCES.md); a machine that may not raise
    # a limit (a nested test node) lists only the ones it can.
    ulimits: dict[Annotated[StrictStr, AfterValidator(_ulimit_name)], StrictStr] = {
        "memlock": "-1", "stack": "67108864"}


class NodeSettings(_Table):
    """What ``[defaults]`` may set for every node and each ``[[nodes]]`` entry may override."""

    connection: Literal["ssh", "local"] = "ssh"
    user: Login | None = None
    port: Port = 22
    identity_file: StrictStr | None = None
    known_hosts: StrictStr = "~/.ssh/known_hosts"
    connect_timeout: Seconds = 10
    command_timeout: Seconds = 600
    gpus: Annotated[StrictInt, Field(ge=1, le=64)] = 1
    fabric: Fabric = Fabric()
    paths: Paths = Paths()
    container: Container = Container()


class Node(NodeSettings):
    """One machine of the cluster."""

    name: NodeName
    address: Address | None = None
    role: Literal["head", "worker"] | None = None
    # The connections a run shares, where it shares them (connections.Connections.share): not part
    # of the entry, carried with it so that every phase handed the node reaches it the same way.
    _connections: Any = PrivateAttr(default=None)

    @property
    def host(self) -> str:
        return self.address or "localhost"

    @property
    def is_head(self) -> bool:
        return self.role == "head"

    @property
    def login(self) -> str:
        """``user@host:port`` as a person would write it, for messages."""
        if self.connection == "local":
            return "local"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port != 22 else ""
        return f"{user}{self.host}{port}"


class ClusterSettings(_Table):
    name: NodeName = "spark"
    build_node: NodeName | None = None


class Preflight(_Table):
    """What ``invoke preflight`` expects of every node."""

    arch: StrictStr = "aarch64"
    gpu_name: StrictStr = "GB10"
    min_compute_capability: VersionText = "8.0"
    min_driver: VersionText = "580.0"
    min_cuda: VersionText = "13.0"
    min_disk_build_gb: Annotated[StrictInt | StrictFloat, Field(ge=0)] = 63
    min_disk_artifacts_gb: Annotated[StrictInt | StrictFloat, Field(ge=0)] = 50
    min_memory_available_gb: Annotated[StrictInt | StrictFloat, Field(ge=0)] = 8
    max_clock_skew_ms: Annotated[StrictInt | StrictFloat, Field(gt=0)] = 500
    require_nvidia_runtime: StrictBool = True
    # false only where no GPU can be (the testbed): a node without one is then a warning
    require_gpu: StrictBool = True


class _File(_Table):
    cluster: ClusterSettings = ClusterSettings()
    defaults: NodeSettings = NodeSettings()
    nodes: list[dict[str, Any]] = []
    preflight: Preflight = Preflight()


@dataclass(frozen=True)
class Cluster:
    """The validated inventory."""

    name: str
    nodes: tuple[Node, ...]
    preflight: Preflight
    build_node_name: str
    source: Path

    @property
    def head(self) -> Node:
        return next(node for node in self.nodes if node.is_head)

    @property
    def build_node(self) -> Node:
        return self.node(self.build_node_name)

    def builds_on(self, node: Node) -> bool:
        """Whether ``node`` is where source builds run."""
        return node.name == self.build_node_name

    def paths_for(self, node: Node) -> dict[str, str]:
        """The node's directories by role; only the build node has a build directory."""
        paths = {"model_cache": node.paths.model_cache, "artifacts": node.paths.artifacts,
                 "state": node.paths.state}
        if self.builds_on(node):
            paths["build"] = node.paths.build
        return paths

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise InputError(
            f"{self.source}: no node named {name!r}; the nodes are: "
            + ", ".join(node.name for node in self.nodes)
        )

    def select(self, names: str | None) -> tuple[Node, ...]:
        """The nodes named in a comma-separated ``--nodes`` value, or all of them."""
        if not names:
            return self.nodes
        return tuple(self.node(name.strip()) for name in names.split(",") if name.strip())


class InventoryError(TomlFileError):
    """hosts.toml is wrong; the message lists every problem with its line."""


_EXAMPLES = {
    "port": "port = 22",
    "gpus": "gpus = 1",
    "connect_timeout": "connect_timeout = 10",
    "command_timeout": "command_timeout = 600",
    "connection": 'connection = "ssh"',
    "role": 'role = "head"',
    "name": 'name = "spark-1"',
    "address": 'address = "192.168.1.10"',
    "user": 'user = "nvidia"',
    "interfaces": 'interfaces = ["enp1s0f1np1", "enP2p1s0f1np1"]',
    "rdma_devices": 'rdma_devices = ["rocep1s0f1", "roceP2p1s0f1"]',
    "nodes": '[[nodes]] tables, one per machine',
}

def _problems(error: ValidationError, model: type[BaseModel], prefix: tuple) -> list[Problem]:
    return problems_from(error, model, prefix, _EXAMPLES,
                         secret_fix="remove {key!r} from hosts.toml and export it in your shell instead")


_SSH_ONLY = ("user", "port", "identity_file", "known_hosts")


def _check_node(raw: dict, node: Node, index: int) -> list[Problem]:
    at = ("nodes", index)
    problems = []
    if node.connection == "ssh" and node.address is None:
        problems.append(Problem(at + ("name",), "an ssh node needs an address",
                                f"add: {_EXAMPLES['address']}, or connection = \"local\""))
    if node.connection == "local":
        for key in _SSH_ONLY:
            if key in raw:
                problems.append(Problem(at + (key,), "a local node is not reached over SSH",
                                        f"remove {key!r}, or set connection = \"ssh\""))
    if node.connection == "ssh" and node.identity_file:
        identity = Path(os.path.expanduser(node.identity_file))
        if not identity.is_file():
            origin = at if "identity_file" in raw else ("defaults",)
            problems.append(Problem(origin + ("identity_file",),
                                    f"no such private key file: {identity}",
                                    f"create it (ssh-keygen -t ed25519 -f {identity}) or fix the path"))
    return problems


def load(path: str | os.PathLike = DEFAULT_PATH) -> Cluster:
    """Read and validate an inventory; raises :class:`InventoryError` listing every problem."""
    source = Path(path)
    text, data = read(source, InventoryError,
                      "create it (copy the example in README.md) or pass --hosts PATH")
    return _validate(source, text, data)


def _validate(source: Path, text: str, data: dict) -> Cluster:
    try:
        top = _File.model_validate(data)
    except ValidationError as exc:
        raise InventoryError(source, text, _problems(exc, _File, ())) from None

    problems: list[Problem] = []
    defaults_raw = data.get("defaults", {})
    nodes: list[Node] = []
    for index, raw in enumerate(top.nodes):
        try:
            node = Node.model_validate(merge(defaults_raw, raw))
        except ValidationError as exc:
            # A key the node does not set itself came from [defaults]; those were valid already.
            problems += _problems(exc, Node, ("nodes", index))
            continue
        problems += _check_node(raw, node, index)
        nodes.append(node)
    if problems:
        raise InventoryError(source, text, problems)

    if not nodes:
        raise InventoryError(source, text, [Problem(("nodes",), "the cluster has no nodes",
                             f"add one {_EXAMPLES['nodes']}, each with a name and an address")])
    problems += _check_cluster(top, nodes)
    if problems:
        raise InventoryError(source, text, problems)

    if len(nodes) == 1 and nodes[0].role is None:
        nodes[0] = nodes[0].model_copy(update={"role": "head"})
    head = next(node for node in nodes if node.is_head)
    return Cluster(
        name=top.cluster.name,
        nodes=tuple(nodes),
        preflight=top.preflight,
        build_node_name=top.cluster.build_node or head.name,
        source=source,
    )


def _check_cluster(top: _File, nodes: list[Node]) -> list[Problem]:
    problems = []
    seen_names: dict[str, int] = {}
    seen_places: dict[tuple, int] = {}
    seen_fabric: dict[str, int] = {}
    for index, node in enumerate(nodes):
        if node.name in seen_names:
            problems.append(Problem(("nodes", index, "name"),
                                    f"duplicate node name {node.name!r}"
                                    f" (also nodes[{seen_names[node.name]}])",
                                    "give every node its own name"))
        seen_names.setdefault(node.name, index)
        place = ("local",) if node.connection == "local" else (same_address(node.host), node.port)
        if place in seen_places:
            what = "a second local node" if place == ("local",) else (
                f"duplicate address {host_port(node.host, node.port)}")
            problems.append(Problem(("nodes", index, "address"),
                                    f"{what} (also nodes[{seen_places[place]}]): two entries for one machine",
                                    "list each machine once"))
        seen_places.setdefault(place, index)
        if node.fabric.address is not None:
            fabric = same_address(node.fabric.address)
            if fabric in seen_fabric:
                other = nodes[seen_fabric[fabric]].name
                problems.append(Problem(("nodes", index, "fabric", "address"),
                                        f"duplicate fabric address {node.fabric.address} (also {other!r},"
                                        f" nodes[{seen_fabric[fabric]}]): the nodes would send each"
                                        " other's traffic to one machine",
                                        "give each node the address of its own fabric link (ip -br addr"
                                        " on the node shows it), or remove fabric.address"))
            seen_fabric.setdefault(fabric, index)
    heads = [index for index, node in enumerate(nodes) if node.is_head]
    if len(nodes) > 1 and not heads:
        problems.append(Problem(("nodes",), "no node has role = \"head\"",
                                "mark the node that runs mpirun and serves HTTP with role = \"head\""))
    for index in heads[1:]:
        problems.append(Problem(("nodes", index, "role"),
                                f"a second head (the first is {nodes[heads[0]].name!r})",
                                "keep exactly one role = \"head\"; the others are \"worker\""))
    build = top.cluster.build_node
    if build and build not in seen_names:
        close = difflib.get_close_matches(build, list(seen_names), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(Problem(("cluster", "build_node"), f"no node named {build!r}{hint}",
                                "name one of the [[nodes]] entries, or remove build_node to use the head"))
    return problems
