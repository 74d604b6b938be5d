"""Our load generator beside the public ones, on the same workloads in the same run.

For each client — ours (`invoke bench`), NVIDIA's `aiperf`, `guidellm` and `llama-benchy`, each
installed from the package index into its own virtual environment under
~/.cache/trtllm-deploy/bench-clients — against tests/timed_server.py:

- accuracy: first token after 40 ms, then one every 10 ms, 32 tokens, 64 streams at once, 128
  requests after a warm-up; the error of each client's median TTFT and ITL against that truth;
- CPU: user+sys of the client's whole process tree for that run (start-up included: what a user pays);
- capacity: the client pinned to one core (taskset), the server on another sending as fast as it is
  read (16 streams of 8,000 tokens); the server's send rate once the socket buffers are full, which
  is the rate the client takes them (target for ours: at least 20,000 tokens/s).
- request rate (ours, aiperf, `vllm bench serve`): open loop at RATE requests/s (Poisson; each
  client's own seed option set to 1), 1,000 requests of 4 tokens against a server that sends the
  first token 2 ms after the request arrived, then one every 1 ms: each client's median TTFT and ITL
  against that truth, how late its requests left against their schedule where the client reports it
  (ours: median target under 1 ms on this machine's 2 cores), the rate achieved, and its CPU.

A client that cannot be installed or run is reported as such in its row; the others still run. Run it
with `nox -s bench -- clients` (or `python benchmarks/bench_clients.py [--only ours,aiperf] [--rate-only]`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "tests" / "timed_server.py"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trtllm-deploy" / "bench-clients"
TOOLS = {"aiperf": "aiperf==0.13.0", "guidellm": "guidellm==0.8.1", "llama-benchy": "llama-benchy==0.4.0",
         "vllm": "vllm==0.33.0"}   # vllm: about 9.5 GB (it pulls torch with CUDA); only its client runs
# vllm loads the local tokenizer with the Hub off; aiperf 0.13.0 cannot (HF_HUB_OFFLINE=1 makes it
# take the folder for a Hub repo id: HFValidationError), and needs nothing from the Hub without it.
OFFLINE = {"HF_HUB_OFFLINE": "1"}
MODEL = "timed-test-model"
TTFT_MS, ITL_MS, STREAMS, REQUESTS, ISL, OSL = 40.0, 10.0, 64, 128, 16, 32
FAST = {"streams": 16, "requests": 16, "osl": 8000}   # the capacity run: one round of long streams
RATE, RATE_REQUESTS = 200.0, 1000                      # the request-rate run: requests/s, how many
RATE_TTFT_MS, RATE_ITL_MS, RATE_OSL, SEED = 2.0, 1.0, 4, 1
CORES = os.cpu_count() or 1
# Server and clients ahead of whatever else the machine runs (root only), all alike.
AHEAD = ["nice", "-n", "-10"] if os.geteuid() == 0 else []
CLIENT_CPU, SERVER_CPU = (["taskset", "-c", "1"], ["taskset", "-c", "0"]) if CORES > 1 else ([], [])


class Failed(Exception):
    """A client that could not be installed or run: its row says why."""


# --- the known-timing server ---------------------------------------------------------------------

class Timed:
    def __init__(self, ttft_ms: float, itl_ms: float, workers: int, pin: list[str]) -> None:
        self.process = subprocess.Popen(AHEAD + pin + [sys.executable, str(SERVER), "--ttft-ms", str(ttft_ms),
                                               "--itl-ms", str(itl_ms), "--workers", str(workers)],
                                        stdout=subprocess.PIPE, text=True)
        self.port = int(self.process.stdout.readline().split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=10) as answer:
            return json.load(answer)

    def __enter__(self) -> Timed:
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(10)


def measured(argv: list[str], cwd: Path, env: dict | None = None, timeout: float = 600) -> tuple[str, float]:
    """Run a client; its output and the CPU seconds of its process tree (the children it waited for)."""
    log = cwd / "client.log"
    with log.open("w") as handle:
        process = subprocess.Popen(AHEAD + argv, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd,
                                   env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                raise Failed(f"did not finish in {timeout:.0f} s")
            time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    output = log.read_text(errors="replace")
    if process.returncode != 0:
        last = output.strip().splitlines()[-1][:160] if output.strip() else ""
        raise Failed(f"exit {process.returncode}: {last}")
    return output, usage.ru_utime + usage.ru_stime


# --- the clients -------------------------------------------------------------------------------------

def venv(tool: str) -> Path:
    """The tool's own virtual environment, made and filled from the package index on first use."""
    folder = CACHE / tool
    marker = folder / ".installed"
    if marker.exists() and marker.read_text() == TOOLS[tool]:
        return folder / "bin"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True, capture_output=True)
    done = subprocess.run([str(folder / "bin" / "pip"), "install", "--quiet", TOOLS[tool]],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise Failed(f"pip install {TOOLS[tool]} failed: {done.stderr.strip().splitlines()[-1][:160]}")
    marker.write_text(TOOLS[tool])
    return folder / "bin"


TOKENIZER = """
import json, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
words = "tok the time of day we can see a light over the water and then go home".split()
corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 50 + [" tok" * 50] * 50
tokenizer = Tokenizer(models.BPE())
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
    vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
tokenizer.save(sys.argv[1] + "/tokenizer.json")
json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
           "model_max_length": 1000000}, open(sys.argv[1] + "/tokenizer_config.json", "w"))
"""


def tokenizer(work: Path, python: Path) -> Path:
    """A small byte-level BPE tokenizer made here (the tools want one; nothing may be downloaded)."""
    folder = work / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(python), "-c", TOKENIZER, str(folder)], check=True, capture_output=True)
    return folder


