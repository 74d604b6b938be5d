"""engine.build making its artifact inside the runtime image, end to end: quantizing with Model
Optimizer's hf_ptq.py and TensorRT engines with convert_checkpoint.py + trtllm-build.

The image is the stand-in (docker/standin/): its tools take the real options and write the real
layouts without a GPU. Model Optimizer is a git repository the test makes, whose hf_ptq.py runs the
stand-in's; the checkpoint comes from the local Hub server (tests/fakehub.py)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fakehub import FakeHub, Repo, hub_env, local_hosts, model_entry
from trtllm_deploy.artifact import convert, manifest
from trtllm_deploy.errors import DeployError
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.serving import launch

ROOT = Path(__file__).resolve().parents[1]
SHA = "c0ffee00" * 5
TOKEN = "hf_convertTestTokenNeverShown0123456789"


def safetensors(size: int) -> bytes:
    header = json.dumps({"w": {"dtype": "BF16", "shape": [size // 2], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + os.urandom(size)


def checkpoint(model_type: str = "llama", **extra) -> dict[str, bytes]:
    config = {"model_type": model_type, "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16",
              **extra}
    return {"config.json": json.dumps(config).encode(),
            "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
            "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
            "model.safetensors": safetensors(256 * 1024)}


MODELS = (model_entry("tiny", "org/tiny", SHA)
          + '[models.tiny.variants.nvfp4]\nquantize_from = "bf16"\nbytes_per_param = 0.6\n'
            'tp_by_nodes = { 1 = 1 }\n\n'
          + model_entry("greedy", "org/greedy", SHA) + model_entry("odd", "org/odd", SHA))


def make_modelopt(where: Path, tag: str) -> str:
    """A Model Optimizer repository whose examples/llm_ptq/hf_ptq.py is the stand-in's."""
    script = where / "examples" / "llm_ptq" / "hf_ptq.py"
    script.parent.mkdir(parents=True)
    script.write_text("import sys\n\nfrom trtllm_deploy.testbed.standin.build import hf_ptq\n\n"
                      "sys.exit(hf_ptq(sys.argv[1:]))\n")
    git = ["git", "-C", str(where), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", str(where)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "hf_ptq"], check=True)
    subprocess.run([*git, "tag", tag], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


@pytest.fixture
def setup(tmp_path, standin_image):
    hub = FakeHub({"org/tiny": Repo("org/tiny", SHA, checkpoint()),
                   "org/greedy": Repo("org/greedy", SHA, checkpoint(standin_fault="oom")),
                   "org/odd": Repo("org/odd", SHA, checkpoint(model_type="rwkv"))})
    url = hub.start()
    commit = make_modelopt(tmp_path / "modelopt", "9.9.9")
    store = tmp_path / "engines"
    models = tmp_path / "models.toml"
    models.write_text(MODELS)
    # This machine's engine cannot raise memlock (the sandbox's hard limit): the stack only.
    hosts = local_hosts(tmp_path / "hosts.toml", store,
                        '\n[nodes.container]\nulimits = { stack = "67108864" }\n')
    lock_text = (ROOT / "requirements" / "tensorrt-llm.lock.toml").read_text()
    lock_text += (f'\n[quantize]\nrepository = "file://{tmp_path / "modelopt"}"\nref = "9.9.9"\n'
                  'calib_size = 16\n')
    lock = tmp_path / "lock.toml"
    lock.write_text(lock_text)
    trt_lock = tmp_path / "lock-trt.toml"
    trt_lock.write_text(lock_text.replace("trtllm_build = false", "trtllm_build = true"))
    env = hub_env(url, tmp_path, HF_TOKEN=TOKEN, HOME=str(tmp_path / "home"))

    def invoke(*args: str, lock_path: Path = lock) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), *args,
                               "--models-file", str(models), "--hosts", str(hosts),
                               "--lock", str(lock_path), "--image", standin_image],
                              capture_output=True, text=True, timeout=300, env=env)

    yield invoke, store, tmp_path, commit, trt_lock, standin_image
    hub.stop()


def _containers_left() -> str:
    return subprocess.run(["docker", "ps", "-a", "--filter", "name=trtllm-deploy-make-", "--format",
                           "{{.Names}}"], capture_output=True, text=True).stdout.strip()


