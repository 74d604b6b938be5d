"""The runtime containers of a job: one per node, idling until ``mpirun`` enters it.

Each container runs with the flags serving needs and its own node's fabric environment (set in the
container, never forwarded by mpirun from the head), mounts the node's artifact store (read-only),
model cache and a per-node log folder, and the files of mpirun's rsh agent (trtllm_deploy/serving/mpi.py):
ssh_config, known_hosts and the agent script in every container, the SSH agent's socket only in
the head's. The key stays on the head, loaded into an ssh-agent there.

Look, then act: the facts of every node are gathered first; a container that already runs with
the same settings is kept, a stale one replaced. A failed start anywhere removes the job from
every node. ``down`` removes the job and then checks, on every node, that nothing of it runs.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.hosts import knownhosts, scripts
from trtllm_deploy.hosts.fanout import GroupResult, fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.container import InContainer
from trtllm_deploy.hosts.targets import Target, expand
from trtllm_deploy.runtimes import runtime as runtimes
from trtllm_deploy.serving import mpi, probe, survey
from trtllm_deploy.serving.fabric import FABRIC_VARS, fabric_env, node_env_file

LABEL = "io.trtllm-deploy"
LABEL_JOB = f"{LABEL}.job"
LABEL_ROLE = f"{LABEL}.role"
LABEL_NODE = f"{LABEL}.node"
LABEL_ARTIFACT = f"{LABEL}.artifact"
LABEL_IMAGE = f"{LABEL}.image"
LABEL_IMAGE_ID = f"{LABEL}.image-id"
LABEL_SPEC = f"{LABEL}.spec"  # a hash of everything `docker run` was given: changed → replaced

# Where things are inside every container.
ARTIFACTS = "/artifacts"
MODEL_CACHE = "/cache/huggingface"
LOGS = "/var/log/trtllm-deploy"
TOOLS = "/run/trtllm-deploy/bin"
PROBE = f"{TOOLS}/probe.py"
NODE_ENV = f"{mpi.MOUNT}/node.env"  # this node's FABRIC_VARS, for every rank started here

SERVE_FLAGS = ("--init", "--ipc", "host", "--network", "host")
IDLE = ("sleep", "infinity")
JOB_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,39}$")
DEFAULT_KEY = "~/.ssh/id_ed25519"
START_TIMEOUT = 300.0


@dataclass(frozen=True)
class Job:
    """What runs: a named job's image (default: each node's container.image) and artifact."""

    name: str
    image: str | None = None
    artifact: str | None = None
    agent_key: str = DEFAULT_KEY   # on the head; mpirun authenticates with it through the agent
    env: tuple[tuple[str, str], ...] = ()  # the same on every node (e.g. STANDIN_* settings)
    runtime: runtimes.Runtime = field(default_factory=runtimes.default)   # what the container will run
    # Node → the image ID it runs, where ``image`` names a digest (trtllm_deploy/source/digest.py:
    # the pinned image, verified on that node); a node not listed runs what the name gives.
    pinned: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not JOB_NAME.match(self.name or ""):
            raise InputError(f"job name {self.name!r} is not valid: 1-40 lower-case letters, digits,"
                             " '.', '_' or '-'")
        for key, _ in self.env:
            if key in FABRIC_VARS:
                raise InputError(f"{key} differs per node: set it in hosts.toml (fabric), not for "
                                 "the whole job")


def container_name(cluster: Cluster, job: str) -> str:
    """The job's container, named the same on every node (mpirun's rsh agent enters it by name)."""
    names = {node.container.name for node in cluster.nodes}
    if len(names) != 1:
        raise InputError(f"{cluster.source}: container.name differs between nodes "
                         f"({', '.join(sorted(names))}); mpirun enters every node's container by one name:"
                         " set it in [defaults]")
    return f"{names.pop()}-{job}"


def job_dir(node: Node, home: str, job: str) -> str:
    return posixpath.join(expand(node.paths.state, home), "jobs", job)


def node_env(node: Node, job: Job, image_id: str, labels: dict[str, str]) -> dict[str, str]:
    """Everything the container's environment holds: the runtime's variables, the node's fabric,
    the node's container.env (the user's word wins), the job's settings, and what the probe reads."""
    env = {**job.runtime.env, **fabric_env(node, job.runtime), **node.container.env, **dict(job.env),
           "HF_HOME": MODEL_CACHE, "TRTLLM_DEPLOY_JOB": job.name, "TRTLLM_DEPLOY_NODE": node.name,
           "TRTLLM_DEPLOY_LOG_DIR": LOGS, probe.NODE_VARS_ENV: ",".join(job.runtime.node_vars),
           probe.IMAGE_ENV: image_id, probe.IMAGE_REF_ENV: job.image or node.container.image or ""}
    if labels.get("org.opencontainers.image.version"):
        env[probe.IMAGE_VERSION_ENV] = labels["org.opencontainers.image.version"]
    if labels.get("org.opencontainers.image.revision"):
        env[probe.IMAGE_REVISION_ENV] = labels["org.opencontainers.image.revision"]
    return env


