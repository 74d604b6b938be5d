"""The depth workload's table in llama-benchy's layout (eugr/llama-benchy, src/llama_benchy/results.py),
the one Spark Arena publishes: per depth a ``pp{N}`` and a ``tg{N}`` row (`` @ d{depth}`` after
them when the depth is not 0), each speed as ``mean ± std`` over the requests.

Columns as llama-benchy prints them. What this client fills them with: t/s of a pp row is every
prompt token the request carried (the depth's context and the prompt itself: nothing is cached,
each prompt differs from its first word) over its TTFT; of a tg row the tokens after the first over
their decode time. ttfr is the time to the response's first bytes; est_ppt and e2e_ttft are the
TTFT (no network latency is subtracted: measure on the serving network).
"""

from __future__ import annotations

COLUMNS = ["model", "test", "t/s", "ttfr (ms)", "est_ppt (ms)", "e2e_ttft (ms)"]


def _mean_std(figure: dict | None) -> str:
    if not figure or figure.get("mean") is None:
        return ""
    return f"{figure['mean']:.2f} ± {figure['std']:.2f}"


def rows(result: dict) -> list[list[str]]:
    model = str(result["environment"]["endpoint"].get("model") or result["workload"].get("model") or "")
    pp, tg = result["workload"]["input_tokens"], result["workload"]["output_tokens"]
    shown = []
    for level in result["levels"]:
        if "depth" not in level:
            continue
        figures = level["summary"].get("depth") or {}
        at = f" @ d{level['depth']}" if level["depth"] else ""
        ttft = _mean_std(figures.get("ttft_ms"))
        shown.append([model, f"pp{pp}{at}", _mean_std(figures.get("pp_tokens_per_s")),
                      _mean_std(figures.get("ttfr_ms")), ttft, ttft])
        shown.append([model, f"tg{tg}{at}", _mean_std(figures.get("tg_tokens_per_s")), "", "", ""])
    return shown