def _provenance(folder: Path) -> dict:
    return manifest.load(folder)["provenance"]


def test_a_variant_made_by_quantizing_is_quantized_in_the_image_and_recorded(setup):
    invoke, store, tmp_path, commit, _, image = setup
    done = invoke("engine.build", "--model", "tiny", "--precision", "nvfp4", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    folder = Path(report["path"])
    assert report["action"] == "built" and folder.name.startswith("tiny-nvfp4-quantized-tp1-")
    quant = json.loads((folder / "hf_quant_config.json").read_text())
    assert quant["quantization"]["quant_algo"] == "NVFP4"
    assert convert.check_quantized(folder, "nvfp4") == "NVFP4"
    assert {"config.json", "model.safetensors", "tokenizer.json", "llm-api.yaml"} <= \
        {p.name for p in folder.iterdir()}
    provenance = _provenance(folder)
    assert provenance["quantized"]["from"] == "bf16"
    assert provenance["quantized"]["run"]["modelopt"] == {
        "repository": f"file://{tmp_path / 'modelopt'}", "ref": "9.9.9", "commit": commit, "installed": None}
    assert provenance["quantized"]["run"]["calib_size"] == 16
    assert launch.serve_backend(folder, "/model") == ("--backend", "pytorch")
    image_id = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", image],
                              capture_output=True, text=True).stdout.strip()
    assert provenance["image"]["id"] == image_id and provenance["made_in"]["id"] == image_id
    assert not manifest.verify(folder, manifest.load(folder))
    # The same inputs: nothing to do, and no container was started for it.
    again = invoke("engine.build", "--model", "tiny", "--precision", "nvfp4", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["action"] == "up to date", again.stderr
    # The token reached the container by environment only: never in output, logs or the artifact.
    log = (store / ".logs" / f"{folder.name}.log").read_text()
    assert "calibrating on 16 samples" in log
    for text in (done.stdout, done.stderr, again.stdout, again.stderr, log,
                 (folder / manifest.MANIFEST).read_text()):
        assert TOKEN not in text
    assert _containers_left() == ""


def test_quantize_flag_plans_the_16_bit_source_and_a_distinct_name(setup):
    invoke, *_ = setup
    done = invoke("engine.plan", "--model", "tiny", "--precision", "fp8", "--quantize", "--json")
    assert done.returncode == 0, done.stderr
    planned = json.loads(done.stdout)
    assert planned["quantize_from"] == "bf16" and planned["repo"] == "org/tiny"
    assert planned["artifact"].startswith("tiny-fp8-quantized-tp1-") and planned["image"]
    refused = invoke("engine.plan", "--model", "tiny", "--precision", "bf16", "--quantize")
    assert refused.returncode == 2 and "makes fp8 or nvfp4" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_running_out_of_memory_while_quantizing_is_explained_and_leaves_nothing(setup):
    invoke, store, *_ = setup
    done = invoke("engine.build", "--model", "greedy", "--precision", "fp8", "--quantize")
    assert done.returncode == 1
    assert "CUDA out of memory" in done.stderr and "drop_caches" in done.stderr, done.stderr
    assert "Traceback (most recent call last)" not in done.stderr.split("failed in")[0]
    assert [p.name for p in store.iterdir() if not p.name.startswith(".logs")] == []
    assert _containers_left() == ""


def test_tensorrt_engines_are_built_with_the_plan_flags_and_served_by_the_image(setup):
    invoke, store, _, _, trt_lock, image = setup
    done = invoke("engine.build", "--model", "tiny", "--backend", "tensorrt", "--max-input-len", "1024",
                  "--max-seq-len", "2048", "--max-batch-size", "8", "--json", lock_path=trt_lock)
    assert done.returncode == 0, done.stderr
    folder = Path(json.loads(done.stdout)["path"])
    assert "-trt-" in folder.name
    config = json.loads((folder / "config.json").read_text())
    assert config["build_config"] == {
        "max_batch_size": 8, "max_input_len": 1024, "max_seq_len": 2048, "max_num_tokens": 8192,
        "plugin_config": {"gemm_plugin": "auto"}}
    assert config["pretrained_config"]["mapping"]["tp_size"] == 1
    assert (folder / "rank0.engine").is_file() and (folder / "tokenizer" / "tokenizer.json").is_file()
    settings = yaml.safe_load((folder / "llm-api.yaml").read_text())
    assert "cuda_graph_config" not in settings and "kv_cache_config" in settings
    provenance = _provenance(folder)
    assert provenance["backend"] == "tensorrt" and provenance["engine"]["max_seq_len"] == 2048
    assert provenance["engine"]["script"].endswith("models/core/llama/convert_checkpoint.py")
    log = (store / ".logs" / f"{folder.name}.log").read_text()
    assert "--gemm_plugin auto" in log and "--tp_size 1" in log
    # Serving it (smoke, launch) takes the TensorRT backend and the tokenizer kept beside the engines.
    assert launch.serve_backend(folder, "/model") == (
        "--backend", "tensorrt", "--tokenizer", "/model/tokenizer")
    # What the image's own loader makes of it (the stand-in's checks, manifest included).
    check = subprocess.run(
        ["docker", "run", "--rm", "--volume", f"{folder}:/model:ro", image, "python3", "-c",
         "from trtllm_deploy.testbed.standin import artifact;"
         " print(artifact.check('/model', 'tensorrt').summary())"],
        capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "1 weight files" in check.stdout, check.stderr
    assert not list(store.glob(".tiny*"))  # no work or partial folder left behind


def test_tensorrt_engines_are_refused_clearly_when_they_cannot_be_made(setup):
    invoke, store, _, _, trt_lock, _ = setup
    no_build = invoke("engine.build", "--model", "tiny", "--backend", "tensorrt")
    assert no_build.returncode == 2 and "no trtllm-build" in no_build.stderr
    bad_lengths = invoke("engine.build", "--model", "tiny", "--backend", "tensorrt", "--max-input-len",
                         "4096", "--max-seq-len", "1024", lock_path=trt_lock)
    assert bad_lengths.returncode == 2 and "--max-seq-len (1024) must be at least" in bad_lengths.stderr
    pytorch_only = invoke("engine.build", "--model", "tiny", "--max-seq-len", "1024")
    assert pytorch_only.returncode == 2 and "trtllm-build settings" in pytorch_only.stderr
    unknown = invoke("engine.build", "--model", "odd", "--backend", "tensorrt", lock_path=trt_lock)
    assert unknown.returncode == 1 and "no convert_checkpoint.py for model_type 'rwkv'" in unknown.stderr
    for done in (no_build, bad_lengths, pytorch_only, unknown):
        assert "Traceback" not in done.stderr
    assert not store.exists() or [p.name for p in store.iterdir() if p.name != ".logs"] == []
    assert _containers_left() == ""


def test_what_is_looked_for_inside_an_image_is_found_there_and_only_there(standin_image, base_image):
    """The looks inside the runtime image (each a throwaway container): trtllm-build on the PATH, and
    the first convert_checkpoint.py of the examples layouts; an image without them says so."""
    here = Local()
    standin, bare = convert.head_image(here, standin_image), convert.head_image(here, base_image)
    assert (convert.has_trtllm_build(standin), convert.has_trtllm_build(bare)) == (True, False)
    found = convert.convert_script(standin, "qwen3")
    assert found == f"{convert.EXAMPLES}/models/core/qwen/convert_checkpoint.py"
    with pytest.raises(DeployError, match="no convert_checkpoint.py for model_type 'llama'"):
        convert.convert_script(bare, "llama")


@pytest.mark.parametrize("files, problem", [
    ({"config.json": "{}", "model.safetensors": ""}, "no quantization config"),
    ({"config.json": '{"quantization_config": {"quant_algo": "FP8"}}', "model.safetensors": ""},
     "quantized as FP8, not NVFP4"),
    ({"hf_quant_config.json": '{"quantization": {"quant_algo": "NVFP4"}}'}, "no config.json"),
])
def test_an_unusable_quantized_export_is_refused(tmp_path, files, problem):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DeployError, match=problem):
        convert.check_quantized(tmp_path, "nvfp4")
