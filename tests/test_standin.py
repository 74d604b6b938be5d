"""The stand-in runtime on this host, one process standing in for every rank (no MPI needed).

Command-line parsing, options files, fault specs and artifact checks are pure and tested as tables;
the HTTP surface and the faults are tested against a real server process on loopback.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from trtllm_deploy.artifact import manifest as manifests
from trtllm_deploy.runtimes import interface
from trtllm_deploy.testbed.standin import artifact, cli, faults, llmapi
from trtllm_deploy.testbed.standin import vllm as standin_vllm
from trtllm_deploy.testbed.standin.engine import VOCABULARY, expected_words
from trtllm_deploy.testbed.standin.faults import Fault
from trtllm_deploy.testbed.standin.settings import Settings
from waiting import until

ROOT = Path(__file__).resolve().parents[1]
PINNED = interface.load()   # the pinned TensorRT-LLM's interface, which the stand-in takes
FAST = {"STANDIN_LOAD_SECONDS": "0", "STANDIN_TOKENS_PER_S": "400"}


def write_checkpoint(path: Path, manifest: bool = True) -> Path:
    """A small Hugging Face-shaped checkpoint, with the manifest trtllm-deploy writes."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                  "architectures": ["LlamaForCausalLM"]}))
    for index in (1, 2):
        (path / f"model-0000{index}-of-00002.safetensors").write_bytes(bytes(range(256)) * (64 * index))
    if manifest:
        manifests.write(path, manifests.create(path, {"model": "test"}))
    return path


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "model")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """This environment without launcher or stand-in variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMI_", "PMIX_", "STANDIN_", cli.LAUNCH_MARK))}
    env["PYTHONPATH"] = str(ROOT)
    return {**env, **extra}


def standin(*args: str) -> list[str]:
    return [sys.executable, "-m", "trtllm_deploy.testbed.standin", *args]


class Server:
    """A stand-in process on 127.0.0.1; its output is collected by a thread as it comes."""

    def __init__(self, program_args: list[str], env: dict | None = None, port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        self.port = port or free_port()
        self.lines: list[str] = []
        self._changed = threading.Condition()  # notified at every line and at the end of the output
        self._ended = False
        self.process = subprocess.Popen(
            standin(*program_args, "--host", host, "--port", str(self.port)),
            env=clean_env(**{**FAST, **(env or {})}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def has_line(self, text: str, count: int = 1, within: float = 0.0) -> bool:
        """Whether ``count`` lines with ``text`` came, waiting up to ``within`` s for them (woken by
        each line; the end of the output ends the wait)."""
        def enough() -> bool:
            return sum(text in line for line in self.lines) >= count

        with self._changed:
            self._changed.wait_for(lambda: enough() or self._ended, timeout=within)
            return enough()

    def whole_output(self, timeout: float = 20) -> str:
        """The output once the process has closed it (every line read), as a log file is whole when
        its writer has died; for a process that has exited or is exiting."""
        with self._changed:
            assert self._changed.wait_for(lambda: self._ended, timeout=timeout), \
                f"the output did not end within {timeout:g} s:\n{self.output}"
        return self.output

    def wait_for_line(self, text: str, timeout: float = 20) -> None:
        assert self.has_line(text, within=timeout), f"no line with {text!r} in:\n{self.output}"

    def wait_ready(self, timeout: float = 20) -> Server:
        def answer() -> int | None:
            assert self.process.poll() is None, f"the stand-in exited early:\n{self.output}"
            return health(self.port)

        until(answer, timeout, f"the stand-in on port {self.port} to answer /health with 200",
              done=lambda status: status == 200)
        return self

    def wait_exit(self, timeout: float = 20) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._reader.join(timeout=5)


@pytest.fixture
def start_server():
    started: list[Server] = []

    def start(*program_args: str, env: dict | None = None, port: int | None = None) -> Server:
        server = Server(list(program_args), env, port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def health(port: int, host: str = "127.0.0.1") -> int | None:
    try:
        connection = http.client.HTTPConnection(host, port, timeout=2)
        connection.request("GET", "/health")
        return connection.getresponse().status
    except OSError:
        return None


def call(port: int, method: str, path: str, body: object = None, raw: bytes | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    return response.status, (json.loads(payload) if payload else None)


def stream(port: int, path: str, body: dict, timeout: float = 20) -> tuple[list[dict], str]:
    """The SSE events of a streamed request and how the stream ended: done, closed or stalled."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request("POST", path, body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events: list[dict] = []
    try:
        for line in response:
            if line.startswith(b"data: [DONE]"):
                return events, "done"
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
    except (TimeoutError, socket.timeout):
        return events, "stalled"
    except (http.client.IncompleteRead, ConnectionError):
        pass
    return events, "closed"


