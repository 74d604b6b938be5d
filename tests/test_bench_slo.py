"""invoke bench --slo: goodput counts exactly the requests that met every SLO, against a server that
makes known requests slow; the best level in the sweep; bad --slo input; bench.compare and its gate
on goodput (a drop fails, a drop within the baseline's own noise is not gated)."""

from __future__ import annotations

import copy
import json

import pytest
from test_bench import bench_json, invoke, timed_server  # noqa: F401  (fixtures)

from trtllm_deploy.measure.bench import report, slo
from trtllm_deploy.measure.bench.client import Sample


def slow_run(invoke, timed_server, tmp_path, name: str, every: int,  # noqa: F811
             slos: str = "ttft=50,e2e=500", *extra: str) -> dict:
    """Concurrency 1 then 2, twelve requests each, no warm-up: request i's prompt starts with i, so
    the server (--slow-every) makes i = 0, every, 2*every, ... slow by 100 ms."""
    url = timed_server(5, 1, "--slow-every", str(every), "--slow-ms", "100")
    return bench_json(invoke, "--url", url, "--concurrency", "1,2", "--requests", "12", "--warmup", "0",
                      "--output-tokens", "4", "--input-tokens", "8", "--slo", slos,
                      "--out", str(tmp_path / name), *extra)


