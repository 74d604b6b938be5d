"""NCCL bus bandwidth across MPI ranks, one GPU per rank, where nccl-tests is not installed.

Standalone (only mpi4py plus PyTorch or CuPy): ``mpirun -np 2 python3 nccl_bench.py --op all_reduce
--sizes 16M,1G``. It reports what nccl-tests reports, computed the same way: the time is the mean of
``--iters`` back-to-back collectives after ``--warmup``; algbw = size / time; bus bandwidth is
algbw × 2(n−1)/n for all-reduce and algbw × (n−1)/n for all-gather, where an all-gather's size is
the whole gathered buffer (each rank contributes size/n), as in nccl-tests. Rank 0 prints one short
line per measurement (mpirun splits long lines), starting with ``nccl_bench:``.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import time

PREFIX = "nccl_bench:"
OPS = ("all_reduce", "all_gather")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_ELEMENT = 4  # float32, as nccl-tests' default


def parse_size(text: str) -> int:
    """``16G`` / ``512M`` / ``4096`` → bytes (binary units, as nccl-tests' -b/-e)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", text.upper())
    if not match:
        raise ValueError(f"size {text!r}: expected a number with an optional K, M or G")
    return int(match.group(1)) * _UNITS[match.group(2)]


def bus_factor(op: str, ranks: int) -> float:
    """nccl-tests' factor from algorithm bandwidth to bus bandwidth."""
    if op == "all_reduce":
        return 2 * (ranks - 1) / ranks
    if op == "all_gather":
        return (ranks - 1) / ranks
    raise ValueError(f"unknown op {op!r}")


def bandwidth(op: str, size: int, ranks: int, seconds: float) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (10^9 bytes, as nccl-tests) for one collective of ``size`` bytes."""
    algbw = size / seconds / 1e9
    return algbw, algbw * bus_factor(op, ranks)


def _local_rank(rank: int) -> int:
    for name in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return rank


class TorchNccl:
    """PyTorch's NCCL process group, rendezvous through MPI (rank 0's address and a free port)."""

    name = "torch"

    def __init__(self, comm, device: int):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        torch.cuda.set_device(device)
        self.device = torch.device("cuda", device)
        meeting = rendezvous(os.environ.get("MASTER_ADDR") or _own_address()) if comm.rank == 0 else None
        dist.init_process_group("nccl", init_method=comm.bcast(meeting, root=0), rank=comm.rank,
                                world_size=comm.size, device_id=self.device)
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        self.version = f"torch {torch.__version__}, NCCL {nccl}"

    def buffers(self, op: str, count: int, ranks: int):
        empty = self.torch.empty
        if op == "all_reduce":
            send = self.torch.ones(count, dtype=self.torch.float32, device=self.device)
            return send, send
        send = self.torch.ones(count // ranks, dtype=self.torch.float32, device=self.device)
        return send, empty(count // ranks * ranks, dtype=self.torch.float32, device=self.device)

    def collective(self, op: str, send, recv) -> None:
        if op == "all_reduce":
            self.dist.all_reduce(send)
        else:
            self.dist.all_gather_into_tensor(recv, send)

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def check(self, op: str, send, recv, ranks: int, done: int) -> bool:
        if op == "all_reduce":  # ones, reduced ``done`` times in place: ranks ** done
            return bool(self.torch.all(send == float(ranks) ** done).item())
        return bool(self.torch.all(recv == 1.0).item())

    def close(self) -> None:
        self.dist.destroy_process_group()


class CupyNccl:
    """CuPy's NCCL communicator, its unique id passed through MPI."""

    name = "cupy"

    def __init__(self, comm, device: int):
        import cupy
        from cupy.cuda import nccl

        self.cupy, self.nccl = cupy, nccl
        cupy.cuda.Device(device).use()
        uid = nccl.get_unique_id() if comm.rank == 0 else None
        uid = comm.bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        self.version = f"cupy {cupy.__version__}, NCCL {nccl.get_version()}"

    def buffers(self, op: str, count: int, ranks: int):
        cupy = self.cupy
        if op == "all_reduce":
            send = cupy.ones(count, dtype=cupy.float32)
            return send, send
        return (cupy.ones(count // ranks, dtype=cupy.float32),
                cupy.empty(count // ranks * ranks, dtype=cupy.float32))

    def collective(self, op: str, send, recv) -> None:
        stream = self.cupy.cuda.get_current_stream().ptr
        if op == "all_reduce":
            self.comm.allReduce(send.data.ptr, send.data.ptr, send.size, self.nccl.NCCL_FLOAT32,
                                self.nccl.NCCL_SUM, stream)
        else:
            self.comm.allGather(send.data.ptr, recv.data.ptr, send.size, self.nccl.NCCL_FLOAT32, stream)

    def synchronize(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()

    def check(self, op: str, send, recv, ranks: int, done: int) -> bool:
        if op == "all_reduce":
            return bool(self.cupy.all(send == float(ranks) ** done))
        return bool(self.cupy.all(recv == 1.0))

    def close(self) -> None:
        self.comm.destroy()


def _own_address() -> str:
    """This host's address as its name resolves, IPv4 or IPv6 (an IPv6-only fabric has no IPv4)."""
    try:
        return socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError):
        return "127.0.0.1"


def rendezvous(host: str) -> str:
    """PyTorch's ``tcp://`` meeting point on ``host`` at a port free there, found in the address's
    own family; an IPv6 literal in brackets (RFC 3986), as the URL's parser needs it."""
    family, _, _, _, where = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(where)
        port = probe.getsockname()[1]
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _backend(name: str, comm, device: int):
    errors = []
    for kind in (TorchNccl, CupyNccl):
        if name not in ("auto", kind.name):
            continue
        try:
            return kind(comm, device)
        except ImportError as exc:
            errors.append(f"{kind.name}: {exc}")
    raise SystemExit(f"{PREFIX} error no NCCL binding: install PyTorch or CuPy ({'; '.join(errors)})")


def measure(nccl, op: str, size: int, ranks: int, warmup: int, iters: int) -> dict:
    """One size: warm-up, then ``iters`` collectives timed together; the result checked."""
    count = max(ranks, size // _ELEMENT // ranks * ranks)
    size = count * _ELEMENT
    send, recv = nccl.buffers(op, count, ranks)
    if op == "all_reduce":
        # Summing ones in place grows as ranks ** calls: check one call, then time on whatever is there.
        nccl.collective(op, send, recv)
        nccl.synchronize()
        correct = nccl.check(op, send, recv, ranks, 1)
    for _ in range(warmup):
        nccl.collective(op, send, recv)
    nccl.synchronize()
    started = time.perf_counter()
    for _ in range(iters):
        nccl.collective(op, send, recv)
    nccl.synchronize()
    seconds = (time.perf_counter() - started) / iters
    if op == "all_gather":
        correct = nccl.check(op, send, recv, ranks, 0)
    del send, recv
    algbw, busbw = bandwidth(op, size, ranks, seconds)
    return {"op": op, "size": size, "ranks": ranks, "time_us": seconds * 1e6, "algbw": algbw,
            "busbw": busbw, "correct": correct}


def line(result: dict) -> str:
    return (f"{PREFIX} op={result['op']} size={result['size']} ranks={result['ranks']} "
            f"time_us={result['time_us']:.1f} algbw={result['algbw']:.3f} busbw={result['busbw']:.3f} "
            f"correct={'yes' if result['correct'] else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=(*OPS, "both"), default="both")
    parser.add_argument("--sizes", default="16M,256M,1G", help="comma-separated sizes (K/M/G)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--backend", choices=("auto", "torch", "cupy"), default="auto")
    args = parser.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast can wedge shared GPUs

    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise SystemExit(f"{PREFIX} error mpi4py is not installed ({exc}): pip install mpi4py") from None

    comm = MPI.COMM_WORLD
    local = _local_rank(comm.rank)
    nccl = _backend(args.backend, comm, local)
    sizes = [parse_size(text) for text in args.sizes.split(",") if text.strip()]
    ops = OPS if args.op == "both" else (args.op,)
    if comm.rank == 0:
        print(f"{PREFIX} backend={nccl.name} ranks={comm.size} version={nccl.version.replace(' ', '_')}",
              flush=True)
    comm.Barrier()
    failed = False
    for op in ops:
        for size in sizes:
            result = measure(nccl, op, size, comm.size, args.warmup, args.iters)
            everyone = comm.gather(result["correct"], root=0)
            if comm.rank == 0:
                result["correct"] = all(everyone)
                failed |= not result["correct"]
                print(line(result), flush=True)
    nccl.close()
    failed = comm.bcast(failed, root=0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
