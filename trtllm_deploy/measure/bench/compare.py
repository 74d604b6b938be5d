"""Results side by side, level by level, and the regression gate against a stored baseline: every
figure the results share (throughput and latencies; goodput under --slo; prompt and generation
speeds at each depth), worse by more than the threshold fails unless the baseline's own repeats
already differ by more than that (noise: reported, not gated)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from trtllm_deploy.errors import InputError

from .levels import level_key, level_label, ms as _ms


# Gated figures: (name, how to read it from a level's summary, True when higher is better).
GATED = (("output tokens/s", lambda s: s["output_tokens_per_s"], True),
         ("TTFT p50 ms", lambda s: s["ttft_ms"].get("p50"), False),
         ("ITL p50 ms", lambda s: s["itl_ms"].get("p50"), False),
         ("E2E p50 ms", lambda s: s["e2e_ms"].get("p50"), False),
         ("goodput requests/s", lambda s: (s.get("goodput") or {}).get("per_s"), True),
         ("pp tokens/s", lambda s: ((s.get("depth") or {}).get("pp_tokens_per_s") or {}).get("mean"), True),
         ("tg tokens/s", lambda s: ((s.get("depth") or {}).get("tg_tokens_per_s") or {}).get("mean"), True))


# Side by side, per result: (column, what the cell shows) — the base figures always, goodput where a
# result has it, pp/tg where it measured depths.
BASE = (("out tok/s", lambda s: f"{s['output_tokens_per_s']:.1f}"),
        ("TTFT p50", lambda s: _ms(s["ttft_ms"], "p50")), ("ITL p50", lambda s: _ms(s["itl_ms"], "p50")),
        ("E2E p50", lambda s: _ms(s["e2e_ms"], "p50")))
GOODPUT = (("goodput/s", lambda s: _fixed((s.get("goodput") or {}).get("per_s"))),
           ("good %", lambda s: _percent((s.get("goodput") or {}).get("share"))))
DEPTH = (("pp t/s", lambda s: _mean_std((s.get("depth") or {}).get("pp_tokens_per_s"))),
         ("tg t/s", lambda s: _mean_std((s.get("depth") or {}).get("tg_tokens_per_s"))))


def _fixed(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _mean_std(figure: dict | None) -> str:
    if not figure or figure.get("mean") is None:
        return "-"
    return f"{figure['mean']:.2f} ± {figure['std']:.2f}"


def shown_figures(results: dict[str, dict]) -> tuple:
    every = [level["summary"] for result in results.values() for level in result["levels"]]
    figures = BASE
    if any("depth" in s for s in every):
        figures = DEPTH + BASE[1:2] + BASE[3:]
    if any("goodput" in s for s in every):
        figures += GOODPUT
    return figures


def side_by_side(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """One row per level (concurrency, request rate or depth); for each result its throughput and
    median latencies, its goodput where measured, its pp/tg speeds at each depth."""
    names = list(results)
    figures = shown_figures(results)
    columns = ["level"] + [f"{name}: {figure}" for name in names for figure, _ in figures]
    by_level = {name: {level_key(level): level["summary"] for level in result["levels"]}
                for name, result in results.items()}
    rows = []
    for key in sorted({k for levels in by_level.values() for k in levels}):
        row = [str(level_label(key))]
        for name in names:
            s = by_level[name].get(key)
            row += ["-"] * len(figures) if s is None else [show(s) for _, show in figures]
        rows.append(row)
    return columns, rows


@dataclass(frozen=True)
class Verdict:
    candidate: str
    concurrency: int | str   # the level: its concurrency, or its request rate ("5/s")
    figure: str
    baseline: float
    measured: float
    change: float       # relative, signed so that positive is worse
    regressed: bool
    noise: float = 0.0  # how far apart the baseline's own repeats are, relative to their mean

    def as_json(self) -> dict:
        return {"candidate": self.candidate, "concurrency": self.concurrency, "figure": self.figure,
                "baseline": self.baseline, "measured": self.measured, "worse_by": round(self.change, 4),
                "baseline_noise": round(self.noise, 4), "regressed": self.regressed}


def gate(baseline: dict, candidates: dict[str, dict], threshold: float) -> list[Verdict]:
    """Every gated figure at every concurrency both measured: worse than the baseline by more than
    ``threshold`` (0.1 = 10 %) is a regression. A level the candidate lacks, or more failed requests
    than the baseline had, is a regression too. A figure whose baseline repeats already differ by
    more than the threshold cannot show a change of that size: it is reported as noisy, not gated
    (record the baseline with more requests or repeats to gate it)."""
    if not threshold >= 0:
        raise InputError(f"--threshold {threshold}: give a fraction of at least 0, e.g. 0.1 for 10 %")
    verdicts = []
    reference = {level_key(level): level["summary"] for level in baseline["levels"]}
    repeats = {level_key(level): level["runs"] for level in baseline["levels"]}
    for name, result in candidates.items():
        measured = {level_key(level): level["summary"] for level in result["levels"]}
        for key, base in sorted(reference.items()):
            concurrency = level_label(key)
            now = measured.get(key)
            if now is None:
                verdicts.append(Verdict(name, concurrency, "measured at all", 1, 0, 1.0, True))
                continue
            base_failed, now_failed = _failed(base), _failed(now)
            if now_failed > base_failed:
                verdicts.append(Verdict(name, concurrency, "failed requests", base_failed, now_failed,
                                        now_failed - base_failed, True))
            for figure, read, higher_is_better in GATED:
                old, new = read(base), read(now)
                if old is None or new is None or not old or math.isnan(old) or math.isnan(new):
                    continue
                change = (old - new) / old if higher_is_better else (new - old) / old
                noise = _noise([read(run) for run in repeats[key]])
                verdicts.append(Verdict(name, concurrency, figure, old, new, change,
                                        change > threshold and noise <= threshold, noise))
    return verdicts


def _noise(values: list) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if len(values) < 2 or not sum(values):
        return 0.0
    return (max(values) - min(values)) / (sum(values) / len(values))


def _failed(summary: dict) -> float:
    return sum(summary["errors"].values()) / max(1, summary["requests"])
