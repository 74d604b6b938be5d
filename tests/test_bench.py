"""invoke bench: the client against a server of known timing, run through the real CLI; the stand-in
trtllm-serve measured locally and on the testbed; compare and the regression gate on recorded results."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from test_launch import ARTIFACT, bed, home  # noqa: F401  (fixtures: the testbed, the artifact on it)

from charts import colour, read_png
from conftest import docker_unusable
from trtllm_deploy.errors import InputError
from timed_server import answer
from trtllm_deploy.measure.bench import client, report, stats, sweep
from trtllm_deploy.measure.bench.client import Sample
from trtllm_deploy.testbed import artifact as tiny
from waiting import until

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "bench"
# The measuring processes get ahead of whatever else this machine runs (root only; harmless else):
# the test is about the client's accuracy, not about a busy machine's scheduler.
AHEAD = ["nice", "-n", "-10"] if os.geteuid() == 0 else []


def start(argv: list[str], env: dict | None = None) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(AHEAD + argv, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, **(env or {})})
    line = process.stdout.readline()
    assert line.startswith("PORT "), line
    return process, int(line.split()[1])


@pytest.fixture
def timed_server():
    """``timed_server(ttft_ms, itl_ms, *flags)`` -> its URL; the server (tests/timed_server.py, run
    with those flags) runs in a process of its own."""
    processes = []

    def run(ttft_ms: float, itl_ms: float, *flags: str) -> str:
        process, port = start([sys.executable, str(ROOT / "tests" / "timed_server.py"),
                               "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms), *flags])
        processes.append(process)
        return f"http://127.0.0.1:{port}"

    yield run
    for process in processes:
        process.terminate()
        process.wait(10)


@pytest.fixture
def invoke(tmp_path):
    """Run `invoke bench…` as a user does, in a process of its own; returns (exit code, stdout, stderr)."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tasks.py").write_text("from invoke import Collection\nfrom trtllm_deploy.cli import bench\n"
                                    "ns = Collection()\nns.add_collection(bench.ns)\n")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(AHEAD + [sys.executable, "-m", "invoke", "--search-root", str(tasks), *args],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    return run


def bench_json(invoke, *args: str) -> dict:
    done = invoke("bench", *args, "--json")
    assert done.returncode == 0, done.stderr + done.stdout
    return json.loads(done.stdout)


def test_median_ttft_and_itl_are_within_1_ms_of_the_truth_at_concurrency_64(invoke, timed_server, tmp_path):
    url = timed_server(40, 10)
    result = bench_json(invoke, "--url", url, "--concurrency", "64", "--input-tokens", "16",
                        "--output-tokens", "32", "--requests", "128", "--warmup", "1",
                        "--out", str(tmp_path / "out"))
    (level,) = result["levels"]
    s = level["summary"]
    assert level["concurrency"] == 64 and s["succeeded"] == 128 and s["errors"] == {}
    assert s["output_tokens"] == 128 * 32 and s["itl_ms"]["count"] == 128 * 31
    server = json.load(urllib.request.urlopen(f"{url}/stats", timeout=10))
    why = f"(the server itself sent its tokens late by {server.get('late_p50_ms', 0):.2f} ms median)"
    assert abs(s["ttft_ms"]["p50"] - 40) < 1, f"TTFT p50 {s['ttft_ms']['p50']} ms, truth 40 ms {why}"
    assert abs(s["itl_ms"]["p50"] - 10) < 1, f"ITL p50 {s['itl_ms']['p50']} ms, truth 10 ms {why}"
    assert abs(s["tpot_ms"]["p50"] - 10) < 1
    # Streams of 10 ms per token: 100 tokens/s each; 64 of them about 64 times that in all.
    assert 90 < s["stream_tokens_per_s"]["p50"] < 110
    assert s["output_tokens_per_s"] > 0.5 * 64 * 100 * 32 / (32 + 4)


def test_chat_and_other_timings_are_measured_as_well(invoke, timed_server, tmp_path):
    url = timed_server(25, 4)
    result = bench_json(invoke, "--url", url, "--chat", "--concurrency", "1,8", "--output-tokens", "20",
                        "--requests", "16", "--warmup", "0", "--repeats", "2", "--out", str(tmp_path / "out"))
    assert result["workload"]["path"] == "/v1/chat/completions"
    assert [level["concurrency"] for level in result["levels"]] == [1, 8]
    for level in result["levels"]:
        s = level["summary"]
        assert s["succeeded"] == 32 and len(level["runs"]) == 2 and level["spread"]["output_tokens_per_s"]
        assert abs(s["ttft_ms"]["p50"] - 25) < 1.5 and abs(s["itl_ms"]["p50"] - 4) < 1
    assert result["environment"]["endpoint"]["server_header"].startswith("timed-test-server")
    assert result["environment"]["endpoint"]["model"] == "timed-test-model"


def test_the_result_is_written_as_json_csv_png_charts_and_one_html_page(invoke, timed_server, tmp_path):
    url = timed_server(5, 2)
    out = tmp_path / "out"
    done = invoke("bench", "--url", url, "--concurrency", "..4", "--output-tokens", "8",
                  "--input-tokens", "8", "--requests", "8", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "TTFT p50 ms" in done.stdout and "words (approximate" in done.stdout
    saved = report.load(out / "result.json")
    assert [level["concurrency"] for level in saved["levels"]] == [1, 2, 4]
    rows = (out / "result.csv").read_text().splitlines()
    assert rows[0].startswith("concurrency,request_rate,run,") and len(rows) == 1 + 3 * 2
    # Each level records its TTFT and ITL distribution, which report.html's charts draw.
    recorded = saved["levels"][0]["summary"]["ttft_ms"]["distribution"]
    assert [q for q, _ in recorded] == list(stats.DISTRIBUTION)
    assert png_size(out / "throughput.png") == (760, 460)
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(report.CHARTS) and "TTFT p50 ms" in page
    assert "report.html" in done.stdout


def png_size(path: Path) -> tuple[int, int]:
    """The chart's size; it must show lines in the palette's first two colours (two series)."""
    size, colours = read_png(path.read_bytes())
    assert colour("blue") in colours and colour("orange") in colours
    return size


@pytest.mark.parametrize("args, message", [
    (["--concurrency", "1,x"], "--concurrency"),
    (["--concurrency", "0"], "at least 1"),
    (["--requests", "4", "--duration", "3"], "not both"),
    (["--duration", "soon"], "--duration"),
    (["--output-tokens", "0"], "--output-tokens"),
], ids=["not-a-number", "zero-streams", "two-budgets", "duration-text", "no-output"])
def test_bad_input_exits_2_and_says_what_is_wrong(invoke, args, message):
    done = invoke("bench", "--url", "http://127.0.0.1:9", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_url_or_hosts_one_of_them(invoke):
    done = invoke("bench")
    assert done.returncode == 2 and "--url" in done.stderr


def test_a_server_that_is_not_there_fails_with_exit_1(invoke):
    done = invoke("bench", "--url", "http://127.0.0.1:9", "--requests", "1")
    assert done.returncode == 1 and "does not answer" in done.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_standin(folder: Path, log: Path, tokens_per_s: int = 100) -> tuple[subprocess.Popen, str]:
    """The stand-in trtllm-serve, run here (no mpirun: one rank) on ``folder``; waits for /health."""
    port = free_port()
    with log.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "trtllm_deploy.testbed.standin", "trtllm-serve",
                                    str(folder), "--port", str(port)],
                                   stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, "STANDIN_LOAD_SECONDS": "0",
                                        "STANDIN_TOKENS_PER_S": str(tokens_per_s)})
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return True
        except OSError:
            assert process.poll() is None, log.read_text()
            raise

    try:
        until(answers, 30, f"the stand-in to answer {url}/health", retry_on=(OSError,))
    except AssertionError:
        process.kill()
        raise AssertionError(f"the stand-in did not answer /health: {log.read_text()}") from None
    return process, url


