"""Open-loop arrivals: when each request of a request-rate run is due, and sending at those times.

Gaps between requests are gamma distributed with shape ``burstiness`` and mean ``1/rate``: shape 1
is a Poisson process (exponential gaps), below 1 burstier, above 1 more regular; the coefficient of
variation of the gaps is ``1/sqrt(burstiness)``. A seed makes the schedule the same on every run.
"""

from __future__ import annotations

import asyncio
import random
import time

from trtllm_deploy.errors import InputError

# Within this much of a request's time the sender stops sleeping on the loop's timer (whose epoll
# timeout is rounded up to whole milliseconds) and yields to the loop until the time has come:
# other streams' bytes are still read meanwhile, and the request leaves within one loop turn.
SPIN_S = 0.002
# Median lateness above this says the client could not keep to its schedule (the bound).
BEHIND_MS = 1.0


def rates(text: str) -> list[float]:
    """``--request-rate 1,2.5,10`` as requests per second."""
    try:
        levels = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--request-rate {text!r}: give requests per second like 1,2,5.5") from None
    if not levels or not all(0 < level < float("inf") for level in levels):
        raise InputError(f"--request-rate {text!r}: every rate must be a number above 0 (requests/s)")
    return levels


def check_burstiness(burstiness: float) -> float:
    if not 0 < burstiness < float("inf"):
        raise InputError(f"--burstiness {burstiness}: give the gamma shape, a number above 0 (1 = Poisson)")
    return burstiness


def gaps(rate: float, burstiness: float, count: int, seed: str) -> list[float]:
    """``count`` seconds between consecutive requests (the first one's from the run's start)."""
    generator = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    return [generator.gammavariate(burstiness, scale) for _ in range(count)]


def schedule(rate: float, burstiness: float, count: int, seed: str) -> list[float]:
    """Offsets from the run's start at which each request is due."""
    offsets, at = [], 0.0
    for gap in gaps(rate, burstiness, count, seed):
        at += gap
        offsets.append(at)
    return offsets


async def wait_until(when: float) -> None:
    """Return at ``when`` (a ``perf_counter`` time), not a millisecond after it."""
    ahead = when - time.perf_counter()
    if ahead > SPIN_S:
        await asyncio.sleep(ahead - SPIN_S)
    while time.perf_counter() < when:
        await asyncio.sleep(0)