def streamed_words(events: list[dict]) -> list[str]:
    return [e["choices"][0]["text"].strip() for e in events if e["choices"] and e["choices"][0]["text"]]


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("args, expected", [
    pytest.param(["/m"], {"host": "localhost", "port": 8000, "backend": "pytorch", "tensor_parallel_size": 1,
                          "pipeline_parallel_size": 1, "log_level": "info", "max_batch_size": 2048},
                 id="defaults"),
    pytest.param(["/m", "--tp_size", "3", "--pp_size", "2"],
                 {"tensor_parallel_size": 3, "pipeline_parallel_size": 2}, id="short-parallel-names"),
    pytest.param(["/m", "--tensor_parallel_size=2", "--ep_size=2"],
                 {"tensor_parallel_size": 2, "moe_expert_parallel_size": 2}, id="long-names-with-equals"),
    pytest.param(["/m", "--config", "a.yml"], {"extra_llm_api_options": "a.yml"}, id="config"),
    pytest.param(["/m", "--extra_llm_api_options", "a.yml"], {"extra_llm_api_options": "a.yml"},
                 id="extra-llm-api-options"),
    pytest.param(["/m", "--hf_revision", "abc", "--no-telemetry"], {"revision": "abc", "telemetry": False},
                 id="alias-and-off-flag"),
    pytest.param(["/m", "--kv_cache_free_gpu_memory_fraction", "0.8", "--gpus_per_node", "1"],
                 {"free_gpu_memory_fraction": 0.8, "gpus_per_node": 1}, id="kv-fraction-and-gpus"),
    pytest.param(["/m", "--trust_remote_code", "--max_seq_len", "4096", "--max_num_tokens", "2048"],
                 {"trust_remote_code": True, "max_seq_len": 4096, "max_num_tokens": 2048},
                 id="limits-and-flag"),
    pytest.param(["--host", "0.0.0.0", "/m", "--log_level", "debug", "--max_beam_width", "1"],
                 {"host": "0.0.0.0", "log_level": "debug"}, id="model-after-options"),
])
def test_serve_options(args, expected):
    values, positionals = cli.parse_serve(args)
    assert positionals == ["/m"]
    assert {key: values[key] for key in expected} == expected