@pytest.fixture
def standin(tmp_path):
    process, url = run_standin(tiny.make(tmp_path / "tiny-bf16-tp1"), tmp_path / "standin.log")
    yield url
    process.terminate()
    process.wait(10)


def test_bench_measures_the_standin_trtllm_serve(invoke, standin, tmp_path):
    result = bench_json(invoke, "--url", standin, "--concurrency", "1,4", "--input-tokens", "12",
                        "--output-tokens", "10", "--requests", "4", "--warmup", "1",
                        "--out", str(tmp_path / "o"))
    endpoint = result["environment"]["endpoint"]
    assert endpoint["runtime"] == "trtllm" and endpoint["standin"] is True
    assert endpoint["server_header"].startswith("trtllm-deploy-standin")
    one, four = (level["summary"] for level in result["levels"])
    assert one["errors"] == {} and four["errors"] == {}
    assert one["output_tokens"] == 4 * 10  # ignore_eos: every request gave all it was asked for
    # The stand-in steps every active request once per 10 ms: ITL 10 ms, four streams four times the tokens.
    assert 8 < one["itl_ms"]["p50"] < 14
    assert four["output_tokens_per_s"] > 2.5 * one["output_tokens_per_s"]


def test_ignore_eos_can_be_left_out_and_the_result_says_so(invoke, standin, tmp_path):
    result = bench_json(invoke, "--url", standin, "--concurrency", "1", "--output-tokens", "3",
                        "--requests", "1", "--warmup", "0", "--no-ignore-eos", "--out", str(tmp_path / "o"))
    assert result["workload"]["ignore_eos"] is False


