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
           "TTFT p99 ms", "TPOT p50 ms", "ITL p50 ms", "ITL p99 ms", "tok/chunk", "E2E p50 ms", "E2E p99 ms",
           "spread"]
# An open-loop result: its rate first, how late requests left their schedule last.
RATE_COLUMNS = ["rate/s", "cap", *COLUMNS[1:], "late p50 ms", "late p99 ms"]
# Gated figures: (name, how to read it from a level's summary, True when higher is better).
GATED = (("output tokens/s", lambda s: s["output_tokens_per_s"], True),
         ("TTFT p50 ms", lambda s: s["ttft_ms"].get("p50"), False),
         ("ITL p50 ms", lambda s: s["itl_ms"].get("p50"), False),
         ("E2E p50 ms", lambda s: s["e2e_ms"].get("p50"), False))


def _ms(figure: dict, key: str) -> str:
    value = figure.get(key)
    return "-" if value is None else f"{value:.2f}"


def columns(result: dict) -> list[str]:
    return RATE_COLUMNS if "arrivals" in result else COLUMNS


def warnings(result: dict) -> list[str]:
    """What a reader of the table must know about how it was measured."""
    lines = []
    refused = result["workload"].get("ignore_eos_refused")
    if refused:
        lines.append(f"the server refused ignore_eos/min_tokens ({refused}); requests were re-sent without "
                     "them, so outputs may stop early (see the out tok column)")
    for level in result["levels"]:
        s = level["summary"]
        if level.get("behind"):
            late = s["lateness_ms"]
            waiting = (", waiting for one of the --concurrency slots included" if level.get("concurrency")
                       else "")
            lines.append(f"{level['request_rate']:g} requests/s: the client fell behind its schedule "
                         f"(requests left {late['p50']:.2f} ms late at the median, p99 {late['p99']:.2f} ms; "
                         f"over {result['arrivals']['behind_ms']:g} ms counts as behind{waiting}): the "
                         "rate it measured is lower than asked")
        if s.get("without_text"):
            lines.append(f"{_level_name(level)}: {s['without_text']} request(s) completed with tokens "
                         "(the server's usage count) but no visible text: counted, with no TTFT or ITL")
    return lines


def _level_name(level: dict) -> str:
    if "request_rate" in level:
        return f"{level['request_rate']:g} requests/s"
    return f"concurrency {level['concurrency']}"


def level_key(level: dict) -> tuple:
    """What identifies a level across results: its request rate (and cap) or its concurrency."""
    if "request_rate" in level:
        return (1, level["request_rate"], level.get("concurrency") or 0)
    return (0, level["concurrency"], 0)


def level_label(key: tuple) -> int | str:
    """A level's key as tables and verdicts show it: the concurrency, or "5/s" ("5/s cap 8")."""
    rated, value, cap = key
    return f"{value:g}/s" + (f" cap {cap}" if cap else "") if rated else value


def level_x(level: dict) -> float:
    """A level on a chart's x axis: its request rate, or its concurrency."""
    return level["request_rate"] if "request_rate" in level else level["concurrency"]


# A chart's x axis, by how the results were measured.
AXES = {False: ("concurrency (streams)", "concurrency", "c="),
        True: ("request rate (requests/s)", "request rate", "")}


def level_row(level: dict) -> list[str]:
    s = level["summary"]
    spread = level.get("spread", {}).get("output_tokens_per_s") or {}
    errors = sum(s["errors"].values())
    rate = [f"{level['request_rate']:g}", str(level["concurrency"] or "-")] if "request_rate" in level else []
    late = ([_ms(s.get("lateness_ms", {}), "p50") + (" behind" if level.get("behind") else ""),
             _ms(s.get("lateness_ms", {}), "p99")] if rate else [])
    first = rate or [str(level["concurrency"])]
    return first + [str(s["succeeded"]), str(errors) if not errors else
            f"{errors}: " + ", ".join(f"{k} {v}" for k, v in s["errors"].items()),
            f"{s['requests_per_s']:.2f}", f"{s['output_tokens_per_s']:.1f}",
            "-" if s["stream_tokens_per_s"]["p50"] is None else f"{s['stream_tokens_per_s']['p50']:.1f}",
            _ms(s["ttft_ms"], "p50"), _ms(s["ttft_ms"], "p99"), _ms(s["tpot_ms"], "p50"),
            _ms(s["itl_ms"], "p50"), _ms(s["itl_ms"], "p99"), f"{s.get('tokens_per_chunk', 0):.2f}",
            _ms(s["e2e_ms"], "p50"), _ms(s["e2e_ms"], "p99"),
            f"±{100 * spread['cv']:.1f}%" if spread.get("cv") is not None and len(level["runs"]) > 1 else "-"
            ] + late


