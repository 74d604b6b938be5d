"""invoke bench against servers that behave as real ones did (issue 18, `transformers serve` on CPU):
ignore_eos refused with 422, tokens with no visible text, several tokens in a chunk, and --tokenizer."""

from __future__ import annotations

import json

import pytest
from test_bench import bench_json, invoke  # noqa: F401  (invoke: a fixture)
from test_bench import timed_server  # noqa: F401  (a fixture)

from trtllm_deploy.measure.bench import report
from trtllm_deploy.measure.bench.client import Sample


def test_a_refused_ignore_eos_is_said_in_the_table_and_the_summary(
        invoke, timed_server, tmp_path):  # noqa: F811
    url = timed_server(2, 1, "--strict")
    done = invoke("bench", "--url", url, "--concurrency", "1", "--requests", "2", "--output-tokens", "3",
                  "--warmup", "0", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    title = " ".join(done.stdout.split("┏", 1)[0].split())  # the title, however it wrapped
    assert "(ignore_eos refused by the server: outputs may stop early)" in title, done.stdout
    assert "warning: the server refused ignore_eos/min_tokens (http 422" in done.stdout
    assert "outputs may stop early" in done.stdout
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    work = saved["workload"]
    assert work["ignore_eos"] is False and "extra_forbidden" in work["ignore_eos_refused"]
    assert saved["levels"][0]["summary"]["succeeded"] == 2


def test_a_server_that_takes_ignore_eos_gets_no_such_warning(invoke, timed_server, tmp_path):  # noqa: F811
    done = invoke("bench", "--url", timed_server(2, 1), "--concurrency", "1", "--requests", "1",
                  "--output-tokens", "2", "--warmup", "0", "--out", str(tmp_path / "out"))
    assert done.returncode == 0 and "refused" not in done.stdout, done.stdout


def test_tokens_without_visible_text_are_counted_from_usage(invoke, timed_server, tmp_path):  # noqa: F811
    url = timed_server(2, 1, "--no-text")
    done = invoke("bench", "--url", url, "--concurrency", "2", "--requests", "4", "--output-tokens", "5",
                  "--warmup", "0", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 request(s) completed with tokens (the server's usage count) but no visible text" in done.stdout
    s = json.loads((tmp_path / "out" / "result.json").read_text())["levels"][0]["summary"]
    assert s["errors"] == {} and s["succeeded"] == 4 and s["output_tokens"] == 4 * 5
    assert s["without_text"] == 4 and s["ttft_ms"] == {"count": 0} and s["e2e_ms"]["count"] == 4


def test_a_stream_with_neither_text_nor_usage_is_still_a_failure():
    from trtllm_deploy.measure.bench import stats
    summary = stats.summarize([Sample(sent=0.0, ended=1.0, error="no tokens")], 1.0)
    assert summary["errors"] == {"no tokens": 1}


@pytest.mark.parametrize("per_chunk", [4, 1], ids=["bundled", "one-a-chunk"])
def test_bundled_tokens_give_per_request_rates_from_usage_and_tokens_per_chunk(
        invoke, timed_server, tmp_path, per_chunk):  # noqa: F811
    """One token every 5 ms, sent four to a chunk (a chunk every 20 ms): TPOT is still 5 ms and each
    request decodes 200 tokens/s; ITL is the chunks' 20 ms, and 4 tokens a chunk stands beside it."""
    url = timed_server(10, 5, "--tokens-per-chunk", str(per_chunk))
    result = bench_json(invoke, "--url", url, "--concurrency", "2", "--requests", "4",
                        "--output-tokens", "16", "--input-tokens", "8", "--warmup", "0",
                        "--out", str(tmp_path / "out"))
    s = result["levels"][0]["summary"]
    assert s["errors"] == {} and s["output_tokens"] == 4 * 16
    assert s["tokens_per_chunk"] == pytest.approx(per_chunk)
    assert abs(s["tpot_ms"]["p50"] - 5) < 1, s["tpot_ms"]
    assert 170 < s["stream_tokens_per_s"]["p50"] < 230, s["stream_tokens_per_s"]
    assert abs(s["itl_ms"]["p50"] - 5 * per_chunk) < 1.5
    row = report.level_row(result["levels"][0])  # the table shows tokens per chunk beside ITL
    assert row[report.COLUMNS.index("tok/chunk")] == f"{per_chunk:.2f}"
    assert report.COLUMNS.index("tok/chunk") == report.COLUMNS.index("ITL p99 ms") + 1


def test_a_request_whose_text_came_in_one_chunk_adds_no_tpot_of_zero(invoke, timed_server, tmp_path):  # noqa: F811
    url = timed_server(5, 1, "--tokens-per-chunk", "8")
    result = bench_json(invoke, "--url", url, "--concurrency", "1", "--requests", "3", "--output-tokens", "8",
                        "--warmup", "0", "--out", str(tmp_path / "out"))
    s = result["levels"][0]["summary"]
    assert s["succeeded"] == 3 and s["output_tokens"] == 24 and s["tokens_per_chunk"] == 8
    assert s["tpot_ms"] == {"count": 0} and s["stream_tokens_per_s"]["p50"] is None


# --- --tokenizer: used, or what is missing said exactly -----------------------------------------

def word_tokenizer(folder):
    """A tokenizer.json made here with the `tokenizers` package (nothing downloaded): one id a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from trtllm_deploy.measure.bench.workload import WORDS
    vocab = {"[UNK]": 0} | {word: i + 1 for i, word in enumerate(dict.fromkeys(WORDS))}
    vocab |= {str(n): len(vocab) + n for n in range(100)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_a_given_tokenizer_counts_the_prompt(invoke, timed_server, tmp_path):  # noqa: F811
    folder = word_tokenizer(tmp_path / "tok")
    result = bench_json(invoke, "--url", timed_server(1, 1), "--concurrency", "1", "--requests", "1",
                        "--output-tokens", "2", "--input-tokens", "12", "--warmup", "0", "--tokenizer",
                        str(folder), "--out", str(tmp_path / "out"))
    assert result["workload"]["counted_by"] == "the model's tokenizer.json"


def test_a_tokenizer_folder_without_tokenizer_json_exits_2_naming_the_file(invoke, tmp_path):  # noqa: F811
    done = invoke("bench", "--url", "http://127.0.0.1:9", "--tokenizer", str(tmp_path))
    assert done.returncode == 2 and f"{tmp_path}/tokenizer.json does not exist" in done.stderr, done.stderr


def test_without_the_tokenizers_package_it_says_exactly_that(invoke, timed_server, tmp_path):  # noqa: F811
    folder = word_tokenizer(tmp_path / "tok")
    # `python -m invoke` runs in tmp_path, first on its path: this package hides the installed one.
    blocker = tmp_path / "tokenizers"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('tokenizers hidden by the test')\n")
    done = invoke("bench", "--url", timed_server(1, 1), "--requests", "1", "--tokenizer", str(folder))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the Python package `tokenizers` is not installed" in done.stderr
    assert "requirements/host.txt" in done.stderr and "Traceback" not in done.stderr