# --- compare and the gate, on results recorded from real runs (tests/data/bench/README.md) ----------

def test_compare_shows_results_side_by_side_with_charts(invoke, tmp_path):
    done = invoke("bench.compare", f"{DATA / 'standin-100tps.json'},{DATA / 'standin-50tps.json'}",
                  "--out", str(tmp_path / "c"), "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["columns"][1] == "standin-100tps: out tok/s" and shown["gate"] is None
    assert [row[0] for row in shown["rows"]] == ["1", "2", "4"]
    fast, slow = float(shown["rows"][0][1]), float(shown["rows"][0][5])
    assert fast > 1.6 * slow
    assert png_size(tmp_path / "c" / "throughput.png") == (760, 460)
    # report.html beside the charts: each result's environment, the table and every chart inline.
    page = (tmp_path / "c" / "report.html").read_text()
    assert shown["files"]["html"] == str(tmp_path / "c" / "report.html")
    assert "Measured on: standin-100tps" in page and "Measured on: standin-50tps" in page
    assert "standin-50tps: out tok/s" in page and page.count("data:image/png;base64,") == len(report.CHARTS)


def test_the_gate_passes_a_rerun_and_fails_a_regression_with_exit_1(invoke, tmp_path):
    baseline = str(DATA / "standin-100tps.json")
    same = invoke("bench.compare", str(DATA / "standin-100tps-again.json"), "--baseline", baseline,
                  "--threshold", "0.1", "--out", str(tmp_path / "a"))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "✘" not in same.stdout and "gate against" in same.stdout
    slower = invoke("bench.compare", str(DATA / "standin-50tps.json"), "--baseline", baseline,
                    "--out", str(tmp_path / "b"), "--json")
    assert slower.returncode == 1 and "regression" in slower.stderr
    gate = json.loads(slower.stdout)["gate"]
    failed = {(v["concurrency"], v["figure"]) for v in gate["verdicts"] if v["regressed"]}
    assert (1, "output tokens/s") in failed and (1, "ITL p50 ms") in failed
    page = (tmp_path / "b" / "report.html").read_text()
    assert f"gate against {baseline} (worse by more than 10% fails)" in page
    assert page.count("<td>fail</td>") == sum(v["regressed"] for v in gate["verdicts"])
    # A generous threshold lets the same results through.
    loose = invoke("bench.compare", str(DATA / "standin-50tps.json"), "--baseline", baseline,
                   "--threshold", "4", "--out", str(tmp_path / "c"))
    assert loose.returncode == 0, loose.stdout


def test_compare_refuses_what_is_not_a_result_with_exit_2(invoke, tmp_path):
    (tmp_path / "x.json").write_text('{"levels": []}')
    for argument in (str(tmp_path / "x.json"), str(tmp_path / "missing.json")):
        done = invoke("bench.compare", argument)
        assert done.returncode == 2 and argument in done.stderr, (argument, done.stderr)


@pytest.mark.parametrize("values, q, expected", [
    ([1.0], 50, 1.0), ([1.0, 2.0], 50, 1.5), ([4.0, 1.0, 3.0, 2.0], 50, 2.5), ([0, 10], 90, 9.0),
    (list(range(101)), 99, 99.0)], ids=["one", "two", "unsorted", "p90", "p99"])
def test_percentiles_interpolate_between_ranks(values, q, expected):
    assert stats.percentile(values, q) == pytest.approx(expected)


def test_a_sample_times_every_gap_and_the_time_per_output_token():
    sample = Sample(sent=1.0, first=1.05, arrivals=[1.05, 1.06, 1.08, 1.09], ended=1.09, output_tokens=4)
    assert sample.ttft == pytest.approx(0.05) and sample.e2e == pytest.approx(0.09)
    assert sample.itl == pytest.approx([0.01, 0.02, 0.01]) and sample.tpot == pytest.approx(0.04 / 3)


@pytest.mark.parametrize("text, levels", [("1,2,4,8", [1, 2, 4, 8]), ("..64", [1, 2, 4, 8, 16, 32, 64]),
                                          ("..12", [1, 2, 4, 8, 12]), ("3", [3])],
                         ids=["list", "sweep", "sweep-with-limit", "one"])
def test_concurrency_levels(text, levels):
    assert sweep.concurrencies(text) == levels


def test_gate_threshold_must_not_be_negative(invoke):
    with pytest.raises(InputError):
        report.gate(report.load(DATA / "standin-100tps.json"), {}, -0.1)
    done = invoke("bench.compare", str(DATA / "standin-50tps.json"),
                  "--baseline", str(DATA / "standin-100tps.json"), "--threshold", "ten")
    assert done.returncode == 2 and "--threshold" in done.stderr


# --- on the testbed: a deployment launched as `invoke launch` does, measured through --hosts --------


@pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))
def test_bench_through_hosts_measures_the_current_deployment_and_records_it(bed, home, testbed):  # noqa: F811
    from trtllm_deploy.measure.bench.measure import measure
    from trtllm_deploy.serving import launch, state

    wanted = state.Deployment(job="tbbench", runtime="trtllm", image=bed.head.container.image,
                               artifact=ARTIFACT, tp=1, port=8371, nodes=(bed.head.name,),
                               env=(("STANDIN_LOAD_SECONDS", "1"),))
    launch.launch(bed, wanted, home / "tmp")
    try:
        result = measure(hosts=str(testbed[0].layout.hosts_file), concurrency="1,2", input_tokens=8,
                         output_tokens=8, requests=4, warmup=1)
    finally:
        launch.stop(bed, "tbbench")
    deployment, endpoint = result["environment"]["deployment"], result["environment"]["endpoint"]
    assert deployment["job"] == "tbbench" and deployment["tp"] == 1 and deployment["nodes"] == [bed.head.name]
    assert deployment["artifact"] == ARTIFACT and deployment["image"] == wanted.image
    assert deployment["image_id"]
    assert "tensorrt_llm_commit" in deployment
    assert endpoint["url"] == f"http://{bed.head.address}:8371" and endpoint["standin"] is True
    assert endpoint["runtime"] == "trtllm"
    for level in result["levels"]:
        assert level["summary"]["errors"] == {} and level["summary"]["output_tokens"] == 4 * 8


