"""What ``supervise --install`` puts on the head, as text: the head's view of the cluster (hosts.toml),
the supervisor's ``docker run`` line, its systemd units and the image's content tag. Pure: nothing
here touches a host.

The supervisor runs on the head and reaches every node, the head included, over SSH with the head's
own key and the host keys ``ssh.setup`` pinned there (``~/.ssh/id_ed25519``, ``~/.ssh/known_hosts``,
bind-mounted read-only). Each node is reached at the address its peers use (hop.address without the
fabric) and the port mpirun's ssh_config gives them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import tomlkit

from trtllm_deploy.hosts import hop
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.knownhosts import host_name

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = "trtllm-deploy/supervisor"
DOCKERFILE = "docker/supervisor"
# The build context, relative to the checkout: what the image's tag is a hash of.
CONTEXT = ("docker/supervisor", "requirements/host.txt", "requirements/interface", "trtllm_deploy")
_SKIP = re.compile(r"(^|/)(__pycache__|\.pytest_cache|\.ruff_cache)(/|$)|\.pyc$")
MODES = ("system", "user", "container")
CONFIG_DIR = ".config/trtllm-deploy/supervisor"     # under the head user's home, per cluster
STATE_DIR = ".local/state/trtllm-deploy/clusters"   # state.STATE_DIR, under the head user's home
HISTORY = "supervisor.jsonl"


def context_files(root: Path = ROOT) -> list[tuple[str, Path]]:
    """Every file of the supervisor image's build context, as (name in the context, path), sorted."""
    found = []
    for entry in CONTEXT:
        path = root / entry
        items = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found += [(item.relative_to(root).as_posix(), item) for item in items
                  if not _SKIP.search(item.relative_to(root).as_posix())]
    return sorted(found)


def image_tag(base: str, root: Path = ROOT) -> str:
    """``trtllm-deploy/supervisor:<hash>``: the same package, requirements and base, the same tag."""
    digest = hashlib.sha256(f"base {base}\n".encode())
    for name, path in context_files(root):
        digest.update(f"{name}\n{len(path.read_bytes())}\n".encode())
        digest.update(path.read_bytes())
    return f"{REPOSITORY}:{digest.hexdigest()[:16]}"


def name_of(cluster: Cluster) -> str:
    """The supervisor's container (and unit) name on the head: one per cluster."""
    return f"trtllm-deploy-supervisor-{cluster.name}"


@dataclass(frozen=True)
class Head:
    """What the head is, as install found it."""

    user: str
    uid: int
    gid: int
    home: str
    mode: str                # system | user | container
    why: str                 # how the mode was chosen, in words
    linger: bool | None = None   # user mode: whether systemd keeps the user's services after logout


@dataclass(frozen=True)
class Options:
    """How the supervisor watches; part of what makes an installed one up to date."""

    on_failure: str = "restart"
    interval: float = 1.0
    hang_s: float = 8.0
    good_after_s: float = 300.0
    restarts: int = 3
    restart_window_min: float = 10.0
    node_wait_s: float = 600.0

    def argv(self) -> list[str]:
        return [f"--{key.replace('_', '-')}={value}" for key, value in asdict(self).items()]


def config_dir(head: Head, cluster: Cluster) -> str:
    return f"{head.home}/{CONFIG_DIR}/{cluster.name}"


def state_dir(head: Head, cluster: Cluster) -> str:
    return f"{head.home}/{STATE_DIR}/{cluster.name}"