@pytest.mark.parametrize("args, message", [
    pytest.param(["/m", "--foo"], "Error: No such option: --foo\n", id="unknown-flag"),
    pytest.param(["/m", "--trust-remote-code"],
                 "No such option: --trust-remote-code Did you mean --trust_remote_code?",
                 id="near-miss-suggests"),
    pytest.param(["/m", "--port", "http"], "Invalid value for '--port': 'http' is not a valid integer.",
                 id="bad-integer"),
    pytest.param(["/m", "--backend", "onnx"], "Invalid value for '--backend': 'onnx' is not one of "
                 + ", ".join(repr(choice) for choice in PINNED.cli.options()["backend"].choices) + ".",
                 id="bad-choice"),
    pytest.param(["/m", "--port"], "Option '--port' requires an argument.", id="missing-value"),
    pytest.param(["/m", "--trust_remote_code=1"], "Option '--trust_remote_code' does not take a value.",
                 id="flag-with-value"),
    pytest.param([], "Missing argument 'MODEL'.", id="missing-model"),
    pytest.param(["/m", "/n"], "Got unexpected extra argument (/n)", id="extra-argument"),
    pytest.param(["grpc", "/m"], "implements only 'serve'", id="other-subcommand"),
])
def test_serve_usage_errors_exit_2_like_click(args, message, capsys):
    assert cli.main(["trtllm-serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Usage: trtllm-serve serve [OPTIONS] MODEL\nTry 'trtllm-serve serve --help'")
    assert message in err


def test_unknown_flag_is_refused_by_the_program():
    result = subprocess.run(standin("trtllm-serve", "serve", "/m", "--foo"), env=clean_env(),
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.endswith("\nError: No such option: --foo\n")


@pytest.mark.parametrize("program", ["trtllm-serve", "vllm"])
def test_version_says_stand_in(program, capsys):
    assert cli.main([f"/usr/local/bin/{program}", "--version"]) == 0
    out = capsys.readouterr().out
    real = "vLLM" if program == "vllm" else "TensorRT-LLM"
    assert out.startswith(f"{program} stand-in ") and f"not {real}" in out


def test_options_file_overrides_flags(tmp_path):
    options = tmp_path / "llm-api.yml"
    options.write_text("tensor_parallel_size: 2\nmax_batch_size: 8\nkv_cache_config:\n"
                       "  free_gpu_memory_fraction: 0.9\n")
    config = cli.trtllm_serve_config(["/m", "--tp_size", "4", "--max_batch_size", "64",
                                      "--config", str(options)])
    assert (config.tp_size, config.max_batch_size, config.option_keys) == (
        2, 8, ("kv_cache_config", "max_batch_size", "tensor_parallel_size"))


@pytest.mark.parametrize("args, expected", [
    pytest.param(["serve", "/m"], {"tp_size": 1, "port": 8000, "host": "0.0.0.0", "served_name": "/m"},
                 id="defaults"),
    pytest.param(["serve", "/m", "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray"],
                 {"tp_size": 2}, id="dashes"),
    pytest.param(["serve", "/m", "--tensor_parallel_size=2", "--served-model-name", "llama"],
                 {"tp_size": 2, "served_name": "llama"}, id="underscores-and-served-name"),
])
def test_vllm_options(args, expected):
    config = standin_vllm.serve_config(args)
    assert {key: getattr(config, key) for key in expected} == expected


def test_vllm_refuses_unknown_arguments(capsys):
    assert cli.main(["vllm", "serve", "/m", "--tensor-parallel-size", "2", "--foo"]) == 2
    assert "vllm: error: unrecognized arguments: --foo" in capsys.readouterr().err


def test_launcher_needs_a_command(capsys):
    assert cli.main(["trtllm-llmapi-launch"]) == 2
    assert "usage: trtllm-llmapi-launch COMMAND" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# LLM-API options files


SPARK_OPTIONS = """
kv_cache_config:
  free_gpu_memory_fraction: 0.9
cuda_graph_config:
  enable_padding: true
print_iter_log: false
disable_overlap_scheduler: true
enable_attention_dp: false
moe_config:
  backend: CUTLASS
max_batch_size: 16
max_num_tokens: 8192
"""


def test_options_file_with_the_common_keys_is_accepted(tmp_path):
    path = tmp_path / "spark.yml"
    path.write_text(SPARK_OPTIONS)
    assert llmapi.load(path)["cuda_graph_config"] == {"enable_padding": True}
    (tmp_path / "empty.yml").write_text("")
    assert llmapi.load(tmp_path / "empty.yml") == {}


@pytest.mark.parametrize("text, lines", [
    pytest.param("kv_cache_config: {free_gpu_memory_fraction: 0.9}\nenable_magic: true\n",
                 ["1 validation error for TorchLlmArgs", "enable_magic",
                  "  Extra inputs are not permitted [type=extra_forbidden, input_value=True, "
                  "input_type=bool]"],
                 id="unknown-top-level-key"),
    pytest.param("cuda_graph_config: {enable_padding: true, padding: 8}\nmax_batch_size: many\n",
                 ["2 validation errors for TorchLlmArgs", "max_batch_size", "cuda_graph_config.padding"],
                 id="unknown-nested-key-and-bad-integer"),
    pytest.param("kv_cache_config: {free_gpu_memory_fraction: 1.5}\n",
                 ["kv_cache_config.free_gpu_memory_fraction"], id="fraction-above-one"),
    pytest.param("print_iter_log: maybe\n", ["print_iter_log", "Input should be a valid boolean"],
                 id="not-a-boolean"),
    pytest.param("- a\n- b\n", ["must hold a mapping of LLM-API options, not list"], id="not-a-mapping"),
    pytest.param("key: [unclosed\n", ["is not valid YAML"], id="not-yaml"),
])
def test_options_file_is_refused(tmp_path, text, lines):
    path = tmp_path / "options.yml"
    path.write_text(text)
    with pytest.raises(llmapi.OptionsError) as caught:
        llmapi.load(path)
    for line in lines:
        assert line in str(caught.value).splitlines() or line in str(caught.value)


def test_serving_with_a_bad_options_file_fails_before_loading(tmp_path, checkpoint):
    path = tmp_path / "options.yml"
    path.write_text("enable_magic: true\n")
    result = subprocess.run(standin("trtllm-serve", str(checkpoint), "--config", str(path)),
                            env=clean_env(**FAST), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "[TensorRT-LLM stand-in][rank 0][ERROR] enable_magic" in result.stderr
    assert "Loading weights" not in result.stdout


# ---------------------------------------------------------------------------------------------
# Fault specs and settings


@pytest.mark.parametrize("text, expected", [
    pytest.param("", (), id="none"),
    pytest.param("exit:5@2", (Fault("exit", 5, 2),), id="exit-at-token-on-rank"),
    pytest.param("hang:3", (Fault("hang", 3, 0),), id="hang-on-rank-0"),
    pytest.param("oom@1", (Fault("oom", None, 1),), id="oom-while-loading"),
    pytest.param("nccl", (Fault("nccl"),), id="nccl-at-start-up"),
    pytest.param("double-free:7@1", (Fault("double-free", 7, 1),), id="double-free-at-token"),
    pytest.param("bind", (Fault("bind"),), id="bind"),
    pytest.param("exit:1, hang:2@1", (Fault("exit", 1), Fault("hang", 2, 1)), id="two-faults"),
])
def test_fault_specs(text, expected):
    assert faults.parse(text) == expected


@pytest.mark.parametrize("text, message", [
    pytest.param("explode", "is not KIND[:TOKEN][@RANK]", id="unknown-kind"),
    pytest.param("exit:x", "is not KIND[:TOKEN][@RANK]", id="token-not-a-number"),
    pytest.param("hang:3@", "is not KIND[:TOKEN][@RANK]", id="rank-missing"),
    pytest.param("exit:0", "tokens count from 1", id="token-zero"),
    pytest.param("oom:3", "'oom' happens before any token", id="oom-at-token"),
    pytest.param("bind@1", "only rank 0 binds a port", id="bind-on-a-worker"),
])
def test_bad_fault_specs(text, message):
    with pytest.raises(ValueError, match="STANDIN_FAULT") as caught:
        faults.parse(text)
    assert message in str(caught.value)


def test_settings_name_the_bad_variable():
    assert Settings.from_env({"STANDIN_TOKENS_PER_S": "25", "STANDIN_FAULT": "hang:2@1"}) == Settings(
        tokens_per_s=25.0, faults=(Fault("hang", 2, 1),))
    with pytest.raises(ValueError, match="STANDIN_LOAD_STEPS='many' is not an integer"):
        Settings.from_env({"STANDIN_LOAD_STEPS": "many"})
    with pytest.raises(ValueError, match="STANDIN_LOAD_SECONDS='-1' must be at least 0"):
        Settings.from_env({"STANDIN_LOAD_SECONDS": "-1"})


def test_tokens_are_deterministic_and_need_every_rank():
    first = expected_words("The capital of France is", 12, 3)
    assert first == expected_words("The capital of France is", 12, 3)
    assert set(first) <= set(VOCABULARY) and len(first) == 12
    assert first != expected_words("The capital of Spain is", 12, 3)
    assert first != expected_words("The capital of France is", 12, 2)


# ---------------------------------------------------------------------------------------------
# The artifact check


def test_artifact_check_reads_config_and_manifest(checkpoint):
    checked = artifact.check(checkpoint)
    assert (checked.model_type, checked.architectures, checked.manifest_files) == (
        "llama", ("LlamaForCausalLM",), 3)
    assert len(checked.weight_files) == 2


def _remove_weights(path: Path) -> None:
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    (path / artifact.MANIFEST).unlink()


@pytest.mark.parametrize("damage, expected", [
    pytest.param(lambda p: (p / "config.json").unlink(), "config.json: missing", id="no-config"),
    pytest.param(lambda p: (p / "config.json").write_text("{not json"), "config.json: cannot be parsed",
                 id="config-not-json"),
    pytest.param(_remove_weights, "no *.safetensors weight files", id="no-weights"),
    pytest.param(lambda p: (p / "model-00002-of-00002.safetensors").unlink(),
                 "model-00002-of-00002.safetensors: missing: listed in the manifest, not on disk",
                 id="listed-file-missing"),
    pytest.param(lambda p: os.truncate(p / "model-00001-of-00002.safetensors", 100),
                 "model-00001-of-00002.safetensors: size: 100 bytes", id="incomplete"),
    pytest.param(lambda p: (p / "model-00001-of-00002.safetensors").write_bytes(
        bytes((p / "model-00001-of-00002.safetensors").stat().st_size)),
        "model-00001-of-00002.safetensors: hash: content differs from the manifest", id="tampered"),
    pytest.param(lambda p: (p / artifact.MANIFEST).write_text("{not json"),
                 "trtllm-deploy-manifest.json", id="manifest-not-json"),
])
def test_artifact_check_names_the_file_at_fault(checkpoint, damage, expected):
    damage(checkpoint)
    with pytest.raises(artifact.ArtifactError) as caught:
        artifact.check(checkpoint)
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems


def test_artifact_check_without_manifest_and_for_engines(tmp_path):
    plain = write_checkpoint(tmp_path / "plain", manifest=False)
    assert artifact.check(plain).manifest_files == 0
    with pytest.raises(artifact.ArtifactError, match=r"no rank\*\.engine weight files"):
        artifact.check(plain, backend="tensorrt")
    with pytest.raises(artifact.ArtifactError, match="model directory does not exist"):
        artifact.check(tmp_path / "absent")


def test_served_artifact_that_is_tampered_is_refused_before_loading(checkpoint, start_server):
    (checkpoint / "model-00002-of-00002.safetensors").write_bytes(b"x" * 32768)
    server = start_server("trtllm-serve", str(checkpoint))
    assert server.wait_exit() == 1
    assert "[ERROR] artifact check failed:" in server.output
    assert "model-00002-of-00002.safetensors: hash: content differs from the manifest" in server.output
    assert "Loading weights" not in server.output and health(server.port) is None


# ---------------------------------------------------------------------------------------------
# The HTTP surface


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server for the shape tests: two tensor-parallel ranks standing in one process."""
    model = write_checkpoint(tmp_path_factory.mktemp("served") / "model")
    server = Server(["trtllm-serve", str(model), "--tp_size", "2", "--max_seq_len", "64"])
    try:
        yield server.wait_ready(), str(model)
    finally:
        server.stop()


def test_health_and_models_say_stand_in(served):
    server, model = served
    assert call(server.port, "GET", "/health") == (200, None)
    status, listing = call(server.port, "GET", "/v1/models")
    assert status == 200 and listing["object"] == "list"
    (entry,) = listing["data"]
    assert (entry["id"], entry["object"], entry["standin"]) == (model, "model", True)
    assert "stand-in" in entry["owned_by"]
    assert entry["metadata"] | {"path": None} == {
        "path": None, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "backend": "pytorch",
        "tp_size": 2, "pp_size": 1, "world_size": 1, "standin_version": entry["metadata"]["standin_version"]}


def test_completion(served):
    server, model = served
    status, body = call(server.port, "POST", "/v1/completions",
                        {"model": model, "prompt": "Once upon a time", "max_tokens": 7, "temperature": 0.7})
    assert status == 200
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == f"{model} (stand-in)" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["text"] == "".join(" " + w for w in expected_words("Once upon a time", 7, 2))
    assert (choice["index"], choice["finish_reason"]) == (0, "length")
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}


def test_streamed_completion_with_usage(served):
    server, model = served
    events, end = stream(server.port, "/v1/completions", {
        "prompt": "Once upon a time", "max_tokens": 7, "stream_options": {"include_usage": True}})
    assert end == "done"
    assert streamed_words(events) == expected_words("Once upon a time", 7, 2)
    assert all(e["object"] == "text_completion" and e["model"] == f"{model} (stand-in)" for e in events)
    assert len({e["id"] for e in events}) == 1
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None] * 7 + ["length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 7


def test_chat_completion(served):
    server, model = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    status, body = call(server.port, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 5})
    assert status == 200 and body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "".join(
        " " + w for w in expected_words("system: Be brief.\nuser: Hello there", 5, 2))
    assert body["usage"]["completion_tokens"] == 5 and body["model"] == f"{model} (stand-in)"

    events, end = stream(server.port, "/v1/chat/completions", {"messages": messages, "max_tokens": 5})
    assert end == "done" and all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == \
        choice["message"]["content"]
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_concurrent_streams_share_steps(served):
    server, _ = served
    results: dict[int, tuple[list[str], str]] = {}

    def one(index: int) -> None:
        events, end = stream(server.port, "/v1/completions", {"prompt": f"request {index}", "max_tokens": 20})
        results[index] = (streamed_words(events), end)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {i: (expected_words(f"request {i}", 20, 2), "done") for i in range(6)}


@pytest.mark.parametrize("path, body, param", [
    pytest.param("/v1/completions", b"{not json", None, id="bad-json"),
    pytest.param("/v1/completions", {"max_tokens": 3}, "prompt", id="no-prompt"),
    pytest.param("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens", id="zero-max-tokens"),
    pytest.param("/v1/completions", {"prompt": "a", "max_tokens": 100}, "max_tokens", id="over-max-seq-len"),
    pytest.param("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}},
                 "stream_options", id="stream-options-without-stream"),
    pytest.param("/v1/completions", {"prompt": "a", "n": 2}, "n", id="several-choices"),
    pytest.param("/v1/completions", {"prompt": "a", "temperature": "hot"}, "temperature",
                 id="bad-temperature"),
    pytest.param("/v1/chat/completions", {"messages": []}, "messages", id="no-messages"),
    pytest.param("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages",
                 id="unknown-role"),
])
def test_bad_requests_get_openai_errors(served, path, body, param):
    server, _ = served
    raw = body if isinstance(body, bytes) else None
    status, error = call(server.port, "POST", path, None if raw else body, raw=raw)
    assert status == 400
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["code"] == 400
    assert error["error"]["param"] == param and error["error"]["message"]


def test_unknown_routes_and_methods(served):
    server, _ = served
    assert call(server.port, "GET", "/v1/embeddings")[0] == 404
    assert call(server.port, "GET", "/v1/completions")[0] == 405


def test_vllm_serves_the_same_surface(checkpoint, start_server):
    server = start_server("vllm", "serve", str(checkpoint), "--tensor-parallel-size", "2",
                          "--distributed-executor-backend", "mp", "--served-model-name", "llama").wait_ready()
    assert "[vLLM stand-in][rank 0][INFO]" in server.output
    status, listing = call(server.port, "GET", "/v1/models")
    assert listing["data"][0]["id"] == "llama" and listing["data"][0]["runtime"] == "vllm"
    status, body = call(server.port, "POST", "/v1/chat/completions",
                        {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert status == 200 and body["model"] == "llama (stand-in)"
    assert body["choices"][0]["message"]["content"].split() == expected_words("user: hi", 4, 2)


# ---------------------------------------------------------------------------------------------
# Start-up: progress, then the port


def test_port_is_bound_only_after_loading(checkpoint, start_server):
    server = start_server("trtllm-serve", str(checkpoint),
                          env={"STANDIN_LOAD_SECONDS": "1.6", "STANDIN_LOAD_STEPS": "4"})
    server.wait_for_line("Loading weights: 1/4 shards")
    assert health(server.port) is None  # refused: nothing listens while loading
    server.wait_ready()
    progress = [line for line in server.lines if "Loading weights:" in line]
    assert [line.split("] ", 1)[1] for line in progress] == [
        f"Loading weights: {i}/4 shards" for i in range(1, 5)]
    assert all(line.startswith("[TensorRT-LLM stand-in][rank 0][") for line in server.lines)


# ---------------------------------------------------------------------------------------------
# Faults, one process standing in for every rank


def test_exit_at_token(checkpoint, start_server):
    server = start_server("trtllm-serve", str(checkpoint), env={"STANDIN_FAULT": "exit:4"}).wait_ready()
    events, end = stream(server.port, "/v1/completions", {"prompt": "p", "max_tokens": 10})
    assert (len(streamed_words(events)), end) == (3, "closed")
    assert server.wait_exit() == 1
    assert "STANDIN_FAULT exit:4: injecting 'exit' at token 4" in server.output


def test_hang_at_token_keeps_the_process_and_health(checkpoint, start_server):
    server = start_server("trtllm-serve", str(checkpoint), "--tp_size", "2",
                          env={"STANDIN_FAULT": "hang:3@1"}).wait_ready()
    events, end = stream(server.port, "/v1/completions", {"prompt": "p", "max_tokens": 10}, timeout=1.5)
    assert (len(streamed_words(events)), end) == (2, "stalled")
    assert health(server.port) == 200 and server.process.poll() is None
    server.process.send_signal(signal.SIGTERM)
    assert server.wait_exit() == -signal.SIGTERM


@pytest.mark.parametrize("spec, line, code, words", [
    pytest.param("nccl:2", faults.NCCL_LINE, 1, 1, id="nccl-at-token"),
    pytest.param("double-free:3", faults.DOUBLE_FREE_LINE, -signal.SIGABRT, 2, id="double-free-at-token"),
])
def test_known_failure_at_token(checkpoint, start_server, spec, line, code, words):
    server = start_server("trtllm-serve", str(checkpoint), env={"STANDIN_FAULT": spec}).wait_ready()
    events, end = stream(server.port, "/v1/completions", {"prompt": "p", "max_tokens": 10})
    assert (len(streamed_words(events)), end) == (words, "closed")
    assert server.wait_exit() == code
    assert f"[TensorRT-LLM stand-in][rank 0][ERROR] {line}" in server.lines


@pytest.mark.parametrize("spec, line, code, loaded", [
    pytest.param("oom", faults.OOM_LINE, 1, 1, id="oom-while-loading"),
    pytest.param("exit", None, 1, 1, id="exit-while-loading"),
    pytest.param("nccl", faults.NCCL_LINE, 1, 4, id="nccl-at-start-up"),
    pytest.param("double-free", faults.DOUBLE_FREE_LINE, -signal.SIGABRT, 4, id="double-free-at-start-up"),
    pytest.param("bind", "[Errno 98] error while attempting to bind on address ('127.0.0.1', {port}): "
                 "address already in use", 1, 4, id="bind"),
])
def test_start_up_faults(checkpoint, start_server, spec, line, code, loaded):
    server = start_server("trtllm-serve", str(checkpoint), env={"STANDIN_FAULT": spec})
    assert server.wait_exit() == code
    assert f"STANDIN_FAULT {spec}: injecting" in server.output or spec == "bind"
    if line:
        assert f"[TensorRT-LLM stand-in][rank 0][ERROR] {line.format(port=server.port)}" in server.lines
    assert sum("Loading weights:" in line for line in server.lines) == loaded
    assert "Application startup complete." not in server.output


def test_hang_while_loading_stops_progress(checkpoint, start_server):
    server = start_server("trtllm-serve", str(checkpoint),
                          env={"STANDIN_FAULT": "hang", "STANDIN_LOAD_SECONDS": "0.4"})
    server.wait_for_line("STANDIN_FAULT hang: injecting 'hang' while loading weights (shard 2/4)")
    # Not a pause: a window of ten shards' loading time (0.1 s each) in which no shard may show up
    # (waiting on the output, so a stand-in that goes on loading fails at once).
    assert not server.has_line("Loading weights:", count=2, within=1.0), server.output
    assert server.process.poll() is None and health(server.port) is None
    assert sum("Loading weights:" in line for line in server.lines) == 1


def test_port_in_use_gives_the_uvicorn_line(checkpoint, start_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server("trtllm-serve", str(checkpoint), port=port)
        assert server.wait_exit() == 1
    assert (f"[TensorRT-LLM stand-in][rank 0][ERROR] [Errno 98] error while attempting to bind on address "
            f"('127.0.0.1', {port}): address already in use") in server.lines


def test_fault_on_a_rank_outside_the_world_is_refused(checkpoint, start_server):
    server = start_server("trtllm-serve", str(checkpoint), "--tp_size", "2",
                          env={"STANDIN_FAULT": "exit:3@2"})
    assert server.wait_exit() == 2
    assert "STANDIN_FAULT exit:3@2: only ranks 0..1 exist" in server.output


# ---------------------------------------------------------------------------------------------
# Checks against the MPI world (the launcher's environment, before MPI is started)


@pytest.mark.parametrize("env, args, message", [
    pytest.param({"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "0"}, ["--tp_size", "3"],
                 "without trtllm-llmapi-launch", id="no-launcher"),
    pytest.param({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", cli.LAUNCH_MARK: "1"},
                 ["--tp_size", "3"], "MPI world size 2 does not match tp_size 3 x pp_size 1 = 3",
                 id="size-mismatch"),
    pytest.param({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, ["--tp_size", "2"],
                 "MPI world size 1 does not match tp_size 2", id="one-rank-for-two"),
])
def test_world_checks(checkpoint, env, args, message):
    result = subprocess.run(standin("trtllm-serve", str(checkpoint), *args), env=clean_env(**FAST, **env),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert message in result.stderr and "Loading weights" not in result.stdout


def test_multi_rank_world_without_mpi4py_is_explained(checkpoint):
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("mpi4py is installed here; the image tests cover real MPI worlds")
    env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", cli.LAUNCH_MARK: "1"}
    result = subprocess.run(standin("trtllm-serve", str(checkpoint), "--tp_size", "2"),
                            env=clean_env(**FAST, **env), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "mpi4py is not installed" in result.stderr


@pytest.mark.parametrize("rank, extra, error", [
    ("0", [], None),
    ("1", ["--headless"], None),
    ("1", [], "--headless is for every node but node 0"),
    ("0", ["--headless"], "--headless is for every node but node 0"),
    ("2", ["--headless", "--node-rank", "1"], "--node-rank 1 on the process the launcher made rank 2"),
])
def test_vllm_multi_node_mode_checks_node_rank_and_headless(monkeypatch, capsys, rank, extra, error):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", rank)
    args = ["serve", "/m", "--tensor-parallel-size", "3", "--distributed-executor-backend", "mp",
            "--nnodes", "3", "--master-addr", "10.0.0.1", *extra]
    if "--node-rank" not in extra:
        args += ["--node-rank", rank]
    if error is None:
        assert standin_vllm.serve_config(args).tp_size == 3
        return
    with pytest.raises(SystemExit) as stopped:
        standin_vllm.serve_config(args)
    assert stopped.value.code == 2 and error in capsys.readouterr().err
