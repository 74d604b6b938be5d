"""A real multi-node cluster on one machine: node containers with sshd and their own Docker engine.

Every container, network and volume the testbed makes carries the label ``io.trtllm-deploy.testbed``
with the testbed's name, and ``down`` removes exactly those. The keys (client key, each node's host
key) live in the testbed's state folder and survive ``down``, so known_hosts stays true across
restarts; ``down --purge`` removes them too.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from trtllm_deploy import atomic, push
from trtllm_deploy.errors import DeployError, InputError
from trtllm_deploy.hosts import inventory, sshkeys, targets
from trtllm_deploy.hosts.connections import Connections
from trtllm_deploy.hosts.dockercli import docker, require_engine, text
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.testbed import fabric, images
from trtllm_deploy.testbed.layout import LABEL, LABEL_NODE, Layout, hosts_toml

# What a node needs to run its own Docker engine (TESTING.md: --privileged is refused on the CI
# machine, these are enough). /var/lib/docker is a volume of its own (overlay cannot sit on the
# container's own overlay root), removed with the container (docker rm --volumes); it outlives a
# restart of the node, as a machine's disk outlives a reboot (its images and stopped containers).
NESTED_DOCKER = ("--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN",
                 "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
                 "--cgroupns", "host", "--volume", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
                 "--volume", "/var/lib/docker")
# A cabled node keeps IPv6 on (link-local addresses only): neighbour discovery finds what each
# fabric port is cabled to.
IPV6 = ("--sysctl", "net.ipv6.conf.all.disable_ipv6=0", "--sysctl", "net.ipv6.conf.default.disable_ipv6=0")


@dataclass
class NodeState:
    """One node after ``up``: what was done to it and what it answered over SSH."""

    index: int
    name: str
    container: str
    address: str
    action: str                 # created | already running | recreated: <why>
    fingerprint: str = ""
    storage_driver: str = ""
    seconds: float = 0.0
    runtime: str = ""           # the stand-in image: "loaded" | "already there" | "" (not asked)
    runtime_seconds: float = 0.0


@dataclass
class UpReport:
    layout: Layout
    image: images.Built
    base: str
    runtime: images.Built | None = None
    nodes: list[NodeState] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        built = [self.image] + ([self.runtime] if self.runtime else [])
        return (any(not image.cached for image in built)
                or any(n.action != "already running" or n.runtime == "loaded" for n in self.nodes))

    def as_json(self) -> dict:
        return {
            "name": self.layout.name, "hosts_file": str(self.layout.hosts_file),
            "known_hosts": str(self.layout.known_hosts), "client_key": str(self.layout.client_key),
            "network": self.layout.network, "subnet": self.layout.subnet,
            "fabric": self.layout.fabric,
            "cables": [{"network": cable.network, "subnet": cable.subnet,
                        "ends": [{"node": self.layout.node_name(end.node), "interface": end.interface,
                                  "rdma": end.rdma} for end in cable.ends]}
                       for cable in fabric.cables(self.layout)],
            "image": self.image.tag, "image_built": not self.image.cached, "base": self.base,
            "runtime_image": self.runtime.tag if self.runtime else None,
            "runtime_image_built": bool(self.runtime and not self.runtime.cached),
            "changed": self.changed, "seconds": round(self.seconds, 2),
            "nodes": [{"name": n.name, "address": n.address, "container": n.container,
                       "action": n.action, "host_key": n.fingerprint,
                       "docker_storage_driver": n.storage_driver, "runtime_image": n.runtime,
                       "ready_seconds": round(n.seconds, 2),
                       "runtime_seconds": round(n.runtime_seconds, 2)} for n in self.nodes],
        }


Report = Callable[[str], None]
Progress = Callable[[str, int, int, str], None]   # (image title, step, steps, what)


def _quiet(_: str) -> None:
    pass


class Testbed:
    """Bring a testbed up, find out what is running, take it down. Used by tasks and by pytest."""

    def __init__(self, layout: Layout, base: str = "auto", mirror: str = images.DEFAULT_MIRROR,
                 report: Report = _quiet):
        self.layout = layout
        self.base = base
        self.mirror = mirror
        self.report = report

    # --- what exists ----------------------------------------------------------------------

    def _filter(self) -> tuple[str, ...]:
        return ("--filter", f"label={LABEL}={self.layout.name}")

    def containers(self) -> dict[str, dict]:
        """This testbed's containers: name → {state, image, node}."""
        done = docker("ps", "--all", *self._filter(), "--format",
                      "{{.Names}}\t{{.State}}\t{{.Image}}\t{{.Label \"" + LABEL_NODE + "\"}}\t"
                      "{{.Label \"" + fabric.LABEL_FABRIC + "\"}}")
        found = {}
        for line in text(done).splitlines():
            name, state, image, node, wiring = (line.split("\t") + ["", "", "", ""])[:5]
            found[name] = {"state": state, "image": image, "node": node, "wiring": wiring or "none"}
        return found

    def networks(self) -> list[str]:
        return text(docker("network", "ls", *self._filter(), "--format", "{{.Name}}")).split()

    def volumes(self) -> list[str]:
        return text(docker("volume", "ls", *self._filter(), "--format", "{{.Name}}")).split()

    def leftovers(self) -> dict[str, list[str]]:
        """Everything with this testbed's label that is still here."""
        return {"containers": sorted(self.containers()), "networks": self.networks(),
                "volumes": self.volumes()}

    # --- up -------------------------------------------------------------------------------

    def up(self, runtime: bool = True, progress: Progress | None = None,
           ready_timeout: float = 90) -> UpReport:
        """Make the testbed exist and answer: images, keys, network, node containers, readiness,
        and (``runtime``) the stand-in runtime image in every node's engine."""
        started = time.monotonic()
        layout = self.layout
        require_engine()
        self._check_other_nodes()
        base = images.resolve_base(self.base, self.mirror, self.report)
        node_image = images.ensure(images.NODE, base, layout.log_dir, self.report,
                                   progress and functools.partial(progress, images.NODE.title))
        runtime_image = (images.ensure(images.STANDIN, base, layout.log_dir, self.report,
                                       progress and functools.partial(progress, images.STANDIN.title))
                         if runtime else None)
        self._make_keys()
        before = self.leftovers()
        try:
            states = self._start(node_image, runtime_image, ready_timeout)
        except BaseException:  # a failure or Ctrl-C takes back what this run made, no more
            self._undo(before)
            raise
        return UpReport(layout, node_image, base, runtime_image, states, time.monotonic() - started)

    def _start(self, node_image: images.Built, runtime_image: images.Built | None,
               ready_timeout: float) -> list[NodeState]:
        layout = self.layout
        self._ensure_network()
        existing = self.containers()
        recabled = {}
        for index in layout.indexes:  # a node cabled otherwise goes first: its networks may go
            info = existing.get(layout.container(index))
            if info is not None and info["wiring"] != fabric.wiring(layout, index):
                docker("rm", "--force", "--volumes", layout.container(index), timeout=300)
                recabled[index] = "recreated: cabled otherwise"
                existing.pop(layout.container(index))
        fabric.remove_stale(layout)
        fabric.create_missing(layout)
        actions = {}
        for index in layout.indexes:
            actions[index] = self._ensure_container(index, node_image,
                                                    existing.get(layout.container(index)))
            if index in recabled:
                actions[index] = recabled[index]
        unchanged = all(action == "already running" for action in actions.values())
        self._write_files(runtime_image.tag if runtime_image else None, keep_fabric=unchanged)
        stop = threading.Event()
        nodes = self.inventory()  # read once, not once per waiting thread
        pool = ThreadPoolExecutor(max_workers=layout.nodes, thread_name_prefix="testbed-node")
        try:
            states = list(pool.map(lambda i: self._wait_ready(
                i, nodes.node(layout.node_name(i)), actions[i], ready_timeout, stop), layout.indexes))
        finally:
            stop.set()  # on Ctrl-C or a failed node, the other waits end at once
            pool.shutdown(wait=True, cancel_futures=True)
        if runtime_image:
            self.report(f"delivering {runtime_image.tag} to {layout.nodes} node(s) over SSH")
            # Through push's image path: only the layers a node lacks travel, and a node that has
            # the image's ID gets nothing. Its look and its send share one connection per node.
            with Connections() as shared:
                delivered = push.push(shared.share(nodes).nodes, push.source(image=runtime_image.tag))
            delivered.raise_for_failures()
            for state in states:
                pushed = delivered[state.name].value
                state.runtime = "already there" if pushed.image.action == "up to date" else "loaded"
                state.runtime_seconds = pushed.seconds
        return states

    def _undo(self, before: dict[str, list[str]]) -> None:
        """Remove the containers and network this run created (those that were there stay)."""
        made = [name for name in self.containers() if name not in before["containers"]]
        if made:
            docker("rm", "--force", "--volumes", *made, check=False, timeout=300)
        if not self.containers():
            for network in self.networks():
                if network not in before["networks"]:
                    docker("network", "rm", network, check=False)
            if self.layout.hosts_file.exists():
                self.layout.hosts_file.unlink()

    def _check_other_nodes(self) -> None:
        """Nodes beyond --nodes from an earlier, larger ``up`` would be silently left running."""
        extra = [name for name, info in self.containers().items()
                 if info["node"].isdigit() and int(info["node"]) > self.layout.nodes]
        if extra:
            raise InputError(f"--nodes {self.layout.nodes}: testbed {self.layout.name!r} is running "
                             f"more nodes ({', '.join(sorted(extra))}); run `invoke testbed.down` "
                             "first or ask for at least as many nodes")

    def _make_keys(self) -> None:
        layout = self.layout
        layout.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(layout.state_dir, 0o700)
        if not layout.client_key.exists():
            sshkeys.keygen(layout.client_key, f"trtllm-deploy testbed {layout.name} client")
        for index in layout.indexes:
            key = layout.host_key(index)
            if not key.exists():
                key.parent.mkdir(parents=True, exist_ok=True)
                sshkeys.keygen(key, f"{layout.node_name(index)} host key")

    def _ensure_network(self) -> None:
        layout = self.layout
        if layout.network in self.networks():
            subnet = text(docker("network", "inspect", "--format",
                                 "{{range .IPAM.Config}}{{.Subnet}}{{end}}", layout.network))
            if subnet == layout.subnet:
                return
            if self.containers():
                raise InputError(f"--subnet {layout.subnet}: testbed {layout.name!r} runs on "
                                 f"{subnet}; run `invoke testbed.down` first to change it")
            docker("network", "rm", layout.network)
        done = docker("network", "create", "--driver", "bridge", "--subnet", layout.subnet,
                      "--label", f"{LABEL}={layout.name}", layout.network, check=False)
        if done.returncode != 0:
            error = done.stderr.decode(errors="replace").strip()
            if "overlap" in error:
                raise InputError(f"--subnet {layout.subnet} overlaps a network this machine already "
                                 f"has ({error}); pick another with --subnet")
            raise DeployError(f"creating network {layout.network} failed: {error}")

    def _ensure_container(self, index: int, built: images.Built, info: dict | None) -> str:
        layout = self.layout
        name = layout.container(index)
        if info is not None:
            if info["state"] == "running" and info["image"] == built.tag:
                return "already running"
            why = f"was {info['state']}" if info["state"] != "running" else "new image"
            docker("rm", "--force", "--volumes", name)
            action = f"recreated: {why}"
        else:
            action = "created"
        docker("create", "--name", name, "--hostname", layout.node_name(index),
               "--network", layout.network, "--ip", layout.address(index),
               "--label", f"{LABEL}={layout.name}", "--label", f"{LABEL_NODE}={index}",
               "--label", f"{fabric.LABEL_FABRIC}={fabric.wiring(layout, index)}",
               *NESTED_DOCKER, *(IPV6 if layout.fabric else ()), built.tag)
        fabric.connect(layout, index)
        with tempfile.TemporaryDirectory() as scratch:
            given = Path(scratch) / "trtllm-testbed"
            given.mkdir()
            key = layout.host_key(index)
            shutil.copy(key, given / "ssh_host_ed25519_key")
            shutil.copy(key.with_name(key.name + ".pub"), given / "ssh_host_ed25519_key.pub")
            (given / "authorized_keys").write_text(sshkeys.public_key(layout.client_key) + "\n")
            (given / "fabric").write_text(fabric.mapping(layout, index))
            docker("cp", f"{given}/.", f"{name}:/etc/trtllm-testbed")
        docker("start", name)
        return action

    def _write_files(self, runtime_image: str | None, keep_fabric: bool = False) -> None:
        layout = self.layout
        lines = []
        for index in layout.indexes:
            key = layout.host_key(index)
            lines.append(sshkeys.known_hosts_line(layout.address(index), 22,
                                                  sshkeys.public_key(key)))
        atomic.write_text(layout.known_hosts, "".join(lines))
        earlier = (layout.hosts_file.read_text()
                   if keep_fabric and layout.hosts_file.exists() else None)
        atomic.write_text(layout.hosts_file, hosts_toml(layout, runtime_image, earlier))
        inventory.load(layout.hosts_file)  # what we hand out must be a valid inventory

    def _wait_ready(self, index: int, node: inventory.Node, action: str, timeout: float,
                    stop: threading.Event) -> NodeState:
        """Until the node answers over SSH (host key checked) and its own Docker engine runs."""
        layout = self.layout
        started = time.monotonic()
        last = "no answer yet"
        while time.monotonic() - started < timeout and not stop.is_set():
            state = text(docker("inspect", "--format", "{{.State.Status}}", layout.container(index)))
            if state != "running":
                logs = docker("logs", "--tail", "20", layout.container(index), check=False)
                raise DeployError(f"{layout.container(index)} stopped ({state}):\n"
                                  f"{(logs.stdout + logs.stderr).decode(errors='replace')}")
            target = None
            try:
                target = SSH(node)
                result = target.run(["docker", "info", "--format", "{{.Driver}}"], timeout=10,
                                    check=False)
                if result.ok and result.stdout.strip():
                    return NodeState(index, node.name, layout.container(index), node.address,
                                     action, sshkeys.fingerprint(
                                         layout.host_key(index).with_suffix(".pub")),
                                     result.stdout.strip(), time.monotonic() - started)
                last = f"docker: {(result.stderr or result.stdout).strip()[:200]}"
            except targets.HostKeyRejected:
                raise
            except targets.TargetError as exc:
                last = str(exc)
            finally:
                if target is not None:
                    target.close()
            stop.wait(0.2)
        logs = docker("logs", "--tail", "20", layout.container(index), check=False)
        raise DeployError(f"{node.name} ({layout.container(index)}) was not ready after "
                          f"{timeout:.0f} s: {last}\nits last log lines:\n"
                          f"{(logs.stdout + logs.stderr).decode(errors='replace')}")

    def inventory(self) -> inventory.Cluster:
        return inventory.load(self.layout.hosts_file)

    def cable(self, index: int, port: int, up: bool) -> None:
        """Take node ``index``'s fabric port ``port`` down (its end of the cable pulled) or up."""
        fabric.set_port(self.layout, index, port, up)

    # --- down -----------------------------------------------------------------------------

    def down(self, purge: bool = False) -> dict[str, list[str]]:
        """Remove every container, network and volume with this testbed's label; say what went."""
        require_engine()
        removed = self.leftovers()
        if removed["containers"]:
            docker("rm", "--force", "--volumes", *removed["containers"], timeout=300)
        for network in removed["networks"]:
            docker("network", "rm", network)
        if removed["volumes"]:
            docker("volume", "rm", "--force", *removed["volumes"])
        still = self.leftovers()
        if any(still.values()):
            raise DeployError(f"testbed {self.layout.name!r}: could not remove {still}")
        if purge and self.layout.state_dir.exists():
            shutil.rmtree(self.layout.state_dir)
        elif self.layout.hosts_file.exists():
            self.layout.hosts_file.unlink()  # points at nodes that no longer exist
        return removed
