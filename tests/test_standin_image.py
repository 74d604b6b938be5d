"""The stand-in image under real mpirun: several ranks in one container, each token a collective.

Everything runs inside one container without a network (``--network none``); the HTTP client is
the container's own python3 talking to 127.0.0.1 through ``docker exec``. Without a Docker engine
the ``standin_image`` fixture skips these tests with the reason.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
from test_standin import write_checkpoint

from trtllm_deploy.testbed.standin import faults
from trtllm_deploy.testbed.standin.engine import expected_words
from waiting import until

FAST = {"STANDIN_LOAD_SECONDS": "0.4", "STANDIN_TOKENS_PER_S": "100"}
MPIRUN = "mpirun --allow-run-as-root --oversubscribe -np {ranks} trtllm-llmapi-launch"

# Runs inside the container with its system python3: `client.py MODE PORT [ARGS...]`, prints JSON.
CLIENT = r"""
import http.client, json, socket, sys
mode, port = sys.argv[1], int(sys.argv[2])
def connect(timeout):
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
if mode == "health":
    try:
        c = connect(3); c.request("GET", "/health"); print(json.dumps(c.getresponse().status))
    except OSError:
        print(json.dumps(None))
elif mode == "get":
    c = connect(10); c.request("GET", sys.argv[3]); print(c.getresponse().read().decode())
elif mode == "post":
    c = connect(float(sys.argv[5])); c.request("POST", sys.argv[3], body=sys.argv[4])
    r = c.getresponse(); print(json.dumps({"status": r.status, "body": json.loads(r.read())}))
elif mode == "stream":
    prompt, max_tokens, timeout = sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    words, end = [], "closed"
    try:
        c = connect(timeout)
        c.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": prompt, "max_tokens": max_tokens, "stream": True}))
        for line in c.getresponse():
            if line.startswith(b"data: [DONE]"):
                end = "done"; break
            if line.startswith(b"data: "):
                words += [c["text"].strip() for c in json.loads(line[6:])["choices"] if c["text"]]
    except (socket.timeout, TimeoutError):
        end = "stalled"
    except (OSError, http.client.HTTPException):
        end = "closed"
    print(json.dumps({"words": words, "end": end}))
"""


class Box:
    """One running container of the stand-in image."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._runs = 0

    def sh(self, script: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
        env_args = [arg for k, v in (env or {}).items() for arg in ("-e", f"{k}={v}")]
        return subprocess.run(["docker", "exec", *env_args, self.name, "sh", "-c", script],
                               capture_output=True, text=True, timeout=timeout)

    def client(self, *args: object, timeout: float = 60):
        result = subprocess.run(["docker", "exec", self.name, "python3", "-c", CLIENT, *map(str, args)],
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def launch(self, command: str, env: dict | None = None) -> Run:
        """Start ``command`` in the background; its output and exit status land in /tmp/run-N.*."""
        self._runs += 1
        run = Run(self, f"/tmp/run-{self._runs}")
        env_args = [arg for k, v in {**FAST, **(env or {})}.items() for arg in ("-e", f"{k}={v}")]
        script = (f"{command} > {run.path}.log 2>&1 & echo $! > {run.path}.pid; "
                  f"wait $!; echo $? > {run.path}.rc")
        # Not detached: this `docker exec` ends when the script does, so the run's end is waited on
        # here, instead of looking for the .rc file again and again.
        run.process = subprocess.Popen(["docker", "exec", *env_args, self.name, "sh", "-c", script],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        return run

    def rank_pid(self, rank: int) -> int:
        """The process of MPI rank ``rank`` (found by the rank mpirun put in its environment)."""
        found = self.sh("for p in /proc/[0-9]*; do tr '\\0' '\\n' < $p/environ 2>/dev/null | "
                        f"grep -qx OMPI_COMM_WORLD_RANK={rank} && echo ${{p#/proc/}}; done").stdout.split()
        assert len(found) == 1, f"rank {rank}: processes {found}"
        return int(found[0])


class Run:
    def __init__(self, box: Box, path: str) -> None:
        self.box = box
        self.path = path
        self.process: subprocess.Popen | None = None  # the `docker exec` running it, until it ends

    @property
    def log(self) -> str:
        return self.box.sh(f"cat {self.path}.log").stdout

    def exit_code(self) -> int | None:
        text = self.box.sh(f"cat {self.path}.rc 2>/dev/null").stdout.strip()
        return int(text) if text else None

    def wait_ready(self, port: int, timeout: float = 60) -> Run:
        def health() -> int:
            assert self.process.poll() is None, f"exited early:\n{self.log}"
            return self.box.client("health", port)

        until(health, timeout, f"the stand-in to answer /health on port {port} with 200",
              done=lambda status: status == 200)
        return self

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.log}") from None
        code = self.exit_code()
        assert code is not None, f"its `docker exec` ended without an exit status:\n{self.log}"
        return code

    def stop(self) -> None:
        """SIGTERM mpirun (it forwards to every rank), then SIGKILL what is left; bounded."""
        if self.process.poll() is not None:
            return
        self.box.sh(f"kill -TERM $(cat {self.path}.pid) 2>/dev/null")
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.box.sh(f"kill -KILL $(cat {self.path}.pid) 2>/dev/null")
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def box(standin_image, tmp_path_factory):
    name = f"trtllm-deploy-standin-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "-d", "--init", "--rm", "--network", "none", "--name", name,
                    "--label", "trtllm-deploy-test=1", standin_image,
                    "sleep", "infinity"],  # keeps the container up to exec into
                   check=True, capture_output=True, timeout=120)
    try:
        model = write_checkpoint(tmp_path_factory.mktemp("image") / "model")
        subprocess.run(["docker", "cp", str(model), f"{name}:/model"], check=True, capture_output=True,
                       timeout=60)
        yield Box(name)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)