def title(result: dict) -> str:
    env, work = result["environment"], result["workload"]
    endpoint = env["endpoint"]
    served = f"{endpoint.get('runtime')} {endpoint.get('version') or ''}".strip()
    if endpoint.get("standin"):
        served += " (stand-in: not inference)"
    shown = (f"{endpoint.get('model')} on {served} at {endpoint['url']}: {work['input_tokens']} in / "
             f"{work['output_tokens']} out tokens, counted by {work['counted_by']}")
    if work.get("ignore_eos_refused"):
        shown += " (ignore_eos refused by the server: outputs may stop early)"
    if "arrivals" in result:
        shown += f"; open loop, gamma gaps of shape {result['arrivals']['burstiness']:g}"
    return shown


def write(result: dict, out: Path) -> dict[str, Path]:
    """result.json, result.csv, the charts and report.html (all of them in one page) in ``out``;
    returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "result.json", "csv": out / "result.csv"}
    files["json"].write_text(json.dumps(result, indent=2) + "\n")
    with files["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["concurrency", "request_rate", "run", "requests", "succeeded", "errors", "wall_s",
                         "requests_per_s", "output_tokens_per_s", "stream_tokens_per_s_p50",
                         *[f"{m}_ms_{q}" for m in LATENCY_NAMES for q in ("p50", "p90", "p99")],
                         "lateness_ms_p50", "lateness_ms_p99"])
        for level in result["levels"]:
            runs = [(str(i + 1), r) for i, r in enumerate(level["runs"])] + [("all", level["summary"])]
            for run, s in runs:
                late = s.get("lateness_ms") or {}
                writer.writerow([level["concurrency"], level.get("request_rate"), run, s["requests"],
                                 s["succeeded"], sum(s["errors"].values()), s["wall_s"], s["requests_per_s"],
                                 s["output_tokens_per_s"], s["stream_tokens_per_s"]["p50"],
                                 *[s[f"{m}_ms"].get(q) for m in LATENCY_NAMES
                                   for q in ("p50", "p90", "p99")], late.get("p50"), late.get("p99")])
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
    rated = any("request_rate" in lv for result in results.values() for lv in result["levels"])
    title, word, mark = AXES[rated]

    def tag(level: dict) -> str:
        return f"{mark}{level_label(level_key(level))}"

    for name, result in results.items():
        prefix = f"{name} " if name else ""
        levels = result["levels"]
        for metric, shown in latency.items():
            shown[name or metric.upper()] = [(level_x(lv), *(lv["summary"][f"{metric}_ms"].get(q)
                                                                   for q in ("p50", "p90", "p99")))
                                             for lv in levels]
        throughput[f"{prefix}all streams"] = [(level_x(lv), lv["summary"]["output_tokens_per_s"])
                                              for lv in levels]
        throughput[f"{prefix}per stream"] = [(level_x(lv), lv["summary"]["stream_tokens_per_s"]["p50"])
                                             for lv in levels]
        bound = (result.get("efficiency") or {}).get("levels")
        if bound:
            ceiling[f"{prefix}ceiling (invoke expect)"] = [(row["concurrency"], row["ceiling_tokens_per_s"])
                                                           for row in bound]
        count = nodes(result)
        label = f"{prefix}{count} node{'s' if count > 1 else ''}" if count else f"{prefix}1 node (assumed)"
        per_node[label] = [
            (lv["summary"]["stream_tokens_per_s"]["p50"], lv["summary"]["output_tokens_per_s"] / (count or 1),
             tag(lv)) for lv in levels]
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
                shown[f"{prefix}{tag(level)}"] = points
    only = "p50/p90/p99 only: a result recorded without its distribution" if partial else ""
    return {
        "latency_png": chart.bands([("TTFT", latency["ttft"]), ("ITL", latency["itl"]),
                                    ("end to end", latency["e2e"])], title, "ms"),
        "throughput_png": chart.line_chart(f"Output tokens/s against {word}", title,
                                           "tokens/s", throughput, dashed=ceiling),
        "per_node_png": chart.curve(f"Throughput per node against speed per user (label: {word})",
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
                       ["result", "level", "figure", "baseline", "measured", "worse by", "verdict"],
                       [[v.candidate, str(v.concurrency), v.figure, f"{v.baseline:.2f}", f"{v.measured:.2f}",
                         f"{v.change:+.1%}", "fail" if v.regressed else
                         f"not gated: baseline repeats differ by {v.noise:.0%}" if v.change > threshold
                         else "pass"] for v in verdicts]))
    path = out / "report.html"
    path.write_text(page.render("results by level", results, columns, rows, charts, tables))
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
    """One row per level (concurrency, or request rate); for each result its throughput and median
    latencies."""
    names = list(results)
    columns = ["level"] + [f"{name}: {figure}" for name in names
                           for figure in ("out tok/s", "TTFT p50", "ITL p50", "E2E p50")]
    by_level = {name: {level_key(level): level["summary"] for level in result["levels"]}
                for name, result in results.items()}
    rows = []
    for key in sorted({k for levels in by_level.values() for k in levels}):
        row = [str(level_label(key))]
        for name in names:
            s = by_level[name].get(key)
            row += (["-"] * 4 if s is None else
                    [f"{s['output_tokens_per_s']:.1f}", _ms(s["ttft_ms"], "p50"), _ms(s["itl_ms"], "p50"),
                     _ms(s["e2e_ms"], "p50")])
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
