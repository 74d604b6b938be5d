"""vLLM's progress for the supervisor: its generated-token counter, read from the Prometheus text of
``GET /metrics`` under the name the pinned vLLM gives it, so a saturated vLLM fallback is busy, not
stuck, and a frozen one is a hang — against the stand-in in vllm mode."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from test_standin import checkpoint, start_server  # noqa: F401  (fixtures)
from test_supervise import long_streams, watched
from trtllm_deploy.runtimes import runtime, trtllm, vllm

# The shape of vLLM's Prometheus logger (vllm/v1/metrics/loggers.py): metrics declared through the
# class's factories, labels from a list named once.
DECLARED = '''
class PrometheusStatLogger:
    _counter_cls = Counter
    def __init__(self, vllm_config, engine_indexes=None):
        labelnames = ["model_name", "engine"]
        gauge = self._gauge_cls(name="vllm:num_requests_running", documentation="...",
                                multiprocess_mode="mostrecent", labelnames=labelnames)
        counter = self._counter_cls(name="vllm:generation_tokens", documentation="...",
                                    labelnames=labelnames)
        success = self._counter_cls(name="vllm:request_success", documentation="...",
                                    labelnames=labelnames + ["finished_reason"])
        info = self._gauge_cls(name="vllm:lora_requests_info", documentation="...",
                               labelnames=["max_lora", "waiting_lora_adapters"])
'''


def test_the_metrics_are_read_from_vllms_source():
    assert vllm.prometheus_metrics(DECLARED) == {
        "vllm:generation_tokens": {"kind": "counter", "labels": ["model_name", "engine"]},
        "vllm:lora_requests_info": {"kind": "gauge", "labels": ["max_lora", "waiting_lora_adapters"]},
        "vllm:num_requests_running": {"kind": "gauge", "labels": ["model_name", "engine"]},
        "vllm:request_success": {"kind": "counter", "labels": ["model_name", "engine", "finished_reason"]},
    }


def test_the_pinned_vllm_declares_the_progress_counter():
    recorded = json.loads((vllm.ROOT / vllm.METRICS).read_text())
    assert recorded["version"] == json.loads((vllm.ROOT / vllm.SERVE_OPTIONS).read_text())["version"]
    assert recorded["metrics"][vllm.PROGRESS] == {"kind": "counter", "labels": ["model_name", "engine"]}
    assert vllm.exposed(vllm.PROGRESS) == "vllm:generation_tokens_total"


@pytest.mark.parametrize("body, expected", [
    pytest.param(b'# HELP vllm:generation_tokens_total Number of generation tokens processed.\n'
                 b'# TYPE vllm:generation_tokens_total counter\n'
                 b'vllm:generation_tokens_total{engine="0",model_name="llama"} 1234.0\n'
                 b'vllm:generation_tokens_created{engine="0",model_name="llama"} 1.7e+09\n'
                 b'vllm:prompt_tokens_total{engine="0",model_name="llama"} 99.0\n', 1234, id="one-engine"),
    pytest.param(b'vllm:generation_tokens_total{engine="0",model_name="m"} 10.0\n'
                 b'vllm:generation_tokens_total{engine="1",model_name="m"} 5.0\n', 15, id="engines-summed"),
    pytest.param(b'vllm:prompt_tokens_total{engine="0",model_name="m"} 10.0\n', None, id="absent"),
    pytest.param(b'[{"iter": 3}]', None, id="trtllm-json"),
])
def test_vllms_generated_tokens_from_its_metrics_text(body, expected):
    assert vllm.generated_tokens(body) == expected


@pytest.mark.parametrize("body, expected", [
    pytest.param(b'[{"iter": 4}, {"iter": 6}]', 6, id="stats"),
    pytest.param(b"[]", None, id="none-since-last"),
    pytest.param(b"# TYPE x counter\n", None, id="prometheus-text"),
])
def test_trtllm_serves_iterations_as_json(body, expected):
    assert trtllm.iterations(body) == expected


def start_vllm(start, checkpoint_dir, env=None):  # noqa: F811
    return start("vllm", "serve", str(checkpoint_dir), "--max-num-seqs", "2", "--served-model-name", "m",
                 env={"STANDIN_TOKENS_PER_S": "2", **(env or {})}).wait_ready()


def test_the_vllm_standin_counts_generated_tokens_under_vllms_name(checkpoint, start_server):  # noqa: F811
    server = start_vllm(start_server, checkpoint, {"STANDIN_TOKENS_PER_S": "50"})
    long_streams(server.port, 1, 5)[0].join(timeout=30)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = answer.read()
    assert b'vllm:generation_tokens_total{model_name="m",engine="0"} 5.0' in text
    assert vllm.generated_tokens(text) == 5


def test_a_saturated_vllm_that_generates_is_busy_not_stuck(checkpoint, start_server):  # noqa: F811
    """Two long streams fill both of --max-num-seqs 2 at 2 tokens/s; the probe queues behind them for
    the whole watch, far longer than hang_s, and only the token counter moves."""
    server = start_vllm(start_server, checkpoint)
    long_streams(server.port, 2, 200)
    failure, probe, waited = watched(server, hang_s=3.0, duration=20, serving=runtime.get("vllm"))
    assert failure is None, failure
    assert max(waited) > 3 * 3.0 and probe.tokens == 0   # the probe waited, unanswered, all along
    assert probe.iterations is not None and probe.iterations > 2 * 15   # the counter it saw moving


def test_a_frozen_vllm_is_a_hang_within_hang_s_plus_2_s(checkpoint, start_server):  # noqa: F811
    server = start_vllm(start_server, checkpoint, {"STANDIN_TOKENS_PER_S": "20", "STANDIN_FAULT": "hang:3"})
    long_streams(server.port, 1, 50)
    server.wait_for_line("STANDIN_FAULT hang:3")
    hung_at = time.monotonic()
    failure, _, _ = watched(server, hang_s=3.0, duration=30, serving=runtime.get("vllm"))
    assert failure is not None and failure.kind == "hang", failure
    assert time.monotonic() - hung_at <= 3.0 + 2.0