def _named(node: Node, job: Job) -> str:
    """The job's image on ``node`` as the user names it: the job's, else the node's container.image."""
    image = job.image or node.container.image
    if not image:
        raise InputError(f"{node.name}: no runtime image: set container.image in hosts.toml or pass --image")
    return image


def _image(node: Node, job: Job) -> str:
    """What ``docker run`` is given on ``node``: the pinned image's ID there, else the name."""
    return dict(job.pinned).get(node.name) or _named(node, job)


def run_argv(cluster: Cluster, node: Node, job: Job, facts: survey.Facts) -> list[str]:
    """The ``docker run`` command for the job's container on ``node`` (pure; labels include its hash)."""
    image = _image(node, job)
    directory = job_dir(node, facts.home, job.name)
    env = node_env(node, job, facts.image_id or "", facts.image_labels)
    labels = {LABEL_JOB: job.name, LABEL_ROLE: "head" if node.is_head else "worker",
              LABEL_NODE: node.name, LABEL_ARTIFACT: job.artifact or "", LABEL_IMAGE: _named(node, job),
              LABEL_IMAGE_ID: facts.image_id or ""}
    artifacts = expand(node.paths.artifacts, facts.home)
    argv = ["docker", "run", "--detach", "--name", container_name(cluster, job.name),
            *(["--gpus", "all"] if facts.nvidia_runtime else []), *SERVE_FLAGS,
            *(["--device", "/dev/infiniband"] if facts.infiniband else []),
            *(arg for key, value in node.container.ulimits.items() for arg in ("--ulimit", f"{key}={value}")),
            *(arg for key, value in env.items() for arg in ("--env", f"{key}={value}")),
            "--volume", f"{artifacts}:{ARTIFACTS}:ro",
            "--volume", f"{expand(node.paths.model_cache, facts.home)}:{MODEL_CACHE}",
            "--volume", f"{directory}/logs:{LOGS}",
            "--volume", f"{directory}/mpi:{mpi.MOUNT}:ro",
            "--volume", f"{directory}/bin:{TOOLS}:ro",
            *(arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")),
            image, *IDLE]
    spec = hashlib.sha256("\0".join(argv).encode()).hexdigest()[:16]
    return [*argv[:-len(IDLE) - 1], "--label", f"{LABEL_SPEC}={spec}", *argv[-len(IDLE) - 1:]]


# OpenMPI hands every OMPI_MCA_ variable in mpirun's environment to the daemons it starts, as
# command-line parameters that beat each node's own: the head's interface names would reach every
# node. So mpirun runs without the per-node ones, and every rank re-reads its node's file.
_WITHOUT_FABRIC = [arg for key in FABRIC_VARS for arg in ("-u", key)]
# mpirun's program on every rank (argv, not a script run on a node): the node's file, then the program.
_RANK = 'set -a; . "$1"; set +a; shift; exec "$@"'


def mpirun_argv(cluster: Cluster, program: list[str], *, slots: int = 1,
                forward_env: tuple[str, ...] = ()) -> list[str]:
    """``mpirun`` across every node's job container (run it in the head's, see :func:`enter`), each
    rank with its own node's fabric variables. ``forward_env`` names variables the same for all
    (never a per-node one)."""
    per_node = [name for name in forward_env if name in FABRIC_VARS]
    if per_node:
        raise InputError(f"{', '.join(per_node)} differ per node and are set in each container: "
                         "they are never forwarded from the head")
    argv = mpi.mpirun_argv([node.name for node in cluster.nodes],
                           ["sh", "-c", _RANK, "rank-env", NODE_ENV, *program], slots=slots,
                           forward_env=forward_env)
    return ["env", *_WITHOUT_FABRIC, *argv]


def spec_of(argv: list[str]) -> str:
    return next(word.split("=", 1)[1] for word in argv if word.startswith(f"{LABEL_SPEC}="))


# --- acting -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Started:
    """One node's container after ``up``."""

    container: str
    action: str  # "started", "replaced" or "kept"
    image_id: str
    env: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"container": self.container, "action": self.action, "image_id": self.image_id,
                "env": self.env}


