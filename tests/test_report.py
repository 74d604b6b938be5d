"""The bench's charts and report.html, on results recorded from real runs (tests/data/bench): the
figures read back before they are saved (scales, labels, lines, bands), the PNG files matplotlib
wrote, and the one self-contained page with the table, the charts, the environment and the ceiling."""

from __future__ import annotations

import base64
import copy
import html.parser
import json
import re
from pathlib import Path

import pytest
from matplotlib.collections import PolyCollection

from charts import png_text, read_png
from trtllm_deploy.measure.bench import page, report, stats

DATA = Path(__file__).resolve().parent / "data" / "bench"
DEPLOYMENT = {"cluster": "lab", "job": "j-1", "runtime": "trtllm", "image": "trtllm-spark:1.2",
              "image_id": "sha256:abc123", "artifact": "llama-3.1-8b-fp8-tp2", "tp": 2, "pp": 1,
              "nodes": ["spark-1", "spark-2"], "tensorrt_llm_version": "1.2.0",
              "tensorrt_llm_commit": "c0ffee"}
CEILING = {"model": "llama-3.1-8b", "precision": "fp8", "tp": 2, "hardware": "gb10",
           "levels": [{"concurrency": c, "measured_tokens_per_s": 1.0, "ceiling_tokens_per_s": 41.5 * c,
                       "efficiency": 0.5} for c in (1, 2, 4)]}


def recorded(name: str = "standin-100tps.json") -> dict:
    return json.loads((DATA / name).read_text())


def deployed() -> dict:
    """A recorded result as if measured with --hosts on two nodes, with its ceiling computed."""
    result = copy.deepcopy(recorded())
    result["environment"]["deployment"] = DEPLOYMENT
    result["efficiency"] = CEILING
    return result


def with_distributions(result: dict) -> dict:
    """The result with each level's TTFT and ITL distribution as bench now records it: every level
    summarised from synthetic latencies (seconds) whose percentiles are known."""
    result = copy.deepcopy(result)
    for level in result["levels"]:
        scale = level["concurrency"]
        for metric in ("ttft", "itl"):
            level["summary"][f"{metric}_ms"] = stats.describe([scale * (i + 1) / 1000 for i in range(101)])
    return result


def levels(result: dict) -> list[int]:
    return [level["concurrency"] for level in result["levels"]]


def assert_log2_concurrency(axes, result: dict) -> None:
    assert axes.get_xscale() == "log" and axes.xaxis.get_transform().base == 2
    assert list(axes.get_xticks()) == levels(result)
    assert [t.get_text() for t in axes.get_xticklabels()] == [str(c) for c in levels(result)]
    assert axes.get_xlabel() == "concurrency (streams)"


def test_latency_is_p50_with_p90_and_p99_bands_on_a_log2_concurrency_axis():
    result = recorded()
    figure = report.figures({"": result})["latency_png"]
    panels = figure.get_axes()
    assert [axes.get_title(loc="left") for axes in panels] == ["TTFT", "ITL", "end to end"]
    assert_log2_concurrency(panels[-1], result)
    for axes, metric in zip(panels, ("ttft", "itl", "e2e"), strict=True):
        figures = [level["summary"][f"{metric}_ms"] for level in result["levels"]]
        (line,) = axes.get_lines()
        assert line.get_label() == f"{metric.upper()} p50"
        assert list(line.get_ydata()) == [f["p50"] for f in figures]
        inner, outer = (c for c in axes.collections if isinstance(c, PolyCollection))
        # A band's outline runs along its lower edge and back along its upper one.
        assert inner.get_label().endswith("p50–p90") and outer.get_label().endswith("p90–p99")
        assert max(inner.get_paths()[0].vertices[:, 1]) == pytest.approx(max(f["p90"] for f in figures))
        assert max(outer.get_paths()[0].vertices[:, 1]) == pytest.approx(max(f["p99"] for f in figures))
        assert axes.get_ylabel() == "ms" and axes.get_ylim()[0] == 0