@pytest.fixture
def launch(box):
    """``launch(command, env)``; every run still going at the end of the test is stopped."""
    runs: list[Run] = []

    def start(command: str, env: dict | None = None) -> Run:
        runs.append(box.launch(command, env))
        return runs[-1]

    yield start
    for run in runs:
        run.stop()


_ports = iter(range(8100, 8200))


def serve(ranks: int, port: int, extra: str = "") -> str:
    return (f"{MPIRUN.format(ranks=ranks)} trtllm-serve /model --tp_size {ranks} --host 127.0.0.1 "
            f"--port {port} {extra}")


def test_executables_say_stand_in(box):
    result = box.sh("trtllm-serve --version; vllm --version; trtllm-serve /model --foo; echo rc=$?")
    assert "trtllm-serve stand-in" in result.stdout and "not TensorRT-LLM" in result.stdout
    assert "vllm stand-in" in result.stdout and "rc=2" in result.stdout
    assert "Error: No such option: --foo" in result.stderr
    labels = subprocess.run(["docker", "inspect", "--format", "{{json .Config.Labels}}", box.name],
                            capture_output=True, text=True, check=True).stdout
    assert json.loads(labels)["io.trtllm-deploy.standin"] == "true"


def test_three_ranks_serve_a_streamed_completion(box, launch):
    port = next(_ports)
    run = launch(serve(3, port)).wait_ready(port)
    result = box.client("stream", port, "The capital of France is", 8, 30)
    assert result == {"words": expected_words("The capital of France is", 8, 3), "end": "done"}
    (entry,) = box.client("get", port, "/v1/models")["data"]
    assert entry["standin"] is True and entry["metadata"]["world_size"] == 3
    log = run.log
    for rank in range(3):
        assert f"[TensorRT-LLM stand-in][rank {rank}][INFO] Loading weights: 4/4 shards" in log
    assert "[rank 1][INFO] artifact ok: /model: model_type=llama" in log


def test_sigterm_to_rank_0_shuts_every_rank_down_cleanly(box, launch):
    port = next(_ports)
    run = launch(serve(3, port)).wait_ready(port)
    box.sh(f"kill -TERM {box.rank_pid(0)}")
    assert run.wait_exit(timeout=30) == 0
    assert "[rank 0][INFO] shut down cleanly" in run.log


def test_killing_a_worker_rank_takes_serving_down(box, launch):
    port = next(_ports)
    run = launch(serve(3, port)).wait_ready(port)
    box.sh(f"kill -9 {box.rank_pid(2)}")
    assert run.wait_exit(timeout=30) != 0
    assert box.client("health", port) is None
    assert "exited on signal 9" in run.log