def test_failed_requests_are_counted_by_kind(timed_server):
    import asyncio
    import threading

    from trtllm_deploy.measure.bench.client import Endpoint, new_loop, stream

    garbage = socket.create_server(("127.0.0.1", 0))

    def answer_garbage() -> None:
        conn, _ = garbage.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n")
        conn.close()

    threading.Thread(target=answer_garbage, daemon=True).start()
    timed = Endpoint.parse(timed_server(1, 1))
    closed = Endpoint("127.0.0.1", free_port())

    async def all_of_them():
        return await asyncio.gather(
            stream(timed, "/v1/no-such-route", {"stream": True}),
            stream(Endpoint("127.0.0.1", garbage.getsockname()[1]), "/v1/completions", {"stream": True}),
            stream(closed, "/v1/completions", {"stream": True}),
            stream(timed, "/v1/completions", {"stream": True, "max_tokens": 3}))

    with asyncio.Runner(loop_factory=new_loop) as runner:
        samples = runner.run(all_of_them())
    garbage.close()
    assert [s.error for s in samples] == ["http 404", "protocol", "connect", None]
    summary = stats.summarize(samples, 1.0)
    assert summary["errors"] == {"http 404": 1, "protocol": 1, "connect": 1} and summary["succeeded"] == 1
    assert "no route" in summary["error_examples"]["http 404"]


def test_a_result_is_put_against_the_ceiling_of_what_it_serves(invoke, standin, tmp_path):
    from trtllm_deploy.measure import expect

    result = bench_json(invoke, "--url", standin, "--concurrency", "1,2", "--input-tokens", "12",
                        "--output-tokens", "10", "--requests", "2", "--warmup", "0",
                        "--expect-model", "llama-8b", "--expect-precision", "nvfp4",
                        "--out", str(tmp_path / "o"))
    shown = result["efficiency"]
    assert (shown["model"], shown["precision"], shown["tp"], shown["hardware"]) == \
        ("llama-8b", "nvfp4", 1, "gb10")
    for row, level in zip(shown["levels"], result["levels"], strict=True):
        bound = expect.ceiling("llama-8b", "nvfp4", 1, "gb10", batch=level["concurrency"])
        assert row["ceiling_tokens_per_s"] == round(bound.decode_tokens_per_s_bound, 2)
        assert row["efficiency"] == round(level["summary"]["output_tokens_per_s"]
                                          / bound.decode_tokens_per_s_bound, 4)
    saved = json.loads((tmp_path / "o" / "result.json").read_text())
    assert saved["efficiency"] == shown
    unknown = bench_json(invoke, "--url", standin, "--concurrency", "1", "--requests", "1", "--warmup", "0",
                         "--output-tokens", "4", "--expect-model", "no-such-model",
                         "--out", str(tmp_path / "u"))
    assert "unavailable" in unknown["efficiency"]