def head_view(cluster: Cluster, head: Head) -> str:
    """hosts.toml as the head sees the cluster: each node at the address its peers use, the head's
    key and known_hosts, the same users, paths, fabric and container settings."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment(f"The cluster {cluster.name!r} as its head sees it: written by "
                            "`invoke supervise --install` for the supervisor; rewritten by it."))
    doc["cluster"] = {"name": cluster.name, "build_node": cluster.build_node_name}
    doc["preflight"] = _plain(cluster.preflight.model_dump(mode="json"))
    nodes = tomlkit.aot()
    for node in cluster.nodes:
        nodes.append(_plain(_node(node, head)))
    doc["nodes"] = nodes
    return doc.as_string()


def _node(node: Node, head: Head) -> dict:
    data = node.model_dump(mode="json")
    data.update(address=hop.address(node, fabric=False), connection="ssh", user=node.user or head.user,
                identity_file=f"{head.home}/.ssh/id_ed25519", known_hosts=f"{head.home}/.ssh/known_hosts")
    return data


def _plain(data):
    """TOML has no null: a key whose value is None is left out (its default holds)."""
    if isinstance(data, dict):
        return {key: _plain(value) for key, value in data.items() if value is not None}
    if isinstance(data, list):
        return [_plain(item) for item in data]
    return data


def pinned_names(cluster: Cluster) -> dict[str, str]:
    """Each node's name in the head's known_hosts (as ssh.setup pins it): address and port."""
    return {node.name: host_name(hop.address(node, fabric=False), node.port) for node in cluster.nodes}


def docker_run(cluster: Cluster, head: Head, image: str, options: Options, *, detach: bool,
               lock: bool = False) -> list[str]:
    """The supervisor's ``docker run``: in the foreground for systemd (``--rm``; systemd restarts
    it), else detached with ``--restart unless-stopped`` (Docker restarts it, after reboots too)."""
    config, state = config_dir(head, cluster), state_dir(head, cluster)
    keeps = ["-d", "--restart", "unless-stopped"] if detach else ["--rm"]
    mounts = []
    for path, mode in ((f"{head.home}/.ssh/id_ed25519", "ro"), (f"{head.home}/.ssh/known_hosts", "ro"),
                       (config, "ro"), (state, "rw")):
        mounts += ["--volume", f"{path}:{path}:{mode}"]
    command = ["run", f"--hosts={config}/hosts.toml", *options.argv()]
    if lock:
        command.append(f"--lock={config}/tensorrt-llm.lock.toml")
    return ["docker", "run", *keeps, "--name", name_of(cluster), "--network", "host",
            "--user", f"{head.uid}:{head.gid}", "--env", f"HOME={head.home}", "--env", f"USER={head.user}",
            "--env", f"LOGNAME={head.user}", "--label", f"io.trtllm-deploy.supervisor={cluster.name}",
            "--stop-timeout", "30", *mounts, image, *command]


def _unit_word(word: str) -> str:
    """One word of an ExecStart= line as systemd reads it (specifiers escaped, quoted if needed)."""
    word = word.replace("%", "%%")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit(cluster: Cluster, head: Head, image: str, options: Options, lock: bool = False) -> str:
    """The systemd unit (system or user) that keeps the supervisor's container running in the
    foreground: restarted always, after Docker is up, at every boot."""
    argv = docker_run(cluster, head, image, options, detach=False, lock=lock)
    name = name_of(cluster)
    argv[0] = "/usr/bin/docker"
    system = head.mode == "system"
    lines = ["[Unit]", f"Description=trtllm-deploy supervisor of cluster {cluster.name}",
             "After=docker.service network-online.target" if system else "After=network-online.target",
             *(["Requires=docker.service", "Wants=network-online.target"] if system else []),
             "", "[Service]", "Type=exec",
             f"ExecStartPre=-/usr/bin/docker rm --force {name}",
             "ExecStart=" + " ".join(_unit_word(word) for word in argv),
             f"ExecStop=/usr/bin/docker stop --time 30 {name}",
             "Restart=always", "RestartSec=10", "TimeoutStopSec=60",
             "", "[Install]", f"WantedBy={'multi-user.target' if system else 'default.target'}", ""]
    return "\n".join(lines)


def unit_path(cluster: Cluster, head: Head) -> str:
    name = f"{name_of(cluster)}.service"
    if head.mode == "system":
        return f"/etc/systemd/system/{name}"
    return f"{head.home}/.config/systemd/user/{name}"


def wanted(cluster: Cluster, head: Head, image: str, options: Options, lock_text: str | None) -> dict:
    """Everything an installed supervisor is: the same record on the head means up to date."""
    files = {"hosts.toml": head_view(cluster, head)}
    if lock_text is not None:
        files["tensorrt-llm.lock.toml"] = lock_text
    how = (shlex.join(docker_run(cluster, head, image, options, detach=True, lock=lock_text is not None))
           if head.mode == "container" else unit(cluster, head, image, options, lock=lock_text is not None))
    return {"cluster": cluster.name, "mode": head.mode, "image": image, "options": asdict(options),
            "name": name_of(cluster), "how": how,
            "files": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()}}


def same(recorded: dict | None, desired: dict) -> bool:
    return recorded is not None and json.dumps(recorded, sort_keys=True) == json.dumps(desired,
                                                                                       sort_keys=True)