def known_hosts_lines(cluster: Cluster) -> str:
    """The pinned host key of every node, from the known_hosts files hosts.toml names: the ones the
    rsh agent checks. A node without one is refused (nothing is trusted on first use)."""
    lines: list[str] = []
    for node in cluster.nodes:
        if node.connection == "local":
            continue
        name = knownhosts.host_name(node.host, node.port)
        path = Path(node.known_hosts).expanduser()
        found = knownhosts.pins(knownhosts.read(path), name)
        if not (found.keys or found.authorities):
            raise InputError(f"{node.name}: no pinned host key for {name} in {path}; mpirun's rsh "
                             "agent checks host keys: run `invoke ssh.setup`, or compare and add it "
                             f"with ssh-keyscan -p {node.port} {node.host}")
        # As written (hashed names stay hashed), @revoked lines too: the rsh agent's OpenSSH
        # judges by the same lines as this machine.
        lines += [line for line in found.lines if line not in lines]
    return "\n".join(lines) + "\n"


FOLDERS = Script("create the job's folders", """
umask 077 && mkdir -p "$1/mpi" "$1/bin" "$1/logs" "$2" "$3"
""")
# The head's ssh-agent for mpirun's rsh agent, holding the key "$2"; the job's folder is "$1".
AGENT = Script("start the head's ssh-agent", """
set -e
dir=$1; key=$2
case $key in "~/"*) key=$HOME/${key#"~/"};; esac
test -f "$key" || { echo "no key $key on this node: run invoke ssh.setup" >&2; exit 3; }
if SSH_AUTH_SOCK=$dir/mpi/agent.sock ssh-add -l >/dev/null 2>&1; then echo kept; exit 0; fi
if test -f "$dir/agent.pid"; then kill "$(cat "$dir/agent.pid")" 2>/dev/null || true; fi
rm -f "$dir/mpi/agent.sock" "$dir/agent.pid"
eval "$(ssh-agent -s -a "$dir/mpi/agent.sock")" >/dev/null
echo "$SSH_AGENT_PID" > "$dir/agent.pid"
SSH_AUTH_SOCK=$dir/mpi/agent.sock ssh-add -q "$key"
echo started
""")


def _prepare(cluster: Cluster, node: Node, target: Target, job: Job, facts: survey.Facts,
             files: dict[str, str]) -> None:
    """The job's folders and files on the node; on the head, the ssh-agent holding its key."""
    directory = job_dir(node, facts.home, job.name)
    scripts.run(target, FOLDERS, directory, expand(node.paths.artifacts, facts.home),
                expand(node.paths.model_cache, facts.home))
    staging = Path(files["_local"])
    for name in ("ssh_config", "known_hosts", "rsh-agent"):
        target.put(staging / name, f"{directory}/mpi/{name}")
    own = staging.parent / f"node.env.{node.name}"
    own.write_text(node_env_file(node, job.runtime))
    target.put(own, f"{directory}/mpi/node.env")
    target.put(Path(probe.__file__), f"{directory}/bin/probe.py")
    # The container's processes (root in most images) write the rank logs here.
    target.run(["chmod", "0777", f"{directory}/logs"], timeout=60)
    if node.is_head:
        scripts.run(target, AGENT, directory, job.agent_key)


def _start(cluster: Cluster, node: Node, target: Target, job: Job, facts: survey.Facts) -> Started:
    name = container_name(cluster, job.name)
    argv = run_argv(cluster, node, job, facts)
    env = node_env(node, job, facts.image_id or "", facts.image_labels)
    if facts.running and facts.running["state"] == "running" \
            and facts.running["labels"].get(LABEL_SPEC) == spec_of(argv):
        return Started(name, "kept", facts.image_id or "", env)
    action = "replaced" if facts.running else "started"
    if facts.running:
        target.run(["docker", "rm", "--force", name], timeout=120)
    target.run(argv, timeout=START_TIMEOUT)
    return Started(name, action, facts.image_id or "", env)


