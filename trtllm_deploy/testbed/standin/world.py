"""The ranks that serve together: one MPI world under mpirun, or one process standing in for all.

Only one thread per process talks MPI. Every collective is non-blocking and polled with short
sleeps: OpenMPI busy-polls inside blocking calls, and test machines run more ranks than cores.
"""

from __future__ import annotations

import json
import os
import threading
import time
from array import array

# Environment set by the launcher for every rank (OpenMPI first, then PMI-based launchers).
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
STOP_GRACE_S = 2.0  # after a stop request, how long a pending collective may still complete


class Stopped(Exception):
    """A stop was requested and the pending collective did not complete within the grace period."""


def launched_size() -> int | None:
    """The world size the launcher announced, or None when not started by mpirun (or alike)."""
    for name in SIZE_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def launched_rank() -> int:
    for name in RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


class LocalWorld:
    """One process that computes the share of every one of ``ranks`` ranks itself."""

    rank = 0
    size = 1

    def __init__(self, ranks: int) -> None:
        self.hosted_ranks = range(ranks)
        self.stop = threading.Event()

    def bcast_json(self, value=None):
        return value

    def bcast_ints(self, values: array | None, count: int) -> array:
        return values

    def allreduce_sum(self, values: array) -> array:
        return values

    def barrier(self) -> None:
        pass

    def finalize(self) -> None:
        pass


class MPIWorld:
    """MPI.COMM_WORLD; raises Stopped once a stop was requested and a collective cannot finish."""

    def __init__(self) -> None:
        import mpi4py

        # One thread (the main one) talks MPI; finalizing at exit could hang on a collective that a
        # dead or stuck peer never completes, so only a clean shutdown finalizes (finalize()).
        mpi4py.rc.thread_level = "funneled"
        mpi4py.rc.finalize = False
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.hosted_ranks = range(self.rank, self.rank + 1)
        self.stop = threading.Event()
        self._stop_seen: float | None = None

    def _wait(self, request) -> None:
        started = time.monotonic()
        while not request.Test():
            now = time.monotonic()
            if self.stop.is_set():
                self._stop_seen = self._stop_seen or now
                if now - self._stop_seen > STOP_GRACE_S:
                    raise Stopped()
            # 1 ms while a step is likely under way, 10 ms once the world has been idle a while.
            time.sleep(0.001 if now - started < 0.5 else 0.01)

    def bcast_json(self, value=None):
        """Rank 0's ``value`` on every rank (a JSON-able object)."""
        data = json.dumps(value).encode() if self.rank == 0 else b""
        length = array("q", [len(data)])
        self._wait(self.comm.Ibcast([length, self._mpi.LONG_LONG], root=0))
        buffer = bytearray(data) if self.rank == 0 else bytearray(length[0])
        self._wait(self.comm.Ibcast([buffer, self._mpi.BYTE], root=0))
        return json.loads(buffer.decode())

    def bcast_ints(self, values: array | None, count: int) -> array:
        buffer = values if self.rank == 0 else array("q", bytes(8 * count))
        self._wait(self.comm.Ibcast([buffer, self._mpi.LONG_LONG], root=0))
        return buffer

    def allreduce_sum(self, values: array) -> array:
        total = array("q", bytes(8 * len(values)))
        self._wait(self.comm.Iallreduce([values, self._mpi.LONG_LONG], [total, self._mpi.LONG_LONG],
                                        op=self._mpi.SUM))
        return total

    def barrier(self) -> None:
        self._wait(self.comm.Ibarrier())

    def finalize(self) -> None:
        self._mpi.Finalize()
