"""A concurrency sweep: at each level, warm-up requests (not counted), then repeated runs, each
closed-loop (every one of C streams sends its next request when its last one ends) until a budget
of requests or seconds is spent."""

from __future__ import annotations

import asyncio
import gc
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

from trtllm_deploy.errors import InputError

from . import arrivals, shapes, slo, stats
from .client import Endpoint, Sample, new_loop, stream
from .workload import Prompts, Workload


@dataclass(frozen=True)
class Budget:
    requests: int = 0       # per run; 0: use seconds
    seconds: float = 0.0    # per run: no new request after this long (those in flight finish)
    warmup: int = 2         # requests per stream before the first run of a level
    repeats: int = 1
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.requests < 0 or self.seconds < 0 or self.warmup < 0 or self.repeats < 1:
            raise InputError("--requests, --duration and --warmup must be 0 or more, --repeats at least 1")
        if self.requests and self.seconds:
            raise InputError("give --requests or --duration, not both")

    def requests_for(self, concurrency: int) -> int:
        """With neither budget given: enough requests that every stream sends four."""
        return self.requests or (0 if self.seconds else 4 * concurrency)

    def requests_at(self, rate: float) -> int:
        """Open loop with neither budget given: ten seconds of arrivals, at least 16 requests."""
        return self.requests or (0 if self.seconds else max(16, math.ceil(10 * rate)))


@dataclass(frozen=True)
class Rates:
    """An open-loop sweep: requests/s per level, gamma shape of the gaps, their seed, and at most
    ``cap`` requests in flight (0: no cap; a request waiting for a slot leaves late, and says so)."""

    rates: tuple[float, ...]
    burstiness: float = 1.0
    seed: int = 0
    cap: int = 0


def concurrencies(text: str) -> list[int]:
    """``1,2,4,8`` as given, or ``..64`` for 1, 2, 4, … 64."""
    text = str(text).strip()
    try:
        if text.startswith(".."):
            limit = int(text[2:])
            levels = [2 ** k for k in range(int(math.log2(limit)) + 1)] if limit >= 1 else []
            if levels and levels[-1] != limit:
                levels.append(limit)
        else:
            levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--concurrency {text!r}: give numbers like 1,2,4,8 or ..64") from None
    if not levels or min(levels) < 1:
        raise InputError(f"--concurrency {text!r}: every level must be at least 1")
    return levels


