"""Phase 1 of the plan: look at every node at once and say what is ready and what to fix.

Gathering (one SSH command per node, plus one clock reading) is separate from judging:
:func:`evaluate` is a pure function of a node's facts, so every verdict is tested on recorded
outputs.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field

from trtllm_deploy.hosts import parsers, shell
from trtllm_deploy.hosts.facts import Fact, Output, gather
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.targets import Target

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"

GPU_FIELDS = ["index", "name", "compute_cap", "driver_version", "memory.total"]

# Each path is printed with the df line of its nearest existing ancestor, so a store that does not
# exist yet is judged by the disk it will land on. `~` is the node user's home.
DISK = Script("measure the node's free disk space", (
    'for p do ' + shell.EXPAND_P_TO_Q
    + 'while [ ! -e "$q" ]; do q=$(dirname -- "$q"); done; '
    'printf "%s\\t" "$p"; df -PB1 -- "$q" | tail -n 1; done'
), timeout=30)

GB = 1000**3


@dataclass(frozen=True)
class Check:
    node: str
    name: str
    status: str
    detail: str
    remedy: str = ""


@dataclass
class Observation:
    """Everything gathered from one node."""

    node: Node
    outputs: dict[str, Output] = field(default_factory=dict)
    clock_offset: float | None = None  # node minus this machine, seconds
    clock_uncertainty: float | None = None
    error: str | None = None  # could not reach the node at all


def disk_paths(node: Node, cluster: Cluster) -> dict[str, str]:
    """The node paths whose free space preflight judges (state is small and lives anywhere)."""
    paths = cluster.paths_for(node)
    del paths["state"]
    return paths


def facts_for(node: Node, cluster: Cluster) -> list[Fact]:
    facts = [
        Fact("arch", ("uname", "-m")),
        Fact("os", ("cat", "/etc/os-release")),
        Fact("user", ("id", "-un")),
        Fact("gpu_query", ("nvidia-smi", f"--query-gpu={','.join(GPU_FIELDS)}",
                           "--format=csv,noheader,nounits")),
        # `-q -d COMPUTE` prints the CUDA version in its header; the plain table takes ~5x longer
        # and several at once queue on the driver.
        Fact("cuda", ("nvidia-smi", "-q", "-d", "COMPUTE")),
        Fact("meminfo", ("cat", "/proc/meminfo")),
        Fact.of("disk", DISK, *disk_paths(node, cluster).values()),
        Fact("docker", ("docker", "info", "--format", "{{json .}}")),
    ]
    if cluster.builds_on(node):
        facts += [Fact("git", ("git", "--version")), Fact("git_lfs", ("git", "lfs", "version"))]
    if node.is_head:
        facts.append(Fact("mpirun", ("mpirun", "--version")))
    return facts


def observe(node: Node, target: Target, cluster: Cluster) -> Observation:
    """Gather one node's facts in one command; the clock is read first thing in it."""
    seen = Observation(node)
    before = time.time()
    seen.outputs = gather(target, [Fact("clock", ("date", "+%s.%N")), *facts_for(node, cluster)])
    after = time.time()
    # The node read its clock somewhere between our send and our receive: the midpoint is the
    # estimate and half the round trip bounds its error.
    try:
        seen.clock_offset = float(seen.outputs["clock"].stdout.strip()) - (before + after) / 2
        seen.clock_uncertainty = (after - before) / 2
    except ValueError:
        pass
    return seen


def run(cluster: Cluster, nodes: tuple[Node, ...], workers: int | None = None) -> list[Observation]:
    """Observe ``nodes`` in parallel; an unreachable node becomes an observation with an error."""
    results = fan_out(nodes, lambda node, target: observe(node, target, cluster), workers=workers)
    observations = []
    for outcome in results:
        if outcome.ok:
            observations.append(outcome.value)
        else:
            observations.append(Observation(outcome.node, error=outcome.reason))
    return observations


# --- judging ----------------------------------------------------------------------------------