def test_throughput_has_the_expect_ceiling_as_a_dashed_line_where_it_is_known():
    result = deployed()
    (axes,) = report.figures({"": result})["throughput_png"].get_axes()
    assert_log2_concurrency(axes, result)
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert list(lines["all streams"].get_ydata()) == [lv["summary"]["output_tokens_per_s"]
                                                      for lv in result["levels"]]
    ceiling = lines["ceiling (invoke expect)"]
    assert ceiling.get_linestyle() == "--" and list(ceiling.get_ydata()) == [41.5, 83.0, 166.0]
    (plain,) = report.figures({"": recorded()})["throughput_png"].get_axes()
    assert [line.get_label() for line in plain.get_lines()] == ["all streams", "per stream"]


def test_throughput_per_node_against_tokens_per_s_per_user():
    result = deployed()
    (axes,) = report.figures({"": result})["per_node_png"].get_axes()
    (line,) = axes.get_lines()
    assert line.get_label() == "2 nodes"
    assert axes.get_xlabel() == "tokens/s per user (p50 of streams)"
    assert axes.get_ylabel() == "output tokens/s per node"
    assert list(line.get_xdata()) == [lv["summary"]["stream_tokens_per_s"]["p50"] for lv in result["levels"]]
    assert list(line.get_ydata()) == [lv["summary"]["output_tokens_per_s"] / 2 for lv in result["levels"]]
    assert [text.get_text() for text in axes.texts] == ["c=1", "c=2", "c=4"]
    (unknown,) = report.figures({"": recorded()})["per_node_png"].get_axes()[0].get_lines()
    assert unknown.get_label() == "1 node (assumed)"


def test_ttft_and_itl_distributions_one_line_per_concurrency():
    result = with_distributions(recorded())
    ttft, itl = report.figures({"": result})["distributions_png"].get_axes()
    assert ttft.get_title(loc="left") == "TTFT" and itl.get_title(loc="left") == "ITL"
    for axes in (ttft, itl):
        lines = axes.get_lines()
        assert [line.get_label() for line in lines] == ["c=1", "c=2", "c=4"]
        assert axes.get_xscale() == "log"  # 1 ms to 404 ms: a long tail shows
        for line, concurrency in zip(lines, levels(result), strict=True):
            # The share at or under each value, from 0 (the fastest) to 1 (the slowest); the values
            # are the recorded percentiles of 1..101 ms times the concurrency.
            assert line.get_xdata()[0] == pytest.approx(concurrency)
            assert line.get_xdata()[-1] == pytest.approx(101 * concurrency)
            assert list(line.get_ydata()) == [q / 100 for q in stats.DISTRIBUTION]
    assert report.figures({"": result})["distributions_png"]._suptitle is None


def test_a_result_recorded_without_distributions_draws_its_percentiles_and_says_so():
    figure = report.figures({"": recorded()})["distributions_png"]
    assert "p50/p90/p99 only" in figure._suptitle.get_text()
    assert list(figure.get_axes()[0].get_lines()[0].get_ydata()) == [0.5, 0.9, 0.99]


def test_compare_draws_one_series_per_result_with_the_same_code():
    results = {"fast": recorded(), "slow": recorded("standin-50tps.json")}
    figures = report.figures(results)
    (throughput,) = figures["throughput_png"].get_axes()
    assert_log2_concurrency(throughput, results["fast"])
    assert [line.get_label() for line in throughput.get_lines()] == [
        "fast all streams", "fast per stream", "slow all streams", "slow per stream"]
    assert [line.get_label() for line in figures["latency_png"].get_axes()[0].get_lines()] == [
        "fast p50", "slow p50"]
    assert [line.get_label() for line in figures["per_node_png"].get_axes()[0].get_lines()] == [
        "fast 1 node (assumed)", "slow 1 node (assumed)"]


