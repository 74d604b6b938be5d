#!/usr/bin/env python3
"""The per-rank probe of ``invoke cluster.check``: what each rank of an MPI job sees of its node.

Run by ``mpirun`` (``mpirun -np 2 python3 probe.py``), in the runtime containers or on a plain
host. Standard library and mpi4py only; pynvml, torch and cupy are used where they import, else
``nvidia-smi`` is read. Every rank reports its host, GPUs, driver, TensorRT-LLM, image, artifact
manifest hash, communication environment and interface state; rank 0 gathers them and prints one
line: ``TRTLLM-DEPLOY-PROBE <json>`` (a marker, so mpirun's --tag-output prefix does no harm).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys

MARKER = "TRTLLM-DEPLOY-PROBE "
CHUNK = 200  # characters of the report per output line
# The variables that pin NCCL, UCX, OpenMPI and Gloo to a node's fabric, and the rest (docs/SOURCES.md).
COMM_ENV = ("NCCL_SOCKET_IFNAME", "UCX_NET_DEVICES", "OMPI_MCA_btl_tcp_if_include",
            "OMPI_MCA_oob_tcp_if_include", "GLOO_SOCKET_IFNAME", "NCCL_IB_HCA", "TP_SOCKET_IFNAME",
            "CPATH", "TRITON_PTXAS_PATH", "NCCL_CUMEM_ENABLE", "CUDA_VISIBLE_DEVICES")
# The runtime's own per-node variables, named by the launcher (comma-separated).
NODE_VARS_ENV = "TRTLLM_DEPLOY_NODE_VARS"
# What the launcher tells the probe about the image it runs in (docker inspect on the node).
IMAGE_ENV = "TRTLLM_DEPLOY_IMAGE_ID"
IMAGE_REF_ENV = "TRTLLM_DEPLOY_IMAGE"
IMAGE_VERSION_ENV = "TRTLLM_DEPLOY_IMAGE_VERSION"
IMAGE_REVISION_ENV = "TRTLLM_DEPLOY_IMAGE_REVISION"
TIMEOUT_S = 60


def _run(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


# --- GPUs: NVML, nvidia-smi, torch, cupy, in that order ---------------------------------------

def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpus_from_nvml() -> dict | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: let the next source say so
        return None
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            devices.append({"index": index, "name": _text(pynvml.nvmlDeviceGetName(handle)),
                            "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
                            "compute_capability": f"{major}.{minor}"})
        return {"source": "nvml", "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
                "devices": devices}
    finally:
        pynvml.nvmlShutdown()


def parse_nvidia_smi(text: str) -> list[dict]:
    """Rows of ``--query-gpu=index,name,uuid,compute_cap,driver_version --format=csv,noheader``."""
    devices = []
    for line in text.strip().splitlines():
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) < 5:
            continue
        devices.append({"index": int(cells[0]) if cells[0].isdigit() else cells[0], "name": cells[1],
                        "uuid": cells[2], "compute_capability": cells[3], "driver": cells[4]})
    return devices


def gpus_from_nvidia_smi() -> dict | None:
    out = _run(["nvidia-smi", "--query-gpu=index,name,uuid,compute_cap,driver_version",
                "--format=csv,noheader"])
    if out is None:
        return None
    devices = parse_nvidia_smi(out)
    driver = devices[0].pop("driver") if devices else None
    for device in devices[1:]:
        device.pop("driver", None)
    return {"source": "nvidia-smi", "driver": driver, "devices": devices}


def _driver_from_smi() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.split()[0] if out and out.split() else None


def gpus_from_torch() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    devices = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        devices.append({"index": index, "name": torch.cuda.get_device_name(index),
                        "compute_capability": f"{major}.{minor}"})
    return {"source": "torch", "driver": _driver_from_smi(), "devices": devices}


def gpus_from_cupy() -> dict | None:
    try:
        import cupy
    except ImportError:
        return None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - cupy without a usable driver
        return None
    devices = []
    for index in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(index)
        devices.append({"index": index, "name": _text(props["name"]),
                        "compute_capability": f"{props['major']}.{props['minor']}"})
    return {"source": "cupy", "driver": _driver_from_smi(), "devices": devices}


def gpus() -> dict:
    for source in (gpus_from_nvml, gpus_from_nvidia_smi, gpus_from_torch, gpus_from_cupy):
        found = source()
        if found is not None:
            return found
    return {"source": "none", "driver": None, "devices": []}


# --- TensorRT-LLM ------------------------------------------------------------------------------

def runtime() -> dict:
    """The TensorRT-LLM this rank would serve with: the installed package, else the image's word."""
    version = None
    source = "none"
    try:
        from importlib import metadata

        version = metadata.version("tensorrt_llm")
        source = "package"
    except Exception:  # noqa: BLE001 - not installed (PackageNotFoundError) or a broken install
        pass
    # Not `import tensorrt_llm`: that initialises CUDA and MPI in every rank and takes seconds; the
    # package metadata has the version, and the image (its environment or labels) the commit.
    commit = os.environ.get("TRT_LLM_GIT_COMMIT") or os.environ.get(IMAGE_REVISION_ENV)
    if version is None and os.environ.get("TRT_LLM_VERSION"):
        version, source = os.environ["TRT_LLM_VERSION"], "env"
    if version is None and os.environ.get(IMAGE_VERSION_ENV):
        version, source = os.environ[IMAGE_VERSION_ENV], "image label"
    said = None
    if version is None:
        # The stand-in (and a real install without package metadata) says what it is here.
        said = (_run(["trtllm-serve", "--version"]) or "").strip() or None
        if said:
            match = re.search(r"(\d+\.\d+[\w.+-]*)", said)
            version, source = (match.group(1) if match else said), "trtllm-serve --version"
    return {"version": version, "commit": commit, "source": source,
            "standin": bool(said and "stand-in" in said), "says": said}