def test_goodput_counts_exactly_the_requests_the_server_made_slow(invoke, timed_server, tmp_path):  # noqa: F811
    result = slow_run(invoke, timed_server, tmp_path, "four", 4, "ttft=50,e2e=500,share=0.75")
    # Level 1 sends prompts 0..11 (0, 4, 8 slow), level 2 prompts 12..23 (12, 16, 20 slow).
    for level in result["levels"]:
        s = level["summary"]
        assert s["succeeded"] == 12 and s["goodput"]["met"] == 9 and s["goodput"]["share"] == 0.75
        assert s["goodput"]["per_s"] == pytest.approx(9 / s["wall_s"], rel=1e-3)
        assert [run["goodput"]["met"] for run in level["runs"]] == [9]
    assert result["slo"]["limits_ms"] == {"ttft": 50.0, "e2e": 500.0}
    assert result["slo"]["target_share"] == 0.75
    assert result["slo"]["best"]["level"] == "2" and result["slo"]["best"]["share"] == 0.75
    # The files carry it: the CSV's columns, the page's table and chart.
    rows = (tmp_path / "four" / "result.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert rows[-1].split(",")[header.index("goodput_share")] == "0.75"
    page = (tmp_path / "four" / "report.html").read_text()
    assert "<th>goodput/s</th>" in page and "<td>75%</td>" in page and "the highest level with 75%" in page
    assert (tmp_path / "four" / "goodput.png").is_file() and "the requests that met every SLO" in page
    # The chart: every request's rate and the goodput, against the concurrency on a log2 axis.
    axes = report.figures({"": result})["goodput_png"].axes[0]
    lines = {line.get_label(): list(line.get_ydata()) for line in axes.get_lines()}
    assert lines == {"all requests": [lv["summary"]["requests_per_s"] for lv in result["levels"]],
                     "meeting the SLOs": [lv["summary"]["goodput"]["per_s"] for lv in result["levels"]]}
    assert axes.get_xscale() == "log" and [t.get_text() for t in axes.get_xticklabels()] == ["1", "2"]


def test_the_table_and_summary_say_the_goodput_and_the_best_level(invoke, timed_server, tmp_path):  # noqa: F811
    url = timed_server(5, 1, "--slow-every", "3", "--slow-ms", "100")
    done = invoke("bench", "--url", url, "--concurrency", "1", "--requests", "6", "--warmup", "0",
                  "--output-tokens", "4", "--input-tokens", "8", "--slo", "ttft=50",
                  "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    assert "goodput/s" in done.stdout and "67%" in done.stdout  # prompts 0 and 3 of 0..5 slow
    assert "SLOs (ttft ≤ 50 ms): no level had 90% of its requests meeting them" in done.stdout


def test_a_sample_meets_the_slos_only_when_every_given_one_holds():
    fast = Sample(sent=0.0, first=0.01, arrivals=[0.01, 0.02, 0.03], ended=0.03)
    assert slo.meets(fast, {"ttft": 20}) and slo.meets(fast, {"tpot": 10.5, "e2e": 30.5})
    assert not slo.meets(fast, {"ttft": 9}) and not slo.meets(fast, {"ttft": 20, "tpot": 9})
    failed = Sample(sent=0.0, first=0.01, arrivals=[0.01], ended=0.01, error="http 500")
    assert not slo.meets(failed, {"e2e": 1000})
    no_text = Sample(sent=0.0, ended=0.01, output_tokens=3)  # usage only: no TTFT to show
    assert not slo.meets(no_text, {"ttft": 1000}) and slo.meets(no_text, {"tpot": 1})


@pytest.mark.parametrize("args, message", [
    (["--slo", "ttft"], "'ttft' has no '='"),
    (["--slo", "latency=5"], "unknown key 'latency'"),
    (["--slo", "ttft=fast"], "ttft=fast must be a number of milliseconds above 0"),
    (["--slo", "tpot=0"], "tpot=0 must be a number of milliseconds above 0"),
    (["--slo", "ttft=5,ttft=6"], "ttft is given twice"),
    (["--slo", "ttft=5,share=90"], "share=90 must be a fraction above 0 and at most 1"),
    (["--slo", "share=0.5"], "no limit given"),
])
def test_bad_slos_exit_2_and_say_what_is_expected(invoke, args, message):  # noqa: F811
    done = invoke("bench", "--url", "http://127.0.0.1:9", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "KEY=MILLISECONDS" in done.stderr


def test_compare_and_its_gate_on_goodput(invoke, timed_server, tmp_path):  # noqa: F811
    slow_run(invoke, timed_server, tmp_path, "base", 4, "ttft=50,e2e=500", "--repeats", "2")
    # The same, with every second request slow: half of them.
    slow_run(invoke, timed_server, tmp_path, "worse", 2, "ttft=50,e2e=500", "--repeats", "2")
    shown = json.loads(invoke("bench.compare", f"{tmp_path / 'base'},{tmp_path / 'worse'}", "--json",
                              "--out", str(tmp_path / "c")).stdout)
    assert "base: goodput/s" in shown["columns"] and "worse: good %" in shown["columns"]
    shares = shown["columns"].index("base: good %"), shown["columns"].index("worse: good %")
    assert [(row[shares[0]], row[shares[1]]) for row in shown["rows"]] == [("75%", "50%"), ("75%", "50%")]
    assert (tmp_path / "c" / "goodput.png").is_file()
    # Against the baseline: the goodput drop fails, level by level.
    failing = invoke("bench.compare", str(tmp_path / "worse"), "--baseline", str(tmp_path / "base"), "--json",
                     "--threshold", "0.2", "--out", str(tmp_path / "g"))
    assert failing.returncode == 1, failing.stdout + failing.stderr
    failed = {(v["concurrency"], v["figure"]) for v in json.loads(failing.stdout)["gate"]["verdicts"]
              if v["regressed"]}
    assert {(1, "goodput requests/s"), (2, "goodput requests/s")} <= failed
    # The baseline against itself passes.
    same = invoke("bench.compare", str(tmp_path / "base"), "--baseline", str(tmp_path / "base"),
                  "--out", str(tmp_path / "s"))
    assert same.returncode == 0, same.stdout + same.stderr


def test_a_goodput_drop_within_the_baselines_own_noise_is_not_gated():
    def result(per_s: float, runs: list[float]) -> dict:
        summary = {"output_tokens_per_s": 100.0, "ttft_ms": {}, "itl_ms": {}, "e2e_ms": {}, "errors": {},
                   "requests": 10}
        return {"levels": [{"concurrency": 1, "summary": summary | {"goodput": {"per_s": per_s}},
                            "runs": [summary | {"goodput": {"per_s": r}} for r in runs]}]}

    steady = report.gate(result(10.0, [10.0, 10.2]), {"new": result(7.0, [7.0])}, 0.1)
    [verdict] = [v for v in steady if v.figure == "goodput requests/s"]
    assert verdict.regressed and verdict.change == pytest.approx(0.3)
    noisy = report.gate(result(10.0, [6.0, 14.0]), {"new": result(7.0, [7.0])}, 0.1)
    [verdict] = [v for v in noisy if v.figure == "goodput requests/s"]
    assert not verdict.regressed and verdict.noise == pytest.approx(0.8)


def test_the_best_level_is_the_highest_that_meets_the_target():
    levels = [{"request_rate": rate, "concurrency": None,
               "summary": {"goodput": {"share": share, "per_s": rate}}}
              for rate, share in ((1, 1.0), (2, 0.95), (4, 0.85), (8, 0.91))]
    assert slo.best(levels, 0.9)["level"] == "8/s"
    assert slo.best(levels, 0.96)["level"] == "1/s" and slo.best(levels, 1.0)["x"] == 1
    assert slo.best(copy.deepcopy(levels)[2:3], 0.9) is None