def test_the_charts_are_pngs_matplotlib_wrote(tmp_path):
    files = report.charts({"": deployed()}, tmp_path)
    assert sorted(path.name for path in files.values()) == sorted(report.CHARTS.values())
    sizes = {}
    for key, path in files.items():
        data = path.read_bytes()
        sizes[path.name], colours = read_png(data)
        assert png_text(data)["Software"].startswith("Matplotlib"), key
        assert len(colours) > 20, key  # drawn on, not a blank canvas
    assert sizes == {"latency.png": (760, 900), "throughput.png": (760, 460), "per_node.png": (760, 460),
                     "distributions.png": (1000, 460)}


class Page(html.parser.HTMLParser):
    """What a browser would fetch or show: every src/href, the images, the text of every cell."""

    def __init__(self, text: str):
        super().__init__()
        self.references, self.images, self.cells, self.text, self.tables = [], [], [], [], []
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.references += [attrs[key] for key in ("src", "href") if key in attrs]
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("td", "th"):
            self._cell = ""
        if tag == "table":
            self.tables.append([])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.cells.append(self._cell)
            self.tables[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell += data


def written(result: dict, out: Path) -> tuple[dict, Page]:
    files = report.write(result, out)
    assert files["html"] == out / "report.html"
    return files, Page(files["html"].read_text())


def test_report_html_is_one_page_with_the_table_every_chart_and_no_outside_reference(tmp_path):
    result = deployed()
    files, shown = written(result, tmp_path)
    assert all(ref.startswith("data:image/png;base64,") for ref in shown.references), shown.references
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*https?://", files["html"].read_text(), re.I)
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in shown.images]
    assert embedded == [files[key].read_bytes() for key in report.CHARTS]
    assert all(column in shown.cells for column in report.COLUMNS)
    for level in result["levels"]:
        row = report.level_row(level)
        index = shown.cells.index(row[0], shown.cells.index(report.COLUMNS[-1]))
        assert shown.cells[index:index + len(row)] == row


def pairs(cells: list[str]) -> dict[str, str]:
    """The (fact, value) table below its empty header row."""
    return dict(zip(cells[2::2], cells[3::2], strict=True))


def test_report_html_shows_the_environment(tmp_path):
    _, shown = written(deployed(), tmp_path)
    facts = pairs(shown.tables[0])
    assert facts["image"] == "trtllm-spark:1.2 (sha256:abc123)"
    assert facts["artifact"] == "llama-3.1-8b-fp8-tp2" and facts["tp"] == "2"
    assert facts["nodes"] == "2: spark-1, spark-2"
    assert facts["endpoint"] == recorded()["environment"]["endpoint"]["url"]
    assert "stand-in" in facts["runtime"]
    _, by_url = written(recorded(), tmp_path / "by-url")
    facts = pairs(by_url.tables[0])
    assert facts["image, artifact, tp, nodes"].startswith("not recorded: measured by --url")


def test_report_html_shows_the_ceiling_or_why_there_is_none(tmp_path):
    _, shown = written(deployed(), tmp_path / "a")
    heading = "Ceiling: llama-3.1-8b fp8 tp 2 on gb10"
    assert any(text.startswith(heading) for text in shown.text)
    start = shown.cells.index("efficiency") + 1
    assert shown.cells[start:start + 4] == ["1", "1.0", "41.5", "50%"]
    _, none = written(recorded(), tmp_path / "b")
    assert page.NO_MODEL in "".join(none.text) and not any("Ceiling:" in text for text in none.text)
    unknown = recorded() | {"efficiency": {"model": "no-such", "precision": None, "tp": 1, "hardware": "gb10",
                                           "unavailable": "unknown architecture 'no-such'"}}
    _, why = written(unknown, tmp_path / "c")
    assert "no ceiling: unknown architecture 'no-such'" in "".join(why.text)


def test_distributions_are_recorded_with_each_latency():
    described = stats.describe([i / 1000 for i in range(1, 102)])
    assert described["distribution"][0] == [0, 1.0] and described["distribution"][-1] == [100, 101.0]
    assert [q for q, _ in described["distribution"]] == list(stats.DISTRIBUTION)
    assert dict(described["distribution"])[50] == described["p50"]