# --- the node's fabric -------------------------------------------------------------------------

def configured_interfaces(env: dict[str, str]) -> list[str]:
    """Interface names the communication variables name (not subnets, not exclusions)."""
    names: list[str] = []
    for key in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "OMPI_MCA_btl_tcp_if_include",
                "OMPI_MCA_oob_tcp_if_include", "UCX_NET_DEVICES"):
        value = env.get(key) or ""
        if value.startswith("^"):
            continue  # NCCL's "all but these": the prefix applies to the whole list
        for word in value.split(","):
            word = word.strip().lstrip("=")
            if key == "UCX_NET_DEVICES" and ":" in word:
                continue  # an RDMA device and port (roceP2p1s0f1:1), not a network interface
            if word and "/" not in word and word != "all" \
                    and word not in names:
                names.append(word)
    return names


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:  # speed of a link that is down or virtual reads EINVAL
        return None


def _ipv4(name: str) -> list[str]:
    out = _run(["ip", "-j", "-4", "addr", "show", "dev", name])
    if out:
        try:
            return [f"{a['local']}/{a['prefixlen']}" for entry in json.loads(out)
                    for a in entry.get("addr_info", [])]
        except (ValueError, KeyError):
            pass
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), 0x8915,  # SIOCGIFADDR: the primary address
                                 struct.pack("256s", name.encode()[:15]))
        except OSError:
            return []
    return [socket.inet_ntoa(packed[20:24])]


def _ipv6(name: str, table: str = "/proc/net/if_inet6") -> list[str]:
    """The interface's IPv6 addresses with their prefix lengths, from the kernel's table (an IPv6
    fabric or management link has no IPv4 address to report); link-local ones (scope 20), which
    every IPv6 link has and nothing can reach without naming the link, are left out."""
    try:
        with open(table) as rows:
            found = [row.split() for row in rows]
    except OSError:
        return []
    return [f"{socket.inet_ntop(socket.AF_INET6, bytes.fromhex(row[0]))}/{int(row[2], 16)}"
            for row in found if len(row) == 6 and row[5] == name and row[3] != "20"]


