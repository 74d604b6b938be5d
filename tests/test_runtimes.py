"""Runtimes as data: each record's command line, image, per-node environment and failures, and the
lookups launch, rollback, advise and bench use instead of a runtime's name. Pure: no Docker."""

from __future__ import annotations

import pytest

from trtllm_deploy.errors import InputError
from trtllm_deploy.runtimes import runtime
from trtllm_deploy.runtimes.runtime import Serve
from trtllm_deploy.source import lock as locks

SERVE = Serve(model="/artifacts/tiny", tp=2, pp=1, port=8355, head="10.0.0.1",
              options=("--backend", "pytorch"))


@pytest.mark.parametrize("name, expected", [
    ("trtllm", ["trtllm-llmapi-launch", "trtllm-serve", "/artifacts/tiny", "--backend", "pytorch",
                "--tp_size", "2", "--pp_size", "1", "--host", "0.0.0.0", "--port", "8355",
                "--config", "/artifacts/tiny/llm-api.yaml"]),
    ("vllm", ["vllm", "serve", "/artifacts/tiny", "--tensor-parallel-size", "2",
              "--pipeline-parallel-size", "1", "--distributed-executor-backend", "mp", "--nnodes", "2",
              "--master-addr", "10.0.0.1", "--master-port", "29501", "--host", "0.0.0.0",
              "--port", "8355"]),
], ids=["trtllm", "vllm"])
def test_each_runtime_builds_its_own_command_line(name, expected):
    argv = runtime.get(name).program(SERVE)
    assert argv[-len(expected):] == expected


def test_the_roles_and_the_help_text_come_from_the_records():
    assert runtime.default().name == "trtllm" and runtime.rollback().name == "vllm"
    assert runtime.names() == ("trtllm", "vllm")
    assert runtime.choices() == "trtllm (default) or vllm"
    with pytest.raises(InputError, match="expected one of trtllm, vllm"):
        runtime.get("sglang")


def test_only_the_runtime_that_needs_it_announces_an_address():
    assert runtime.get("trtllm").node_env("192.0.2.1") == {}
    assert runtime.get("vllm").node_env("192.0.2.1") == {"VLLM_HOST_IP": "192.0.2.1"}
    assert runtime.node_vars() == ("VLLM_HOST_IP",)


@pytest.mark.parametrize("format, trtllm, vllm", [
    ("pytorch", ("--backend", "pytorch"), ()),
    ("tensorrt", ("--backend", "tensorrt", "--tokenizer", "/m/tokenizer"), None),
], ids=["checkpoint", "engines"])
def test_options_and_formats(format, trtllm, vllm):
    assert runtime.get("trtllm").options(format, "/m") == trtllm
    assert runtime.get("trtllm").format_of(trtllm) == format
    served = runtime.get("vllm")
    assert (format in served.formats) == (vllm is not None)
    if vllm is not None:  # what rollback records as the vLLM deployment's options
        assert served.options(format, "/m") == vllm


@pytest.mark.parametrize("said, expected", [
    (("vllm", "trtllm-deploy stand-in (not a real runtime)", "uvicorn"), "vllm"),
    (("trtllm-serve", "trtllm-deploy stand-in (not a real runtime)", "uvicorn"), "trtllm"),
    (("", "vllm", ""), "vllm"),
    (("", "tensorrt_llm", ""), "trtllm"),
    (("", "", "uvicorn"), "unknown"),
], ids=["vllm-standin", "trtllm-standin", "real-vllm", "real-trtllm", "unknown"])
def test_the_runtime_an_endpoint_says_it_is(said, expected):
    assert runtime.of_endpoint(*said) == expected


def test_the_rollback_image_is_the_locks_table_else_the_default(tmp_path):
    path = tmp_path / "lock.toml"
    path.write_text('[source]\nrepository = "x"\n[build]\n')
    assert runtime.rollback().image(locks.load(path)) == "nvcr.io/nvidia/vllm:26.05-py3"
    path.write_text('[source]\nrepository = "x"\n[build]\n[vllm]\nimage = "mine@sha256:1"\n')
    pinned = locks.load(path)
    assert runtime.rollback().image(pinned) == "mine@sha256:1"
    assert '[vllm]\nimage = "mine@sha256:1"' in locks.dumps(pinned.lock)


def test_failures_are_tied_to_the_runtimes_that_show_them():
    trtllm = {known.name for known in runtime.get("trtllm").known_failures}
    vllm = {known.name for known in runtime.get("vllm").known_failures}
    assert "a memory corruption crash (double free)" in trtllm - vllm
    assert "CUDA out of memory" in trtllm & vllm