def ours(url: str, work: Path, streams: int, requests: int, osl: int, warmup: int, pin: list[str]) -> dict:
    level, cpu = invoke_bench(url, work, ["--concurrency", str(streams), "--output-tokens", str(osl),
                                          "--requests", str(requests), "--warmup", str(warmup)], pin)
    s = level["summary"]
    return {"ttft": s["ttft_ms"]["p50"], "itl": s["itl_ms"]["p50"], "cpu": cpu, "ok": s["succeeded"],
            "errors": sum(s["errors"].values())}


def aiperf(url: str, work: Path, streams: int, requests: int, osl: int, warmup: int, pin: list[str]) -> dict:
    bin_ = venv("aiperf")
    out = work / "aiperf"
    _, cpu = measured(pin + [str(bin_ / "aiperf"), "profile", "-m", MODEL, "--url", url, "--endpoint-type",
                             "completions", "--streaming", "--concurrency", str(streams), "--request-count",
                             str(requests),
                             *(["--warmup-request-count", str(warmup * streams)] if warmup else []),
                             "--isl", str(ISL), "--osl", str(osl),
                             "--tokenizer", str(tokenizer(work.parent, bin_ / "python")),
                             "--extra-inputs", "ignore_eos:true", "--artifact-dir", str(out),
                             "--ui-type", "none"],
                      work)
    found = json.loads((out / "profile_export_aiperf.json").read_text())
    return {"ttft": found["time_to_first_token"]["p50"], "itl": found["inter_token_latency"]["p50"],
            "cpu": cpu, "ok": int(found["request_count"]["avg"]),
            "errors": sum(e.get("count", 0) for e in found.get("error_summary") or [])}


def guidellm(url: str, work: Path, streams: int, requests: int, osl: int, warmup: int,
             pin: list[str]) -> dict:
    bin_ = venv("guidellm")
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": url, "model": MODEL, "request_format": "/v1/completions",
                    "extras": {"body": {"ignore_eos": True}}},
        "profile": {"kind": "concurrent", "streams": streams},
        "data": [{"kind": "synthetic_text", "prompt_tokens": ISL, "output_tokens": osl}],
        "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer(work.parent, bin_ / "python"))},
        "constraints": [{"kind": "max_requests", "count": requests}]}}
    (work / "scenario.json").write_text(json.dumps(scenario))
    _, cpu = measured(pin + [str(bin_ / "guidellm"), "run", "--scenario", str(work / "scenario.json"),
                             "--output", f"kind=json,path={work / 'out.json'}",
                             "--disable-console-interactive"], work)
    found = json.loads((work / "out.json").read_text())["benchmarks"][0]
    metrics, done = found["metrics"], found["requests"]
    return {"ttft": metrics["time_to_first_token_ms"]["successful"]["median"],
            "itl": metrics["inter_token_latency_ms"]["successful"]["median"], "cpu": cpu,
            "ok": len(done["successful"]), "errors": len(done["errored"]) + len(done["incomplete"]),
            "concurrency": metrics["request_concurrency"]["successful"]["median"]}


