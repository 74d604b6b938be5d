"""``invoke bench`` and ``invoke bench.compare``: measure an OpenAI-compatible endpoint; compare results
and gate a candidate against a stored baseline."""

from __future__ import annotations

import datetime
from pathlib import Path

from invoke import Collection, Context, task
from invoke.exceptions import Exit

from trtllm_deploy import console
from trtllm_deploy.cli import JSON_HELP, user_errors
from trtllm_deploy.errors import InputError
from trtllm_deploy.measure.bench import efficiency, report
from trtllm_deploy.measure.bench.measure import Shape, measure
from trtllm_deploy.runtimes import runtime as runtimes


def _default_out() -> str:
    return f"bench-results/{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


@task(default=True, help={
    "url": "the endpoint, http://HOST:PORT (any OpenAI-compatible server: "
           f"{', '.join(runtime.server for runtime in runtimes.known())}, ...)",
    "hosts": "measure the cluster's current deployment instead (its hosts.toml); records image, "
             "artifact, tp and nodes",
    "concurrency": "streams at once, a sweep: 1,2,4,8 (default) or ..64 for 1,2,4,...,64; with "
                   "--request-rate one number, the most requests in flight (default: no cap)",
    "request_rate": "open loop instead: requests/s, a sweep 1,2,5 (each level's gaps drawn with --seed)",
    "burstiness": "gamma shape of the gaps between requests: 1 Poisson (default), <1 burstier, >1 steadier",
    "seed": "seed of the request-rate schedule (default 0): the same seed, the same arrivals",
    "input_tokens": "prompt length in the model's tokens (in words, approximate, without its tokenizer)",
    "output_tokens": "tokens to generate per request (ignore_eos is sent so none stops early)",
    "requests": "requests per run and level (default: 4 per stream)",
    "duration": "seconds per run and level instead of a request count",
    "warmup": "warm-up requests per stream before each level, not counted (default 2)",
    "repeats": "runs per level; the table shows their spread (default 1)",
    "out": "folder for result.json, result.csv and the charts (default bench-results/<time>)",
    "model": "the model name to send (default: the first of /v1/models)",
    "chat": "use /v1/chat/completions instead of /v1/completions",
    "tokenizer": "folder with the model's tokenizer.json, to count prompt tokens exactly",
    "ignore_eos": "send ignore_eos/min_tokens (default); --no-ignore-eos lets the server stop early",
    "expect_model": "report measured/ceiling for this model (default with --hosts: the served artifact's)",
    "expect_precision": "its precision (default: the artifact's, else the model's default)",
    "hardware": "the hardware the ceiling is computed for (default gb10; see invoke expect)",
    "store": "where engine.build keeps artifacts, to read the served one's model (default engines/)",
    "slo": "service-level objectives in ms, any of ttft=MS,tpot=MS,e2e=MS: goodput (requests/s meeting "
           "every one) per level, and the highest level where share=FRACTION of requests (default 0.9) "
           "meet them",
    "workload": "random (default: unique prompts), prefix (a shared prefix: --prefix-tokens), multi-turn "
                "(chat conversations carrying their history: --turns) or depth (pp/tg at --depths)",
    "prefix_tokens": "--workload prefix: tokens every prompt shares at its start (default: half of "
                     "--input-tokens)",
    "turns": "--workload multi-turn: turns per conversation (default 3); --requests counts turns, rounded "
             "up to whole conversations",
    "depths": "--workload depth: context tokens before each prompt, 0,4096,16384; a table in "
              "llama-benchy's layout",
    "prompts": "a JSONL file of your own prompts: {\"prompt\": ...} or {\"messages\": [...]} a line, "
               "optionally \"output_tokens\"",
    "json": JSON_HELP})
