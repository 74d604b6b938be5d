"""`invoke engine.plan` / `engine.build` / `engine.verify` end to end with this machine as the head
(``connection = "local"``: the same code path as a head over SSH, tests/test_engine_head.py),
against the local Hub stand-in (tests/fakehub.py) serving a small checkpoint the test generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fakehub import FakeHub, Repo, hub_env, local_hosts, model_entry
from trtllm_deploy.artifact import manifest

ROOT = Path(__file__).resolve().parents[1]
SHA = "5e1d0c3b" * 5
WEIGHTS = os.urandom(2 * 1024 * 1024)
FILES = {"config.json": b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}',
         "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
         "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
         "model.safetensors": WEIGHTS, "pytorch_model.bin": b"not for serving"}


@pytest.fixture
def setup(tmp_path):
    hub = FakeHub({"org/tiny": Repo("org/tiny", SHA, dict(FILES))})
    url = hub.start()
    store = tmp_path / "engines"
    models = tmp_path / "models.toml"
    models.write_text(model_entry("tiny", "org/tiny", SHA, description="a tiny checkpoint for tests")
                      + model_entry("huge", "org/tiny", SHA, 5000, "too big for any node"))
    hosts = local_hosts(tmp_path / "hosts.toml", store)
    lock = tmp_path / "lock.toml"
    lock.write_text((ROOT / "requirements" / "tensorrt-llm.lock.toml").read_text())
    env = hub_env(url, tmp_path)

    def invoke(*args: str) -> subprocess.CompletedProcess:
        with_lock = ["--lock", str(lock)] if args[0] != "engine.verify" else []
        return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), *args,
                               "--hosts", str(hosts), *with_lock],
                              capture_output=True, text=True, timeout=120, env=env)

    yield invoke, hub, store, models, tmp_path
    hub.stop()


def test_build_makes_a_whole_verified_artifact_then_is_up_to_date(setup):
    invoke, hub, store, models, tmp_path = setup
    done = invoke("engine.build", "--model", "tiny", "--models-file", str(models), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["action"] == "built" and report["revision"] == SHA and report["node"] == "here"
    artifact = Path(report["path"])
    # Downloaded into the head's Hugging Face cache (its paths.model_cache), in the Hub's layout;
    # nothing in the Hugging Face home of the process that ran invoke.
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / SHA
    assert (snapshot / "model.safetensors").resolve().parent.name == "blobs"
    assert not (tmp_path / "hf-home").exists()
    assert artifact.parent == store and artifact.name.startswith("tiny-bf16-tp1-")
    names = sorted(p.name for p in artifact.iterdir())
    assert names == ["config.json", "llm-api.yaml", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "trtllm-deploy-manifest.json"]
    assert (artifact / "model.safetensors").read_bytes() == WEIGHTS
    assert (artifact / "model.safetensors").stat().st_nlink == 2  # linked from the Hub cache, not copied
    settings = yaml.safe_load((artifact / "llm-api.yaml").read_text())
    assert settings["disable_overlap_scheduler"] is True  # one node
    assert settings["kv_cache_config"]["free_gpu_memory_fraction"] == 0.9
    made = manifest.load(artifact)
    assert made["provenance"]["revision"] == SHA and made["provenance"]["repo"] == "org/tiny"
    assert manifest.verify(artifact, made) == []
    assert not list(store.glob(".*"))  # no half-made artifact left beside it

    bodies = [s for s in hub.seen if s.method == "GET" and "/resolve/" in s.path]
    again = invoke("engine.build", "--model", "tiny", "--models-file", str(models), "--json")
    assert json.loads(again.stdout)["action"] == "up to date"
    assert [s for s in hub.seen if s.method == "GET" and "/resolve/" in s.path] == bodies

    # engine.verify on the node (here: this machine) agrees; a damaged file is named, and the
    # next build puts the artifact right.
    assert invoke("engine.verify", "--name", artifact.name).returncode == 0
    damaged = artifact / "tokenizer.json"
    damaged.unlink()  # a hard link: replace the file rather than write through to the cache
    damaged.write_bytes(b'{"version": "2.0", "model": {"type": "BPE"}}')
    refused = invoke("engine.verify", "--name", artifact.name)
    assert refused.returncode == 1 and "tokenizer.json" in refused.stdout + refused.stderr
    fixed = invoke("engine.build", "--model", "tiny", "--models-file", str(models), "--json")
    assert json.loads(fixed.stdout)["action"] == "built"
    assert invoke("engine.verify", "--name", artifact.name).returncode == 0


def test_a_plan_that_cannot_fit_is_refused_before_any_download(setup):
    invoke, hub, store, models, _ = setup
    done = invoke("engine.build", "--model", "huge", "--models-file", str(models))
    assert done.returncode == 2
    assert "does not fit" in done.stderr and "what to do:" in done.stderr
    assert hub.seen == [] and not store.exists()


def test_the_tensorrt_backend_is_refused_where_the_pin_has_no_trtllm_build(setup):
    invoke, hub, store, models, tmp = setup
    assert "trtllm_build = false" in (tmp / "lock.toml").read_text()
    done = invoke("engine.plan", "--model", "tiny", "--models-file", str(models), "--backend", "tensorrt")
    assert done.returncode == 2
    assert "no trtllm-build" in done.stderr and "removed" in done.stderr
    assert hub.seen == []
