"""A result on disk (JSON, CSV, PNG charts, one HTML page with all of them) and its tables; the
comparison of several results and its gate are in ``compare`` (re-exported here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from trtllm_deploy.errors import InputError
from trtllm_deploy.measure import chart
from trtllm_deploy.measure.bench import depth_table, page, slo
from trtllm_deploy.measure.bench.compare import GATED, Verdict, gate, side_by_side  # noqa: F401
from trtllm_deploy.measure.bench.levels import level_key, level_label, level_x
from trtllm_deploy.measure.bench.levels import ms as _ms

SCHEMA = "trtllm-deploy.bench/1"
LATENCY_NAMES = ("ttft", "tpot", "itl", "e2e")
COLUMNS = ["concurrency", "requests", "errors", "req/s", "out tok/s", "tok/s/stream", "TTFT p50 ms",
           "TTFT p99 ms", "TPOT p50 ms", "ITL p50 ms", "ITL p99 ms", "tok/chunk", "E2E p50 ms", "E2E p99 ms",
           "spread"]
# An open-loop result: its rate first, how late requests left their schedule last.
RATE_COLUMNS = ["rate/s", "cap", *COLUMNS[1:], "late p50 ms", "late p99 ms"]
# A depth result: the context depth first (its pp/tg speeds are in llama-benchy's table, depth_table.py).
DEPTH_COLUMNS = ["depth", *COLUMNS[1:]]
# With --slo, last: requests/s that met every SLO and their share of all requests.
GOODPUT_COLUMNS = ["goodput/s", "good %"]


def columns(result: dict) -> list[str]:
    shown = RATE_COLUMNS if "arrivals" in result else DEPTH_COLUMNS if _depth(result) else COLUMNS
    return shown + (GOODPUT_COLUMNS if "slo" in result else [])


def _depth(result: dict) -> bool:
    return any("depth" in level for level in result["levels"])


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


def summary_lines(result: dict) -> list[str]:
    """What the sweep found, beyond the table: the best level under the SLOs."""
    return [slo.describe(result["slo"])] if result.get("slo") else []


def _level_name(level: dict) -> str:
    if "request_rate" in level:
        return f"{level['request_rate']:g} requests/s"
    if "depth" in level:
        return f"depth {level['depth']}"
    return f"concurrency {level['concurrency']}"


# A chart's x axis, by how the results were measured.
AXES = {False: ("concurrency (streams)", "concurrency", "c="),
        True: ("request rate (requests/s)", "request rate", ""),
        "depth": ("context depth (tokens)", "context depth", "")}


def level_row(level: dict) -> list[str]:
    s = level["summary"]
    spread = level.get("spread", {}).get("output_tokens_per_s") or {}
    errors = sum(s["errors"].values())
    rate = [f"{level['request_rate']:g}", str(level["concurrency"] or "-")] if "request_rate" in level else []
    late = ([_ms(s.get("lateness_ms", {}), "p50") + (" behind" if level.get("behind") else ""),
             _ms(s.get("lateness_ms", {}), "p99")] if rate else [])
    good = s.get("goodput")
    goodput = [f"{good['per_s']:.2f}", f"{100 * good['share']:.0f}%"] if good else []
    first = rate or [str(level["depth"] if "depth" in level else level["concurrency"])]
    return first + [str(s["succeeded"]), str(errors) if not errors else
            f"{errors}: " + ", ".join(f"{k} {v}" for k, v in s["errors"].items()),
            f"{s['requests_per_s']:.2f}", f"{s['output_tokens_per_s']:.1f}",
            "-" if s["stream_tokens_per_s"]["p50"] is None else f"{s['stream_tokens_per_s']['p50']:.1f}",
            _ms(s["ttft_ms"], "p50"), _ms(s["ttft_ms"], "p99"), _ms(s["tpot_ms"], "p50"),
            _ms(s["itl_ms"], "p50"), _ms(s["itl_ms"], "p99"), f"{s.get('tokens_per_chunk', 0):.2f}",
            _ms(s["e2e_ms"], "p50"), _ms(s["e2e_ms"], "p99"),
            f"±{100 * spread['cv']:.1f}%" if spread.get("cv") is not None and len(level["runs"]) > 1 else "-"
            ] + late + goodput


def title(result: dict) -> str:
    env, work = result["environment"], result["workload"]
    endpoint = env["endpoint"]
    runtime = endpoint.get("runtime")
    if runtime == "unknown" and endpoint.get("server_header"):   # not one we know: what it calls itself
        runtime = f"an unknown runtime (server: {endpoint['server_header']})"
    served = f"{runtime} {endpoint.get('version') or ''}".strip()
    if endpoint.get("standin"):
        served += " (stand-in: not inference)"
    shown = (f"{endpoint.get('model')} on {served} at {endpoint['url']}: {work['input_tokens']} in / "
             f"{work['output_tokens']} out tokens, counted by {work['counted_by']}")
    kind, shape = work.get("kind", "random"), work.get("shape") or {}
    if kind == "file":
        shown = (f"{endpoint.get('model')} on {served} at {endpoint['url']}: prompts of {shape['prompts']}, "
                 f"{work['output_tokens']} out tokens unless a line says")
    elif kind != "random":
        shown += f"; workload {kind}" + "".join(f", {k.replace('_', ' ')} {v}" for k, v in shape.items())
    if work.get("ignore_eos_refused"):
        shown += " (ignore_eos refused by the server: outputs may stop early)"
    if "arrivals" in result:
        shown += f"; open loop, gamma gaps of shape {result['arrivals']['burstiness']:g}"
    return shown


def extra_tables(result: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """Tables beside the main one: llama-benchy's pp/tg table of a depth result, figures per turn of a
    multi-turn one."""
    tables = []
    if _depth(result):
        tables.append(("prompt processing (pp) and generation (tg) by context depth, llama-benchy's layout",
                       depth_table.COLUMNS, depth_table.rows(result)))
    turned = [(level, level["summary"]["turns"]) for level in result["levels"]
              if level["summary"].get("turns")]
    if turned:
        tables.append(("by turn of the conversations (each turn carries the history)",
                       ["level", "turn", "requests", "succeeded", "TTFT p50 ms", "E2E p50 ms"],
                       [[_level_name(level), str(t["turn"]), str(t["requests"]), str(t["succeeded"]),
                         _ms(t, "ttft_p50_ms"), _ms(t, "e2e_p50_ms")]
                        for level, turns in turned for t in turns]))
    return tables


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
                         "depth", "goodput_per_s", "goodput_share", "pp_tokens_per_s", "tg_tokens_per_s",
                         "lateness_ms_p50", "lateness_ms_p99"])
        for level in result["levels"]:
            runs = [(str(i + 1), r) for i, r in enumerate(level["runs"])] + [("all", level["summary"])]
            for run, s in runs:
                late, good, depth = s.get("lateness_ms") or {}, s.get("goodput") or {}, s.get("depth") or {}
                writer.writerow([level["concurrency"], level.get("request_rate"), run, s["requests"],
                                 s["succeeded"], sum(s["errors"].values()), s["wall_s"], s["requests_per_s"],
                                 s["output_tokens_per_s"], s["stream_tokens_per_s"]["p50"],
                                 *[s[f"{m}_ms"].get(q) for m in LATENCY_NAMES
                                   for q in ("p50", "p90", "p99")],
                                 level.get("depth"), good.get("per_s"), good.get("share"),
                                 (depth.get("pp_tokens_per_s") or {}).get("mean"),
                                 (depth.get("tg_tokens_per_s") or {}).get("mean"),
                                 late.get("p50"), late.get("p99")])
    drawn = charts({"": result}, out)
    files.update(drawn)
    files["html"] = out / "report.html"
    tables = [(line, [], []) for line in summary_lines(result)] + extra_tables(result)
    files["html"].write_text(page.render(title(result), {"": result}, columns(result),
                                         [level_row(level) for level in result["levels"]], drawn, tables))
    return files


CHARTS = {"latency_png": "latency.png", "throughput_png": "throughput.png", "per_node_png": "per_node.png",
          "distributions_png": "distributions.png"}
# Drawn where they apply: goodput with --slo, pp/tg against depth for the depth workload (which has
# no latency or throughput chart: depth 0 has no place on their log2 axes).
MORE_CHARTS = {"goodput_png": "goodput.png", "depth_png": "depth.png"}


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
    deep = any("depth" in lv for result in results.values() for lv in result["levels"])
    title, word, mark = AXES["depth" if deep else rated]

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
    drawn = {
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
    if deep:  # depth 0 has no place on the latency charts' log2 axes: the depth chart places it
        drawn = {"depth_png": _depth_chart(results), "distributions_png": drawn["distributions_png"]}
    good = {}
    for name, result in results.items():
        prefix = f"{name} " if name else ""
        if any("goodput" in level["summary"] for level in result["levels"]):
            good[f"{prefix}all requests"] = [(level_x(lv), lv["summary"]["requests_per_s"])
                                             for lv in result["levels"]]
            good[f"{prefix}meeting the SLOs"] = [
                (level_x(lv), (lv["summary"].get("goodput") or {}).get("per_s")) for lv in result["levels"]]
    if good:
        drawn["goodput_png"] = chart.line_chart(f"Goodput (requests/s meeting every SLO) against {word}",
                                                title, "requests/s", good, log_x=not deep)
    return drawn


def _depth_chart(results: dict[str, dict]):
    """pp and tg tokens/s (mean, with ± one standard deviation) against the context depth."""
    panels = {"pp": {}, "tg": {}}
    for name, result in results.items():
        for kind, series in panels.items():
            series[name or kind] = [
                (level["depth"], figure.get("mean"), figure.get("std"))
                for level in result["levels"] if "depth" in level
                for figure in [(level["summary"].get("depth") or {}).get(f"{kind}_tokens_per_s") or {}]]
    return chart.depth([("prompt processing (pp)", panels["pp"]), ("generation (tg)", panels["tg"])])


def charts(results: dict[str, dict], out: Path) -> dict[str, Path]:
    """``figures`` written as PNG files in ``out``."""
    names = CHARTS | MORE_CHARTS
    return {key: chart.save(figure, out / names[key]) for key, figure in figures(results).items()}


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


