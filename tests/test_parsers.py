"""The readers of tool output, against real recorded outputs (tests/data/*/SOURCES.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trtllm_deploy.hosts import parsers

DATA = Path(__file__).parent / "data"


def recorded(name: str) -> str:
    return (DATA / name).read_text()


@pytest.mark.parametrize("name,cuda", [
    ("gb10-580.95.05.txt", "13.0"),
    ("gb10-580.126.09.txt", "13.0"),
    ("h200-580.159.04.txt", "13.0"),
    ("h200x2-580.159.04.txt", "13.0"),
    ("h100-q-d-compute-580.159.04.txt", "13.0"),
], ids=["gb10-table-580.95", "gb10-table-580.126", "h200-table", "h200x2-table", "h100-q"])
def test_cuda_version_from_either_layout(name, cuda):
    assert parsers.parse_cuda_version(recorded(f"nvidia-smi/{name}")) == cuda


def test_no_cuda_version_in_unrelated_text():
    assert parsers.parse_cuda_version("NVIDIA-SMI has failed because it couldn't communicate") is None


def test_gb10_query_with_header_reads_na_memory_as_unknown():
    (gpu,) = parsers.gpus_from_query(recorded("nvidia-smi/gb10-query-index-name-memory.csv"))
    assert gpu.index == 0 and gpu.name == "NVIDIA GB10"
    assert gpu.memory_total_mib is None and gpu.unified_memory


def test_gb10_query_without_header():
    (gpu,) = parsers.gpus_from_query(
        recorded("nvidia-smi/gb10-query-name-compute_cap.noheader.csv"), ["name", "compute_cap"])
    assert (gpu.name, gpu.compute_capability) == ("NVIDIA GB10", "12.1")


def test_gb10_memory_fields_all_na():
    (row,) = parsers.parse_gpu_query(
        recorded("nvidia-smi/gb10-query-memory.used-memory.total-utilization.memory.noheader.csv"),
        ["memory.used", "memory.total", "utilization.memory"])
    assert row == {"memory.used": None, "memory.total": None, "utilization.memory": "0"}


def test_h200_query():
    path = next((DATA / "nvidia-smi").glob("h200-query-*.csv"))
    fields = "index,name,uuid,compute_cap,driver_version,memory.total,memory.used,memory.free"
    (gpu,) = parsers.gpus_from_query(path.read_text(), fields.split(","))
    assert (gpu.name, gpu.compute_capability, gpu.driver, gpu.memory_total_mib) == (
        "NVIDIA H200", "9.0", "580.159.04", 143771)
    assert not gpu.unified_memory


def test_two_gpu_query_as_preflight_sends_it():
    (path,) = (DATA / "nvidia-smi").glob("h200x2-query-*.csv")
    gpus = parsers.gpus_from_query(path.read_text(),
                                   ["index", "name", "compute_cap", "driver_version", "memory.total"])
    assert [gpu.index for gpu in gpus] == [0, 1]
    assert all(gpu.name == "NVIDIA H200" and gpu.compute_capability == "9.0" for gpu in gpus)


def test_query_field_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="expected 2 fields"):
        parsers.parse_gpu_query("a, b, c\n", ["x", "y"])


@pytest.mark.parametrize("have,want,ok", [
    ("13.0", "13.0", True), ("12.9", "13.0", False), ("13", "13.0", True),
    ("580.95.05", "580.0", True), ("575.57.08", "580", False), ("12.1", "8.0", True),
    ("10.0", "9.0", True), ("9.0", "12.1", False),
])
def test_version_comparison(have, want, ok):
    assert parsers.at_least(have, want) is ok


def test_meminfo_in_bytes():
    values = parsers.parse_meminfo("MemTotal:       131981020 kB\nMemAvailable:   131486188 kB\n"
                                   "HugePages_Total:       0\n")
    assert values["MemTotal"] == 131981020 * 1024
    assert values["HugePages_Total"] == 0


def test_df_lines():
    text = ("~/trtllm-deploy/engines\t/dev/vda 269490393088 23000000000 85000000000 22% /\n"
            "/data/hf\t/dev/nvme0n1p2 3936818806784 100 3700000000000 1% /data store\n")
    first, second = parsers.parse_df(text)
    assert (first.path, first.available, first.mount) == ("~/trtllm-deploy/engines", 85000000000, "/")
    assert second.mount == "/data store"


@pytest.mark.parametrize("stem,exit_code,problem", [
    ("no-permission", 1, "permission"),
    ("no-daemon", 1, "not-running"),
])
def test_docker_failures_are_told_apart(stem, exit_code, problem):
    stdout = recorded(f"docker/{stem}.stdout")
    stderr = recorded(f"docker/{stem}.stderr")
    assert parsers.docker_problem(exit_code, stdout, stderr) == problem


def test_docker_missing_binary():
    assert parsers.docker_problem(127, "", "sh: docker: not found") == "missing"


@pytest.mark.parametrize("name,has_nvidia", [
    ("debian12-docker.io.json", False), ("nvidia-runtime-registered.json", True)])
def test_docker_info(name, has_nvidia):
    text = recorded(f"docker/{name}")
    assert parsers.docker_problem(0, text, "") is None
    info = parsers.parse_docker_info(text)
    assert info.server_version == "20.10.24+dfsg1"
    assert info.has_nvidia_runtime is has_nvidia
    assert "runc" in info.runtimes


@pytest.mark.parametrize("text,expected", [
    ("mpirun (Open MPI) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/\n",
     ("Open MPI", "4.1.4")),
    ("mpirun (Open MPI) 5.0.3\n", ("Open MPI", "5.0.3")),
    ("HYDRA build details:\n    Version:                                 4.0.2\n", ("MPICH", "4.0.2")),
])
def test_mpirun_version(text, expected):
    assert parsers.parse_mpirun_version(text) == expected


def test_tool_versions():
    assert parsers.first_version("git version 2.39.5") == "2.39.5"
    assert parsers.first_version("git-lfs/3.3.0 (GitHub; linux amd64; go 1.19.8)") == "3.3.0"
    assert parsers.parse_os_release('ID=ubuntu\nVERSION_ID="24.04"\n')["VERSION_ID"] == "24.04"