@user_errors
def run(c: Context, url: str = "", hosts: str = "", concurrency: str = "", input_tokens: int = 128,
        output_tokens: int = 128, requests: int = 0, duration: str = "0", warmup: int = 2, repeats: int = 1,
        out: str = "", model: str = "", chat: bool = False, tokenizer: str = "", ignore_eos: bool = True,
        expect_model: str = "", expect_precision: str = "", hardware: str = "gb10", store: str = "engines",
        json: bool = False, request_rate: str = "", burstiness: str = "1", seed: int = 0, slo: str = "",
        workload: str = "random", prefix_tokens: int = 0, turns: int = 0,
        depths: str = "", prompts: str = "") -> None:
    """Measure an endpoint: TTFT, TPOT, ITL, latency and tokens/s over a concurrency or request-rate sweep."""
    with console.err.status("measuring…") as status:
        result = measure(url, hosts, concurrency, input_tokens, output_tokens, requests,
                         _number(duration, "--duration"), warmup, repeats, model, chat, tokenizer, ignore_eos,
                         progress=lambda line: status.update(line), request_rate=request_rate,
                         burstiness=_number(burstiness, "--burstiness"), seed=seed,
                         shape=Shape(workload, prefix_tokens, turns, depths, prompts, slo))
    deployment = result["environment"].get("deployment") or {}
    served, served_precision = efficiency.served_model(store, deployment.get("artifact"))
    if expect_model or served:
        result["efficiency"] = efficiency.against_ceiling(
            result, expect_model or served, expect_precision or served_precision,
            int(deployment.get("tp") or 1), hardware)
    files = report.write(result, Path(out or _default_out()))
    if json:
        console.print_json(result | {"files": {k: str(v) for k, v in files.items()}})
        return
    console.out.print(console.table(report.title(result), report.columns(result),
                                    [report.level_row(level) for level in result["levels"]]))
    for heading, columns, rows in report.extra_tables(result):
        console.out.print(console.table(heading, columns, rows))
    for line in report.summary_lines(result):
        console.out.print(line, soft_wrap=True)
    for line in report.warnings(result):
        console.out.print(f"warning: {line}", soft_wrap=True)
    shown = result.get("efficiency") or {}
    if shown.get("levels"):
        console.out.print(console.table(
            f"against the ceiling: {shown['model']} {shown['precision'] or ''} tp {shown['tp']} on "
            f"{shown['hardware']} (invoke expect)", ["streams", "measured tokens/s", "ceiling", "efficiency"],
            [[str(r["concurrency"]), f"{r['measured_tokens_per_s']:.1f}", f"{r['ceiling_tokens_per_s']:.1f}",
              f"{100 * r['efficiency']:.0f}%"] for r in shown["levels"]]))
    elif shown.get("unavailable"):
        console.out.print(f"no ceiling: {shown['unavailable']}")
    console.out.print(f"wrote {', '.join(str(p) for p in files.values())}", soft_wrap=True)
    failed = sum(sum(level["summary"]["errors"].values()) for level in result["levels"])
    if failed:
        raise Exit(f"{failed} request(s) failed (kinds in the table; examples in {files['json']})", code=1)


@task(positional=["results"], help={
    "results": "result files (or their folders) of `invoke bench`, comma-separated: A.json,B.json",
    "baseline": "a stored result to gate against: exit 1 if any result is worse than it by --threshold",
    "threshold": "how much worse counts as a regression, as a fraction (default 0.1 = 10 %)",
    "out": "folder for the comparison charts (default: bench-results/compare-<time>)",
    "json": JSON_HELP})
@user_errors
def compare(c: Context, results: str | None = None, baseline: str = "", threshold: str = "0.1", out: str = "",
            json: bool = False) -> None:
    """Side by side: several results by level (concurrency, request rate or depth; goodput and pp/tg
    where measured), charts; with --baseline a pass/fail gate."""
    paths = [path for path in (results or "").split(",") if path.strip()]
    if not paths:
        raise Exit("give result files to compare: invoke bench.compare A.json,B.json [--baseline X.json]",
                   code=2)
    loaded = _named(paths)
    reference = report.load(baseline) if baseline else None
    shown = ({f"baseline {_name(baseline)}": reference} if reference else {}) | loaded
    columns, rows = report.side_by_side(shown)
    folder = Path(out or _default_out().replace("bench-results/", "bench-results/compare-"))
    folder.mkdir(parents=True, exist_ok=True)
    files = report.charts(shown, folder)
    limit = _number(threshold, "--threshold")
    verdicts = report.gate(reference, loaded, limit) if reference else []
    regressions = [v for v in verdicts if v.regressed]
    files["html"] = report.compare_page(shown, columns, rows, files, folder,
                                        baseline and f"gate against {baseline}", verdicts, limit)
    if json:
        console.print_json({"columns": columns, "rows": rows, "files": {k: str(v) for k, v in files.items()},
                            "gate": None if reference is None else {
                                "threshold": limit, "passed": not regressions,
                                "verdicts": [v.as_json() for v in verdicts]}})
    else:
        console.out.print(console.table("results by level", columns, rows))
        if reference is not None:
            console.out.print(console.table(
                f"gate against {baseline} (worse by more than {limit:.0%} fails)",
                ["result", "concurrency", "figure", "baseline", "measured", "worse by", ""],
                [[v.candidate, str(v.concurrency), v.figure, f"{v.baseline:.2f}", f"{v.measured:.2f}",
                  f"{v.change:+.1%}", _verdict_cell(v, limit)]
                 for v in verdicts]))
        console.out.print(f"wrote {', '.join(str(p) for p in files.values())}", soft_wrap=True)
    if regressions:
        raise Exit(f"regression: {len(regressions)} figure(s) worse than the baseline by more than "
                   f"{limit:.0%}", code=1)


def _verdict_cell(verdict: report.Verdict, limit: float):
    if verdict.regressed:
        return console.status_cell("fail")
    if verdict.change > limit:  # worse, but the baseline's own repeats differ more than that
        return console.status_cell("warn", f"baseline repeats differ by {verdict.noise:.0%}: not gated")
    return console.status_cell("pass")


def _number(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{flag} {text!r}: give a number") from None


def _name(path: str) -> str:
    path = Path(path)
    return path.parent.name if path.name == "result.json" else path.stem


def _named(paths: list[str]) -> dict[str, dict]:
    named: dict[str, dict] = {}
    for path in paths:
        name = _name(path)
        while name in named:
            name += "'"
        named[name] = report.load(path)
    return named


ns = Collection("bench", run, compare)
