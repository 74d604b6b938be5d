"""The generation loop: in-flight batching where every step is one collective over all ranks.

Rank 0 runs :class:`Engine` in its main thread; HTTP threads hand it :class:`Generation` objects
through a queue. Each step rank 0 broadcasts which requests take part, every rank adds its partial
"logit" for each of them, and an allreduce sums those into the next token of every request. Other
ranks run :func:`follow`.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import queue
import threading
import time
from array import array
from dataclasses import dataclass, field

from . import faults
from .faults import Fault
from .log import Log

VOCABULARY = (
    "stand", "in", "test", "double", "not", "inference", "token", "rank", "step", "node", "link",
    "cluster", "spark", "model", "shard", "weight", "cache", "batch", "queue", "port", "route",
    "probe", "health", "ready", "serve", "reply", "stream", "chunk", "line", "log", "check",
    "plan", "apply", "deploy", "roll", "back", "green", "amber", "quiet", "steady", "simple",
    "plain", "known", "fixed", "same", "again", "every", "each", "one", "two", "three", "four",
    "north", "south", "east", "west", "river", "stone", "maple", "cedar", "harbor", "lantern",
    "signal", "echo",
)
STEP, SHUTDOWN = 1, 2
HEADER = 3  # command, tokens generated so far, requests in this step


def prompt_seed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")


def partial_logit(seed: int, position: int, rank: int) -> int:
    """One rank's share of a token; 40 bits, so a sum over thousands of ranks fits in int64."""
    digest = hashlib.blake2b(f"{seed}:{position}:{rank}".encode(), digest_size=5).digest()
    return int.from_bytes(digest, "big")


def word(total: int) -> str:
    return VOCABULARY[total % len(VOCABULARY)]


def expected_words(prompt: str, count: int, ranks: int) -> list[str]:
    """The words a world of ``ranks`` ranks generates for ``prompt`` (what tests compare against)."""
    seed = prompt_seed(prompt)
    return [word(sum(partial_logit(seed, position, r) for r in range(ranks))) for position in range(count)]


def count_prompt_tokens(text: str) -> int:
    return max(1, len(text.split()))


@dataclass
class Generation:
    """One request as the engine sees it; events arrive on ``events``."""

    prompt: str
    max_tokens: int
    seed: int = field(init=False)
    words: list[str] = field(default_factory=list)
    cancelled: bool = False  # the client went away; the engine drops it at the next step
    events: queue.Queue = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self.seed = prompt_seed(self.prompt)

    def next_event(self):
        """``("token", word)``, ``("finish", reason)`` or ``("error", message)``; waits for it."""
        return self.events.get()


class Engine:
    """Rank 0's loop. ``submit`` is thread-safe; ``run`` must be called from the MPI thread."""

    def __init__(self, world, settings, max_batch_size: int, log: Log) -> None:
        self.world = world
        self.settings = settings
        self.max_batch_size = max_batch_size
        self.log = log
        self.inbox: queue.Queue[Generation] = queue.Queue()
        self.tokens_done = 0
        self.alive = True
        # Iteration stats as trtllm-serve's GET /metrics returns them: each call takes the ones
        # recorded since the last (a bounded queue, as iter_stats_max_iterations bounds the real one).
        self.iterations = 0
        self._stats: collections.deque[dict] = collections.deque(maxlen=1000)
        self._stats_lock = threading.Lock()
        self._completed = 0

    def take_stats(self) -> list[dict]:
        """The iteration stats recorded since the last call (thread-safe)."""
        with self._stats_lock:
            taken = list(self._stats)
            self._stats.clear()
        return taken

    def submit(self, generation: Generation) -> None:
        self.inbox.put(generation)

    def run(self) -> None:
        """Step until a stop is requested, then tell every rank to shut down."""
        active: list[Generation] = []
        interval = 1.0 / self.settings.tokens_per_s
        due = time.monotonic()
        try:
            while not self.world.stop.is_set():
                self._admit(active, wait=not active)
                active[:] = [g for g in active if not g.cancelled]
                if not active:
                    continue
                now = time.monotonic()
                due = max(due, now)  # after an idle spell, no burst of catch-up steps
                time.sleep(due - now)
                before = len(active)
                self._step(active)
                self._record(before, len(active), time.monotonic() - now)
                due += interval
            self.world.bcast_ints(array("q", [SHUTDOWN, self.tokens_done, 0]), HEADER)
            self.world.finalize()
        finally:
            self.alive = False
            for generation in active + _drain(self.inbox):
                generation.events.put(("error", "the engine has stopped"))

    def _record(self, scheduled: int, still_active: int, seconds: float) -> None:
        """One iteration's stats, with the field names of TensorRT-LLM's IterationStats JSON."""
        self.iterations += 1
        self._completed = scheduled - still_active
        stat = {"timestamp": time.strftime("%m-%d-%Y %H:%M:%S"), "iter": self.iterations,
                "iterLatencyMS": round(seconds * 1000, 3), "numActiveRequests": scheduled,
                "numQueuedRequests": self.inbox.qsize(), "numCompletedRequests": self._completed,
                "maxNumActiveRequests": self.max_batch_size}
        with self._stats_lock:
            self._stats.append(stat)

    def _admit(self, active: list[Generation], wait: bool) -> None:
        try:
            while len(active) < self.max_batch_size:
                blocking = wait and not active  # idle: wait a little for the first request
                active.append(self.inbox.get(timeout=0.05) if blocking else self.inbox.get_nowait())
        except queue.Empty:
            pass

    def _step(self, active: list[Generation]) -> None:
        fault = faults.at_token(self.settings.faults, self.world.hosted_ranks, self.tokens_done, len(active))
        if fault:
            fault.fire(self.log, f"at token {fault.token}")
        header = array("q", [STEP, self.tokens_done, len(active)])
        body = array("q", itertools.chain.from_iterable((g.seed, len(g.words)) for g in active))
        self.world.bcast_ints(header, HEADER)
        self.world.bcast_ints(body, len(body))
        totals = self.world.allreduce_sum(_shares(body, self.world.hosted_ranks))
        self.tokens_done += len(active)
        for generation, total in zip(list(active), totals, strict=True):
            generation.words.append(word(total))
            generation.events.put(("token", generation.words[-1]))
            if len(generation.words) >= generation.max_tokens:
                generation.events.put(("finish", "length"))
                active.remove(generation)


def follow(world, settings, log: Log) -> None:
    """A worker rank's loop: take part in every step until rank 0 says shut down."""
    while True:
        command, done, count = world.bcast_ints(None, HEADER)
        if command == SHUTDOWN:
            world.finalize()
            return
        fault: Fault | None = faults.at_token(settings.faults, world.hosted_ranks, done, count)
        if fault:
            fault.fire(log, f"at token {fault.token}")
        body = world.bcast_ints(None, 2 * count)
        world.allreduce_sum(_shares(body, world.hosted_ranks))


def _shares(body: array, ranks: range) -> array:
    pairs = zip(body[0::2], body[1::2], strict=True)
    return array("q", (sum(partial_logit(seed, position, r) for r in ranks) for seed, position in pairs))


def _drain(inbox: queue.Queue) -> list[Generation]:
    drained = []
    while True:
        try:
            drained.append(inbox.get_nowait())
        except queue.Empty:
            return drained
