"""Percentiles and summaries of the samples of one run, and the spread of figures across runs."""

from __future__ import annotations

import math
import statistics
from collections import Counter

from .client import Sample

PERCENTILES = (50, 90, 99)
# Where the distribution is recorded (for the report's distribution charts): every 5th percentile and
# the 99th, from the fastest (0) to the slowest (100) request or gap.
DISTRIBUTION = (*range(0, 100, 5), 99, 100)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), for q in 0..100."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def describe(values: list[float]) -> dict:
    """p50/p90/p99 and mean, in milliseconds, of values in seconds."""
    if not values:
        return {"count": 0}
    figures = {f"p{q}": round(percentile(values, q) * 1000, 4) for q in PERCENTILES}
    return {"count": len(values), "mean": round(statistics.fmean(values) * 1000, 4), **figures,
            "distribution": [[q, round(percentile(values, q) * 1000, 4)] for q in DISTRIBUTION]}


def latencies(samples: list[Sample]) -> dict[str, list[float]]:
    good = [s for s in samples if s.error is None]
    return {"ttft": [s.ttft for s in good if s.ttft is not None],
            "tpot": [s.tpot for s in good if s.tpot is not None],
            "itl": [gap for s in good for gap in s.itl],
            "e2e": [s.e2e for s in good if s.e2e is not None]}


def summarize(samples: list[Sample], wall_s: float) -> dict:
    """One run: latency percentiles, token and request rates, errors by kind."""
    good = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in good)
    # Each request's own decode rate: its tokens after the first chunk over the time they took (a
    # server that bundles tokens in chunks neither inflates it nor adds zeros).
    per_stream = [1 / s.tpot for s in good if s.tpot]
    lateness = [s.lateness for s in samples if s.lateness is not None]
    errors = Counter(s.error for s in samples if s.error is not None)
    first_errors = {}
    for s in samples:
        if s.error is not None and s.error not in first_errors:
            first_errors[s.error] = s.detail
    return {
        "requests": len(samples), "succeeded": len(good), "wall_s": round(wall_s, 4),
        "requests_per_s": round(len(good) / wall_s, 4) if wall_s > 0 else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall_s, 3) if wall_s > 0 else 0.0,
        "stream_tokens_per_s": {"p50": round(percentile(per_stream, 50), 3) if per_stream else None,
                                "mean": round(statistics.fmean(per_stream), 3) if per_stream else None},
        "tokens_per_chunk": round(sum(s.tokens for s in good if s.arrivals)
                                  / max(1, sum(len(s.arrivals) for s in good)), 3),
        # Completed with a usage count but no visible text: counted, but with no TTFT or ITL.
        "without_text": sum(1 for s in good if not s.arrivals),
        **{f"{name}_ms": describe(values) for name, values in latencies(good).items()},
        "errors": dict(errors), "error_examples": first_errors,
        **({"lateness_ms": describe(lateness)} if lateness else {}),
    }


def behind(summary: dict, limit_ms: float) -> bool:
    """Whether an open-loop run's requests left later than their schedule by more than ``limit_ms``
    at the median: its arrival rate was then the client's, not the one asked for."""
    late = summary.get("lateness_ms") or {}
    return late.get("p50") is not None and late["p50"] > limit_ms


def spread(values: list[float]) -> dict:
    """How much a figure moved across repeated runs."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {}
    mean = statistics.fmean(values)
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"min": round(min(values), 4), "max": round(max(values), 4), "mean": round(mean, 4),
            "stdev": round(deviation, 4), "cv": round(deviation / mean, 4) if mean else None}


def depth_figures(samples: list[Sample], prompt_tokens: int) -> dict:
    """Prompt processing and generation speed of a depth level's requests, each request's own:
    pp = the prompt's tokens (context and new prompt) over its TTFT, tg = its tokens after the first
    chunk over their decode time (1/TPOT); their mean and standard deviation, and the times behind
    them in milliseconds (time to the response's first bytes, and to its first token)."""
    good = [s for s in samples if s.error is None]
    pp = [prompt_tokens / s.ttft for s in good if s.ttft]
    tg = [1 / s.tpot for s in good if s.tpot]
    ttfr = [(s.responded - s.sent) * 1000 for s in good if s.responded is not None]
    ttft = [s.ttft * 1000 for s in good if s.ttft is not None]
    return {"prompt_tokens": prompt_tokens, "pp_tokens_per_s": _mean_std(pp),
            "tg_tokens_per_s": _mean_std(tg), "ttfr_ms": _mean_std(ttfr), "ttft_ms": _mean_std(ttft)}


def _mean_std(values: list[float]) -> dict:
    """Mean and population standard deviation (as llama-benchy prints them: mean ± std)."""
    if not values:
        return {"mean": None, "std": None, "count": 0}
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4),
            "count": len(values)}
