"""report.html: one self-contained page beside result.json and result.csv (and beside the charts of
`bench.compare`, for the results it compares) — the table, every chart (embedded as data: URIs,
nothing fetched from anywhere), what was measured on (endpoint, image, artifact, tp, nodes) and the
`invoke expect` ceiling, or why there is none."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
.facts td{text-align:left}img{display:block;margin:0.5em 0 1.5em;max-width:100%}p.note{color:#555}"""
NO_MODEL = ("no ceiling: the result records no model to compute one for (pass --expect-model MODEL, or "
            "--hosts for a deployment whose artifact is in the local store)")
CAPTIONS = {"latency_png": "Latency: p50 (line), the p50–p90 and p90–p99 bands; concurrency on a log2 axis",
            "throughput_png": "Output tokens/s, all streams and per stream (dashed: the ceiling if known)",
            "per_node_png": "Throughput per node against tokens/s per user, one point per concurrency",
            "distributions_png": "TTFT and ITL distributions, one line per concurrency",
            "goodput_png": "Requests/s against goodput: the requests that met every SLO (--slo)",
            "depth_png": "Prompt processing (pp) and generation (tg) tokens/s against the context depth, "
                         "log2 axis (± one standard deviation)"}


def _table(columns: list[str], rows: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f'<table class="{css}"><tr>{head}</tr>{body}</table>'


def environment_rows(result: dict) -> list[list[str]]:
    """What was measured on, as (fact, value) rows: endpoint, deployment (or why it is not known),
    workload and client."""
    env, work = result["environment"], result["workload"]
    endpoint, client = env["endpoint"], env.get("client") or {}
    runtime = f"{endpoint.get('runtime') or '?'} {endpoint.get('version') or ''}".strip()
    if endpoint.get("standin"):
        runtime += " (stand-in: not inference)"
    rows = [["endpoint", endpoint["url"]], ["model", str(endpoint.get("model"))], ["runtime", runtime],
            ["server", endpoint.get("server_header") or "-"]]
    deployment = env.get("deployment")
    if deployment:
        nodes = deployment.get("nodes") or []
        rows += [["cluster", str(deployment.get("cluster"))],
                 ["image", f"{deployment.get('image')} ({deployment.get('image_id') or 'id not recorded'})"],
                 ["artifact", str(deployment.get("artifact"))],
                 ["tp", str(deployment.get("tp"))], ["pp", str(deployment.get("pp"))],
                 ["nodes", f"{len(nodes)}: {', '.join(nodes)}"],
                 ["TensorRT-LLM", f"{deployment.get('tensorrt_llm_version') or '?'} "
                                  f"({deployment.get('tensorrt_llm_commit') or 'commit not recorded'})"]]
    else:
        rows += [["image, artifact, tp, nodes", "not recorded: measured by --url (pass --hosts hosts.toml "
                                                "to record the deployment)"]]
    rows += [["workload", f"{work['input_tokens']} in / {work['output_tokens']} out tokens, "
                          f"{work['path']}, ignore_eos {work['ignore_eos']}"],
             ["tokens counted by", str(work["counted_by"])],
             ["client", f"{client.get('client', '?')} on {client.get('host', '?')}"],
             ["started", str(result.get("started"))]]
    return rows


def ceiling_html(result: dict, name: str = "") -> str:
    """The decode ceiling per concurrency where the result records it; else the reason there is none."""
    named = f"{name}: " if name else ""
    shown = result.get("efficiency")
    if not shown:
        return f'<p class="note">{escape(named + NO_MODEL)}</p>'
    if not shown.get("levels"):
        return f'<p class="note">{escape(named + "no ceiling: " + str(shown.get("unavailable")))}</p>'
    heading = (f"{named}Ceiling: {shown['model']} {shown.get('precision') or ''} tp {shown['tp']} on "
               f"{shown['hardware']} (invoke expect; the dashed line in the throughput chart)")
    rows = [[str(r["concurrency"]), f"{r['measured_tokens_per_s']:.1f}", f"{r['ceiling_tokens_per_s']:.1f}",
             f"{100 * r['efficiency']:.0f}%"] for r in shown["levels"]]
    return (f"<h2>{escape(heading)}</h2>"
            + _table(["streams", "measured tokens/s", "ceiling tokens/s", "efficiency"], rows))


def image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<h3>{escape(caption)}</h3>"
            f'<img alt="{escape(caption)}" src="data:image/png;base64,{data}">')


def render(title: str, results: dict[str, dict], columns: list[str], rows: list[list[str]],
           charts: dict[str, Path], tables: list[tuple[str, list[str], list[list[str]]]] = ()) -> str:
    """The page as one string: what each result (one named "", or several side by side) was measured
    on and its ceiling, the table, any further ``tables`` (heading, columns, rows), every chart
    inlined — no link or source outside it."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>"]
    for name, result in results.items():
        parts += [f"<h2>Measured on{': ' + escape(name) if name else ''}</h2>",
                  _table(["", ""], environment_rows(result), "facts")]
    parts += ["<h2>Results by level</h2>", _table(columns, rows)]
    for name, result in results.items():
        parts.append(ceiling_html(result, name))
    for heading, table_columns, table_rows in tables:
        if not table_columns:  # a line of the summary, no table
            parts.append(f"<p><b>{escape(heading)}</b></p>")
            continue
        parts += [f"<h2>{escape(heading)}</h2>", _table(table_columns, table_rows)]
    parts += ["<h2>Charts</h2>", *(image(path, CAPTIONS.get(key, key)) for key, path in charts.items()),
              "</body></html>"]
    return "\n".join(parts) + "\n"
