"""Goodput under service-level objectives (``--slo ttft=MS,tpot=MS,e2e=MS``).

A request meets the SLOs when it succeeded and each latency given is at or under its limit: TTFT
(a request with no visible text has none, so it does not meet a TTFT limit), TPOT (a request whose
text came in one chunk has no decode time to judge and is not held to it), end-to-end latency.
Goodput is the number of such requests per second of the run, as aiperf and other serving
benchmarks define it, and their share of every request sent (failures included). A level meets the
SLOs when that share is at least the target (``share=`` in ``--slo``, 0.9 by default); the sweep's best
level is the highest rate (or concurrency) that does.
"""

from __future__ import annotations

from trtllm_deploy.errors import InputError

from .client import Sample
from .levels import level_key, level_label, level_x

KEYS = {"ttft": "time to first token", "tpot": "time per output token", "e2e": "end-to-end latency"}
DEFAULT_TARGET = 0.9


def parse(text: str) -> tuple[dict[str, float], float]:
    """``ttft=500,tpot=50,share=0.95`` as the limits {"ttft": 500.0, "tpot": 50.0} (milliseconds; any
    subset of the keys) and the share of requests that must meet them (default 0.9)."""
    expected = ("give KEY=MILLISECONDS pairs like ttft=500,tpot=50,e2e=4000 (keys: ttft, tpot, e2e), "
                "optionally share=FRACTION, the share of requests that must meet them (default 0.9)")
    limits: dict[str, float] = {}
    share = None
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        key, equals, value = (s.strip() for s in part.partition("="))
        key = key.lower()
        if not equals:
            raise InputError(f"--slo {text!r}: {part!r} has no '='; {expected}")
        if key not in (*KEYS, "share"):
            raise InputError(f"--slo {text!r}: unknown key {key!r}; {expected}")
        if key in limits or (key == "share" and share is not None):
            raise InputError(f"--slo {text!r}: {key} is given twice; {expected}")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if key == "share":
            if not 0 < number <= 1:
                raise InputError(f"--slo {text!r}: share={value} must be a fraction above 0 and at most 1 "
                                 f"(0.9 = 90 %); {expected}")
            share = number
        elif not 0 < number < float("inf"):
            raise InputError(f"--slo {text!r}: {key}={value} must be a number of milliseconds above 0; "
                             f"{expected}")
        else:
            limits[key] = number
    if not limits:
        raise InputError(f"--slo {text!r}: no limit given; {expected}")
    return limits, DEFAULT_TARGET if share is None else share


def meets(sample: Sample, limits: dict[str, float]) -> bool:
    if sample.error is not None:
        return False
    for key, limit in limits.items():
        value = getattr(sample, key)
        if value is None:
            if key == "tpot":
                continue  # one chunk of text: no decode time to judge
            return False
        if value * 1000 > limit:
            return False
    return True


def goodput(samples: list[Sample], wall_s: float, limits: dict[str, float]) -> dict:
    """How many requests met every limit, their share of all requests and their rate."""
    met = sum(1 for s in samples if meets(s, limits))
    return {"met": met, "share": round(met / len(samples), 4) if samples else 0.0,
            "per_s": round(met / wall_s, 4) if wall_s > 0 else 0.0}


def best(levels: list[dict], share: float) -> dict | None:
    """The level with the highest rate (or concurrency, or depth) whose goodput share is at least
    ``share``; None when no level is."""
    good = [level for level in levels
            if (level["summary"].get("goodput") or {}).get("share", 0) >= share]
    if not good:
        return None
    top = max(good, key=level_x)
    return {"level": str(level_label(level_key(top))), "x": level_x(top),
            "goodput_per_s": top["summary"]["goodput"]["per_s"], "share": top["summary"]["goodput"]["share"]}


def record(limits: dict[str, float], share: float, levels: list[dict]) -> dict:
    """What result.json keeps of the SLOs: the limits, the target share and the best level."""
    return {"limits_ms": limits, "target_share": share, "best": best(levels, share)}


def describe(record_: dict) -> str:
    """One line for the summary: the limits and the best level, or that none met them."""
    limits = ", ".join(f"{key} ≤ {value:g} ms" for key, value in record_["limits_ms"].items())
    top = record_["best"]
    if top is None:
        return (f"SLOs ({limits}): no level had {record_['target_share']:.0%} of its requests meeting "
                "them")
    return (f"SLOs ({limits}): the highest level with {record_['target_share']:.0%} of requests meeting "
            f"them is {top['level']} (goodput {top['goodput_per_s']:.2f} requests/s, {top['share']:.0%} "
            "of requests)")