# --- when a token is stamped ----------------------------------------------------------------

def _burst_server(tokens: tuple[int, ...], requests_read, go, sent) -> tuple[int, dict]:
    """A server that reads one streamed request per entry of ``tokens`` (its max_tokens says which),
    then, on ``go``, sends each its whole answer in one send: head, every token and [DONE] in one
    TCP segment. Returns its port and {max_tokens: the client's port}, filled as requests come."""
    listener = socket.create_server(("127.0.0.1", 0))
    ports: dict[int, int] = {}

    def serve() -> None:
        answers = []
        with listener:
            for _ in tokens:
                conn, peer = listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                while len(body) < length:
                    body += conn.recv(65536)
                request = json.loads(body)
                ports[request["max_tokens"]] = peer[1]
                pieces = answer("POST", "/v1/completions", request, 0.0, 0.0, 0.0, False, [])
                answers.append((conn, b"".join(piece for _, piece in pieces)))
            requests_read.set()
            go.wait(60)
            for conn, data in answers:
                conn.sendall(data)
            sent.set()
            for conn, _ in answers:
                conn.recv(1)  # until the client closes
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], ports


def test_tokens_are_stamped_when_the_poll_found_them_not_when_they_were_parsed(monkeypatch):
    """Every token of two streams arrives at once, each stream's in one segment, while the client's
    loop is held so that it cannot poll. Each token's time must then be the time of the one poll
    that found its stream's bytes: the same for all of a stream's tokens (ITL 0), though they are
    parsed one after another, and the second stream's only after the loop has polled again.
    Stamping at parse time, in the read callback, or from a later poll's clock all give other
    times. The clock is made strictly increasing, so no two readings of it are equal by chance: no
    timing is asserted, only which reading each token got."""
    real, last = time.perf_counter, [0.0]

    def strictly_increasing() -> float:
        last[0] = max(real(), last[0] + 1e-6)
        return last[0]
    monkeypatch.setattr(time, "perf_counter", strictly_increasing)

    loop = client.new_loop()
    polls: list[tuple[float, set]] = []   # each poll's time and the local ports it found with bytes
    select = loop.poll_clock.select

    def recorded(timeout=None):
        ready = select(timeout)
        found = set()
        for key, events in ready:
            if not events & selectors.EVENT_READ:
                continue  # a connection being made
            try:
                with socket.fromfd(key.fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
                    found.add(sock.getsockname()[1])
            except (OSError, IndexError, TypeError):
                pass  # the loop's own wake-up pipe
        polls.append((loop.poll_clock.polled, found))
        return ready
    loop.poll_clock.select = recorded

    requests_read, go, sent = threading.Event(), threading.Event(), threading.Event()
    port, ports = _burst_server((3, 5), requests_read, go, sent)

    async def run() -> list[Sample]:
        endpoint = client.Endpoint("127.0.0.1", port)
        tasks = [asyncio.ensure_future(client.stream(endpoint, "/v1/completions",
                                                     {"model": "m", "prompt": "p", "max_tokens": n,
                                                      "stream": True}, timeout=60)) for n in (3, 5)]
        assert await loop.run_in_executor(None, requests_read.wait, 60)
        go.set()
        assert sent.wait(60)  # the loop is held here: every token lands before it polls again
        return await asyncio.gather(*tasks)

    try:
        samples = loop.run_until_complete(run())
    finally:
        loop.close()
    for n, sample in zip((3, 5), samples, strict=True):
        assert sample.error is None and len(sample.arrivals) == n, (sample.error, sample.detail)
        stamps = sorted(set(sample.arrivals))
        assert len(stamps) == 1, f"stream of {n}: its tokens, read in one poll, are stamped {stamps}"
        stamp = stamps[0]
        finding = [when for when, found in polls if ports[n] in found]
        assert finding == [stamp], (f"stream of {n}: its tokens are stamped {stamp}, not when the poll"
                                    f" found its bytes ({finding})")
        assert sample.itl == [0.0] * (n - 1) and sample.first == stamp == sample.ended