def test_a_level_where_every_request_failed_keeps_its_place_and_the_report_is_written(tmp_path):
    result = recorded()
    failed = result["levels"][1]["summary"]
    failed.update({f"{m}_ms": {"count": 0} for m in report.LATENCY_NAMES})
    failed.update({"stream_tokens_per_s": {"p50": None, "mean": None}, "output_tokens_per_s": 0.0,
                   "succeeded": 0, "errors": {"refused": 16}})
    figures = report.figures({"": result})
    assert_log2_concurrency(figures["latency_png"].get_axes()[-1], result)
    assert list(figures["latency_png"].get_axes()[0].get_lines()[0].get_xdata()) == [1, 4]
    assert [line.get_label() for line in figures["distributions_png"].get_axes()[0].get_lines()] == [
        "c=1", "c=4"]
    files = report.write(result, tmp_path)
    assert Page(files["html"].read_text()).images and read_png(files["latency_png"].read_bytes())


def rated(result: dict, rates=(0.5, 2.0, 8.0), cap=None) -> dict:
    """The result as if measured open loop at ``rates`` (requests/s), capped at ``cap`` in flight."""
    result = copy.deepcopy(result)
    for level, rate in zip(result["levels"], rates, strict=True):
        level["request_rate"], level["concurrency"] = rate, cap
    return result


def test_request_rate_results_are_drawn_against_the_rate_on_a_log2_axis():
    result = rated(with_distributions(recorded()))
    figures = report.figures({"": result})
    (throughput,) = figures["throughput_png"].get_axes()
    assert throughput.get_xlabel() == "request rate (requests/s)"
    assert throughput.get_xscale() == "log" and list(throughput.get_xticks()) == [0.5, 2.0, 8.0]
    assert [x for x, _ in figures["per_node_png"].get_axes()[0].get_lines()[0].get_xydata()] == [
        level["summary"]["stream_tokens_per_s"]["p50"] for level in result["levels"]]
    labels = [text.get_text() for text in figures["per_node_png"].get_axes()[0].texts]
    assert labels == ["0.5/s", "2/s", "8/s"]


def test_compare_and_its_gate_key_request_rate_levels_by_their_rate():
    """Uncapped rate levels all have concurrency None: keyed by it they overwrote one another."""
    base, worse = rated(recorded()), rated(recorded())
    worse["levels"][1]["summary"]["output_tokens_per_s"] /= 2
    columns, rows = report.side_by_side({"base": base, "worse": worse})
    assert columns[0] == "level" and [row[0] for row in rows] == ["0.5/s", "2/s", "8/s"]
    verdicts = report.gate(base, {"worse": worse}, 0.1)
    failed = {(v.concurrency, v.figure) for v in verdicts if v.regressed}
    assert ("2/s", "output tokens/s") in {(level, figure.lower()) for level, figure in failed}, verdicts
    assert not any(v.concurrency in ("0.5/s", "8/s") and v.regressed for v in verdicts)
    capped = report.side_by_side({"a": rated(recorded(), cap=4)})[1]
    assert [row[0] for row in capped] == ["0.5/s cap 4", "2/s cap 4", "8/s cap 4"]


def test_the_csv_of_a_request_rate_run_has_its_rate_and_lateness(tmp_path):
    result = rated(recorded())
    for level in result["levels"]:
        level["summary"]["lateness_ms"] = {"p50": 0.25, "p90": 0.5, "p99": 1.5}
    report.write(result, tmp_path)
    rows = (tmp_path / "result.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:3] == ["concurrency", "request_rate", "run"] and header[-2:] == ["lateness_ms_p50",
                                                                                    "lateness_ms_p99"]
    last = rows[-1].split(",")
    assert last[1] == "8.0" and last[-2:] == ["0.25", "1.5"]
