"""Pure readers of what host tools print: nvidia-smi, docker info, /proc/meminfo, df, versions.

Each takes text and returns plain data; none runs anything. They are tested against real
recorded outputs under ``tests/data/`` (GB10's ``[N/A]`` memory fields included).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass

_NOT_AVAILABLE = {"", "n/a", "[n/a]", "not supported", "[not supported]", "unknown error",
                  "[unknown error]"}


def _value(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return None if text.lower() in _NOT_AVAILABLE else text


def version_tuple(text: str) -> tuple[int, ...]:
    """``"580.95.05"`` → ``(580, 95, 5)``; anything after the numbers is ignored."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def at_least(have: str, want: str) -> bool:
    """Whether version ``have`` is ``want`` or newer (missing parts count as 0)."""
    a, b = version_tuple(have), version_tuple(want)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


# --- nvidia-smi -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    index: int | None
    name: str | None
    compute_capability: str | None
    driver: str | None
    memory_total_mib: int | None

    @property
    def unified_memory(self) -> bool:
        """No memory of its own reported: GB10 and other unified-memory parts read ``[N/A]``."""
        return self.memory_total_mib is None


def parse_gpu_query(text: str, fields: list[str] | None = None) -> list[dict[str, str | None]]:
    """Rows of ``nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]``.

    With a header line the field names come from it (units such as ``[MiB]`` removed); without,
    pass ``fields``. Values that read ``[N/A]`` or ``[Not Supported]`` become ``None``.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if fields is None:
        if not lines:
            return []
        fields = [re.sub(r"\s*\[.*?\]\s*$", "", name.strip()) for name in lines[0].split(",")]
        lines = lines[1:]
    rows = []
    for record in csv.reader(io.StringIO("\n".join(lines)), skipinitialspace=True):
        if len(record) != len(fields):
            raise ValueError(f"expected {len(fields)} fields, got {len(record)}: {record!r}")
        rows.append({field: _value(value) for field, value in zip(fields, record, strict=True)})
    return rows


def _mib(text: str | None) -> int | None:
    if text is None:
        return None
    match = re.match(r"(\d+(?:\.\d+)?)\s*(MiB|GiB)?", text)
    if not match:
        return None
    number = float(match.group(1))
    return int(number * 1024) if match.group(2) == "GiB" else int(number)


def gpus_from_query(text: str, fields: list[str] | None = None) -> list[Gpu]:
    gpus = []
    for row in parse_gpu_query(text, fields):
        index = row.get("index")
        gpus.append(Gpu(
            index=int(index) if index is not None else None,
            name=row.get("name") or row.get("gpu_name"),
            compute_capability=row.get("compute_cap"),
            driver=row.get("driver_version"),
            memory_total_mib=_mib(row.get("memory.total")),
        ))
    return gpus


def parse_cuda_version(text: str) -> str | None:
    """The CUDA version the driver supports, from ``nvidia-smi -q`` (``CUDA Version : 13.0``) or
    from the plain ``nvidia-smi`` table's header (``CUDA Version: 13.0``)."""
    match = re.search(r"CUDA Version\s*:\s*([\d.]+)", text)
    return match.group(1) if match else None


# --- memory and disks -------------------------------------------------------------------------

def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` in bytes (``HugePages_*`` counts are kept as counts)."""
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+(?:\(\w+\))?):\s+(\d+)(?:\s+(kB))?", line)
        if match:
            number = int(match.group(2))
            values[match.group(1)] = number * 1024 if match.group(3) else number
    return values


@dataclass(frozen=True)
class Disk:
    path: str
    device: str
    size: int
    available: int
    mount: str


def parse_df(text: str) -> list[Disk]:
    """Lines of ``<path>\\t<df -PB1 data line>``, as the disk fact prints them."""
    disks = []
    for line in text.splitlines():
        if "\t" not in line:
            continue
        path, data = line.split("\t", 1)
        fields = data.split()
        if len(fields) < 6 or not fields[1].isdigit():
            continue
        disks.append(Disk(path=path, device=fields[0], size=int(fields[1]),
                          available=int(fields[3]), mount=" ".join(fields[5:])))
    return disks


# --- docker -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DockerInfo:
    server_version: str | None
    runtimes: tuple[str, ...]
    default_runtime: str | None
    architecture: str | None
    server_errors: tuple[str, ...]

    @property
    def has_nvidia_runtime(self) -> bool:
        return "nvidia" in self.runtimes


def parse_docker_info(text: str) -> DockerInfo:
    """``docker info --format '{{json .}}'``; a client that reached no engine leaves ID empty."""
    data = json.loads(text)
    errors = tuple(data.get("ServerErrors") or ())
    return DockerInfo(
        server_version=data.get("ServerVersion") or None,
        runtimes=tuple(sorted((data.get("Runtimes") or {}).keys())),
        default_runtime=data.get("DefaultRuntime") or None,
        architecture=data.get("Architecture") or None,
        server_errors=errors,
    )


def docker_problem(exit_code: int, stdout: str, stderr: str) -> str | None:
    """Why ``docker info`` did not describe an engine: ``missing``, ``permission``,
    ``not-running`` or ``error``; ``None`` when it did."""
    if exit_code == 127:
        return "missing"
    text = f"{stdout}\n{stderr}".lower()
    if "permission denied" in text:
        return "permission"
    if "cannot connect to the docker daemon" in text or "is the docker daemon running" in text:
        return "not-running"
    if exit_code != 0:
        return "error"
    try:
        info = parse_docker_info(stdout)
    except (ValueError, AttributeError):
        return "error"
    return None if info.server_version else "error"


# --- versions of tools ------------------------------------------------------------------------

def first_version(text: str) -> str | None:
    """The first dotted version number in a tool's ``--version`` text."""
    match = re.search(r"(\d+\.\d+(?:\.\d+)*)", text)
    return match.group(1) if match else None


def parse_mpirun_version(text: str) -> tuple[str | None, str | None]:
    """(implementation, version) from ``mpirun --version``."""
    match = re.search(r"\((Open MPI|OpenRTE|PRRTE)\)\s+(\S+)", text)
    if match:
        return "Open MPI", match.group(2)
    if "HYDRA" in text or "MPICH" in text.upper():
        version = re.search(r"Version:\s+(\S+)", text)
        return "MPICH", version.group(1) if version else None
    return None, first_version(text)


def parse_os_release(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip().strip('"')
    return values