def evaluate(seen: Observation, cluster: Cluster) -> list[Check]:
    """Every check for one node, from its observation alone."""
    node, want = seen.node, cluster.preflight
    name = node.name

    def check(check_name: str, status: str, detail: str, remedy: str = "") -> Check:
        return Check(name, check_name, status, detail, remedy)

    if seen.error:
        checks = [check("reach", FAIL, seen.error,
                        "fix the connection first; every other check needs it")]
        return checks + [check(other, SKIP, "not reached") for other in _check_names(node, cluster)[1:]]

    out = seen.outputs
    via = "this machine" if node.connection == "local" else f"SSH {node.login}"
    user = out["user"].stdout.strip() if out["user"].ok else "?"
    checks = [check("reach", PASS, f"{via} as {user}")]

    arch = out["arch"].stdout.strip()
    system = parsers.parse_os_release(out["os"].stdout).get("PRETTY_NAME", "") if out["os"].ok else ""
    on = f" ({system})" if system else ""
    if arch == want.arch:
        checks.append(check("arch", PASS, arch + on))
    else:
        checks.append(check("arch", WARN, f"{arch or 'unknown'}{on}, not {want.arch}",
                            f"allowed; a DGX Spark is {want.arch}, so images and wheels built"
                            " here will not run on one"))

    gpus, gpu_failure = _read_gpus(out["gpu_query"])
    checks += _gpu_checks(seen, cluster, gpus, gpu_failure, check)
    checks.append(_memory_check(seen, cluster, gpus, check))
    checks += _disk_checks(seen, cluster, check)
    checks += _docker_checks(seen, cluster, check)
    if cluster.builds_on(node):
        checks += _tool_checks(seen, check)
    if node.is_head:
        checks.append(_mpirun_check(seen, check))
    checks.append(_clock_check(seen, cluster, check))
    return checks


def _check_names(node: Node, cluster: Cluster) -> list[str]:
    """Every check :func:`evaluate` makes for ``node``, in order (to list as skipped)."""
    names = ["reach", "arch", "gpu", "compute", "driver", "cuda", "memory",
             *(f"disk:{role}" for role in disk_paths(node, cluster)), "docker", "nvidia-runtime"]
    if cluster.builds_on(node):
        names += ["git", "git-lfs"]
    if node.is_head:
        names.append("mpirun")
    return names + ["clock"]


_DRIVER_FIX = ("install or update the NVIDIA driver (DGX OS: sudo apt update && sudo apt"
               " dist-upgrade), then reboot")


def _read_gpus(query: Output) -> tuple[list[parsers.Gpu], str | None]:
    """The node's GPUs from the query fact, or why there are none to judge."""
    if query.missing:
        return [], "nvidia-smi not found: no NVIDIA driver"
    if not query.ok:
        reason = (query.stderr or query.stdout).strip().splitlines()
        return [], f"nvidia-smi failed: {reason[-1] if reason else query.exit_code}"
    try:
        return parsers.gpus_from_query(query.stdout, GPU_FIELDS), None
    except ValueError as exc:
        return [], f"cannot read nvidia-smi output: {exc}"


def _gpu_checks(seen: Observation, cluster: Cluster, gpus: list[parsers.Gpu],
                failure: str | None, check) -> list[Check]:
    want, node = cluster.preflight, seen.node
    if failure and not want.require_gpu:
        return [check("gpu", WARN, f"{failure}; allowed: [preflight] require_gpu = false",
                      "a node that serves needs a GPU; this setting is for the testbed")] + [
            check(name, SKIP, "no GPU required") for name in ("compute", "driver", "cuda")]
    if failure:
        return [check("gpu", FAIL, failure, _DRIVER_FIX)] + [
            check(name, SKIP, "no GPU facts") for name in ("compute", "driver", "cuda")]
    cuda_fact = seen.outputs["cuda"]
    checks = []
    names = sorted({gpu.name or "?" for gpu in gpus})
    label = f"{len(gpus)} × {', '.join(names)}" if gpus else "no GPU visible"
    if len(gpus) < node.gpus:
        checks.append(check("gpu", FAIL, f"{label}; hosts.toml says {node.gpus}",
                            "check `nvidia-smi -L`; fix gpus in hosts.toml or the hardware"))
    elif not all(want.gpu_name.lower() in (gpu.name or "").lower() for gpu in gpus):
        checks.append(check("gpu", WARN, f"{label}, not {want.gpu_name}",
                            "allowed; the Spark presets and memory figures assume a GB10"))
    elif len(gpus) > node.gpus:
        checks.append(check("gpu", WARN, f"{label}; hosts.toml says {node.gpus}",
                            "set gpus in hosts.toml to use them all"))
    else:
        checks.append(check("gpu", PASS, label))

    caps = sorted({gpu.compute_capability for gpu in gpus if gpu.compute_capability})
    if not caps:
        checks.append(check("compute", FAIL, "compute capability not reported",
                            "update the driver; nvidia-smi gained compute_cap in 510"))
    elif all(parsers.at_least(cap, want.min_compute_capability) for cap in caps):
        checks.append(check("compute", PASS, ", ".join(caps)))
    else:
        checks.append(check("compute", FAIL, f"{', '.join(caps)} < {want.min_compute_capability}",
                            "TensorRT-LLM needs a newer GPU than this one"))

    driver = next((gpu.driver for gpu in gpus if gpu.driver), None)
    if driver and parsers.at_least(driver, want.min_driver):
        checks.append(check("driver", PASS, driver))
    else:
        checks.append(check("driver", FAIL, f"{driver or 'unknown'} < {want.min_driver}", _DRIVER_FIX))

    cuda = parsers.parse_cuda_version(cuda_fact.stdout) if cuda_fact.ok else None
    if cuda and parsers.at_least(cuda, want.min_cuda):
        checks.append(check("cuda", PASS, f"CUDA {cuda} (driver)"))
    else:
        checks.append(check("cuda", FAIL, f"CUDA {cuda or 'unknown'} < {want.min_cuda}",
                            f"the driver must support CUDA {want.min_cuda} or newer; {_DRIVER_FIX}"))
    return checks


