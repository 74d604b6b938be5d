"""invoke bench --workload depth --depths ...: prompt processing and generation tokens/s at each
context depth against a server whose TTFT grows with the prompt by a known amount, printed in
llama-benchy's table layout; the depth chart; bench.compare of depth results and its gate."""

from __future__ import annotations

import json
import subprocess

import pytest
from test_bench import bench_json, invoke, timed_server  # noqa: F401  (fixtures)

from trtllm_deploy.measure.bench import depth_table, report

TTFT_MS, PER_TOKEN_MS, ITL_MS = 50.0, 0.05, 4.0
PP, TG, DEPTHS = 64, 64, (0, 1024, 4096)


def depth_run(invoke, timed_server, out, *extra: str) -> subprocess.CompletedProcess:  # noqa: F811
    """One stream: one server process (a second one's first answer, its code paths still cold, came
    some milliseconds late at depth 0), warmed at each depth by one request not counted."""
    url = timed_server(TTFT_MS, ITL_MS, "--prefill-ms-per-token", str(PER_TOKEN_MS), "--workers", "1")
    return invoke("bench", "--url", url, "--workload", "depth", "--depths", ",".join(map(str, DEPTHS)),
                  "--input-tokens", str(PP), "--output-tokens", str(TG), "--requests", "3", "--warmup", "1",
                  "--out", str(out), *extra)


def expected_pp(depth: int) -> float:
    """The server's TTFT is TTFT_MS + PER_TOKEN_MS per prompt word: every word of depth and prompt."""
    tokens = depth + PP
    return tokens / ((TTFT_MS + PER_TOKEN_MS * tokens) / 1000)