def interface(name: str) -> dict:
    base = f"/sys/class/net/{name}"
    if not os.path.isdir(base):
        return {"name": name, "exists": False}
    speed = _read(f"{base}/speed")
    mtu = _read(f"{base}/mtu")
    return {"name": name, "exists": True, "operstate": _read(f"{base}/operstate"),
            "mtu": int(mtu) if mtu and mtu.isdigit() else None,
            "speed_mbps": int(speed) if speed and speed.lstrip("-").isdigit() and int(speed) > 0
            else None, "ipv4": _ipv4(name), "ipv6": _ipv6(name)}


# --- one rank, then all -------------------------------------------------------------------------

def manifest_hash(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            return "sha256:" + hashlib.sha256(handle.read()).hexdigest()
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def report(rank: int, size: int, manifest: str | None) -> dict:
    names = [*COMM_ENV, *filter(None, os.environ.get(NODE_VARS_ENV, "").split(","))]
    env = {key: os.environ[key] for key in names if key in os.environ}
    found = gpus()
    devices = found["devices"]
    return {
        "rank": rank, "size": size, "host": socket.gethostname(), "pid": os.getpid(),
        "node": os.environ.get("TRTLLM_DEPLOY_NODE"),  # the inventory's name, set by the launcher
        "gpu": {"source": found["source"], "count": len(devices),
                "names": sorted({d["name"] for d in devices}),
                "compute_capability": sorted({d["compute_capability"] for d in devices}),
                "devices": devices},
        "driver": found["driver"],
        "runtime": runtime(),
        "image": {"id": os.environ.get(IMAGE_ENV), "ref": os.environ.get(IMAGE_REF_ENV)},
        "manifest": {"path": manifest, "sha256": manifest_hash(manifest)},
        "env": env,
        "interfaces": [interface(name) for name in configured_interfaces(env)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", help="the artifact's manifest file, hashed on every rank")
    parser.add_argument("--out", help="rank 0 also writes the gathered JSON to this file")
    args = parser.parse_args(argv)
    try:
        from mpi4py import MPI
    except ImportError:
        if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
            print(f"probe: mpi4py is not importable by {sys.executable}; install it, or run the"
                  " probe with a python that has it", file=sys.stderr)
            return 3
        MPI = None
    comm = MPI.COMM_WORLD if MPI else None
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm else (0, 1)
    mine = report(rank, size, args.manifest)
    ranks = comm.gather(mine, root=0) if comm else [mine]
    if rank == 0:
        gathered = {"size": size, "ranks": ranks}
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(gathered, handle, indent=2)
        # In short numbered lines: mpirun forwards a long line in pieces and tags every piece
        # ("[1,0]<stdout>:"), which would land inside the JSON.
        text = json.dumps(gathered, sort_keys=True)
        pieces = [text[at:at + CHUNK] for at in range(0, len(text), CHUNK)] or [""]
        for index, piece in enumerate(pieces):
            sys.stdout.write(f"{MARKER}{index}/{len(pieces)} {piece}\n")
        sys.stdout.flush()
    return 0


def parse_output(text: str) -> dict:
    """The gathered report from the probe's standard output (with or without mpirun's tags)."""
    pieces: dict[int, str] = {}
    total = None
    for line in text.splitlines():
        at = line.find(MARKER)
        if at < 0:
            continue
        head, _, piece = line[at + len(MARKER):].partition(" ")
        index, _, count = head.partition("/")
        if index.isdigit() and count.isdigit():
            pieces[int(index)], total = piece, int(count)
    if total is None or sorted(pieces) != list(range(total)):
        raise ValueError("the probe printed no (whole) report")
    return json.loads("".join(pieces[index] for index in range(total)))


if __name__ == "__main__":
    sys.exit(main())