async def run_level(endpoint: Endpoint, workload: Workload, prompts: Prompts, concurrency: int,
                    requests: int, seconds: float, timeout_s: float, first_index: int = 0
                    ) -> tuple[list[Sample], float]:
    """One closed-loop run; returns every request's sample and the run's wall time."""
    if workload.kind == "multi-turn":
        return await shapes.run_conversations(endpoint, workload, prompts, concurrency, requests, seconds,
                                              timeout_s, first_index)
    samples: list[Sample] = []
    issued = 0
    started = time.perf_counter()
    stop_at = started + seconds if seconds else math.inf

    async def one_stream() -> None:
        nonlocal issued
        while (issued < requests if requests else time.perf_counter() < stop_at):
            index = first_index + issued
            issued += 1
            samples.append(await stream(endpoint, workload.path, workload.body(prompts(index)), timeout_s))

    await asyncio.gather(*(one_stream() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


async def run_rate(endpoint: Endpoint, workload: Workload, prompts: Prompts, rate: float, plan: Rates,
                   requests: int, seconds: float, timeout_s: float, first_index: int = 0, repeat: int = 0
                   ) -> tuple[list[Sample], float]:
    """One open-loop run: request *i* is due at its scheduled time whether or not earlier ones have
    answered; each sample keeps that time, so how late it left is known. With a budget of seconds,
    no request is scheduled after it."""
    seed = f"{plan.seed}:{rate}:{repeat}"
    if requests:
        offsets = arrivals.schedule(rate, plan.burstiness, requests, seed)
    else:  # enough arrivals for the seconds, cut at them
        offsets = [at for at in arrivals.schedule(rate, plan.burstiness, math.ceil(rate * seconds * 2) + 16,
                                                  seed) if at <= seconds]
    slots = asyncio.Semaphore(plan.cap) if plan.cap else None
    samples: list[Sample] = []

    async def one(index: int, due: float) -> None:
        if slots is not None:
            async with slots:
                sample = await stream(endpoint, workload.path, workload.body(prompts(index)), timeout_s)
        else:
            sample = await stream(endpoint, workload.path, workload.body(prompts(index)), timeout_s)
        sample.scheduled = due
        samples.append(sample)

    tasks = []
    started = time.perf_counter()
    for index, offset in enumerate(offsets):
        due = started + offset
        await arrivals.wait_until(due)
        tasks.append(asyncio.ensure_future(one(first_index + index, due)))
    await asyncio.gather(*tasks)
    return samples, time.perf_counter() - started


def summarize(samples: list[Sample], wall_s: float, limits: dict | None = None,
              prompt_tokens: int = 0) -> dict:
    """A run's (or a level's) summary, with its goodput under ``limits`` (--slo), its prompt and
    generation speeds at a depth (``prompt_tokens``: the depth workload) and its figures per turn (a
    multi-turn run), where they apply."""
    summary = stats.summarize(samples, wall_s)
    if limits:
        summary["goodput"] = slo.goodput(samples, wall_s, limits)
    if prompt_tokens:
        summary["depth"] = stats.depth_figures(samples, prompt_tokens)
    if any(s.turn is not None for s in samples):
        summary["turns"] = shapes.by_turn(samples)
    return summary


def _level(key: str, value, runs: list[dict], pooled: list, limits: dict | None = None,
           prompt_tokens: int = 0) -> dict:
    every = [s for samples, _ in pooled for s in samples]
    summary = summarize(every, sum(wall for _, wall in pooled), limits, prompt_tokens)
    return {key: value, "summary": summary, "runs": runs,
            "spread": {"output_tokens_per_s": stats.spread([r["output_tokens_per_s"] for r in runs]),
                       "requests_per_s": stats.spread([r["requests_per_s"] for r in runs]),
                       "ttft_p50_ms": stats.spread([r["ttft_ms"].get("p50") for r in runs]),
                       "itl_p50_ms": stats.spread([r["itl_ms"].get("p50") for r in runs])}}


async def _rate_sweep(endpoint: Endpoint, workload: Workload, prompts: Prompts, plan: Rates, budget: Budget,
                      progress: Callable[[str], None], limits: dict | None = None) -> list[dict]:
    results = []
    index = 0
    for rate in plan.rates:
        if budget.warmup:
            streams = plan.cap or 1
            progress(f"{rate:g} requests/s: {budget.warmup * streams} warm-up requests")
            warm, _ = await run_level(endpoint, workload, prompts, streams, budget.warmup * streams, 0,
                                      budget.timeout_s, index)
            index += len(warm)
        runs, pooled = [], []
        for repeat in range(budget.repeats):
            progress(f"{rate:g} requests/s: run {repeat + 1} of {budget.repeats}")
            samples, wall = await run_rate(endpoint, workload, prompts, rate, plan, budget.requests_at(rate),
                                           budget.seconds, budget.timeout_s, index, repeat)
            index += len(samples)
            runs.append(summarize(samples, wall, limits))
            pooled.append((samples, wall))
        level = _level("request_rate", rate, runs, pooled, limits)
        # The cap is the level's concurrency where there is one; None: as many as the rate brings.
        results.append({**level, "concurrency": plan.cap or None,
                        "behind": stats.behind(level["summary"], arrivals.BEHIND_MS)})
    return results


async def _closed(endpoint: Endpoint, workload: Workload, key: str,
                  steps: list[tuple[int, Prompts, int, int]], budget: Budget,
                  progress: Callable[[str], None], limits: dict | None = None) -> list[dict]:
    """Closed-loop levels, each ``(value, prompts, concurrency, input tokens for pp)``: its
    warm-up, then its repeats, pooled into one level keyed ``key`` (input tokens 0: not a depth)."""
    results = []
    index = 0
    for value, prompts, concurrency, input_tokens in steps:
        if budget.warmup:
            progress(f"{key} {value}: {budget.warmup * concurrency} warm-up requests")
            warm, _ = await run_level(endpoint, workload, prompts, concurrency, budget.warmup * concurrency,
                                      0, budget.timeout_s, index)
            index += len(warm)
        runs, pooled = [], []
        for repeat in range(budget.repeats):
            progress(f"{key} {value}: run {repeat + 1} of {budget.repeats}")
            samples, wall = await run_level(endpoint, workload, prompts, concurrency,
                                            budget.requests_for(concurrency), budget.seconds,
                                            budget.timeout_s, index)
            index += len(samples)
            runs.append(summarize(samples, wall, limits, input_tokens))
            pooled.append((samples, wall))
        results.append(_level(key, value, runs, pooled, limits, input_tokens))
    return results


def _sweep(endpoint: Endpoint, workload: Workload, prompts: Prompts, levels: list[int], budget: Budget,
           progress: Callable[[str], None], limits: dict | None = None):
    return _closed(endpoint, workload, "concurrency", [(c, prompts, c, 0) for c in levels], budget,
                   progress, limits)


async def _depth_sweep(endpoint: Endpoint, workload: Workload, prompts: Prompts, depths: list[int],
                       concurrency: int, budget: Budget, progress: Callable[[str], None],
                       limits: dict | None = None) -> list[dict]:
    """At each context depth D: prompts of D tokens of context before the --input-tokens of the
    prompt itself (each one unique from its first word: no prefix cache helps), closed loop at
    ``concurrency`` streams."""
    steps = []
    for depth in depths:
        at_depth = prompts.longer(depth)
        steps.append((depth, at_depth, concurrency, at_depth.input_tokens))
    levels = await _closed(endpoint, workload, "depth", steps, budget, progress, limits)
    return [{**level, "concurrency": concurrency} for level in levels]


def depths(text: str) -> list[int]:
    """``--depths 0,4096,16384``: context tokens before each prompt, in the order given."""
    try:
        levels = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 0:
        raise InputError(f"--depths {text!r}: give context depths in tokens like 0,4096,16384 (0 or more)")
    return levels


def sweep(endpoint: Endpoint, workload: Workload, prompts: Prompts, levels: list[int], budget: Budget,
          progress: Callable[[str], None] = lambda line: None, plan: Rates | None = None,
          limits: dict | None = None, depth_levels: list[int] | None = None) -> list[dict]:
    """Every level measured: by request rate (``plan``), by context depth (``depth_levels``, at the
    single concurrency of ``levels``) or by concurrency."""
    # A collection pass in the middle of a stream would delay the clock reads behind it; samples
    # hold no reference cycles, so nothing piles up while the collector rests.
    gc.collect()
    gc.disable()
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            if plan is not None:
                return runner.run(_rate_sweep(endpoint, workload, prompts, plan, budget, progress, limits))
            if depth_levels:
                return runner.run(_depth_sweep(endpoint, workload, prompts, depth_levels, levels[0], budget,
                                               progress, limits))
            return runner.run(_sweep(endpoint, workload, prompts, levels, budget, progress, limits))
    finally:
        gc.enable()


def budget_json(budget: Budget) -> dict:
    return asdict(budget)
