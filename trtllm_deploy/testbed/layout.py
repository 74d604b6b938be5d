"""What a testbed is: its name, nodes, subnet and the state folder of its keys, and the
inventory (hosts.toml) it hands out, which any task takes with ``--hosts``.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import tomlkit

from trtllm_deploy.errors import InputError
from trtllm_deploy.tomlsource import commented

LABEL = "io.trtllm-deploy.testbed"
LABEL_NODE = "io.trtllm-deploy.testbed.node"
DEFAULT_NAME = "testbed"
DEFAULT_SUBNET = "10.213.7.0/24"
USER = "spark"
MAX_NODES = 16
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")


def default_state_dir(name: str) -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "trtllm-deploy" / "testbed" / name


@dataclass(frozen=True)
class Layout:
    """What a testbed is: its name, node count, subnet and where its keys and files live."""

    name: str = DEFAULT_NAME
    nodes: int = 3
    subnet: str = DEFAULT_SUBNET
    state_dir: Path | None = None
    fabric: str | None = None       # pair | ring | switch: cables between the nodes (testbed/fabric.py)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InputError(f"--name {self.name!r}: expected 1-24 lowercase letters, digits or '-', "
                             "starting with a letter or digit")
        if not 1 <= self.nodes <= MAX_NODES:
            raise InputError(f"--nodes {self.nodes}: expected 1 to {MAX_NODES} nodes")
        try:
            net = ipaddress.IPv4Network(self.subnet)
        except ValueError:
            raise InputError(f"--subnet {self.subnet!r}: expected an IPv4 network such as "
                             f"{DEFAULT_SUBNET}") from None
        if not net.is_private or net.is_loopback or net.num_addresses < 16 + self.nodes:
            raise InputError(f"--subnet {self.subnet}: expected a private IPv4 network with room for "
                             f"{self.nodes} nodes (e.g. {DEFAULT_SUBNET})")
        if self.fabric is not None:
            wanted = {"pair": "2 nodes", "ring": "3 nodes", "switch": "at least 2 nodes"}
            if self.fabric not in wanted:
                raise InputError(f"--fabric {self.fabric}: expected pair, ring or switch (or leave it "
                                 "out for no fabric)")
            fits = {"pair": self.nodes == 2, "ring": self.nodes == 3, "switch": self.nodes >= 2}
            if not fits[self.fabric]:
                raise InputError(f"--fabric {self.fabric} --nodes {self.nodes}: a {self.fabric} needs "
                                 f"{wanted[self.fabric]}; change --nodes or --fabric")
        if self.state_dir is None:
            object.__setattr__(self, "state_dir", default_state_dir(self.name))

    @property
    def network(self) -> str:
        return f"trtllm-{self.name}"

    def container(self, index: int) -> str:
        return f"trtllm-{self.name}-node{index}"

    @staticmethod
    def node_name(index: int) -> str:
        return f"spark-{index}"

    def address(self, index: int) -> str:
        return str(ipaddress.IPv4Network(self.subnet).network_address + 10 + index)

    @property
    def indexes(self) -> range:
        return range(1, self.nodes + 1)

    # files in the state folder
    @property
    def client_key(self) -> Path:
        return self.state_dir / "id_ed25519"

    def host_key(self, index: int) -> Path:
        return self.state_dir / "host-keys" / self.node_name(index) / "ssh_host_ed25519_key"

    @property
    def known_hosts(self) -> Path:
        return self.state_dir / "known_hosts"

    @property
    def hosts_file(self) -> Path:
        return self.state_dir / "hosts.toml"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"


def hosts_toml(layout: Layout, runtime_image: str | None = None, earlier: str | None = None) -> str:
    """The inventory of the testbed: a plain hosts.toml any task can take with --hosts.

    ``earlier``: the file as it was, while every node stayed up; with a fabric, what
    ``fabric.setup`` wrote into it (``fabric`` tables) is kept, as the nodes still have it."""
    doc = tomlkit.document()
    for line in (f"The testbed {layout.name!r}: {layout.nodes} simulated node(s) on this machine, made by",
                 "`invoke testbed.up`. They have no GPU; the runtime inside them is the stand-in.",
                 "Written by trtllm-deploy; `invoke testbed.up` rewrites it."):
        doc.add(tomlkit.comment(line))
    doc.add(tomlkit.nl())
    doc["cluster"] = {"name": layout.name}
    defaults = tomlkit.table()
    defaults.update({"user": USER, "identity_file": str(layout.client_key),
                     "known_hosts": str(layout.known_hosts)})
    if layout.fabric is None:
        defaults["fabric"] = {"interfaces": ["eth0"]}
    else:
        defaults.add(tomlkit.comment(f"No fabric here: the nodes are cabled as a {layout.fabric}; "
                                     "`invoke fabric.setup` finds it and writes it."))
    if runtime_image:
        container = tomlkit.table()
        container["image"] = commented(runtime_image, "the stand-in runtime")
        container.add(tomlkit.comment(
            "A nested test node may not raise memlock (this machine's hard limit stands); a Spark can."))
        container["ulimits"] = tomlkit.inline_table()
        container["ulimits"]["stack"] = "67108864"
        defaults["container"] = container
    doc["defaults"] = defaults
    doc["preflight"] = {
        "arch": commented(platform.machine(), "the nodes run on this machine's architecture"),
        "require_gpu": commented(False, "simulated nodes have none: the stand-in runtime needs none"),
        "require_nvidia_runtime": False,
        "min_disk_build_gb": commented(1, "they share this machine's disk"),
        "min_disk_artifacts_gb": 1,
    }
    nodes = tomlkit.aot()
    for index in layout.indexes:
        node = tomlkit.table()
        node.update({"name": layout.node_name(index), "address": layout.address(index)})
        if index == 1:
            node["role"] = "head"
        nodes.append(node)
    doc["nodes"] = nodes
    if layout.fabric is not None and earlier is not None:
        _keep_fabric(doc, tomlkit.parse(earlier))
    return doc.as_string()


def _keep_fabric(doc: tomlkit.TOMLDocument, earlier: tomlkit.TOMLDocument) -> None:
    if "fabric" in earlier.get("defaults", {}):
        doc["defaults"]["fabric"] = earlier["defaults"]["fabric"]
    was = {node.get("name"): node for node in earlier.get("nodes", [])}
    for node in doc["nodes"]:
        if "fabric" in was.get(node["name"], {}):
            node["fabric"] = was[node["name"]]["fabric"]