def _memory_check(seen: Observation, cluster: Cluster, gpus: list[parsers.Gpu], check) -> Check:
    want = cluster.preflight
    info = seen.outputs["meminfo"]
    memory = parsers.parse_meminfo(info.stdout) if info.ok else {}
    total, available = memory.get("MemTotal"), memory.get("MemAvailable")
    if total is None or available is None:
        return check("memory", FAIL, "cannot read /proc/meminfo", "is this Linux?")
    unified = (" (unified with the GPU; nvidia-smi reports N/A)"
               if any(gpu.unified_memory for gpu in gpus) else "")
    detail = f"{available / GB:.1f} of {total / GB:.1f} GB available{unified}"
    if available / GB < want.min_memory_available_gb:
        return check("memory", WARN, detail,
                     "stop what holds memory (old containers: docker ps) or drop the page cache:"
                     " sync; echo 3 | sudo tee /proc/sys/vm/drop_caches")
    return check("memory", PASS, detail)


def _disk_checks(seen: Observation, cluster: Cluster, check) -> list[Check]:
    want, node = cluster.preflight, seen.node
    paths = disk_paths(node, cluster)
    disk = seen.outputs["disk"]
    found = {item.path: item for item in parsers.parse_df(disk.stdout)} if disk.stdout else {}
    minimum = {"artifacts": want.min_disk_artifacts_gb, "build": want.min_disk_build_gb,
               "model_cache": 0}
    checks = []
    for role, path in paths.items():
        item = found.get(path)
        if item is None:
            checks.append(check(f"disk:{role}", FAIL, f"cannot measure free space at {path}",
                                (disk.stderr or "check the path in hosts.toml").strip()))
            continue
        free = item.available / GB
        detail = f"{free:.0f} GB free at {path} ({item.mount})"
        if free < minimum[role]:
            checks.append(check(f"disk:{role}", FAIL, f"{detail}; needs {minimum[role]:g} GB",
                                f"free space on {item.mount} or point paths.{role} elsewhere"))
        else:
            checks.append(check(f"disk:{role}", PASS, detail))
    return checks


def _docker_checks(seen: Observation, cluster: Cluster, check) -> list[Check]:
    docker = seen.outputs["docker"]
    user = seen.outputs["user"].stdout.strip() or "$USER"
    problem = parsers.docker_problem(docker.exit_code, docker.stdout, docker.stderr)
    remedies = {
        "missing": ("Docker is not installed", "install Docker Engine (sudo apt-get install -y"
                    " docker.io, or Docker's own packages)"),
        "permission": (f"user {user} may not use Docker", f"sudo usermod -aG docker {user}, then"
                       " log in again"),
        "not-running": ("the Docker engine is not running", "sudo systemctl enable --now docker"),
        "error": ("docker info failed: " + ((docker.stderr or docker.stdout).strip().splitlines()
                                            or ["no output"])[-1], "run `docker info` on the node"),
    }
    if problem:
        detail, remedy = remedies[problem]
        return [check("docker", FAIL, detail, remedy),
                check("nvidia-runtime", SKIP, "no Docker engine to ask")]
    info = parsers.parse_docker_info(docker.stdout)
    checks = [check("docker", PASS, f"engine {info.server_version}")]
    if info.has_nvidia_runtime:
        default = " (default)" if info.default_runtime == "nvidia" else ""
        checks.append(check("nvidia-runtime", PASS, f"registered{default}"))
    else:
        status = FAIL if cluster.preflight.require_nvidia_runtime else WARN
        checks.append(check("nvidia-runtime", status,
                            f"not registered (runtimes: {', '.join(info.runtimes) or 'none'})",
                            "install nvidia-container-toolkit, then: sudo nvidia-ctk runtime"
                            " configure --runtime=docker && sudo systemctl restart docker"))
    return checks


