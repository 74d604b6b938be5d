"""A result on disk (JSON, CSV, PNG charts, one HTML page with all of them), its table, and the
comparison of several results with a regression gate against a stored baseline."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from trtllm_deploy.errors import InputError
from trtllm_deploy.measure import chart
from trtllm_deploy.measure.bench import page

SCHEMA = "trtllm-deploy.bench/1"
LATENCY_NAMES = ("ttft", "tpot", "itl", "e2e")
COLUMNS = ["concurrency", "requests", "errors", "req/s", "out tok/s", "tok/s/stream", "TTFT p50 ms",
           "TTFT p99 ms", "TPOT p50 ms", "ITL p50 ms", "ITL p99 ms", "E2E p50 ms", "E2E p99 ms", "spread"]
# Gated figures: (name, how to read it from a level's summary, True when higher is better).
GATED = (("output tokens/s", lambda s: s["output_tokens_per_s"], True),
         ("TTFT p50 ms", lambda s: s["ttft_ms"].get("p50"), False),
         ("ITL p50 ms", lambda s: s["itl_ms"].get("p50"), False),
         ("E2E p50 ms", lambda s: s["e2e_ms"].get("p50"), False))


def _ms(figure: dict, key: str) -> str:
    value = figure.get(key)
    return "-" if value is None else f"{value:.2f}"


def level_row(level: dict) -> list[str]:
    s = level["summary"]
    spread = level.get("spread", {}).get("output_tokens_per_s") or {}
    errors = sum(s["errors"].values())
    return [str(level["concurrency"]), str(s["succeeded"]), str(errors) if not errors else
            f"{errors}: " + ", ".join(f"{k} {v}" for k, v in s["errors"].items()),
            f"{s['requests_per_s']:.2f}", f"{s['output_tokens_per_s']:.1f}",
            "-" if s["stream_tokens_per_s"]["p50"] is None else f"{s['stream_tokens_per_s']['p50']:.1f}",
            _ms(s["ttft_ms"], "p50"), _ms(s["ttft_ms"], "p99"), _ms(s["tpot_ms"], "p50"),
            _ms(s["itl_ms"], "p50"), _ms(s["itl_ms"], "p99"), _ms(s["e2e_ms"], "p50"),
            _ms(s["e2e_ms"], "p99"),
            f"±{100 * spread['cv']:.1f}%" if spread.get("cv") is not None and len(level["runs"]) > 1 else "-"]


def title(result: dict) -> str:
    env, work = result["environment"], result["workload"]
    endpoint = env["endpoint"]
    served = f"{endpoint.get('runtime')} {endpoint.get('version') or ''}".strip()
    if endpoint.get("standin"):
        served += " (stand-in: not inference)"
    return (f"{endpoint.get('model')} on {served} at {endpoint['url']}: {work['input_tokens']} in / "
            f"{work['output_tokens']} out tokens, counted by {work['counted_by']}")


def write(result: dict, out: Path) -> dict[str, Path]:
    """result.json, result.csv, the charts and report.html (all of them in one page) in ``out``;
    returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "result.json", "csv": out / "result.csv"}
    files["json"].write_text(json.dumps(result, indent=2) + "\n")
    with files["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["concurrency", "run", "requests", "succeeded", "errors", "wall_s", "requests_per_s",
                         "output_tokens_per_s", "stream_tokens_per_s_p50",
                         *[f"{m}_ms_{q}" for m in LATENCY_NAMES for q in ("p50", "p90", "p99")]])
        for level in result["levels"]:
            runs = [(str(i + 1), r) for i, r in enumerate(level["runs"])] + [("all", level["summary"])]
            for run, s in runs:
                writer.writerow([level["concurrency"], run, s["requests"], s["succeeded"],
                                 sum(s["errors"].values()), s["wall_s"], s["requests_per_s"],
                                 s["output_tokens_per_s"], s["stream_tokens_per_s"]["p50"],
                                 *[s[f"{m}_ms"].get(q) for m in LATENCY_NAMES
                                   for q in ("p50", "p90", "p99")]])
    drawn = charts({"": result}, out)
    files.update(drawn)
    files["html"] = out / "report.html"
    files["html"].write_text(page.render(title(result), {"": result}, COLUMNS,
                                         [level_row(level) for level in result["levels"]], drawn))
    return files


CHARTS = {"latency_png": "latency.png", "throughput_png": "throughput.png", "per_node_png": "per_node.png",
          "distributions_png": "distributions.png"}


def nodes(result: dict) -> int | None:
    """How many nodes served the result (its recorded deployment), None when it was not recorded."""
    deployment = result["environment"].get("deployment") or {}
    return len(deployment.get("nodes") or []) or None