def test_a_stopped_worker_rank_stalls_every_token(box, launch):
    port = next(_ports)
    launch(serve(3, port)).wait_ready(port)
    worker = box.rank_pid(1)
    box.sh(f"kill -STOP {worker}")
    try:
        assert box.client("stream", port, "stalled", 5, 3) == {"words": [], "end": "stalled"}
        assert box.client("health", port) == 200  # the port alone says nothing about serving
    finally:
        box.sh(f"kill -CONT {worker}")
    result = box.client("stream", port, "resumed", 5, 30)
    assert result == {"words": expected_words("resumed", 5, 3), "end": "done"}


@pytest.mark.parametrize("spec, words, line", [
    pytest.param("exit:3@1", 2, "[rank 1][WARNING] STANDIN_FAULT exit:3@1: injecting 'exit' at token 3",
                 id="exit"),
    pytest.param("nccl:2@1", 1, "[rank 1][ERROR] " + faults.NCCL_LINE, id="nccl"),
    pytest.param("double-free:2@1", 1, "[rank 1][ERROR] " + faults.DOUBLE_FREE_LINE, id="double-free"),
])
def test_a_failing_rank_ends_serving_mid_stream(box, launch, spec, words, line):
    port = next(_ports)
    run = launch(serve(2, port), {"STANDIN_FAULT": spec}).wait_ready(port)
    result = box.client("stream", port, "p", 10, 30)
    assert (len(result["words"]), result["end"]) == (words, "closed")
    assert result["words"] == expected_words("p", words, 2)
    assert run.wait_exit(timeout=30) != 0
    assert line in run.log
    if spec.startswith("double-free"):
        assert "exited on signal 6 (Aborted)" in run.log


def test_a_hung_rank_stalls_serving(box, launch):
    port = next(_ports)
    run = launch(serve(2, port), {"STANDIN_FAULT": "hang:3@1"}).wait_ready(port)
    result = box.client("stream", port, "p", 10, 3)
    assert result == {"words": expected_words("p", 2, 2), "end": "stalled"}
    assert box.client("health", port) == 200 and run.exit_code() is None
    assert "[rank 1][WARNING] STANDIN_FAULT hang:3@1: injecting 'hang' at token 3" in run.log


@pytest.mark.parametrize("spec, line", [
    pytest.param("oom@1", "[rank 1][ERROR] " + faults.OOM_LINE, id="oom-while-loading"),
    pytest.param("nccl@1", "[rank 1][ERROR] " + faults.NCCL_LINE, id="nccl-at-start-up"),
    pytest.param("bind", "[rank 0][ERROR] [Errno 98] error while attempting to bind on address "
                 "('127.0.0.1', {port}): address already in use", id="bind"),
])
def test_start_up_failures(box, launch, spec, line):
    port = next(_ports)
    run = launch(serve(2, port), {"STANDIN_FAULT": spec})
    assert run.wait_exit(timeout=60) != 0
    assert line.format(port=port) in run.log
    assert "Application startup complete." not in run.log and box.client("health", port) is None


@pytest.mark.parametrize("command, message", [
    pytest.param("mpirun --allow-run-as-root --oversubscribe -np 2 trtllm-serve /model --tp_size 2",
                 "without trtllm-llmapi-launch", id="no-launcher"),
    pytest.param(f"{MPIRUN.format(ranks=2)} trtllm-serve /model --tp_size 3",
                 "MPI world size 2 does not match tp_size 3 x pp_size 1 = 3", id="world-size-mismatch"),
    pytest.param(f"{MPIRUN.format(ranks=2)} trtllm-serve /tampered --tp_size 2",
                 "/tampered/model-00001-of-00002.safetensors: hash:", id="tampered-artifact"),
])
def test_refused_launches(box, launch, command, message):
    box.sh("[ -d /tampered ] || { cp -r /model /tampered && printf x | "
           "dd of=/tampered/model-00001-of-00002.safetensors bs=1 count=1 conv=notrunc 2>/dev/null; }")
    run = launch(command)
    assert run.wait_exit(timeout=60) != 0
    assert message in run.log and "Loading weights" not in run.log


def test_vllm_answers(box, launch):
    port = next(_ports)
    launch(f"vllm serve /model --tensor-parallel-size 2 --distributed-executor-backend mp "
           f"--host 127.0.0.1 --port {port}").wait_ready(port)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    reply = box.client("post", port, "/v1/chat/completions", json.dumps(body), 30)
    assert reply["status"] == 200 and reply["body"]["model"] == "/model (stand-in)"
    assert reply["body"]["choices"][0]["message"]["content"].split() == expected_words("user: hi", 4, 2)