def _tool_checks(seen: Observation, check) -> list[Check]:
    git, lfs = seen.outputs["git"], seen.outputs["git_lfs"]
    checks = []
    if git.ok:
        checks.append(check("git", PASS, parsers.first_version(git.stdout) or git.stdout.strip()))
    else:
        checks.append(check("git", FAIL, "git not found (the source build needs it)",
                            "sudo apt-get install -y git"))
    if lfs.ok:
        checks.append(check("git-lfs", PASS, parsers.first_version(lfs.stdout) or lfs.stdout.strip()))
    else:
        checks.append(check("git-lfs", FAIL, "git-lfs not found (TensorRT-LLM keeps binaries in LFS)",
                            "sudo apt-get install -y git-lfs && git lfs install"))
    return checks


def _mpirun_check(seen: Observation, check) -> Check:
    mpirun = seen.outputs["mpirun"]
    if not mpirun.ok:
        return check("mpirun", FAIL, "mpirun not found on the head (launches start there)",
                     "sudo apt-get install -y openmpi-bin")
    implementation, version = parsers.parse_mpirun_version(mpirun.stdout + mpirun.stderr)
    return check("mpirun", PASS, f"{implementation or 'MPI'} {version or ''}".strip())


def _clock_check(seen: Observation, cluster: Cluster, check) -> Check:
    if seen.clock_offset is None:
        return check("clock", FAIL, "could not read the node's clock", "is `date` available?")
    offset_ms = seen.clock_offset * 1000
    slack_ms = (seen.clock_uncertainty or 0) * 1000
    detail = f"{offset_ms:+.0f} ms (±{slack_ms:.0f})"
    if abs(offset_ms) - slack_ms > cluster.preflight.max_clock_skew_ms:
        return check("clock", FAIL, f"{detail} from this machine",
                     "enable time sync on every node: sudo timedatectl set-ntp true")
    return check("clock", PASS, detail)


THIS_MACHINE = "this machine"


def driver_checks(cluster: Cluster, nodes: tuple[Node, ...], which=shutil.which) -> list[Check]:
    """What the machine running invoke needs for this cluster, and no more.

    It only orchestrates: images are built on the build node and checkpoints downloaded and
    quantized on the head, then sent node to node, so it needs no GPU, no Docker and no disk for
    checkpoints. It needs OpenSSH's client where any node is reached over SSH (pushes stream
    through it). Where it is itself one of the nodes, that node's own checks say the rest."""
    if any(node.connection == "local" for node in nodes):
        return []

    def check(check_name: str, status: str, detail: str, remedy: str = "") -> Check:
        return Check(THIS_MACHINE, check_name, status, detail, remedy)

    checks = [check("role", PASS, "orchestrates only: no GPU, Docker or checkpoint disk needed here "
                    f"(images are built on {cluster.build_node_name}, checkpoints fetched on "
                    f"{cluster.head.name}, both sent node to node)")]
    ssh_nodes = [node.name for node in nodes if node.connection == "ssh"]
    if ssh_nodes:
        if which("ssh"):
            checks.append(check("ssh", PASS, f"OpenSSH client for {len(ssh_nodes)} node(s)"))
        else:
            checks.append(check("ssh", FAIL, "no OpenSSH client (ssh) on this machine; pushes and "
                                "tunnels to the nodes use it", "sudo apt-get install -y openssh-client"))
    return checks


def summarize(checks: list[Check]) -> dict:
    """Counts by status, and whether the whole preflight passed."""
    counts = {status: sum(1 for c in checks if c.status == status) for status in (PASS, WARN, FAIL, SKIP)}
    return {"ok": counts[FAIL] == 0, **counts}


def as_json(cluster: Cluster, checks: list[Check]) -> dict:
    nodes: dict[str, list[dict]] = {node.name: [] for node in cluster.nodes}
    for item in checks:
        nodes.setdefault(item.node, []).append(
            {key: value for key, value in asdict(item).items() if key != "node"})
    return {"cluster": cluster.name, "summary": summarize(checks),
            "nodes": {name: items for name, items in nodes.items() if items}}