def test_pp_and_tg_at_each_depth_are_what_the_server_was_timed_to_give(invoke, timed_server, tmp_path):  # noqa: F811
    done = depth_run(invoke, timed_server, tmp_path / "d", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [level["depth"] for level in result["levels"]] == list(DEPTHS)
    for level in result["levels"]:
        figures = level["summary"]["depth"]
        assert figures["prompt_tokens"] == level["depth"] + PP
        assert figures["pp_tokens_per_s"]["mean"] == pytest.approx(expected_pp(level["depth"]), rel=0.1)
        assert figures["tg_tokens_per_s"]["mean"] == pytest.approx(1000 / ITL_MS, rel=0.05)
        assert figures["pp_tokens_per_s"]["count"] == 3 and figures["ttft_ms"]["mean"] == pytest.approx(
            TTFT_MS + PER_TOKEN_MS * (level["depth"] + PP), rel=0.1)
    rows = (tmp_path / "d" / "result.csv").read_text().splitlines()
    header = rows[0].split(",")
    depths = [row.split(",")[header.index("depth")] for row in rows[1:]]
    assert depths == ["0", "0", "1024", "1024", "4096", "4096"]  # a run and the level's pooled row each
    assert (tmp_path / "d" / "depth.png").is_file() and not (tmp_path / "d" / "latency.png").exists()


def test_the_table_is_in_llama_benchys_layout(invoke, timed_server, tmp_path):  # noqa: F811
    done = depth_run(invoke, timed_server, tmp_path / "d")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    [head] = [line for line in lines if "est_ppt (ms)" in line]
    assert [cell.strip() for cell in head.strip("┃ ").split("┃")] == depth_table.COLUMNS == [
        "model", "test", "t/s", "ttfr (ms)", "est_ppt (ms)", "e2e_ttft (ms)"]
    named = [line.split("│")[2].strip() for line in lines if line.startswith("│ timed-test-model")]
    assert named == ["pp64", "tg64", "pp64 @ d1024", "tg64 @ d1024", "pp64 @ d4096", "tg64 @ d4096"]
    pp_at_4096 = next(line for line in lines if "pp64 @ d4096" in line).split("│")[3]
    mean, std = (float(part) for part in pp_at_4096.split("±"))
    assert mean == pytest.approx(expected_pp(4096), rel=0.1) and std >= 0
    page = (tmp_path / "d" / "report.html").read_text()
    assert "<td>pp64 @ d1024</td>" in page and "<th>est_ppt (ms)</th>" in page


def test_the_depth_chart_puts_pp_and_tg_against_depth_on_a_log2_axis(invoke, timed_server, tmp_path):  # noqa: F811
    result = json.loads(depth_run(invoke, timed_server, tmp_path / "d", "--json").stdout)
    figure = report.figures({"": result})["depth_png"]
    pp, tg = figure.axes
    assert pp.get_title(loc="left") == "prompt processing (pp)"
    assert tg.get_title(loc="left") == "generation (tg)"
    assert tg.get_xscale() == "log" and [t.get_text() for t in tg.get_xticklabels()] == ["0", "1024", "4096"]
    assert list(tg.get_xticks()) == [512, 1024, 4096]  # depth 0 below the smallest other depth
    line = pp.get_lines()[0]
    assert list(line.get_xdata()) == [512, 1024, 4096]
    assert list(line.get_ydata()) == [level["summary"]["depth"]["pp_tokens_per_s"]["mean"]
                                      for level in result["levels"]]


def test_compare_depth_results_side_by_side_and_gate_a_pp_drop(invoke, timed_server, tmp_path):  # noqa: F811
    assert depth_run(invoke, timed_server, tmp_path / "base", "--repeats", "2").returncode == 0
    result = json.loads((tmp_path / "base" / "result.json").read_text())
    slower = json.loads(json.dumps(result))
    for level in slower["levels"]:  # the same run with prompt processing at half the speed
        for summary in [level["summary"], *level["runs"]]:
            summary["depth"]["pp_tokens_per_s"]["mean"] /= 2
    (tmp_path / "slower.json").write_text(json.dumps(slower))
    shown = json.loads(invoke("bench.compare", f"{tmp_path / 'base'},{tmp_path / 'slower.json'}", "--json",
                              "--out", str(tmp_path / "c")).stdout)
    assert shown["columns"][:3] == ["level", "base: pp t/s", "base: tg t/s"]
    assert [row[0] for row in shown["rows"]] == ["d0", "d1024", "d4096"]
    column = shown["columns"].index("slower: pp t/s")
    for row, level in zip(shown["rows"], slower["levels"], strict=True):
        assert row[column].startswith(f"{level['summary']['depth']['pp_tokens_per_s']['mean']:.2f} ± ")
    assert (tmp_path / "c" / "depth.png").is_file()
    failing = invoke("bench.compare", str(tmp_path / "slower.json"), "--baseline", str(tmp_path / "base"),
                     "--threshold", "0.3", "--json", "--out", str(tmp_path / "g"))
    assert failing.returncode == 1, failing.stdout + failing.stderr
    verdicts = json.loads(failing.stdout)["gate"]["verdicts"]
    assert {v["concurrency"] for v in verdicts if v["regressed"]} == {"d0", "d1024", "d4096"}
    assert {v["figure"] for v in verdicts if v["regressed"]} == {"pp tokens/s"}
    # Generation at the same speed passes; the baseline against itself passes.
    assert all(not v["regressed"] for v in verdicts if v["figure"] == "tg tokens/s")
    same = invoke("bench.compare", str(tmp_path / "base"), "--baseline", str(tmp_path / "base"), "--out",
                  str(tmp_path / "s"))
    assert same.returncode == 0, same.stdout + same.stderr
    # A baseline whose own repeats differ by more than the drop: reported, not gated.
    noisy = json.loads(json.dumps(result))
    for level in noisy["levels"]:
        first, second = level["runs"]
        first["depth"]["pp_tokens_per_s"]["mean"] *= 0.4
        second["depth"]["pp_tokens_per_s"]["mean"] *= 1.6
    (tmp_path / "noisy.json").write_text(json.dumps(noisy))
    lenient = invoke("bench.compare", str(tmp_path / "slower.json"), "--baseline",
                     str(tmp_path / "noisy.json"),
                     "--threshold", "0.3", "--json", "--out", str(tmp_path / "n"))
    verdicts = json.loads(lenient.stdout)["gate"]["verdicts"]
    pp = [v for v in verdicts if v["figure"] == "pp tokens/s"]
    assert pp and all(not v["regressed"] and v["worse_by"] > 0.3 for v in pp), pp


@pytest.mark.parametrize("args, message", [
    (["--depths", "0,4096"], "--depths belongs to --workload depth"),
    (["--workload", "depth"], "--workload depth needs --depths"),
    (["--workload", "depth", "--depths", "0,deep"], "--depths '0,deep': give context depths in tokens"),
    (["--workload", "depth", "--depths", "-1"], "--depths '-1'"),
    (["--workload", "depth", "--depths", "0", "--concurrency", "1,2"], "must be one number"),
    (["--workload", "depth", "--depths", "0", "--request-rate", "1"], "not at a --request-rate"),
])
def test_depth_flags_that_do_not_fit_exit_2(invoke, args, message):  # noqa: F811
    done = invoke("bench", "--url", "http://127.0.0.1:9", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_depth_prompts_are_counted_with_the_tokenizer_when_given(invoke, timed_server, tmp_path):  # noqa: F811
    from test_bench_workloads import prompt_of, received, tokenizer

    made = tokenizer(tmp_path / "tok")
    log = tmp_path / "requests.jsonl"
    url = timed_server(1, 1, "--log", str(log))
    result = bench_json(invoke, "--url", url, "--workload", "depth", "--depths", "0,100",
                        "--input-tokens", "30", "--output-tokens", "2", "--requests", "2", "--warmup", "0",
                        "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o"))
    assert result["workload"]["counted_by"] == "the model's tokenizer.json"
    lengths = [len(made.encode(prompt_of(body), add_special_tokens=False).ids) for body in received(log)[1:]]
    assert lengths == [30, 30, 130, 130]
    assert [level["summary"]["depth"]["prompt_tokens"] for level in result["levels"]] == [30, 130]