def figures(results: dict[str, dict]) -> dict[str, object]:
    """The charts of one result (name "") or several side by side, as matplotlib figures by key:
    latency p50 with p90/p99 bands, throughput with the `expect` ceiling where known, throughput per
    node against tokens/s per user, and the TTFT and ITL distributions; concurrency on log2 axes."""
    latency = {metric: {} for metric in ("ttft", "itl", "e2e")}
    throughput, ceiling, per_node = {}, {}, {}
    spread = {"ttft": {}, "itl": {}}
    partial = False
    for name, result in results.items():
        prefix = f"{name} " if name else ""
        levels = result["levels"]
        for metric, shown in latency.items():
            shown[name or metric.upper()] = [(lv["concurrency"], *(lv["summary"][f"{metric}_ms"].get(q)
                                                                   for q in ("p50", "p90", "p99")))
                                             for lv in levels]
        throughput[f"{prefix}all streams"] = [(lv["concurrency"], lv["summary"]["output_tokens_per_s"])
                                              for lv in levels]
        throughput[f"{prefix}per stream"] = [(lv["concurrency"], lv["summary"]["stream_tokens_per_s"]["p50"])
                                             for lv in levels]
        bound = (result.get("efficiency") or {}).get("levels")
        if bound:
            ceiling[f"{prefix}ceiling (invoke expect)"] = [(row["concurrency"], row["ceiling_tokens_per_s"])
                                                           for row in bound]
        count = nodes(result)
        label = f"{prefix}{count} node{'s' if count > 1 else ''}" if count else f"{prefix}1 node (assumed)"
        per_node[label] = [
            (lv["summary"]["stream_tokens_per_s"]["p50"], lv["summary"]["output_tokens_per_s"] / (count or 1),
             f"c={lv['concurrency']}") for lv in levels]
        for metric, shown in spread.items():
            for level in levels:
                figures_ = level["summary"][f"{metric}_ms"]
                if not figures_.get("count"):
                    continue  # nothing measured at this level (every request failed)
                points = figures_.get("distribution")
                if points is None:  # recorded before the distribution was kept: its percentiles only
                    partial = True
                    points = [(q, figures_[f"p{q}"]) for q in (50, 90, 99)
                              if figures_.get(f"p{q}") is not None]
                shown[f"{prefix}c={level['concurrency']}"] = points
    only = "p50/p90/p99 only: a result recorded without its distribution" if partial else ""
    return {
        "latency_png": chart.bands([("TTFT", latency["ttft"]), ("ITL", latency["itl"]),
                                    ("end to end", latency["e2e"])], "concurrency (streams)", "ms"),
        "throughput_png": chart.line_chart("Output tokens/s against concurrency", "concurrency (streams)",
                                           "tokens/s", throughput, dashed=ceiling),
        "per_node_png": chart.curve("Throughput per node against speed per user (label: concurrency)",
                                    "tokens/s per user (p50 of streams)", "output tokens/s per node",
                                    per_node),
        "distributions_png": chart.distributions([("TTFT", spread["ttft"]), ("ITL", spread["itl"])],
                                                 "ms", only),
    }


def charts(results: dict[str, dict], out: Path) -> dict[str, Path]:
    """``figures`` written as PNG files in ``out``."""
    return {key: chart.save(figure, out / CHARTS[key]) for key, figure in figures(results).items()}


def compare_page(results: dict[str, dict], columns: list[str], rows: list[list[str]],
                 charts: dict[str, Path], out: Path, gate_heading: str = "", verdicts: list[Verdict] = (),
                 threshold: float = 0.0) -> Path:
    """report.html of `bench.compare`: the side-by-side table, each result's environment and ceiling,
    the gate's verdicts (when there is a baseline) and the charts, in one file in ``out``."""
    tables = []
    if gate_heading:
        tables.append((f"{gate_heading} (worse by more than {threshold:.0%} fails)",
                       ["result", "concurrency", "figure", "baseline", "measured", "worse by", "verdict"],
                       [[v.candidate, str(v.concurrency), v.figure, f"{v.baseline:.2f}", f"{v.measured:.2f}",
                         f"{v.change:+.1%}", "fail" if v.regressed else
                         f"not gated: baseline repeats differ by {v.noise:.0%}" if v.change > threshold
                         else "pass"] for v in verdicts]))
    path = out / "report.html"
    path.write_text(page.render("results by concurrency", results, columns, rows, charts, tables))
    return path


def load(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "result.json"
    try:
        result = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise InputError(f"{path}: not JSON ({exc})") from None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        raise InputError(f"{path}: not a result of `invoke bench` (schema {SCHEMA} expected)")
    return result


def side_by_side(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """One row per concurrency; for each result its throughput and median latencies."""
    names = list(results)
    columns = ["concurrency"] + [f"{name}: {figure}" for name in names
                                 for figure in ("out tok/s", "TTFT p50", "ITL p50", "E2E p50")]
    by_level = {name: {level["concurrency"]: level["summary"] for level in result["levels"]}
                for name, result in results.items()}
    rows = []
    for concurrency in sorted({c for levels in by_level.values() for c in levels}):
        row = [str(concurrency)]
        for name in names:
            s = by_level[name].get(concurrency)
            row += (["-"] * 4 if s is None else
                    [f"{s['output_tokens_per_s']:.1f}", _ms(s["ttft_ms"], "p50"), _ms(s["itl_ms"], "p50"),
                     _ms(s["e2e_ms"], "p50")])
        rows.append(row)
    return columns, rows


@dataclass(frozen=True)
class Verdict:
    candidate: str
    concurrency: int
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
    reference = {level["concurrency"]: level["summary"] for level in baseline["levels"]}
    repeats = {level["concurrency"]: level["runs"] for level in baseline["levels"]}
    for name, result in candidates.items():
        measured = {level["concurrency"]: level["summary"] for level in result["levels"]}
        for concurrency, base in sorted(reference.items()):
            now = measured.get(concurrency)
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
                noise = _noise([read(run) for run in repeats[concurrency]])
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