def llama_benchy(url: str, work: Path, streams: int, requests: int, osl: int, warmup: int,
                 pin: list[str]) -> dict:
    bin_ = venv("llama-benchy")
    # Its batches are of --concurrency requests each, run --runs times (after its own warm-up batch).
    _, cpu = measured(pin + [str(bin_ / "llama-benchy"), "--base-url", f"{url}/v1", "--model", MODEL,
                             "--tokenizer", str(tokenizer(work.parent, bin_ / "python")), "--pp", str(ISL),
                             "--tg", str(osl), "--concurrency", str(streams), "--runs",
                             str(max(1, requests // streams)), "--exact-tg", "--latency-mode", "none",
                             "--skip-coherence", "--no-cache", "--format", "json", "--save-result",
                             str(work / "out.json"), "--book-url", f"{url}/book.txt"]
                      + ([] if warmup else ["--no-warmup"]), work, {"HOME": str(work)})
    found = json.loads((work / "out.json").read_text())["benchmarks"][0]
    rates = found["tg_req_throughput"]["values"]
    return {"ttft": statistics.median(found["e2e_ttft"]["values"]), "itl": 1000 / statistics.median(rates),
            "cpu": cpu, "ok": len(rates), "errors": requests - len(rates)}


CLIENTS = {"ours": ours, "aiperf": aiperf, "guidellm": guidellm, "llama-benchy": llama_benchy}
VERSIONS = {"ours": "trtllm-deploy bench", **TOOLS}


def accuracy(name: str, work: Path) -> dict:
    with Timed(TTFT_MS, ITL_MS, workers=2, pin=[]) as server:
        found = CLIENTS[name](server.url, work, STREAMS, REQUESTS, OSL, 1, [])
        found["server_late_ms"] = server.stats().get("late_p50_ms")
    return found


def capacity(name: str, work: Path) -> dict:
    with Timed(0, 0, workers=1, pin=SERVER_CPU) as server:
        found = CLIENTS[name](server.url, work, FAST["streams"], FAST["requests"], FAST["osl"], 0, CLIENT_CPU)
        stats = server.stats()
    return {"tokens_per_s": stats.get("steady_tokens_per_s"), "pieces": stats["pieces"], "cpu": found["cpu"],
            "errors": found["errors"]}


def invoke_bench(url: str, work: Path, args: list[str], pin: list[str] | None = None) -> tuple[dict, float]:
    """`invoke bench --json` as a user runs it; its first level and the CPU of its process tree."""
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / "tasks.py").write_text("from invoke import Collection\nfrom trtllm_deploy.cli import bench\n"
                                    "ns = Collection()\nns.add_collection(bench.ns)\n")
    argv = [sys.executable, "-m", "invoke", "--search-root", str(tasks), "bench", "--url", url,
            "--input-tokens", str(ISL), *args, "--out", str(work / "out"), "--json"]
    output, cpu = measured((pin or []) + argv, work, {"PYTHONPATH": str(ROOT)})
    return json.loads(output[output.index("{"):])["levels"][0], cpu


# --- request rate: open loop, the same schedule parameters for each client ------------------------

def ours_rate(url: str, work: Path) -> dict:
    level, cpu = invoke_bench(url, work, ["--request-rate", f"{RATE:g}", "--burstiness", "1", "--seed",
                                          str(SEED), "--requests", str(RATE_REQUESTS), "--output-tokens",
                                          str(RATE_OSL), "--warmup", "1"])
    s = level["summary"]
    return {"ttft": s["ttft_ms"]["p50"], "itl": s["itl_ms"]["p50"], "late_p50": s["lateness_ms"]["p50"],
            "late_p99": s["lateness_ms"]["p99"], "rate": s["requests_per_s"], "ok": s["succeeded"],
            "errors": sum(s["errors"].values()), "cpu": cpu, "behind": level["behind"]}


def aiperf_rate(url: str, work: Path) -> dict:
    # aiperf 0.13.0: --request-rate with --arrival-pattern poisson (its default), --random-seed.
    bin_ = venv("aiperf")
    out = work / "aiperf"
    _, cpu = measured([str(bin_ / "aiperf"), "profile", "-m", MODEL, "--url", url, "--endpoint-type",
                       "completions", "--streaming", "--request-rate", f"{RATE:g}", "--arrival-pattern",
                       "poisson", "--random-seed", str(SEED), "--request-count", str(RATE_REQUESTS),
                       "--warmup-request-count", "1", "--isl", str(ISL), "--osl", str(RATE_OSL),
                       "--tokenizer", str(tokenizer(work.parent, bin_ / "python")),
                       "--extra-inputs", "ignore_eos:true", "--artifact-dir", str(out), "--ui-type", "none"],
                      work)
    found = json.loads((out / "profile_export_aiperf.json").read_text())
    return {"ttft": found["time_to_first_token"]["p50"], "itl": found["inter_token_latency"]["p50"],
            "late_p50": None, "late_p99": None, "rate": found["request_throughput"]["avg"],
            # Its own: from its timing service's credit to the worker's send (not against the schedule).
            "send": (found["credit_to_start_latency"]["p50"], found["credit_to_start_latency"]["p99"]),
            "ok": int(found["request_count"]["avg"]), "cpu": cpu,
            "errors": sum(e.get("count", 0) for e in found.get("error_summary") or [])}


def vllm_rate(url: str, work: Path) -> dict:
    bin_ = venv("vllm")   # --request-rate, --burstiness 1 (Poisson); --seed seeds its gaps and prompts
    argv = ["bench", "serve", "--backend", "openai", "--base-url", url, "--model", MODEL, "--tokenizer",
            str(tokenizer(work.parent, bin_ / "python")), "--dataset-name", "random", "--random-input-len",
            str(ISL), "--random-output-len", str(RATE_OSL), "--num-prompts", str(RATE_REQUESTS),
            "--request-rate", f"{RATE:g}", "--burstiness", "1", "--seed", str(SEED), "--ignore-eos",
            "--num-warmups", "1", "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", str(work), "--result-filename", "out.json", "--disable-tqdm"]
    _, cpu = measured([str(bin_ / "vllm"), *argv], work, OFFLINE)
    found = json.loads((work / "out.json").read_text())
    # Its own: from when its generator yielded the request (after its sleep) to the send.
    queued = sorted(1000 * t for t in found["queue_times"])
    return {"ttft": found["median_ttft_ms"], "itl": found["median_itl_ms"], "late_p50": None,
            "late_p99": None, "rate": found["request_throughput"], "ok": found["completed"],
            "errors": found["failed"], "cpu": cpu,
            "send": (statistics.median(queued), queued[int(0.99 * (len(queued) - 1))])}


RATE_CLIENTS = {"ours": ours_rate, "aiperf": aiperf_rate, "vllm": vllm_rate}


def rate(name: str, work: Path) -> dict:
    with Timed(RATE_TTFT_MS, RATE_ITL_MS, workers=2, pin=[]) as server:
        found = RATE_CLIENTS[name](server.url, work)
        found["server_late_ms"] = server.stats().get("late_p50_ms")
    return found


def rate_table(figures: dict) -> list[str]:
    header = ["client", "TTFT p50 ms", "error ms", "ITL p50 ms", "error ms", "lateness p50/p99 ms",
              "own send delay p50/p99 ms", "achieved req/s", "requests ok", "CPU s"]
    rows = []
    for name, f in figures.items():
        if "failed" in f:
            rows.append([name, "failed"] + ["-"] * 8)
            continue
        late = ("not reported" if f["late_p50"] is None
                else f"{f['late_p50']:.3f} / {f['late_p99']:.3f}" + (" (behind)" if f.get("behind") else ""))
        ok = f"{f['ok']}" + (f" ({f['errors']} failed)" if f.get("errors") else "")
        rows.append([name, f"{f['ttft']:.2f}", f"{f['ttft'] - RATE_TTFT_MS:+.2f}", f"{f['itl']:.3f}",
                     f"{f['itl'] - RATE_ITL_MS:+.3f}", late,
                     "-" if "send" not in f else f"{f['send'][0]:.3f} / {f['send'][1]:.3f}",
                     f"{f['rate']:.1f}", ok, f"{f['cpu']:.2f}"])
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = [f"request rate: {RATE:g} requests/s open loop (Poisson, seed {SEED}), {RATE_REQUESTS} requests "
             f"of {RATE_OSL} tokens; truth: TTFT {RATE_TTFT_MS:g} ms, ITL {RATE_ITL_MS:g} ms; {CORES} cores"]
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(ln, widths, strict=True)) for ln in [header] + rows]
    lines += [f"{name}: {f['failed']}" for name, f in figures.items() if "failed" in f]
    return lines + ["server's own lateness p50 (ms): " + ", ".join(
        f"{name} {f['server_late_ms']:.3f}" for name, f in figures.items() if f.get("server_late_ms"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(dict.fromkeys([*CLIENTS, *RATE_CLIENTS])),
                        help="clients to run, comma-separated")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--rate-only", "--schedule-only", action="store_true",
                        help="only the request-rate comparison (ours, aiperf, vllm)")
    args, _ = parser.parse_known_args()
    names = [name for name in args.only.split(",") if name in CLIENTS or name in RATE_CLIENTS]
    rated = {}
    with tempfile.TemporaryDirectory(prefix="bench-rate-") as scratch:
        for name in [name for name in names if name in RATE_CLIENTS]:
            work = Path(scratch) / name
            work.mkdir(parents=True)
            print(f"{name}: request rate…", file=sys.stderr, flush=True)
            try:
                rated[name] = {"client": VERSIONS[name], **rate(name, work)}
            except (Failed, OSError, ValueError, KeyError, IndexError, TypeError,
                    subprocess.CalledProcessError) as exc:
                rated[name] = {"client": VERSIONS[name], "failed": f"{type(exc).__name__}: {exc}"[:300]}
    if rated:
        print("\n".join(rate_table(rated)), flush=True)
    if args.rate_only:
        if args.json:
            Path(args.json).write_text(json.dumps({"rate": rated}, indent=2))
        return
    names = [name for name in names if name in CLIENTS]
    rows, figures = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-clients-") as scratch:
        for name in names:
            figure = {"client": VERSIONS[name]}
            for phase, run in (("accuracy", accuracy), ("capacity", capacity)):
                work = Path(scratch) / name / phase
                work.mkdir(parents=True)
                print(f"{name}: {phase}…", file=sys.stderr, flush=True)
                try:
                    figure[phase] = run(name, work)
                except (Failed, OSError, ValueError, KeyError, IndexError,
                        subprocess.CalledProcessError) as exc:
                    figure[phase] = {"failed": f"{type(exc).__name__}: {exc}"[:200]}
            figures[name] = figure
            rows.append(row(name, figure))
    header = ["client", "TTFT p50 ms", "error ms", "ITL p50 ms", "error ms", "requests ok", "CPU s",
              "tok/s on 1 core", "CPU s (capacity)"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"truth: TTFT {TTFT_MS:g} ms, ITL {ITL_MS:g} ms, {STREAMS} streams, {REQUESTS} requests of {OSL} "
          f"tokens; capacity: {FAST['streams']} streams x {FAST['osl']} tokens, client on 1 core; "
          f"{CORES} cores here")
    for line in [header] + rows:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(line, widths, strict=True)))
    for name, figure in figures.items():
        for phase in ("accuracy", "capacity"):
            if "failed" in figure.get(phase, {}):
                print(f"{name} {phase}: {figure[phase]['failed']}")
    if args.json:
        Path(args.json).write_text(json.dumps({**figures, "rate": rated}, indent=2))


def row(name: str, figure: dict) -> list[str]:
    a, c = figure.get("accuracy", {}), figure.get("capacity", {})
    if "failed" in a:
        cells = ["failed"] + ["-"] * 5
    else:
        cells = [f"{a['ttft']:.2f}", f"{a['ttft'] - TTFT_MS:+.2f}", f"{a['itl']:.3f}",
                 f"{a['itl'] - ITL_MS:+.3f}",
                 f"{a['ok']}" + (f" ({a['errors']} failed)" if a.get("errors") else ""), f"{a['cpu']:.2f}"]
    if "failed" in c:
        cells += ["failed", "-"]
    else:
        cells += [f"{c['tokens_per_s']:,.0f}" if c.get("tokens_per_s") else "-", f"{c['cpu']:.2f}"]
    return [name] + cells


if __name__ == "__main__":
    main()