def up(cluster: Cluster, job: Job, tmp: Path) -> GroupResult[Started]:
    """Start the job's container on every node, in parallel; kept where it already runs as asked.

    ``tmp`` is a private local folder for the files sent to the nodes. A failure on any node (or
    Ctrl-C) removes the job from every node, then raises :class:`CheckFailed` naming the nodes.
    """
    name = container_name(cluster, job.name)
    staging = tmp / "mpi"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "ssh_config").write_text(mpi.ssh_config(cluster.nodes))
    (staging / "known_hosts").write_text(known_hosts_lines(cluster))
    (staging / "rsh-agent").write_text(mpi.rsh_agent(name))
    (staging / "rsh-agent").chmod(0o755)
    files = {"_local": str(staging)}

    facts = fan_out(cluster.nodes, lambda node, target: survey.gather(
        target, _image(node, job), container_name(cluster, job.name)))
    for outcome in facts:
        if outcome.ok and outcome.value.image_id is None:
            raise CheckFailed(f"{outcome.node.name} has no image {_named(outcome.node, job)}:"
                              " load it first (invoke push)")
    facts.raise_for_failures()

    def one(node: Node, target: Target) -> Started:
        mine = facts[node.name].value
        _prepare(cluster, node, target, job, mine, files)
        return _start(cluster, node, target, job, mine)

    try:
        started = fan_out(cluster.nodes, one)
    except BaseException:
        down(cluster, job.name)
        raise
    if started.failed:
        down(cluster, job.name)
        raise CheckFailed(f"the job {job.name} did not start, and was removed from every node: "
                          + started.summary())
    return started


@dataclass(frozen=True)
class Running:
    """A container of the job on a node, as ``docker ps`` shows it."""

    name: str
    state: str
    status: str
    image: str
    labels: dict[str, str]

    def as_json(self) -> dict:
        return {"name": self.name, "state": self.state, "status": self.status, "image": self.image,
                "labels": self.labels}


def _listed(target: Target, job: str) -> list[Running]:
    out = target.run(["docker", "ps", "--all", "--no-trunc", "--filter", f"label={LABEL_JOB}={job}",
                      "--format", "{{json .}}"], timeout=60).stdout
    found = []
    for line in out.splitlines():
        row = json.loads(line)
        labels = dict(item.split("=", 1) for item in row.get("Labels", "").split(",") if "=" in item)
        found.append(Running(row["Names"], row.get("State", ""), row.get("Status", ""),
                             row.get("Image", ""), labels))
    return found


def status(cluster: Cluster, job: str) -> GroupResult[list[Running]]:
    """The job's containers on every node (found by label, whatever their name)."""
    return fan_out(cluster.nodes, lambda node, target: _listed(target, job))


@dataclass(frozen=True)
class Stopped:
    """One node after ``down``: what was removed, and what still runs of the job (should be none)."""

    removed: list[str]
    leftovers: list[str]

    @property
    def clean(self) -> bool:
        return not self.leftovers

    def as_json(self) -> dict:
        return {"removed": self.removed, "leftovers": self.leftovers, "clean": self.clean}


# Processes of the job left on the node itself: the ssh-agent (head), and `docker exec` clients of
# mpirun's rsh agent. The bracket keeps pgrep from matching the shell that runs it.
CLEAN_UP = Script("stop the job's ssh-agent and rsh clients", """
dir=$1
if test -f "$dir/agent.pid"; then kill "$(cat "$dir/agent.pid")" 2>/dev/null; rm -f "$dir/agent.pid"; fi
pkill -f "[d]ocker exec -i $2 " || true
rm -rf "$dir/mpi" "$dir/bin"
""")
LEFTOVERS = Script("look for what is left of the job", """
dir=$1; name=$2
if test -f "$dir/agent.pid" && kill -0 "$(cat "$dir/agent.pid")" 2>/dev/null; then
  echo "ssh-agent $(cat "$dir/agent.pid")"
fi
pgrep -a -f "[d]ocker exec -i $name " | sed 's/^/process /' || true
""")


def _down(node: Node, target: Target, cluster: Cluster, job: str) -> Stopped:
    name = container_name(cluster, job)
    removed = [c.name for c in _listed(target, job)]
    if removed:
        target.run(["docker", "rm", "--force", *removed], timeout=120)
    directory = job_dir(node, target.home(), job)
    scripts.run(target, CLEAN_UP, directory, name)
    # Verify, not assume: the job's label and its processes, looked for afresh.
    leftovers = [f"container {c.name} ({c.state})" for c in _listed(target, job)]
    leftovers += scripts.run(target, LEFTOVERS, directory, name).lines()
    return Stopped(removed, leftovers)


def down(cluster: Cluster, job: str) -> GroupResult[Stopped]:
    """Remove the job's containers and agent on every node, then check that nothing of it runs.

    The per-node logs stay (``<state>/jobs/<job>/logs``). A node that could not be reached is a
    failed outcome, never a silent success."""
    return fan_out(cluster.nodes, lambda node, target: _down(node, target, cluster, job))


def enter(cluster: Cluster, job: str, node: Node | None = None) -> InContainer:
    """A target that runs commands inside the job's container on ``node`` (default: the head)."""
    return InContainer(connect(node or cluster.head), container_name(cluster, job))
